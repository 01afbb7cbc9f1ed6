"""The typed schema of ``params.yaml``: the single source of every value convpipe uses.

Every section rejects unknown keys with a did-you-mean, and every value is checked for type
and range, so a typo fails at load time with the key, what was expected and what was found.
Defaults live only in ``params.yaml``: the schema requires every key, so there is no second
default hidden in code.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from convpipe.errors import ConvpipeError

DEFAULT_PARAMS = "params.yaml"

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
FloatRange = tuple[float, float]


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are not coerced silently."""

    # attribute docstrings become field descriptions: the params reference (docs/params.md)
    # shows them for keys params.yaml cannot comment (those of list items)
    model_config = ConfigDict(
        extra="forbid", strict=False, frozen=True, use_attribute_docstrings=True
    )


class BaseParams(Section):
    """Shared by every stage."""

    seed: NonNegInt


class PathsParams(Section):
    """Where each artifact lives; ``dvc.yaml`` reads the same keys through ``${paths.*}``."""

    prepared: str
    augmented: str
    augment_preview: str
    checkpoints: str
    model: str
    run_info: str
    calibration: str
    train_metrics: str
    train_history: str
    eval_metrics: str
    eval_confusion: str
    eval_per_class: str
    eval_calibration: str
    eval_roc: str
    eval_pr: str
    confusion_png: str
    misclassified_png: str
    curves_png: str
    reliability_png: str
    roc_pr_png: str
    gradcam_png: str
    tuning_reports: str
    tuning_checkpoints: str
    init_source: str


class CsvParams(Section):
    """Layout of a ``label,p0,p1,...`` CSV file."""

    image_shape: tuple[PositiveInt, PositiveInt] | tuple[PositiveInt, PositiveInt, PositiveInt]
    label_column: NonNegInt


#: ``data.resize``: how an image meets ``data.image_size`` (see ``convpipe.data.images.fit``).
ResizeMode = Literal["stretch", "crop", "pad"]
#: ``data.format``: how prepare and augment store images (``convpipe.data.streaming``).
DataFormat = Literal["npy", "litdata"]
#: The object stores LitData streams from (``runtime.stream_from``): its URL schemes.
STREAM_SCHEMES = ("s3", "gs", "r2", "azure", "hf")
#: The weight penalty (``train.reg_type``): allowed values are read from here everywhere.
RegType = Literal["none", "l1", "l2"]
#: Test-time augmentation (``evaluate.tta``), also what the served model accepts.
TtaMode = Literal["none", "flip", "translate", "flip_translate"]


class DataParams(Section):
    """The prepare stage: where images come from and how they are normalised and split."""

    source: Literal["digits", "imagefolder", "mnist_idx", "cifar", "csv"]
    path: str | None
    image_size: PositiveInt | tuple[PositiveInt, PositiveInt] | None
    resize: ResizeMode
    channels: Literal["auto", 1, 3]
    val_fraction: Fraction
    test_fraction: Fraction
    on_bad_file: Literal["error", "skip"]
    chunk_size: PositiveInt
    format: DataFormat
    csv: CsvParams

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "data.val_fraction + data.test_fraction must be < 1 so the train split is not "
                f"empty, got {self.val_fraction} + {self.test_fraction}"
            )
        if self.source != "digits" and not self.path:
            raise ValueError(f"data.path is required for data.source '{self.source}', got null")
        if self.resize != "stretch" and self.image_size is None:
            raise ValueError(
                f"data.resize {self.resize} fits images into data.image_size, which is null: "
                "set data.image_size (e.g. 64) or data.resize: stretch"
            )
        return self

    def size_hw(self) -> tuple[int, int] | None:
        """``image_size`` as ``(height, width)``, or None to keep the native size."""
        if self.image_size is None:
            return None
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        return (int(self.image_size[0]), int(self.image_size[1]))


class Toggle(Section):
    """An augmentation applied with probability ``p`` (0 disables it)."""

    p: Probability
    """probability of applying it to an image (0: off)"""


class CropParams(Toggle):
    """Pad by ``padding`` pixels, then crop back to the image size at a random place."""

    padding: NonNegInt
    border: Literal["constant", "reflect"]


class ResizedCropParams(Toggle):
    """Crop a random area fraction ``scale`` with aspect ``ratio``, resize to the image size."""

    scale: FloatRange
    ratio: FloatRange


class AffineParams(Toggle):
    """Shift (fraction of the size), rescale (zoom factor range) and rotate (degrees)."""

    shift: Annotated[float, Field(ge=0.0, le=0.5)]
    scale: FloatRange
    rotate: Annotated[float, Field(ge=0.0, le=180.0)]


class RotateParams(Toggle):
    """Rotate by an angle drawn from ``[-limit, limit]`` degrees."""

    limit: Annotated[float, Field(ge=0.0, le=180.0)]


class ColorJitterParams(Toggle):
    """Brightness/contrast/saturation factors drawn from ``[1-x, 1+x]``, hue shift ``[-h, h]``."""

    brightness: Annotated[float, Field(ge=0.0, le=1.0)]
    contrast: Annotated[float, Field(ge=0.0, le=1.0)]
    saturation: Annotated[float, Field(ge=0.0, le=1.0)]
    hue: Annotated[float, Field(ge=0.0, le=0.5)]


class NoiseParams(Toggle):
    """Gaussian noise with standard deviation drawn from ``std`` (fraction of full scale)."""

    std: FloatRange


class ErasingParams(Toggle):
    """Random erasing (Zhong et al. 2020): a rectangle of ``scale`` of the area, w/h ``ratio``."""

    scale: FloatRange
    ratio: FloatRange
    fill: Literal["black", "random"]


class AugmentParams(Section):
    """The augment stage: offline copies of the train split, and online augmentation in training."""

    copies: NonNegInt
    online: bool
    preview_count: PositiveInt
    crop: CropParams
    resized_crop: ResizedCropParams
    affine: AffineParams
    rotate: RotateParams
    horizontal_flip: Toggle
    vertical_flip: Toggle
    trivial_augment: Toggle
    color_jitter: ColorJitterParams
    gaussian_noise: NoiseParams
    erasing: ErasingParams

    @field_validator("copies")
    @classmethod
    def _copies_bounded(cls, value: int) -> int:
        if value > 100:
            raise ValueError(f"augment.copies must be at most 100, got {value}")
        return value


Activation = Literal[
    "relu", "leaky_relu", "elu", "gelu", "silu", "mish", "hardswish", "tanh", "sigmoid"
]


class ConvBlock(Section):
    """One convolution block: conv -> [batch norm] -> activation -> [pooling]."""

    filters: PositiveInt
    """output channels (feature maps) of the convolution"""
    kernel: PositiveInt
    """the convolution's kernel size, kernel x kernel"""
    stride: PositiveInt
    """the convolution's step: 2 halves the feature map"""
    padding: Literal["valid", "same"]
    """valid: no padding | same: ceil(size / stride) kept, as TensorFlow"""
    activation: Activation
    """the nonlinearity after the convolution (and batch norm)"""
    batch_norm: bool
    """batch normalisation between the convolution and the activation"""
    pool: Literal["max", "avg", "none"]
    """pooling after the activation"""
    pool_size: PositiveInt
    """pooling window and step, pool_size x pool_size"""


#: A bottleneck block's 1x1 expansion: its 3x3 conv has ``filters / BOTTLENECK_EXPANSION``
#: channels (He et al. 2016: 64 -> 256).
BOTTLENECK_EXPANSION = 4


class ResidualStage(Section):
    """``blocks`` residual blocks with ``filters`` output channels, after the conv blocks.

    The first block has stride ``stride`` and a projection shortcut (1x1 conv + BN) when the
    stride or the width changes; the rest keep the size and add their input unchanged.
    """

    block: Literal["basic", "bottleneck"]
    """basic: two 3x3 convs | bottleneck: 1x1, 3x3, 1x1 (ResNet-50's)"""
    filters: PositiveInt
    """output channels of each block (a bottleneck's 3x3 conv has a quarter)"""
    blocks: PositiveInt
    """residual blocks in the stage"""
    stride: PositiveInt
    """the first block's stride: 2 halves the feature map"""
    activation: Activation
    """the nonlinearity inside the blocks and after each addition"""

    @model_validator(mode="after")
    def _bottleneck_width(self) -> ResidualStage:
        if self.block == "bottleneck" and self.filters % BOTTLENECK_EXPANSION:
            raise ValueError(
                f"a bottleneck stage needs filters divisible by {BOTTLENECK_EXPANSION} (its 3x3 "
                f"conv has filters/{BOTTLENECK_EXPANSION} channels), got {self.filters}"
            )
        return self


class ModelParams(Section):
    """The CNN: conv blocks, residual stages, flatten or global pooling, then dense layers."""

    conv: list[ConvBlock] = Field(min_length=1)
    stages: list[ResidualStage]
    global_pool: Literal["none", "avg", "max"]
    hidden: list[PositiveInt]
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]
    batch_norm_momentum: Annotated[float, Field(gt=0.0, le=1.0)]
    batch_norm_eps: Annotated[float, Field(gt=0.0, le=1.0)]
    batch_norm_scale: bool
    pool_before_norm: bool
    conv_init: Literal["default", "dirac"]
    output_scale: Annotated[float, Field(gt=0.0)]
    whiten: bool
    init_from: str | None
    width: Annotated[float, Field(gt=0.0, le=16.0)] = 1.0
    """multiplies every conv block's and stage's filters and every hidden width (rounded; a
    bottleneck stage to a multiple of 4; a whitening first conv keeps its fixed count): one
    number that scales the network, for ``tune.space`` (1.0 in checkpoints written before it)"""

    @field_validator("init_from")
    @classmethod
    def _init_from_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(
                "model.init_from must name a checkpoint, a weights file or an MLflow model, "
                "or be empty (null)"
            )
        return value


def _widened(count: int, width: float, multiple: int = 1) -> int:
    return max(multiple, multiple * round(count * width / multiple))


def scaled_model(model: ModelParams) -> ModelParams:
    """``model`` with ``width`` applied to its filters and hidden widths (and set to 1).

    The network's builder and the shape arithmetic both start here, so they always agree;
    applying it twice changes nothing.
    """
    if model.width == 1.0:
        return model
    width = model.width
    conv = [
        block
        if i == 0 and model.whiten  # whitening fixes the first conv's filter count
        else block.model_copy(update={"filters": _widened(block.filters, width)})
        for i, block in enumerate(model.conv)
    ]
    stages = [
        stage.model_copy(
            update={
                "filters": _widened(
                    stage.filters, width, BOTTLENECK_EXPANSION if stage.block == "bottleneck" else 1
                )
            }
        )
        for stage in model.stages
    ]
    hidden = [_widened(units, width) for units in model.hidden]
    return model.model_copy(update={"conv": conv, "stages": stages, "hidden": hidden, "width": 1.0})


class TrainParams(Section):
    """The train stage: optimisation, regularisation, early stopping and the Trainer."""

    optimizer: Literal["sgd", "momentum", "nesterov", "adam", "adamw"]
    lr: Annotated[float, Field(gt=0.0)]
    lr_unit: Literal["batch", "sample"]
    norm_bias_lr_scale: Annotated[float, Field(gt=0.0)]
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)]
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)]
    mixup_alpha: Annotated[float, Field(ge=0.0)]
    cutmix_alpha: Annotated[float, Field(ge=0.0)]
    class_weights: Literal["none", "balanced"]
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)]
    reg_type: RegType
    reg_lambda: Annotated[float, Field(ge=0.0)]
    batch_size: PositiveInt | Literal["full"]
    max_epochs: PositiveInt
    max_steps: PositiveInt | None
    patience: NonNegInt
    monitor: str
    monitor_mode: Literal["min", "max"]
    scheduler: Literal[
        "none", "cosine", "step", "plateau", "onecycle", "warmup_linear", "warmup_cosine"
    ]
    warmup_epochs: Annotated[float, Field(ge=0.0)]
    freeze_epochs: NonNegInt
    backbone_lr_scale: Annotated[float, Field(gt=0.0)]
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"]
    devices: PositiveInt | Literal["auto"]
    strategy: str
    num_nodes: PositiveInt
    precision: Literal["auto", "32-true", "16-mixed", "bf16-mixed", "64-true"]
    sync_batchnorm: bool

    @model_validator(mode="after")
    def _step_budget_schedules(self) -> TrainParams:
        if self.max_steps is not None and self.scheduler in ("cosine", "step"):
            raise ValueError(
                f"train.scheduler {self.scheduler} is laid out over train.max_epochs, which "
                f"train.max_steps {self.max_steps} may cut short: use warmup_cosine, "
                "warmup_linear or onecycle (laid out over the steps that run), or "
                "max_steps: null"
            )
        return self

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainParams:
        if self.scheduler.startswith("warmup_") and self.warmup_epochs >= self.max_epochs:
            raise ValueError(
                f"train.warmup_epochs must be below train.max_epochs for train.scheduler "
                f"{self.scheduler}, got {self.warmup_epochs} >= {self.max_epochs}"
            )
        return self

    @field_validator("monitor")
    @classmethod
    def _monitor_namespaced(cls, value: str) -> str:
        if not value.startswith(("train/", "val/")):
            raise ValueError(
                f"train.monitor must name a 'val/...' or 'train/...' metric, got '{value}'"
            )
        return value


class RuntimeParams(Section):
    """How a training runs, never what it learns (beyond float rounding).

    The DataLoader workers, the CPU threads per process, the NHWC memory layout,
    ``torch.compile`` and where batches are transformed (and kept). No stage lists this
    section as a DVC param, checkpoints do not store it and a resumed training may change it:
    set it for the machine at hand.
    """

    num_workers: NonNegInt
    threads: PositiveInt | Literal["auto"]
    channels_last: bool
    compile: bool
    batch_transform: Literal["auto", "loader", "device"]
    resident: bool
    system_metrics_seconds: NonNegInt
    """seconds between samples of MLflow's system metrics on the training run (0: none)"""
    stream_from: str | None
    """data.format litdata: an object-store URL holding a copy of the project's data folders
    (e.g. s3://bucket/convpipe): splits stream from <url>/<paths.prepared>/<split>; empty:
    the local folders"""

    @model_validator(mode="after")
    def _resident_on_device(self) -> RuntimeParams:
        if self.resident and self.batch_transform == "loader":
            raise ValueError(
                "runtime.resident: true keeps the images on the model's device, so they are "
                "transformed there: set runtime.batch_transform to device or auto"
            )
        return self

    @field_validator("stream_from")
    @classmethod
    def _an_object_store_url_without_credentials(cls, value: str | None) -> str | None:
        # the value is not echoed: a password in it would reach the terminal and logs
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in STREAM_SCHEMES or not parts.netloc:
            raise ValueError(
                "runtime.stream_from must be an object-store URL LitData reads "
                f"({', '.join(f'{s}://' for s in STREAM_SCHEMES)}), e.g. s3://bucket/convpipe, "
                "or empty for the local folders"
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "runtime.stream_from holds credentials, and params.yaml goes to git and MLflow: "
                "remove them and give them as the store's own environment variables "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...)"
            )
        return value

    @field_validator("threads", mode="before")
    @classmethod
    def _threads_positive_or_auto(cls, value: Any) -> Any:
        # one message instead of pydantic's two union branches ('constrained-int', 'literal')
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value > 0
        ):
            return value
        raise ValueError(f"runtime.threads must be a number >= 1 or 'auto', got {value!r}")


class EvaluateParams(Section):
    """The evaluate stage: test-time augmentation, extra metrics and pictures."""

    tta: TtaMode
    top_k: Annotated[int, Field(ge=2)]
    misclassified: PositiveInt
    calibration: Literal["none", "temperature"]
    """``temperature``: divide the logits by one temperature fitted on the validation split
    (Guo et al. 2017): confidences that mean what they say, the same predictions"""
    promotion_alpha: Annotated[float, Field(gt=0.0, lt=1.0)]
    """the level of McNemar's exact test a new version must pass against the champion, on
    the same test images, to take the ``champion`` alias"""


class MlflowParams(Section):
    """Where runs are tracked."""

    tracking_uri: str
    experiment: str
    registered_model: str = Field(min_length=1)


class FloatDim(Section):
    """A float drawn from ``[low, high]`` (log-uniform if ``log``)."""

    type: Literal["float"]
    low: float
    high: float
    log: bool

    @model_validator(mode="after")
    def _check(self) -> FloatDim:
        _check_range(self.low, self.high, self.log)
        return self


class IntDim(Section):
    """An integer drawn from ``[low, high]`` (log-uniform if ``log``)."""

    type: Literal["int"]
    low: int
    high: int
    log: bool

    @model_validator(mode="after")
    def _check(self) -> IntDim:
        _check_range(self.low, self.high, self.log)
        return self


class CategoricalDim(Section):
    """One of ``choices``."""

    type: Literal["categorical"]
    choices: list[str | int | float | bool] = Field(min_length=1)


def _check_range(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"a search range needs low <= high, got low={low}, high={high}")
    if log and low <= 0:
        raise ValueError(f"a log-scale search range needs low > 0, got low={low}")


SearchDim = Annotated[FloatDim | IntDim | CategoricalDim, Field(discriminator="type")]


_CONSTRAINT = re.compile(r"\s*([A-Za-z_][\w/]*)\s*(<=|>=)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*")


class Constraint(Section):
    """One ``tune.constraints`` entry, written ``"latency_ms <= 10"`` in params.yaml."""

    metric: str
    op: Literal["<=", ">="]
    bound: float

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        found = _CONSTRAINT.fullmatch(value)
        if found is None:
            raise ValueError(
                f"tune.constraints entry {value!r} is not '<metric> <= <number>' or "
                "'<metric> >= <number>' (e.g. 'latency_ms <= 10')"
            )
        return {"metric": found[1], "op": found[2], "bound": float(found[3])}

    @model_serializer
    def _to_text(self) -> str:
        return str(self)

    def violation(self, value: float) -> float:
        """How far ``value`` is outside the bound: <= 0 when it is met (Optuna's convention)."""
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


class TuneParams(Section):
    """``convpipe tune``: an Optuna study over any params keys, on the validation split."""

    study_name: str
    storage: str
    n_trials: PositiveInt
    max_epochs: PositiveInt
    sampler: Literal["tpe", "random", "gp", "cmaes", "nsgaii", "qmc"]
    """tpe | random | gp (Gaussian process) | cmaes (continuous and integer spaces only) |
    nsgaii (a genetic algorithm, population ``startup_trials``) | qmc (scrambled Sobol points);
    every one seeded from ``base.seed``."""
    startup_trials: NonNegInt
    pruner: Literal["median", "hyperband", "none"]
    warmup_epochs: NonNegInt
    heartbeat_seconds: PositiveInt
    retries: NonNegInt
    """How many times a trial whose worker died, was preempted or interrupted is run again from
    its last checkpoint (``paths.tuning_checkpoints``); 0: never, it stays FAIL."""
    objectives: list[str] = Field(default_factory=list)
    """What a trial is scored on: validation metrics (``val/acc``, ``val/loss``, ...) and measured
    costs (``params``, ``flops``, ``latency_ms``, ``batch_latency_ms``); empty: ``train.monitor``
    alone. Two or more make a multi-objective study (a Pareto front, no pruning)."""
    constraints: list[Constraint] = Field(default_factory=list)
    """Bounds a trial must meet to count (``latency_ms <= 10``, ``params <= 1e6``): on the same
    metrics as ``objectives``; infeasible trials are kept, marked, and never applied."""
    space: dict[str, SearchDim] = Field(min_length=1)

    @model_validator(mode="after")
    def _sampler_fits_the_space(self) -> TuneParams:
        # CMA-ES models float and int dimensions only; Optuna would draw the others at random
        # without a word, which is not the search the user asked for
        categorical = [key for key, dim in self.space.items() if isinstance(dim, CategoricalDim)]
        if self.sampler == "cmaes" and categorical:
            raise ValueError(
                f"tune.sampler cmaes searches float and int dimensions only, but tune.space "
                f"'{categorical[0]}' is categorical: use tune.sampler tpe or gp, or search it "
                "as an int or float"
            )
        return self


class Params(Section):
    """All of ``params.yaml``."""

    base: BaseParams
    paths: PathsParams
    data: DataParams
    augment: AugmentParams
    model: ModelParams
    train: TrainParams
    runtime: RuntimeParams
    evaluate: EvaluateParams
    mlflow: MlflowParams
    tune: TuneParams

    @model_validator(mode="after")
    def _init_checks(self) -> Params:
        init = self.model.init_from
        if self.train.freeze_epochs and init is None:
            raise ValueError(
                f"train.freeze_epochs {self.train.freeze_epochs} freezes trained layers, but "
                "model.init_from is empty: set it to the model to start from, or "
                "train.freeze_epochs to 0"
            )
        own = (self.paths.model, self.paths.checkpoints)
        if init is not None and any(_same_or_inside(init, path) for path in own):
            raise ValueError(
                f"model.init_from {init} is the train stage's own output, which dvc removes "
                f"before training: copy it first (cp {init} models/init.ckpt) and start from "
                "the copy, or use models:/<name>@champion"
            )
        return self


def _same_or_inside(path: str, place: str) -> bool:
    """Whether ``path`` is ``place`` or inside it (both relative to the project, normalised)."""
    mine, theirs = os.path.normpath(path), os.path.normpath(place)
    return mine == theirs or mine.startswith(theirs + os.sep)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The params section model an annotation holds (directly or as a list item), if any."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _known_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names valid at ``loc`` (the parent of an unknown key)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if current is not None else None
        current = _section_model(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else []


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# Keys that moved to another section, for a params file written before the move.
MOVED_KEYS = {f"train.{key}": f"runtime.{key}" for key in RuntimeParams.model_fields}


def describe_error(error: Any, source: str) -> ConvpipeError:
    """Turn the first pydantic error into a user-facing :class:`ConvpipeError`."""
    loc = tuple(error["loc"])
    key = _dotted(loc)
    if error["type"] == "extra_forbidden" and key in MOVED_KEYS:
        return ConvpipeError(
            f"unknown key '{key}'", f"in {source}", f"it is now '{MOVED_KEYS[key]}': move it there"
        )
    if error["type"] == "extra_forbidden":
        choices = _known_keys(Params, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        hint = f"did you mean '{_dotted((*loc[:-1], close[0]))}'?" if close else ""
        valid = f"valid keys here: {', '.join(choices)}" if choices else ""
        return ConvpipeError(f"unknown key '{key}'", f"in {source}", hint or valid)
    if error["type"] == "missing":
        return ConvpipeError(f"missing key '{key}'", f"in {source}", "add it (see docs/params.md)")
    got = error.get("input")
    msg = error["msg"]
    if error["type"] == "value_error":
        return ConvpipeError(msg.removeprefix("Value error, "), f"in {source}", "fix the value")
    return ConvpipeError(f"'{key}': {msg.lower()}, got {got!r}", f"in {source}", "fix the value")


def parse_params(raw: Any, source: str = DEFAULT_PARAMS) -> Params:
    """Validate an already-loaded mapping against the schema.

    Raises:
        ConvpipeError: naming the first bad key, what was expected and what was received.
    """
    if not isinstance(raw, dict):
        raise ConvpipeError(
            f"params must be a mapping of sections, got {type(raw).__name__}",
            f"in {source}",
            "see the params.yaml shipped with convpipe",
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise describe_error(exc.errors()[0], source) from None


def parse_yaml(text: str, where: str) -> Any:
    """``text`` as plain YAML data (safe loader, YAML 1.2), a syntax error as one line.

    Raises:
        ConvpipeError: Naming the line and column of the first syntax error, and ``where``.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConvpipeError(
            f"params file is not valid YAML: {first}", f"in {where}", "fix the syntax at that line"
        ) from None


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file with :func:`parse_yaml`; a missing file is one line too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConvpipeError(
            f"params file not found: {path}", "", "run from the project root or pass --params"
        ) from None
    return parse_yaml(text, str(path))


def load_params(path: str | os.PathLike[str] = DEFAULT_PARAMS) -> Params:
    """Load and validate ``params.yaml``."""
    return parse_params(read_yaml(path), str(path))

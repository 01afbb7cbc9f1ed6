"""The LightningModule that trains the CNN, and how it runs (threads, layout, compilation).

:class:`CNNClassifier` wraps the network of :func:`convpipe.models.network.build_cnn`: it
minimises the data loss plus the lambda/m weight penalty, logs each split's metrics, and
stores as hyperparameters only plain data, so a checkpoint reloads with
``weights_only=True``. How a training runs (the ``runtime`` section) is set on the module,
never stored with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from convpipe.config.schema import ModelParams, RuntimeParams, TrainParams, describe_error
from convpipe.errors import ConvpipeError
from convpipe.hardware import cpu_threads
from convpipe.models.mixing import mix_batch
from convpipe.models.network import build_cnn, probabilities, regularization_penalty
from convpipe.models.optim import (
    PER_STEP_SCHEDULERS,
    build_optimizer,
    build_scheduler,
    check_optimizer,
    global_batch,
)
from convpipe.models.shapes import check_inputs, is_int
from convpipe.models.whitening import first_conv, whitening_filters

__all__ = ["CNNClassifier"]

_Schema = TypeVar("_Schema", bound=BaseModel)


def _parse_section(schema: type[_Schema], value: Any, section: str) -> _Schema:
    """Re-validate a params section given as a plain mapping (or the schema object itself)."""
    if isinstance(value, schema):
        return value
    if not isinstance(value, Mapping):
        raise ConvpipeError(
            f"the '{section}' hyperparameter must be a mapping, got {type(value).__name__}",
            "in CNNClassifier(...)",
            f"pass params.{section}.model_dump()",
        )
    try:
        return schema.model_validate(dict(value))
    except ValidationError as exc:
        first = exc.errors()[0]
        error = {**first, "loc": (section, *first["loc"])}
        raise describe_error(error, "the model hyperparameters") from None


# Checkpoints written before the runtime section existed stored its keys under `train`; they
# say how that training ran, not what it learnt, so loading one drops them.
_RUNTIME_KEYS = frozenset(RuntimeParams.model_fields)


def _without_runtime_keys(train: Any) -> Any:
    """``train`` without the keys that moved to the ``runtime`` section."""
    if isinstance(train, Mapping):
        return {key: value for key, value in train.items() if key not in _RUNTIME_KEYS}
    return train


def _check_train_size(train_size: int) -> None:
    if not is_int(train_size) or train_size < 1:
        raise ConvpipeError(
            f"train_size must be a positive integer, got {train_size!r}",
            "in CNNClassifier(...)",
            "pass the number of training images (the m of the lambda/m penalty)",
        )


def _check_class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str] | None:
    if class_names is None:
        return None
    names = [str(name) for name in class_names]
    if len(names) != num_classes:
        raise ConvpipeError(
            f"got {len(names)} class names for {num_classes} classes",
            "in CNNClassifier(...)",
            "pass one name per class, in label order",
        )
    return names


def _accuracy(num_classes: int) -> Metric:
    # validate_args would check every batch's labels (a torch.unique per step); the labels
    # come from a validated manifest and the logits from this network, so skip the check.
    if num_classes == 2:
        return BinaryAccuracy(validate_args=False)
    return MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)


class CNNClassifier(L.LightningModule):
    """The CNN of :func:`build_cnn`, trained with the lambda/m penalty and logged per split.

    Logged keys (all epoch-level): ``train/loss`` (data loss J), ``train/penalty``,
    ``train/objective`` (J + penalty, what is minimised), ``train/acc``, ``val/loss``,
    ``val/acc``, ``val/count``, ``test/loss``, ``test/acc``, ``test/count`` (images evaluated,
    summed over DDP ranks).

    ``hparams`` (plain data, so checkpoints reload with ``weights_only=True``)::

        model: dict         # ModelParams.model_dump(mode="json")
        train: dict         # TrainParams.model_dump(mode="json")
        in_channels: int
        image_hw: [H, W]
        num_classes: int
        train_size: int     # m of the lambda/m penalty
        class_names: list[str] | None

    Args:
        model: The ``model`` section as a mapping (``params.model.model_dump()``); a
            :class:`ModelParams` is accepted too and stored as a mapping.
        train: The ``train`` section, likewise.
        in_channels: Image channels C (1 or 3).
        image_hw: Image ``(H, W)``.
        num_classes: Number of classes K (>= 2).
        train_size: Training-set size m (> 0).
        class_names: Optional names of the K classes, in label order.

    Raises:
        ConvpipeError: If any argument is invalid or the network does not fit the image size.
    """

    def __init__(
        self,
        model: Mapping[str, Any] | ModelParams,
        train: Mapping[str, Any] | TrainParams,
        in_channels: int,
        image_hw: Sequence[int],
        num_classes: int,
        train_size: int,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        model_params = _parse_section(ModelParams, model, "model")
        train_params = _parse_section(TrainParams, _without_runtime_keys(train), "train")
        hw = check_inputs(in_channels, image_hw, num_classes)
        _check_train_size(train_size)
        check_optimizer(train_params)
        names = _check_class_names(class_names, num_classes)
        self.save_hyperparameters(
            {
                "model": model_params.model_dump(mode="json"),
                "train": train_params.model_dump(mode="json"),
                "in_channels": int(in_channels),
                "image_hw": list(hw),
                "num_classes": int(num_classes),
                "train_size": int(train_size),
                "class_names": names,
            }
        )
        self.model_params = model_params
        self.train_params = train_params
        self.num_classes = int(num_classes)
        self.binary = num_classes == 2
        self.input_shape = (int(in_channels), *hw)
        self.net = build_cnn(model_params, in_channels, hw, num_classes)
        self.runtime: RuntimeParams | None = None  # how to run: see use_runtime()
        # MLflow tags naming the weights it started from (model.init_from), set by training
        self.init_tags: dict[str, str] = {}
        # per-class weights of the training loss (train.class_weights), see set_class_counts
        self.class_weights: Tensor | None = None
        self._compiled_net: nn.Module | None = None  # set by setup("fit") with runtime.compile
        # The epoch's training sums so far: J * n, penalty * n, correct, n. Logged once, at
        # the epoch's last step; float64 on the CPU whatever the device (MPS has no float64).
        self._train_sums = torch.zeros(4, dtype=torch.float64)
        self.val_acc = _accuracy(num_classes)
        self.test_acc = _accuracy(num_classes)
        # Images seen per evaluation split, summed over DDP ranks: proves each counts once.
        self.val_count = SumMetric()
        self.test_count = SumMetric()
        self.example_input_array = torch.zeros(1, *self.input_shape)
        # Inference divides the logits by it (temperature scaling, fitted by evaluate and set
        # by load_trained); not a weight: training and the checkpoint never see it.
        self.temperature = 1.0

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch.

        Args:
            x: Float ``(N, C, H, W)``, already normalised, with the ``C, H, W`` of training.

        Returns:
            ``(N,)`` logits of class 1 for 2 classes, else ``(N, K)`` logits; in eval mode
            divided by :attr:`temperature`.

        Raises:
            ConvpipeError: If ``x`` does not have the shape the network was built for.
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ConvpipeError(
                f"the model expects images of shape (N, {', '.join(map(str, self.input_shape))})"
                f" but got a batch of shape {tuple(x.shape)}",
                "at the model input",
                "prepare the data with the data.image_size and data.channels used in training",
            )
        if self.runtime is not None and self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        compiled = self._compiled_net
        logits = compiled(x) if compiled is not None and self.training else self.net(x)
        if not self.training and self.temperature != 1.0:
            logits = logits / self.temperature
        return logits[:, 0] if self.binary else logits

    def set_class_counts(self, counts: Sequence[int]) -> None:
        """Weight the training loss by class as ``train.class_weights`` says.

        ``balanced``: class ``k`` gets ``m / (K m_k)`` (scikit-learn's "balanced"), so each class
        adds as much to the loss as the others whatever its size; ``none`` leaves every image
        weight 1. Validation and test losses stay unweighted, so runs compare.

        Args:
            counts: Training images per class, in label order (from the manifests).

        Raises:
            ConvpipeError: A class without training images under ``balanced``.
        """
        if self.train_params.class_weights == "none":
            self.class_weights = None
            return
        if len(counts) != self.num_classes or min(counts) < 1:
            raise ConvpipeError(
                "train.class_weights balanced needs images of every class, got counts "
                f"{list(counts)}",
                "in the training split",
                "add images of the empty classes or set train.class_weights: none",
            )
        total = float(sum(counts))
        self.class_weights = torch.tensor([total / (len(counts) * c) for c in counts])

    def data_loss(
        self, logits: Tensor, y: Tensor, smoothing: float = 0.0, weighted: bool = False
    ) -> Tensor:
        """Mean data loss J of a batch.

        Args:
            logits: Output of :meth:`forward`, ``(N,)`` or ``(N, K)``.
            y: int64 labels ``(N,)`` in ``[0, K)``.
            smoothing: Label smoothing ``s`` in ``[0, 1)``: the target is ``(1 - s)`` times
                the one-hot label plus ``s / K`` for every class (``K = 2`` for the sigmoid
                unit, whose target becomes ``y (1 - s) + s / 2``). Training passes
                ``train.label_smoothing``; validation and test keep 0, so their losses
                compare across runs.
            weighted: Weight each image by its class (:meth:`set_class_counts`): the mean is
                then ``sum w_i J_i / sum w_i``, as ``F.cross_entropy(weight=...)`` takes it.

        Returns:
            Scalar: binary cross-entropy with logits for 2 classes, else cross-entropy.
        """
        weights = self.class_weights if weighted else None
        if weights is not None:
            weights = weights.to(device=logits.device, dtype=logits.dtype)
        if self.binary:
            target = y.to(logits.dtype) * (1.0 - smoothing) + smoothing / 2.0
            if weights is None:
                return F.binary_cross_entropy_with_logits(logits, target)
            each = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            w = weights[y]
            return (each * w).sum() / w.sum()
        return F.cross_entropy(logits, y, weight=weights, label_smoothing=smoothing)

    def penalty(self) -> Tensor:
        """The lambda/m weight penalty of the current weights (m = ``hparams.train_size``)."""
        train = self.train_params
        return regularization_penalty(
            self.net, train.reg_type, train.reg_lambda, int(self.hparams["train_size"])
        )

    def _shared_step(self, batch: Sequence[Tensor], split: str) -> Tensor:
        """Loss, accuracy and logging for one ``val`` or ``test`` batch.

        Args:
            batch: ``(x, y)`` with x float ``(N, C, H, W)`` and y int64 ``(N,)``.
            split: ``val`` or ``test``.

        Returns:
            The mean data loss J of the batch.
        """
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.data_loss(logits, y)
        accuracy: Metric = getattr(self, f"{split}_acc")
        accuracy.update(torch.sigmoid(logits) if self.binary else logits, y)
        size = int(x.shape[0])
        bar = split != "test"
        opts: dict[str, Any] = {"on_step": False, "on_epoch": True, "batch_size": size}
        self.log(f"{split}/loss", loss, prog_bar=bar, sync_dist=True, **opts)
        self.log(f"{split}/acc", accuracy, prog_bar=split == "val", **opts)
        counter: Metric = getattr(self, f"{split}_count")
        counter.update(torch.tensor(float(size), device=x.device))
        self.log(f"{split}/count", counter, **opts)
        return loss

    def _correct(self, logits: Tensor, y: Tensor) -> Tensor:
        """Number of right predictions in a batch (argmax, or logit > 0 for 2 classes)."""
        predicted = (logits > 0).long() if self.binary else logits.argmax(dim=1)
        return (predicted == y).sum()

    def _last_step_of_epoch(self, batch_idx: int) -> bool:
        trainer = self.trainer
        if batch_idx + 1 >= trainer.num_training_batches:
            return True
        return 0 < trainer.max_steps <= self.global_step + 1  # max_steps ends mid-epoch

    def _log_train_epoch(self) -> None:
        """Log the epoch's train metrics, reduced over DDP ranks (the sums, then the means)."""
        sums = self._train_sums.clone()
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").cpu()
        loss, penalty, correct = (sums[:3] / sums[3].clamp(min=1)).float().to(self.device)
        # every rank now holds the same global means: sync_dist averages equal values (exact),
        # and spares the "use sync_dist=True" warning Lightning gives under DDP otherwise
        opts: dict[str, Any] = {"on_step": False, "on_epoch": True, "batch_size": 1}
        opts["sync_dist"] = True
        self.log("train/loss", loss, prog_bar=True, **opts)
        self.log("train/acc", correct, **opts)
        self.log("train/penalty", penalty, **opts)
        self.log("train/objective", loss + penalty, **opts)

    def _check_finite(self, objective: Tensor) -> None:
        value = float(objective.detach())
        if math.isfinite(value):
            self._last_finite_loss = value
            return
        last = getattr(self, "_last_finite_loss", None)
        before = f", last finite loss {last:.6g}" if last is not None else " at the first step"
        raise ConvpipeError(
            f"training diverged: loss became {value} at epoch {self.current_epoch}, "
            f"step {self.global_step}{before}",
            "while training",
            f"lower train.lr (now {self.train_params.lr:g}) or check the data for nan/inf values",
        )

    def on_train_epoch_start(self) -> None:
        """Start the epoch's training sums from zero.

        A new tensor, not ``zero_()``: under ``ddp_spawn`` the ranks inherit the module's
        tensors in shared memory, and one shared tensor would add up both ranks' batches.
        """
        self._train_sums = torch.zeros(4, dtype=torch.float64)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Minimise J + penalty on one training batch; stop with an error if it is nan/inf.

        With ``train.mixup_alpha`` or ``train.cutmix_alpha`` the batch is mixed first
        (:func:`convpipe.models.mixing.mix_batch`): ``train/loss`` is then the mixed target's
        (smoothed, class-weighted) loss and ``train/acc`` counts the label that dominates each
        mixed image. The epoch's ``train/*`` metrics are summed here in one small tensor and
        logged once, at the last step of the epoch: a ``self.log`` per metric and step costs
        Lightning about as much as a small batch's forward pass.

        Args:
            batch: ``(x, y)`` with x float ``(N, C, H, W)`` and y int64 ``(N,)``.
            batch_idx: Index of the batch in the epoch.

        Returns:
            The objective J + penalty, which the optimiser minimises.
        """
        train = self.train_params
        x, y_a, y_b, lam = mix_batch(batch[0], batch[1], train.mixup_alpha, train.cutmix_alpha)
        logits = self(x)
        smoothing = train.label_smoothing
        loss = self.data_loss(logits, y_a, smoothing, weighted=True)
        if lam < 1.0:  # mixed targets: the loss is linear in the target
            loss = lam * loss + (1.0 - lam) * self.data_loss(logits, y_b, smoothing, weighted=True)
        y = y_a if lam >= 0.5 else y_b  # accuracy against the label that dominates
        penalty = self.penalty()
        objective = loss + penalty
        self._check_finite(objective)
        size = float(x.shape[0])
        dtype = loss.dtype  # the penalty follows the weights' dtype, which may differ
        right = self._correct(logits.detach(), y).to(dtype)
        step = torch.stack([loss.detach() * size, penalty.detach().to(dtype) * size, right])
        self._train_sums[:3] += step.to("cpu", torch.float64)
        self._train_sums[3] += size
        if self._last_step_of_epoch(batch_idx):
            self._log_train_epoch()
        return objective

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Log ``val/loss`` and ``val/acc`` for one batch."""
        return self._shared_step(batch, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Log ``test/loss`` and ``test/acc`` for one batch, in the weights' own precision.

        Under a mixed precision (``bf16-mixed``, ``16-mixed``) autocast is off here: evaluate,
        ``convpipe predict`` and the exported models run the fp32 weights in fp32, so the test
        metrics are theirs.
        """
        with torch.autocast(self.device.type, enabled=False):
            return self._shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``(N, K)`` for a batch ``x`` or ``(x, y)`` (labels ignored)."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return probabilities(self(x), self.num_classes)

    @torch.no_grad()
    def init_whitening(self, images: Tensor) -> None:
        """Set the first conv's fixed filters to whiten the patches of ``images``.

        Only with ``model.whiten`` (see :mod:`convpipe.models.whitening`); the filters are
        then part of the state dict, so a checkpoint restores them without the data.

        Args:
            images: Float ``(N, C, H, W)`` training images, normalised as in training.
        """
        if not self.model_params.whiten:
            return
        conv = first_conv(self.net)
        conv.weight.copy_(whitening_filters(images.float(), int(conv.kernel_size[0])))

    def use_runtime(self, runtime: RuntimeParams) -> None:
        """Run with ``runtime``'s memory layout, threads and compilation from now on.

        How a module runs is not what it learnt, so none of it is a hyperparameter: a
        module without a runtime (loaded for evaluation, prediction, export) runs NCHW,
        eager, with the process's threads.

        Args:
            runtime: The ``runtime`` section.
        """
        self.runtime = runtime
        # NHWC is oneDNN's fast convolution layout on CPU; the weights keep their values and
        # state_dict keys, only the strides change.
        layout = torch.channels_last if runtime.channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=layout)  # type: ignore[call-overload]

    def setup(self, stage: str) -> None:
        """Give this process its share of the CPU threads; compile the network for ``fit``.

        Both follow :meth:`use_runtime`. With ``runtime.compile``, training steps run
        ``torch.compile(net)``, which shares the eager network's parameters; validation,
        testing and prediction stay eager (no second compile for eval mode and other batch
        sizes).
        """
        runtime = self.runtime
        if runtime is None:
            return
        processes = self.trainer.num_devices if self._trainer is not None else 1
        torch.set_num_threads(cpu_threads(runtime.threads, processes))
        if stage == "fit" and runtime.compile and self._compiled_net is None:
            # torch.compile(module), not module.compile(): torch 2.13 silently skips the latter
            # for a Sequential of built-in layers (pytorch#150915). Kept out of the submodules,
            # so state_dict keys stay those of the eager network.
            object.__setattr__(self, "_compiled_net", torch.compile(self.net))

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """The optimiser and optional scheduler from the ``train`` section."""
        train = self.train_params
        batch = global_batch(train, int(self.hparams["train_size"]))
        optimizer = build_optimizer(self.net, train, batch)
        total = None
        if train.scheduler in PER_STEP_SCHEDULERS:
            total = int(self.trainer.estimated_stepping_batches)
        per_epoch = math.ceil(int(self.hparams["train_size"]) / batch)
        scheduler = build_scheduler(optimizer, train, total, per_epoch)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

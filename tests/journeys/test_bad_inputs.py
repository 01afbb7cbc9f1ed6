"""Bad inputs end to end: each one stops a real stage process with one line and no partial output.

Every case builds a working directory (the shipped ``params.yaml`` with a few keys changed,
plus the data or artefacts the case needs), runs the real entry point there as a subprocess
(``python pipelines/<stage>.py`` or ``convpipe validate``) and checks the project's rule for
input a user can get wrong:

* exit code 2 (:data:`convpipe.errors.EXIT_USER_ERROR`) and no traceback;
* stderr holds exactly one non-empty line, ``convpipe: error: ...``, naming the key or file;
* no partial output: every file of the directory is as before the run (prepare cases start
  from a good ``data/prepared`` that must stay byte-identical), no ``.*.tmp`` left behind;
* a pickle payload planted in the input never ran (its marker file does not exist).

Cases that need prepared data or a model copy them from two module-scoped folders made once,
in-process. No case trains: the checkpoints are written directly, the way training saves them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ruamel.yaml import YAML

from convpipe.config.edit import set_dotted
from convpipe.config.schema import load_params
from convpipe.data.manifest import load_manifest
from convpipe.data.prepare import write_prepared
from convpipe.data.readers.base import FileReader
from convpipe.data.sources import open_source
from convpipe.errors import EXIT_USER_ERROR, ConvpipeError
from tests.helpers import datagen
from tests.helpers.disk import fill, small_disk
from tests.helpers.project import ROOT

SHIPPED_PARAMS = (ROOT / "params.yaml").read_text(encoding="utf-8")
PREFIX = "convpipe: error: "
TIMEOUT_S = 120.0  # a hang (symlink loop, unreachable server) fails the case instead of the run
MARKER = "PWNED"  # what the pickle payloads would create in the working directory
RAW = "raw"  # data.path of the data cases, relative to the working directory
IMAGEFOLDER = {"data.source": "imagefolder", "data.path": RAW}
COMMANDS = {
    "prepare": [sys.executable, str(ROOT / "pipelines" / "prepare.py")],
    "augment": [sys.executable, str(ROOT / "pipelines" / "augment.py")],
    "train": [sys.executable, str(ROOT / "pipelines" / "train.py")],
    "evaluate": [sys.executable, str(ROOT / "pipelines" / "evaluate.py")],
    "validate": [str(Path(sys.executable).with_name("convpipe")), "validate"],
}
# What each stage's working directory starts with, copied from the module fixtures.
STAGE_INPUTS = {
    "prepare": ("data/prepared",),  # a previous good output that must survive the failure
    "validate": (),
    "train": ("data/prepared", "data/augmented"),
    "evaluate": ("data/prepared", "models", "mlflow.db"),
}

Setup = Callable[[Path], object]


# --------------------------------------------------------------------------- helpers


def write_params(cwd: Path, overrides: Mapping[str, Any]) -> None:
    """The shipped params.yaml with dotted-key overrides (new keys are added), comments kept."""
    yaml = YAML()
    data = yaml.load(SHIPPED_PARAMS)
    for key, value in overrides.items():
        set_dotted(data, key, copy.deepcopy(value))
    with open(cwd / "params.yaml", "w", encoding="utf-8") as fh:
        yaml.dump(data, fh)


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_stage(
    stage: str, cwd: Path, env: Mapping[str, str] | None = None, *args: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``stage``'s real entry point in ``cwd``; return the process and its wall time."""
    clean = {
        k: v for k, v in os.environ.items() if k not in ("CONVPIPE_DEBUG", "MLFLOW_TRACKING_URI")
    }
    clean["PYTHONPATH"] = str(ROOT / "src")  # this tree's code, whatever is installed
    start = time.monotonic()
    proc = subprocess.run(
        [*COMMANDS[stage], *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    return proc, time.monotonic() - start


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one ``convpipe: error:`` line of a failed run (asserting there is exactly one)."""
    assert proc.returncode == EXIT_USER_ERROR, f"exit {proc.returncode}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{proc.stderr}"
    assert lines[0].startswith(PREFIX), lines[0]
    assert lines[0].isprintable(), f"control characters in {lines[0]!r}"
    return lines[0]


def _entry(path: Path) -> str:
    if path.is_symlink():
        return f"-> {os.readlink(path)}"
    if path.is_dir():
        return "dir"
    if not path.is_file():  # a FIFO: reading it would wait for a writer
        return "special"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every file, folder and link under ``root``: its hash, ``dir`` or its target."""
    out = {}
    for folder, dirs, files in os.walk(root):  # links are listed, never followed
        here = Path(folder)
        for name in (*dirs, *files):
            out[(here / name).relative_to(root).as_posix()] = _entry(here / name)
    return out


def changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Paths added, removed or modified between two snapshots."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders of atomic writes (``.<name>.*.tmp``) anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.name.endswith(".tmp"))


class CodePayload:
    """Unpickling this runs code that creates ``marker`` (what a hostile file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def write_checkpoint(path: Path, num_classes: int, payload: object = None) -> Path:
    """A Lightning checkpoint of an untrained CNN for 8x8 digits, as training saves it.

    With ``payload``, the state dict is replaced by it (a pickle that would run code).
    """
    import lightning as L
    import torch

    from convpipe.models.module import CNNClassifier

    params = load_params(ROOT / "params.yaml")
    model = CNNClassifier(
        model=params.model.model_dump(mode="json"),
        train=params.train.model_dump(mode="json"),
        in_channels=1,
        image_hw=(8, 8),
        num_classes=num_classes,
        train_size=100,
        class_names=[str(i) for i in range(num_classes)],
    )
    state = model.state_dict() if payload is None else payload
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "epoch": 0,
            "global_step": 0,
            "pytorch-lightning_version": L.__version__,
            "state_dict": state,
            "hyper_parameters": dict(model.hparams),
        },
        path,
    )
    return path


# --------------------------------------------------------------------------- case setups


def imagefolder(cwd: Path, **kwargs: Any) -> Path:
    """Three classes of three 16x16 PNGs in ``raw/<class>/`` (unless told otherwise)."""
    return datagen.write_imagefolder(cwd / RAW, **kwargs)


def with_bad_file(writer: Callable[[Path], object], folder: str) -> Setup:
    """An image folder plus one file from ``writer`` in class folder ``folder``."""

    def setup(cwd: Path) -> None:
        writer(imagefolder(cwd) / folder)

    return setup


def empty_class(cwd: Path) -> None:
    (imagefolder(cwd) / "3").mkdir()


def class_of_two(cwd: Path) -> None:
    imagefolder(cwd)
    datagen.write_imagefolder(cwd / RAW, n_per_class=2, classes=("7",))


def idx_bad_magic(cwd: Path) -> None:
    path = datagen.write_idx(cwd / RAW) / "train-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[:4] = struct.pack(">I", 0x00000D03)
    path.write_bytes(bytes(data))


def idx_short_labels(cwd: Path) -> None:
    root = datagen.write_idx(cwd / RAW, n_test=20)
    labels = np.zeros(19, dtype=np.uint8)
    datagen.write_idx_file(root / "t10k-labels-idx1-ubyte", labels, datagen.IDX_LABELS_MAGIC)


def csv_bad_row(cwd: Path) -> None:
    path = datagen.write_csv(cwd / "raw.csv", n=30)
    lines = path.read_text().splitlines()
    fields = lines[4].split(",")  # line 5 of the file: the header is line 1
    fields[3] = "300"
    lines[4] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")


def cifar_payload(cwd: Path) -> None:
    root = datagen.write_cifar(cwd / RAW)
    batch = {b"data": CodePayload(cwd / MARKER), b"labels": [0]}
    (root / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))


def truncated_checkpoint(cwd: Path) -> None:
    path = cwd / "models" / "model.ckpt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def three_class_checkpoint(cwd: Path) -> None:
    write_checkpoint(cwd / "models" / "model.ckpt", num_classes=3)


def checkpoint_payload(cwd: Path) -> None:
    write_checkpoint(cwd / "models" / "model.ckpt", 10, payload=CodePayload(cwd / MARKER))


SMALL_IMAGE_STACK = [
    {
        "filters": 8,
        "kernel": 3,
        "stride": 1,
        "padding": "valid",
        "activation": "relu",
        "batch_norm": True,
        "pool": "max",
        "pool_size": 2,
    }
] * 3  # 8x8 -> conv 6x6 -> pool 3x3 -> conv 1x1 -> pool 0x0


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """One bad input: the stage to run, how to build its directory, what the line must name."""

    name: str
    stage: str
    fragments: tuple[str, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    setup: Setup | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # "{closed_port}" is filled in
    # a bound far below a hang (MLflow alone retries an unreachable server for minutes) and
    # far above a stage's start-up on two busy cores (make test runs two files at once)
    max_seconds: float | None = None
    xfail: str | None = None

    def param(self) -> Any:
        marks = [pytest.mark.xfail(strict=True, reason=self.xfail)] if self.xfail else []
        return pytest.param(self, id=self.name, marks=marks)


# fmt: off
CASES = [
    # ---- params
    Case("unknown_key", "prepare", ("unknown key 'train.lrr'", "did you mean 'train.lr'?"),
         {"train.lrr": 0.01}),
    Case("wrong_type", "validate", ("'train.max_epochs'", "'ten'", "params.yaml"),
         {"train.max_epochs": "ten"}),
    Case("dropout_one", "prepare", ("'model.dropout'", "less than 1", "got 1.0"),
         {"model.dropout": 1.0}),
    Case("dropout_negative", "prepare", ("'model.dropout'", "got -0.1"), {"model.dropout": -0.1}),
    Case("lr_zero", "prepare", ("'train.lr'", "greater than 0", "got 0"), {"train.lr": 0}),
    Case("lr_negative", "prepare", ("'train.lr'", "got -1"), {"train.lr": -1}),
    Case("unknown_optimizer", "prepare", ("'train.optimizer'", "'adagrad'"),
         {"train.optimizer": "adagrad"}),
    Case("unknown_reg_type", "prepare", ("'train.reg_type'", "'l3'"), {"train.reg_type": "l3"}),
    Case("patience_negative", "prepare", ("'train.patience'", "got -1"), {"train.patience": -1}),
    Case("invalid_yaml", "validate", ("not valid YAML", "params.yaml"),
         setup=lambda cwd: (cwd / "params.yaml").write_text("train:\n  lr: [0.1\n")),
    Case("missing_params_file", "prepare", ("params file not found: params.yaml",),
         setup=lambda cwd: (cwd / "params.yaml").unlink()),
    Case("monitor_mode_against_the_metric", "train",
         ("train.monitor_mode is 'min' but val/acc improves as it goes up",
          "set train.monitor_mode: max"),
         {"train.monitor": "val/acc", "train.monitor_mode": "min"}),
    Case("monitor_typo", "train", ("'val/los'", "did you mean 'val/loss'?"),
         {"train.monitor": "val/los"}),
    Case("batch_larger_than_train_split", "train", ("train.batch_size is 100000",),
         {"train.batch_size": 100000}),
    Case("image_too_small_for_conv_stack", "train", ("model.conv[1].pool", "8x8 input images"),
         {"model.conv": SMALL_IMAGE_STACK}),
    Case("unknown_strategy", "train", ("train.strategy 'dpp'", "did you mean 'ddp'?"),
         {"train.strategy": "dpp"}),
    # ---- data
    Case("missing_data_path", "prepare", ("image folder not found: raw", "data.path"),
         IMAGEFOLDER),
    Case("zero_byte_file", "prepare", ("(empty file)", "raw/1/empty.png"), IMAGEFOLDER,
         with_bad_file(datagen.write_zero_byte, "1")),
    Case("truncated_png", "prepare", ("(truncated image)", "raw/2/truncated.png"),
         {**IMAGEFOLDER, "data.image_size": 16}, with_bad_file(datagen.write_truncated_png, "2")),
    Case("text_named_png", "prepare", ("(not an image)", "raw/0/notes.png"), IMAGEFOLDER,
         with_bad_file(datagen.write_not_an_image, "0")),
    Case("fifo_named_png", "prepare", ("(not a regular file (a FIFO))", "raw/1/pipe.png"),
         IMAGEFOLDER, with_bad_file(datagen.write_fifo, "1"), max_seconds=60.0),
    Case("postscript_named_png", "prepare", ("(not an image)", "raw/2/doc.png"), IMAGEFOLDER,
         with_bad_file(datagen.write_postscript, "2")),
    Case("decompression_bomb", "prepare", ("decompression bomb", "raw/0/bomb.png"), IMAGEFOLDER,
         with_bad_file(datagen.write_decompression_bomb, "0")),
    Case("symlink_loop", "prepare", ("(symlink loop)", "raw/1/self.png"), IMAGEFOLDER,
         with_bad_file(datagen.write_symlink_loop, "1")),
    Case("escape_sequence_in_file_name", "prepare", ("(empty file)", r"raw/0/\x1b[2Jx.png"),
         IMAGEFOLDER, with_bad_file(lambda d: datagen.write_zero_byte(d, "\x1b[2Jx.png"), "0")),
    Case("empty_class_folder", "prepare", ("no image files", "raw/3"), IMAGEFOLDER, empty_class),
    Case("single_class", "prepare", ("found 1 class", "needs at least 2", "in raw"), IMAGEFOLDER,
         lambda cwd: imagefolder(cwd, classes=("0",))),
    Case("class_too_small_to_stratify", "prepare", ("class '7' has 2 image(s)", "in raw,"),
         IMAGEFOLDER, class_of_two),
    Case("idx_bad_magic", "prepare", ("bad magic 0x00000d03", "raw/train-images-idx3-ubyte"),
         {"data.source": "mnist_idx", "data.path": RAW}, idx_bad_magic),
    Case("idx_count_mismatch", "prepare",
         ("has 20 images but t10k-labels-idx1-ubyte has 19 labels", "in raw"),
         {"data.source": "mnist_idx", "data.path": RAW}, idx_short_labels),
    Case("csv_bad_row", "prepare", ("line 5", "'300'", "raw.csv"),
         {"data.source": "csv", "data.path": "raw.csv", "data.csv.image_shape": [8, 8]},
         csv_bad_row),
    Case("cifar_pickle_payload", "prepare", ("refusing to unpickle", "exec", "raw/data_batch_3"),
         {"data.source": "cifar", "data.path": RAW}, cifar_payload),
    # ---- checkpoints
    Case("truncated_checkpoint", "evaluate", ("cannot load checkpoint", "models/model.ckpt"),
         setup=truncated_checkpoint),
    Case("checkpoint_wrong_class_count", "evaluate",
         ("checkpoint's 3 classes (0, 1, 2) are not the prepared data's 10 classes",
          "models/model.ckpt and data/prepared"),
         setup=three_class_checkpoint),
    Case("checkpoint_pickle_payload", "evaluate", ("would run code (exec)", "models/model.ckpt"),
         setup=checkpoint_payload),
    # ---- tracking
    Case("tracking_server_closed_port", "train", ("unreachable", "http://127.0.0.1:"),
         env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed_port}"}, max_seconds=60.0),
]
# fmt: on


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def good_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the shipped params and good ``data/prepared`` + ``data/augmented``."""
    from convpipe.data.augment import write_augmented

    root = tmp_path_factory.mktemp("good")
    write_params(root, {})
    with contextlib.chdir(root):
        params = load_params()
        raw = open_source(params.data)
        write_prepared(raw, params.data, params.base.seed, params.paths.prepared)
        write_augmented(params)
    return root


@pytest.fixture(scope="module")
def good_model(good_data: Path) -> Path:
    """``good_data`` plus what training leaves: a checkpoint and its run in ``mlflow.db``."""
    from mlflow.tracking import MlflowClient

    from convpipe.models.checkpoint import load_model
    from convpipe.tracking.provenance import RunInfo

    with contextlib.chdir(good_data):
        params = load_params()
        checkpoint = write_checkpoint(Path(params.paths.model), num_classes=10)
        assert load_model(checkpoint).num_classes == 10  # the cases break a loadable file
        # absolute: MLflow caches stores by URI string, and other tests used this relative one
        uri = f"sqlite:///{Path(good_data).resolve() / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment(params.mlflow.experiment)
        run = client.create_run(experiment)
        RunInfo(run.info.run_id, experiment, uri).save(params.paths.run_info)
    return good_data


def _copy_inputs(stage: str, source: Path, cwd: Path) -> None:
    import shutil

    for item in STAGE_INPUTS[stage]:
        target = cwd / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if (source / item).is_dir():
            shutil.copytree(source / item, target)
        else:
            shutil.copy2(source / item, target)


# --------------------------------------------------------------------------- tests


@pytest.mark.subprocess
@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_bad_input(
    case: Case,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    if STAGE_INPUTS[case.stage]:
        source = request.getfixturevalue("good_model" if case.stage == "evaluate" else "good_data")
        _copy_inputs(case.stage, source, cwd)
    write_params(cwd, case.params)
    if case.setup is not None:
        case.setup(cwd)
    env = {k: v.format(closed_port=closed_port()) for k, v in case.env.items()}
    before = snapshot(cwd)

    proc, seconds = run_stage(case.stage, cwd, env)

    line = error_line(proc)
    for fragment in case.fragments:
        assert fragment in line
    assert not (cwd / MARKER).exists(), "a pickle payload in the input ran"
    assert not leftovers(cwd)
    assert not changes(before, snapshot(cwd)), "the failed stage changed files"
    if case.max_seconds is not None:
        assert seconds < case.max_seconds, f"took {seconds:.1f} s"


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("writer", "channels"),
    [
        pytest.param(
            lambda root: datagen.write_16bit_png(
                root / "0", (np.arange(256).reshape(16, 16) * 257).tolist()
            ),
            1,
            id="16bit_png",
        ),
        pytest.param(lambda root: datagen.write_cmyk_jpeg(root / "1"), 3, id="cmyk_jpeg"),
    ],
)
def test_unusual_but_valid_images_are_prepared(
    writer: Callable[[Path], Path], channels: int, tmp_path: Path
) -> None:
    write_params(tmp_path, IMAGEFOLDER)
    writer(imagefolder(tmp_path))

    proc, _ = run_stage("prepare", tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert PREFIX not in proc.stderr and "Traceback" not in proc.stderr
    manifest = load_manifest(tmp_path / "data" / "prepared")
    assert manifest.channels == channels
    assert sum(split.count for split in manifest.splits.values()) == 10
    assert manifest.skipped.count == 0
    assert not leftovers(tmp_path)


def test_file_disappearing_mid_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_params: Callable[..., Any]
) -> None:
    params = make_params(**{"data.source": "imagefolder", "data.path": str(imagefolder(tmp_path))})
    raw = open_source(params.data)
    reader = raw.splits["all"].reader
    assert isinstance(reader, FileReader)
    victim = reader.paths[4]
    load = reader.load

    def vanishing_load(index: int) -> Any:  # probed fine, gone when its pixels are read
        if reader.paths[index] == victim:
            os.remove(victim)
        return load(index)

    monkeypatch.setattr(reader, "load", vanishing_load)
    out = tmp_path / "prepared"
    with pytest.raises(ConvpipeError) as info:
        write_prepared(raw, params.data, params.base.seed, out)
    line = info.value.line()
    assert line.startswith(PREFIX) and "\n" not in line
    assert "file disappeared while reading" in line and victim in line
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.subprocess
def test_payloads_are_live(tmp_path: Path) -> None:
    """The planted pickles do run code when loaded unsafely, so their refusal means something."""
    import torch

    plain = tmp_path / "plain"
    pickle.loads(pickle.dumps({b"data": CodePayload(plain)}, protocol=2))
    assert plain.exists()
    checkpoint = tmp_path / "checkpoint"
    torch.load(
        write_checkpoint(tmp_path / "evil.ckpt", 10, CodePayload(checkpoint)), weights_only=False
    )
    assert checkpoint.exists()


@pytest.mark.subprocess
def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    write_params(tmp_path, {"train.lrr": 0.01})

    proc, _ = run_stage("prepare", tmp_path, None, "--debug")

    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ConvpipeError: unknown key 'train.lrr'" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["prepare", "augment"])
def test_disk_full_keeps_the_previous_outputs(tmp_path: Path, stage: str) -> None:
    """ENOSPC while a stage writes: one line, and the outputs of the last good run intact.

    ``data/`` is a small tmpfs: a first run fills it with good outputs, then a filler file
    takes all but a quarter of what the rerun needs.
    """
    (tmp_path / "params.yaml").write_text(SHIPPED_PARAMS, encoding="utf-8")
    with small_disk(tmp_path / "data") as disk:
        for needed in dict.fromkeys(("prepare", stage)):
            done, _ = run_stage(needed, tmp_path)
            assert done.returncode == 0, done.stderr
        out = disk / ("prepared" if stage == "prepare" else "augmented")
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        fill(disk, leave=size // 4)
        before = snapshot(disk)

        line = error_line(run_stage(stage, tmp_path)[0])

        assert line.startswith(PREFIX + "the disk is full (No space left on device)"), line
        assert "free space there and rerun" in line
        assert snapshot(disk) == before  # same files, same bytes: no temp leftovers either
        (disk / "filler").unlink()
        assert run_stage(stage, tmp_path)[0].returncode == 0  # space freed: the rerun works

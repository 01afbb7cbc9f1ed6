"""``make gpu-check``: what convpipe does on a CUDA GPU, as one table, in at most ~8 minutes.

Run it whenever a GPU machine is at hand (the README's "Running the GPU check" says how). On a
machine without a CUDA GPU it prints one line and exits 0. Otherwise it runs, in order, each
check a row of the table:

1. ``environment``: the GPU, its compute capability, torch / CUDA / Lightning versions.
2. ``matmul peak``: the best dense ``torch.mm`` FLOP/s in fp32, TF32, bf16 and fp16 (CUDA
   events, several sizes): the honest peak each training precision is compared with.
3. ``unit tier``: ``tests/test_gpu.py``, the model and data-path tests that run on CUDA.
4. ``train <model> <precision> [compile]``: the MNIST and CIFAR-10 recipes' networks trained by
   convpipe's own Trainer on synthetic data prepared by convpipe's prepare stage, resident on
   the GPU with the device data path, channels-last, in fp32, bf16-mixed and 16-mixed, compile
   off and on: images/s, TFLOP/s (torch's FLOP counter) and the fraction of the matching peak.
5. ``plain loop``: the CIFAR network in a hand-written PyTorch loop over the same batches
   (bf16): convpipe's throughput over the loop's is its overhead ratio.
6. ``ddp``: the CIFAR network under ``strategy: ddp`` on every GPU present (NCCL).
7. ``export pt2``: ``torch.export`` of the trained network, run on the GPU, against the model.

It exits non-zero when any check FAILs. The GPU machines this project gets bring their own
torch and Lightning but no package registry: packages convpipe needs that are missing are
installed from ``build/gpu-bundle`` (``make gpu-bundle``, prepared on the CPU machine) into
``build/gpu-site``; a check whose packages are still missing is SKIPped, saying which.

``--device cpu --quick`` runs the same checks on the CPU with tiny sizes (the test suite does,
so the script is exercised where no GPU is): figures are then meaningless.

Usage: python benchmarks/gpu_check.py [--device cuda|cpu] [--quick] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import put_section  # standard library only

try:
    import torch
except ImportError:  # a machine without torch has no GPU to check either
    print(f"gpu-check: skipped: torch is not installed for {sys.executable}")
    raise SystemExit(0) from None

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BUNDLE = ROOT / "build" / "gpu-bundle"
SITE = ROOT / "build" / "gpu-site"
#: Modules the checks import beyond torch, Lightning, numpy and OpenCV (which the GPU machines
#: bring), and the wheels that hold them (``make gpu-bundle`` downloads these; ``pytest`` is
#: only for the unit tier).
BUNDLED = {
    "pydantic": ("pydantic", "pydantic_core", "annotated_types", "typing_inspection"),
    "typing_extensions": ("typing_extensions",),
    "yaml": ("pyyaml",),
    "ruamel.yaml": ("ruamel_yaml",),
    "albumentations": ("albumentations", "albucore", "simsimd", "stringzilla"),
    "scipy": ("scipy",),
    "PIL": ("pillow",),
    "pytest": ("pytest", "pluggy", "iniconfig", "packaging", "pytest_timeout"),
}
#: Recipes whose networks are trained: (name, overlay, image shape (H, W, C)).
MODELS = (
    ("mnist", "params/mnist.yaml", (28, 28, 1)),
    ("cifar", "params/cifar10.yaml", (32, 32, 3)),
)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
#: Seconds the whole check may take on one GPU (the rest is skipped, saying so).
BUDGET_SECONDS = 450.0


@dataclass
class Row:
    """One check: its name, PASS / FAIL / SKIP, and what it measured or why."""

    check: str
    status: str
    detail: str


@dataclass
class Context:
    """What the checks share: the device, sizes, peaks, prepared data, the clock."""

    device: str
    quick: bool
    deadline: float
    peaks: dict[str, float] = field(default_factory=dict)
    projects: dict[str, Any] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)
    work: Path = Path(".")

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# --------------------------------------------------------------------------- packages


def missing_modules(names: Any) -> list[str]:
    """The modules of ``names`` that cannot be imported here."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def install_from_bundle(missing: list[str]) -> None:
    """Install the bundled wheels of ``missing`` modules into :data:`SITE` (no network)."""
    wheels = [
        str(path)
        for module in missing
        for dist in BUNDLED.get(module, ())
        for path in sorted(BUNDLE.glob(f"{dist}-*.whl"))
    ]
    if wheels:
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
        subprocess.run([*pip, "--target", str(SITE), "--upgrade", *wheels], check=False)
    if SITE.is_dir() and str(SITE) not in sys.path:
        sys.path.insert(0, str(SITE))
        importlib.invalidate_caches()


def prepare_imports() -> list[str]:
    """Put convpipe's sources and the bundle on the path; the modules still missing."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    missing = missing_modules(BUNDLED)
    if missing and BUNDLE.is_dir():
        install_from_bundle(missing)
        missing = missing_modules(BUNDLED)
    return missing


# --------------------------------------------------------------------------- timing


def seconds_of(ctx: Context, fn: Callable[[], object], repeats: int) -> float:
    """The best wall seconds of ``repeats`` calls of ``fn``, after one untimed call."""
    fn()
    ctx.sync()
    best = float("inf")
    for _ in range(repeats):
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - begin)
    return best


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on or off (cuDNN allows TF32 convolutions by default)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# --------------------------------------------------------------------------- checks


def check_environment(ctx: Context) -> Row:
    import lightning

    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        what = (
            f"{torch.cuda.device_count()} x {props.name}, sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB; CUDA {torch.version.cuda}; "
            f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
        )
    else:
        what = f"CPU, {torch.get_num_threads()} threads"
    versions = f"python {sys.version.split()[0]}, torch {torch.__version__}, "
    return Row("environment", "PASS", what + "; " + versions + f"lightning {lightning.__version__}")


def check_peaks(ctx: Context) -> Row:
    """Best dense matmul FLOP/s per precision; 32-true is compared with the TF32 one."""
    sizes = (512, 1024) if ctx.quick else (4096, 8192)
    kinds = {"fp32": (torch.float32, False), "tf32": (torch.float32, True)}
    kinds |= {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False)}
    if not ctx.cuda:
        kinds = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False)}
    for name, (dtype, allow) in kinds.items():
        best = 0.0
        for size in sizes:
            a = torch.randn(size, size, device=ctx.device, dtype=dtype)
            b = torch.randn(size, size, device=ctx.device, dtype=dtype)
            with tf32(allow):
                seconds = seconds_of(ctx, lambda a=a, b=b: torch.mm(a, b), 3 if ctx.quick else 10)
            best = max(best, 2 * size**3 / seconds)
        ctx.peaks[name] = best
    ctx.peaks["32-true"] = max(ctx.peaks["fp32"], ctx.peaks.get("tf32", 0.0))
    ctx.peaks["bf16-mixed"] = ctx.peaks["bf16"]
    ctx.peaks["16-mixed"] = ctx.peaks.get("fp16", 0.0)
    shown = ", ".join(f"{k} {v / 1e12:.1f}" for k, v in ctx.peaks.items() if "-" not in k)
    return Row("matmul peak", "PASS", f"TFLOP/s: {shown}")


def check_unit_tier(ctx: Context) -> Row:
    if missing_modules(["pytest"]):
        return Row("unit tier", "SKIP", "pytest is missing (make gpu-bundle)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SITE), str(ROOT / "src"), str(ROOT)]))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    if done.returncode == 0 and not ctx.cuda:
        return Row("unit tier", "SKIP", f"{summary} (CUDA tests skip on a CPU)")
    if done.returncode == 0 and "passed" in summary:
        return Row("unit tier", "PASS", summary)  # a skip here is a GPU without bfloat16
    tail = " | ".join(done.stdout.strip().splitlines()[-6:])
    return Row("unit tier", "FAIL", tail or done.stderr.strip()[-500:])


def synthetic_params(
    ctx: Context, name: str, overlay: str, shape: tuple[int, int, int], root: Path
) -> Any:
    """The recipe's params over ``root``, and synthetic prepared data written by prepare."""
    import numpy as np

    from convpipe.config.edit import overlaid, set_dotted
    from convpipe.config.schema import parse_params
    from convpipe.data.augment import write_augmented
    from convpipe.data.prepare import write_prepared
    from convpipe.data.raw import ALL
    from convpipe.data.readers.base import ArrayReader, labelled

    raw = overlaid(ROOT / overlay, ROOT / "params.yaml")
    raw["paths"] = {key: str(root / value) for key, value in raw["paths"].items()}
    overrides = {
        "data.test_fraction": 0.1,
        "data.val_fraction": 0.1,
        "runtime.batch_transform": "device",
        "runtime.resident": True,
        "runtime.channels_last": True,
        "runtime.num_workers": 0,
        "train.accelerator": "gpu" if ctx.cuda else "cpu",
    }
    if ctx.quick:  # a smoke run: small steps
        overrides["train.batch_size"] = 64
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    params = parse_params(raw)
    count = 640 if ctx.quick else 8192
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    labels = np.arange(count) % 10
    names = [str(i) for i in range(10)]
    source = labelled(name, names, {ALL: (labels, ArrayReader(images, f"synthetic-{name}"))})
    write_prepared(source, params.data, params.base.seed, params.paths.prepared)
    write_augmented(params)
    return params


def flops_per_image(params: Any) -> float:
    """Training FLOPs of one image (forward + backward), counted by torch on the CPU."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from convpipe.training.run import build_model

    _, model = build_model(params)
    x = torch.randn(4, *model.input_shape)
    y = torch.randint(0, model.num_classes, (4,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops()) / 4


class StepClock:
    """A Lightning callback: seconds of the steps after ``warmup``, the device drained."""

    def __init__(self, ctx: Context, warmup: int) -> None:
        import lightning as L

        clock = self

        class _Callback(L.Callback):
            def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
                if trainer.global_step == warmup:
                    ctx.sync()
                    clock.start = time.perf_counter()

            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                ctx.sync()
                clock.end = time.perf_counter()

        self.callback = _Callback()
        self.start = self.end = 0.0


def train_rate(ctx: Context, params: Any, precision: str, compile_: bool, steps: int) -> float:
    """Images/s of convpipe's Trainer over ``steps`` steps after a warm-up."""
    import lightning as L

    from convpipe.training.callbacks import weight_averaging
    from convpipe.training.run import build_model
    from convpipe.training.trainer import build_trainer

    params = params.model_copy(
        update={"runtime": params.runtime.model_copy(update={"compile": compile_})}
    )
    L.seed_everything(params.base.seed, verbose=False)
    datamodule, model = build_model(params)
    warmup = 3 if ctx.quick else 10
    clock = StepClock(ctx, warmup)
    train = params.train.model_copy(update={"precision": precision})
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=ctx.work) as root:
        trainer = build_trainer(
            train,
            [*weight_averaging(train), clock.callback],
            False,
            root,
            interactive=False,
            max_steps=warmup + steps,
            max_epochs=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, datamodule=datamodule)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("the weights are not finite after training")
    batch = datamodule.device_batch_size(datamodule.train_size)
    return steps * batch / (clock.end - clock.start)


def check_training(ctx: Context, name: str, precision: str, compile_: bool) -> Row:
    label = f"train {name} {precision}{' compile' if compile_ else ''}"
    if ctx.peaks.get(precision, 0.0) == 0.0:
        return Row(label, "SKIP", f"{precision} does not run on {ctx.device}")
    params, flops = ctx.projects[name]
    steps = 5 if ctx.quick else 50
    rate = train_rate(ctx, params, precision, compile_, steps)
    ctx.rates[label] = rate
    achieved = rate * flops
    fraction = achieved / ctx.peaks[precision]
    return Row(
        label,
        "PASS",
        f"{rate:,.0f} images/s, {achieved / 1e12:.2f} TFLOP/s = {100 * fraction:.1f} % of the "
        f"{precision} matmul peak",
    )


def plain_rate(ctx: Context, params: Any, steps: int) -> float:
    """Images/s of a hand-written loop: same network, batches, optimiser, bf16 autocast."""
    import lightning as L

    from convpipe.models.optim import build_optimizer, global_batch
    from convpipe.training.run import build_model

    L.seed_everything(params.base.seed, verbose=False)
    datamodule, model = build_model(params)
    datamodule.setup("fit")
    net = model.net.to(ctx.device).to(memory_format=torch.channels_last).train()
    optimizer = build_optimizer(
        net, params.train, global_batch(params.train, datamodule.train_size)
    )
    loader = datamodule.train_dataloader()
    transform = datamodule.transform(train=True)
    resident = None
    warmup = 3 if ctx.quick else 10
    done = 0
    start = 0.0
    while done < warmup + steps:
        for indices, labels in loader:
            if resident is None:  # the device path's resident images, as convpipe keeps them
                resident = torch.from_numpy(_host(datamodule)).to(ctx.device)
            if done == warmup:
                ctx.sync()
                start = time.perf_counter()
            images = transform(resident[indices.to(ctx.device)])
            labels = labels.to(ctx.device, non_blocking=True)
            with torch.autocast(ctx.device, dtype=torch.bfloat16):
                logits = net(images.contiguous(memory_format=torch.channels_last))
                loss = model.data_loss(logits, labels, params.train.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == warmup + steps:
                break
    ctx.sync()
    batch = datamodule.device_batch_size(datamodule.train_size)
    return steps * batch / (time.perf_counter() - start)


def _host(datamodule: Any) -> Any:
    import numpy as np

    from convpipe.data.manifest import load_split

    x, _ = load_split(datamodule.prepared_dir, datamodule.manifest, "train")
    return np.ascontiguousarray(x)


def check_plain_loop(ctx: Context) -> Row:
    convpipe = ctx.rates.get("train cifar bf16-mixed")
    if convpipe is None:
        return Row("plain loop", "SKIP", "needs the 'train cifar bf16-mixed' row")
    params, _ = ctx.projects["cifar"]
    params = params.model_copy(
        update={"train": params.train.model_copy(update={"scheduler": "none", "ema_decay": 0.0})}
    )
    steps = 5 if ctx.quick else 50
    plain = plain_rate(ctx, params, steps)
    ours = train_rate(ctx, params, "bf16-mixed", False, steps)
    return Row(
        "plain loop",
        "PASS",
        f"{plain:,.0f} images/s by hand, {ours:,.0f} by convpipe (no scheduler, no EMA in both): "
        f"overhead ratio {ours / plain:.3f}",
    )


def check_ddp(ctx: Context) -> Row:
    devices = torch.cuda.device_count() if ctx.cuda else 2
    params, _ = ctx.projects["cifar"]
    params_file = ctx.work / "ddp_params.json"
    params_file.write_text(params.model_dump_json())
    done = subprocess.run(
        [sys.executable, __file__, "--ddp-worker", str(params_file), "--device", ctx.device]
        + (["--quick"] if ctx.quick else [])
        + ["--devices", str(devices)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("ddp:")]
    if done.returncode != 0 or not lines:
        return Row("ddp", "FAIL", (done.stderr.strip().splitlines() or ["no output"])[-1][:300])
    backend = "NCCL" if ctx.cuda else "gloo"
    return Row("ddp", "PASS", f"{devices} processes ({backend}): {lines[-1][4:].strip()}")


def ddp_worker(params_file: Path, device: str, devices: int, quick: bool) -> None:
    """One rank of the ddp check (Lightning starts the others by running this again)."""
    sys.path.insert(0, str(ROOT / "src"))
    from convpipe.config.schema import Params

    params = Params.model_validate_json(params_file.read_text())
    train = params.train.model_copy(
        update={"devices": devices, "strategy": "ddp", "batch_size": 64 * devices}
    )
    params = params.model_copy(update={"train": train})
    ctx = Context(device, quick, time.monotonic() + 200, work=params_file.parent)
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    rate = train_rate(ctx, params, precision, False, 5 if quick else 30)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"ddp: {rate:,.0f} images/s on rank 0's clock ({precision})", flush=True)


def check_export(ctx: Context) -> Row:
    """The pt2 export, loaded back and run on the device, against the model on the device."""
    from convpipe.data.manifest import load_manifest
    from convpipe.tools.export import TOLERANCE, export_metadata, load_exported, serialize
    from convpipe.training.run import build_model

    params, _ = ctx.projects["cifar"]
    _, model = build_model(params)
    model.eval()
    data = serialize(model, "pt2", export_metadata(model, load_manifest(params.paths.prepared)))
    run, metadata = load_exported(data, "pt2")  # as a consumer loads it: on the CPU
    program = torch.export.load(io.BytesIO(data)).module().to(ctx.device)
    x = torch.randn(64, *model.input_shape)
    with torch.no_grad(), tf32(False):
        on_cpu = float((run(x) - model(x)).abs().max())
        model.to(ctx.device)
        on_device = float((program(x.to(ctx.device)) - model(x.to(ctx.device))).abs().max())
    ok = max(on_cpu, on_device) <= TOLERANCE and metadata["num_classes"] == model.num_classes
    return Row(
        "export pt2",
        "PASS" if ok else "FAIL",
        f"max |logit difference| {on_device:.2g} on {ctx.device}, {on_cpu:.2g} on the CPU "
        f"(64 images; tolerance {TOLERANCE:g})",
    )


# --------------------------------------------------------------------------- the run


def plan(ctx: Context) -> list[tuple[str, Callable[[], Row]]]:
    """Every check, in order, as (name, thunk)."""
    checks: list[tuple[str, Callable[[], Row]]] = [
        ("environment", lambda: check_environment(ctx)),
        ("matmul peak", lambda: check_peaks(ctx)),
        ("unit tier", lambda: check_unit_tier(ctx)),
    ]
    compiles = (False, True) if not ctx.quick else (False,)
    for name, _, _ in MODELS:
        for precision in PRECISIONS:
            for compile_ in compiles:
                label = f"train {name} {precision}{' compile' if compile_ else ''}"
                checks.append(
                    (label, lambda n=name, p=precision, c=compile_: check_training(ctx, n, p, c))
                )
    if ctx.quick:  # one compiled run keeps torch.compile exercised where it is slow (CPU)
        checks.append(
            ("train mnist 32-true compile", lambda: check_training(ctx, "mnist", "32-true", True))
        )
    checks += [
        ("plain loop", lambda: check_plain_loop(ctx)),
        ("ddp", lambda: check_ddp(ctx)),
        ("export pt2", lambda: check_export(ctx)),
    ]
    return checks


def run_checks(ctx: Context) -> list[Row]:
    """Each check once, in order: a FAIL on an exception, a SKIP once the budget is spent."""
    rows = []
    for name, thunk in plan(ctx):
        if time.monotonic() > ctx.deadline:
            rows.append(Row(name, "SKIP", "the time budget is spent"))
            continue
        began = time.monotonic()
        try:
            row = thunk()
        except Exception as exc:  # one failing check must not hide the others
            row = Row(name, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        row.detail += f" [{time.monotonic() - began:.0f} s]"
        rows.append(row)
        print(f"gpu-check: {row.check}: {row.status}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    """The markdown table RESULTS.md gets."""
    lines = ["| check | result | figures |", "|---|---|---|"]
    lines += [f"| {r.check} | {r.status} | {r.detail} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds in all")
    parser.add_argument(
        "--results",
        type=Path,
        help="file whose GPU section gets the table (default: benchmarks/RESULTS.md after a "
        "full CUDA run; nothing after a quick or CPU run)",
    )
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu-check: skipped: no CUDA GPU here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'})"
        )
        return 0
    missing = prepare_imports()
    if args.ddp_worker is not None:
        ddp_worker(args.ddp_worker, args.device, args.devices, args.quick)
        return 0
    needed = [m for m in missing if m != "pytest"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = Context(args.device, args.quick, started + args.budget, work=Path(work))
        if needed:
            rows = [check_environment(ctx)]
            rows.append(
                Row("packages", "FAIL", f"missing {', '.join(needed)}: run make gpu-bundle")
            )
        else:
            for name, overlay, shape in MODELS:
                params = synthetic_params(ctx, name, overlay, shape, ctx.work / name)
                ctx.projects[name] = (params, flops_per_image(params))
            rows = run_checks(ctx)
    minutes = (time.monotonic() - started) / 60
    print(f"\n## GPU check ({args.device}{', quick' if args.quick else ''}, {minutes:.1f} min)\n")
    print(table(rows))
    results = args.results or (RESULTS if args.device == "cuda" and not args.quick else None)
    if results is not None:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        put_section(
            results,
            "gpu-check",
            f"## GPU check\n\nRun on {when} with `python benchmarks/gpu_check.py "
            f"--device {args.device}{' --quick' if args.quick else ''}`, {minutes:.1f} min, on: "
            f"{rows[0].detail}\n\n{table(rows)}",
        )
        print(f"gpu-check: table written to {results}", file=sys.stderr)
    failed = [r.check for r in rows if r.status == "FAIL"]
    if failed:
        print(f"\ngpu-check: {len(failed)} check(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

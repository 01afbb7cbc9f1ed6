"""The ``convpipe`` console script: what people run outside ``dvc repro``.

Each sub-command is one small function registered in :data:`COMMANDS`; failures go through
:func:`convpipe.errors.entrypoint`, so a user error is one ``convpipe: error:`` line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from convpipe import __version__
from convpipe.config.schema import DEFAULT_PARAMS, load_params
from convpipe.errors import entrypoint
from convpipe.stage import setup_logging
from convpipe.tools.formats import EXPORT_SUFFIXES, PREDICT_FORMATS, SUMMARY_FORMATS

Command = Callable[[argparse.Namespace], int]


def cmd_validate(args: argparse.Namespace) -> int:
    """Check params.yaml against the schema and say so."""
    params = load_params(args.params)
    print(
        f"{args.params}: valid (data.source={params.data.source}, model: "
        f"{len(params.model.conv)} conv blocks, train.optimizer={params.train.optimizer})"
    )
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    """Write a recipe's values into the params file, keeping everything else in it."""
    from convpipe.config.edit import apply_recipe

    changed = apply_recipe(args.recipe, args.params)
    shown = ", ".join(changed) if changed else "nothing: its values were already there"
    print(f"{args.params}: applied {args.recipe} ({len(changed)} keys): {shown}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Open the MLflow UI on the tracking store of params.yaml (127.0.0.1 unless told)."""
    from convpipe.redact import mask
    from convpipe.tracking.store import tracking_uri

    uri = tracking_uri(load_params(args.params).mlflow)
    print(f"MLflow UI for {mask(uri)} on http://{args.host}:{args.port}", flush=True)
    argv = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port)]
    # through the environment, not argv: a command line is visible to every user in `ps`
    env = dict(os.environ, MLFLOW_BACKEND_STORE_URI=uri)
    os.execve(sys.executable, argv, env)
    return 0  # pragma: no cover - execv does not return


def cmd_tune_ui(args: argparse.Namespace) -> int:
    """Serve optuna-dashboard over the campaign's storage (127.0.0.1 unless told)."""
    import errno

    import optuna
    from optuna_dashboard import run_server

    from convpipe.errors import ConvpipeError
    from convpipe.redact import mask
    from convpipe.tuning.storage import open_storage

    tune = load_params(args.params).tune
    storage = open_storage(tune.storage)  # journal files, sqlite, PostgreSQL: as `tune` opens it
    url = f"http://{args.host}:{args.port}/dashboard"
    known = optuna.get_all_study_names(storage)
    study = (
        f"study {tune.study_name}"
        if tune.study_name in known
        else (f"no study {tune.study_name} yet: `convpipe tune` starts it")
    )
    print(f"optuna-dashboard for {mask(tune.storage)} ({study}) on {url}", flush=True)
    try:
        run_server(storage, host=args.host, port=args.port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise ConvpipeError(
            f"port {args.port} is in use", f"on {args.host}", "pass another --port"
        ) from None
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Run or continue the Optuna campaign of ``tune:``; optionally apply its best values."""
    from collections import Counter

    from convpipe.errors import ConvpipeError
    from convpipe.tuning.apply import apply_best
    from convpipe.tuning.launch import check_workers
    from convpipe.tuning.worker import tune, tune_in_workers

    if args.trial is not None and not args.apply:
        raise ConvpipeError(
            "--trial chooses what --apply writes", "on the command line", "add --apply"
        )
    if args.n_trials is not None and args.n_trials < 0:
        raise ConvpipeError(
            f"--n-trials must be 0 or more, got {args.n_trials}", "on the command line", ""
        )
    params = load_params(args.params)
    check_workers(params, args.workers)
    if args.workers > 1:
        study = tune_in_workers(params, args.params, args.workers, args.n_trials, args.debug)
    else:
        study = tune(params, args.n_trials)
    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    shown = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
    reports = params.paths.tuning_reports
    print(f"study {study.study_name}: {shown or 'no trials'}; reports in {reports}/")
    if args.apply:
        trial, values = apply_best(study, args.params, args.trial)
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        print(f"{args.params}: applied trial {trial.number}: {shown}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Per-layer shapes, parameters, receptive fields; totals against a dense network."""
    import json

    from convpipe.data.manifest import load_manifest
    from convpipe.tools.summary import format_summary, summary_dict

    params = load_params(args.params)
    summary = summary_dict(params.model, load_manifest(params.paths.prepared))
    if args.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary), end="")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify image files with the trained model; one row per file, errors included."""
    from convpipe.errors import ConvpipeError
    from convpipe.inference.predict import find_images, predict_files
    from convpipe.inference.trained import load_trained
    from convpipe.io import atomic_path
    from convpipe.tools.predict import format_predictions

    if args.top_k < 1:
        raise ConvpipeError(f"--top-k must be 1 or more, got {args.top_k}", "on the command line")
    params = load_params(args.params)
    paths = params.paths
    model, manifest = load_trained(
        paths.model, paths.prepared, params.train.accelerator, paths.calibration
    )
    files = find_images(args.paths)
    if not files:
        raise ConvpipeError("no image files found", f"in {', '.join(args.paths)}", "")
    tta = params.evaluate.tta  # the served and evaluated model's test-time augmentation
    predictions = predict_files(
        model, files, manifest.mean, manifest.std, args.top_k, tta, resize=manifest.resize
    )
    failed = [p for p in predictions if p.error is not None]
    if len(failed) == len(predictions):
        first = failed[0]
        raise ConvpipeError(
            f"none of the {len(files)} files could be classified "
            f"(first: {first.path}: {first.error})",
            "",
            "pass image files or folders holding them",
        )
    text = format_predictions(predictions, args.format, args.top_k)
    if args.output is None:
        print(text, end="")
        return 0
    with atomic_path(args.output) as tmp:
        tmp.write_text(text, encoding="utf-8")
    ok = len(predictions) - len(failed)
    print(f"{args.output}: {ok} predictions, {len(failed)} unreadable files")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export the trained model as pt2, ONNX or TorchScript, checked on the test split."""
    from convpipe.tools.export import TOLERANCE, export_checkpoint

    params = load_params(args.params)
    result = export_checkpoint(params, args.format, args.output)
    check = result.parity
    print(
        f"{result.path}: {result.fmt} export of {params.paths.model} ({result.size:,} bytes); "
        f"max |logit difference| {check.max_abs_diff:.2g} on {check.images} test images "
        f"(tolerance {TOLERANCE:g})"
    )
    return 0


def cmd_feature_maps(args: argparse.Namespace) -> int:
    """Draw one image's feature maps through every conv and pooling layer to a PNG."""
    from pathlib import Path

    from convpipe.evaluation.plots import save_figure
    from convpipe.inference.predict import load_image
    from convpipe.inference.trained import load_trained
    from convpipe.tools.feature_maps import picture

    params = load_params(args.params)
    paths = params.paths
    model, manifest = load_trained(paths.model, paths.prepared, calibration=paths.calibration)
    image = load_image(args.image, manifest.channels, manifest.image_hw, resize=manifest.resize)
    name = Path(args.image).name
    output = args.output or f"{Path(args.image).stem}.feature_maps.png"
    figure = picture(model, image, manifest.mean, manifest.std, name, params.evaluate.tta)
    save_figure(figure, output)
    stages = model.model_params.stages
    blocks = f" and {sum(s.blocks for s in stages)} residual blocks" if stages else ""
    print(
        f"{output}: feature maps of {name} through {len(model.model_params.conv)} conv blocks"
        f"{blocks}"
    )
    return 0


COMMANDS: dict[str, tuple[Command, str]] = {
    "validate": (cmd_validate, "check params.yaml against the schema"),
    "recipe": (cmd_recipe, "apply a recipe overlay (params/<name>.yaml) to the params file"),
    "ui": (cmd_ui, "open the MLflow UI (binds 127.0.0.1 by default)"),
    "tune": (cmd_tune, "run or continue the Optuna tuning campaign of params.yaml's tune:"),
    "tune-ui": (cmd_tune_ui, "serve optuna-dashboard over the campaign (127.0.0.1 by default)"),
    "summary": (cmd_summary, "per-layer shapes, parameters and receptive fields of the model"),
    "predict": (cmd_predict, "classify image files or folders with the trained model"),
    "export": (cmd_export, "export the trained model as pt2, ONNX or TorchScript, checked"),
    "feature-maps": (cmd_feature_maps, "picture of one image's feature maps through every layer"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="convpipe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"convpipe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file to read")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    sub.choices["recipe"].add_argument(
        "recipe", metavar="RECIPE", help="a recipe file, such as params/mnist.yaml"
    )
    ui = sub.choices["ui"]
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ui.add_argument("--port", type=int, default=5000)
    dashboard = sub.choices["tune-ui"]
    dashboard.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: loopback only)"
    )
    dashboard.add_argument("--port", type=int, default=8080)
    tune = sub.choices["tune"]
    tune.add_argument(
        "--n-trials",
        type=int,
        help="run exactly N more trials in this worker (default: continue the study up to "
        "tune.n_trials finished trials)",
    )
    tune.add_argument(
        "--workers",
        type=int,
        default=1,
        help="start N worker processes on this node, each pinned to its own GPU (or share of "
        "the CPU cores); with --n-trials, the N trials are shared out",
    )
    tune.add_argument(
        "--apply",
        action="store_true",
        help="write a trial's values into the params file: the complete trial meeting "
        "tune.constraints that is best on the first objective, unless --trial says which",
    )
    tune.add_argument("--trial", type=int, help="with --apply: the trial number to write")
    _add_inference_arguments(sub.choices["summary"], sub.choices["predict"])
    _add_export_arguments(sub.choices["export"])
    maps = sub.choices["feature-maps"]
    maps.add_argument("image", metavar="IMAGE", help="an image file prepare could read")
    maps.add_argument(
        "--output", help="PNG to write (default: IMAGE's name + .feature_maps.png, here)"
    )
    return parser


def _add_inference_arguments(
    summary: argparse.ArgumentParser, predict: argparse.ArgumentParser
) -> None:
    """The options of ``summary`` and ``predict``."""
    summary.add_argument("--format", choices=SUMMARY_FORMATS, default=SUMMARY_FORMATS[0])
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--top-k", type=int, default=1, help="classes shown per image")
    predict.add_argument("--format", choices=PREDICT_FORMATS, default=PREDICT_FORMATS[0])
    predict.add_argument("--output", help="write to this file (atomically) instead of stdout")


def _add_export_arguments(export: argparse.ArgumentParser) -> None:
    """The options of ``export``."""
    export.add_argument(
        "--format",
        required=True,
        choices=tuple(EXPORT_SUFFIXES),
        help="pt2 (torch.export, the successor of TorchScript), onnx (needs: pip install "
        "'convpipe[onnx]') or torchscript (torch.jit, deprecated upstream)",
    )
    export.add_argument(
        "--output",
        help="file to write (atomically); default beside paths.model: "
        "<name>.pt2, <name>.onnx or <name>.torchscript.pt",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``convpipe`` command line."""
    args = build_parser().parse_args(argv)

    @entrypoint
    def run() -> int:
        setup_logging(args.debug)
        return COMMANDS[args.command][0](args)

    return run()


if __name__ == "__main__":
    raise SystemExit(main())

"""A study's reports: best params, the trials table and Optuna's plots."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

from convpipe.io import atomic_path, write_text

log = logging.getLogger("convpipe")

REPORTS = (
    "best_params.yaml",
    "trials.csv",
    "optimization_history.png",
    "intermediate_values.png",
    "parallel_coordinate.png",
    "param_importances.png",
)


def write_reports(study: optuna.Study, out_dir: str | Path) -> Path:
    """Best params (YAML), every trial (CSV) and the standard Optuna plots (PNG).

    Each file is replaced atomically (workers may finish at the same time); a report that
    cannot be made yet (no complete trial, importances of fewer than two) is removed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "trials.csv", study.trials_dataframe().to_csv(index=False))
    written = {"trials.csv"}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        _write_best(study, out / "best_params.yaml")
        written.add("best_params.yaml")
    written |= _write_plots(study, out, len(complete))
    for name in set(REPORTS) - written:
        (out / name).unlink(missing_ok=True)
    return out


def _write_best(study: optuna.Study, path: Path) -> None:
    from ruamel.yaml import YAML

    best = study.best_trial
    doc = {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "trial": best.number,
        "value": best.value,
        "params": dict(best.params),
    }
    buf = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.dump(doc, buf)
    write_text(path, buf.getvalue())


def _write_plots(study: optuna.Study, out: Path, complete: int) -> set[str]:
    import matplotlib

    matplotlib.use("Agg")  # optuna's matplotlib plots go through pyplot; never open a window
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    plots = {
        "optimization_history.png": vis.plot_optimization_history,
        "intermediate_values.png": vis.plot_intermediate_values,
        "parallel_coordinate.png": vis.plot_parallel_coordinate,
        "param_importances.png": vis.plot_param_importances,
    }
    if complete < 2:
        del plots["param_importances.png"]
    written = set()
    for name, plot in plots.items():
        try:
            with _no_warnings():
                axes = plot(study)
            figure = (axes.ravel()[0] if hasattr(axes, "ravel") else axes).get_figure(root=True)
            if figure is None:
                continue
            figure.set_size_inches(9, 5.5)
            figure.tight_layout()
            with atomic_path(out / name) as tmp:
                figure.savefig(tmp, format="png", dpi=90)
        except Exception as exc:  # a report must not fail the campaign (e.g. constant params)
            log.warning("skipped %s: %s", name, exc)
            continue
        written.add(name)
    plt.close("all")  # also the figures of plots that failed half-way
    return written


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    """Optuna's plots warn about experimental APIs and empty studies: not the user's concern."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

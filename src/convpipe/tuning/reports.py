"""A study's reports: best params, the trials table, the Pareto front and Optuna's plots.

"Best" is the feasible trial best on the first objective (:func:`best_feasible`); with several
objectives the reports add the front (``pareto_front.csv`` and ``.png``: every complete trial,
the front's marked, infeasible ones apart) and the plots show the first objective.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from convpipe.io import atomic_path, write_text
from convpipe.tuning.objectives import (
    best_feasible,
    feasible,
    pareto_front,
    violations,
)

log = logging.getLogger("convpipe")

REPORTS = (
    "best_params.yaml",
    "trials.csv",
    "pareto_front.csv",
    "pareto_front.png",
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
    best = best_feasible(study)
    if best is not None:
        _write_best(study, best, out / "best_params.yaml")
        written.add("best_params.yaml")
    if len(study.directions) > 1 and complete:
        write_text(out / "pareto_front.csv", _front_csv(study, complete))
        written.add("pareto_front.csv")
    written |= _write_plots(study, out, len(complete))
    for name in set(REPORTS) - written:
        (out / name).unlink(missing_ok=True)
    return out


def _names(study: optuna.Study) -> list[str]:
    names = study.metric_names
    return list(names) if names else [f"objective {i}" for i in range(len(study.directions))]


def _write_best(study: optuna.Study, best: FrozenTrial, path: Path) -> None:
    from ruamel.yaml import YAML

    doc: dict[str, object] = {
        "study": study.study_name,
        "objectives": dict(
            zip(_names(study), (d.name.lower() for d in study.directions), strict=True)
        ),
        "trial": best.number,
        "values": dict(zip(_names(study), best.values, strict=True)),
        "params": dict(best.params),
    }
    if best.constraints:
        doc["constraint_violations"] = violations(best)
    buf = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.dump(doc, buf)
    write_text(path, buf.getvalue())


def _front_csv(study: optuna.Study, complete: list[FrozenTrial]) -> str:
    """Every complete trial: its values, whether it is feasible, whether it is on the front."""
    front = {t.number for t in pareto_front(study)}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys = sorted({key for t in complete for key in t.params})
    writer.writerow(["trial", *_names(study), "feasible", "pareto", *keys])
    for t in complete:
        row = [t.number, *t.values, feasible(t), t.number in front]
        writer.writerow([*row, *(t.params.get(key, "") for key in keys)])
    return out.getvalue()


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
    first = {}  # several objectives: the plots show the first
    if len(study.directions) > 1:
        first = {"target": lambda t: t.values[0], "target_name": _names(study)[0]}
        del plots["intermediate_values.png"]  # multi-objective trials report none
        plots["pareto_front.png"] = _pareto_plot
    if complete < 2:
        del plots["param_importances.png"]
    written = set()
    for name, plot in plots.items():
        try:
            with _no_warnings():
                axes = plot(study, **first) if name != "pareto_front.png" else plot(study)
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


def _pareto_plot(study: optuna.Study) -> Any:
    """Optuna's front plot of the first two objectives, infeasible trials apart."""
    from optuna.visualization import matplotlib as vis

    names = _names(study)[:2]  # feasibility: the constraints the trials stored
    return vis.plot_pareto_front(study, targets=lambda t: tuple(t.values[:2]), target_names=names)


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    """Optuna's plots warn about experimental APIs and empty studies: not the user's concern."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

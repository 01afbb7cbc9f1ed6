"""``convpipe tune --apply [--trial N]``: a trial's values written into the params file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from convpipe.config.edit import write_values
from convpipe.errors import ConvpipeError
from convpipe.tuning.objectives import best_feasible, feasible, violations


def chosen_trial(study: optuna.Study, number: int | None = None) -> FrozenTrial:
    """The trial ``--apply`` writes: trial ``number``, or the best feasible one.

    Args:
        study: The campaign's study.
        number: A trial number (``--trial``), or None for the complete trial that meets every
            constraint and is best on the first objective (with ``tune.objectives: [val/acc,
            latency_ms]`` and ``latency_ms <= 10``: the most accurate under 10 ms).

    Raises:
        ConvpipeError: No complete trial (meeting the constraints), or trial ``number`` is
            unknown, not complete, or breaks a constraint.
    """
    where = f"in study '{study.study_name}'"
    if number is None:
        best = best_feasible(study)
        if best is not None:
            return best
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            raise ConvpipeError(
                f"none of the {len(complete)} complete trials meets tune.constraints",
                where,
                "loosen the constraints or run more trials, or pick one with --trial N",
            )
        raise ConvpipeError(
            f"study '{study.study_name}' has no complete trial", "", "run convpipe tune first"
        )
    found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not found:
        raise ConvpipeError(
            f"--trial {number}: no such trial", where, "see reports/tuning/trials.csv"
        )
    trial = found[0]
    if trial.state != TrialState.COMPLETE:
        raise ConvpipeError(
            f"--trial {number} is {trial.state.name}, not COMPLETE", where, "pick a complete trial"
        )
    if not feasible(trial):
        broken = {k: v for k, v in violations(trial).items() if v > 0}
        raise ConvpipeError(
            f"--trial {number} breaks tune.constraints (violations {broken})",
            where,
            "pick a feasible trial (pareto_front.csv marks them)",
        )
    return trial


def apply_best(
    study: optuna.Study, params_file: str | Path, number: int | None = None
) -> tuple[FrozenTrial, dict[str, Any]]:
    """Write the chosen trial's values into ``params_file``, changing nothing else in it.

    Comments, order and layout stay as they were; the result is validated before it is
    written (:func:`convpipe.config.edit.write_values`).

    Returns:
        The trial and the values written (floats rounded to 6 significant digits).

    Raises:
        ConvpipeError: See :func:`chosen_trial`; or the result is not valid params.
    """
    trial = chosen_trial(study, number)
    values = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in trial.params.items()}
    write_values(params_file, values, f"trial {trial.number} of study '{study.study_name}'")
    return trial, values

"""``convpipe tune --apply``: the best trial's values written into the params file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from convpipe.config.edit import write_values
from convpipe.errors import ConvpipeError


def apply_best(study: optuna.Study, params_file: str | Path) -> dict[str, Any]:
    """Write the best trial's values into ``params_file``, changing nothing else in it.

    Comments, order and layout stay as they were; the result is validated before it is
    written (:func:`convpipe.config.edit.write_values`).

    Returns:
        The values written (floats rounded to 6 significant digits).

    Raises:
        ConvpipeError: if the study has no complete trial yet, or the result is not valid.
    """
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConvpipeError(
            f"study '{study.study_name}' has no complete trial", "", "run convpipe tune first"
        )
    best = study.best_trial
    values = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in best.params.items()}
    write_values(params_file, values, f"trial {best.number} of study '{study.study_name}'")
    return values

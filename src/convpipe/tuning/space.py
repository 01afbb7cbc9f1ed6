"""The search space of a campaign: checking it, sampling it, and the study's sampler and pruner."""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import Trial, TrialState

from convpipe.config.edit import leaves, set_dotted
from convpipe.config.schema import (
    CategoricalDim,
    FloatDim,
    IntDim,
    Params,
    TuneParams,
    parse_params,
)
from convpipe.errors import ConvpipeError

#: Trials that count toward ``tune.n_trials``: a failed trial (diverged, or its worker died)
#: is reported but does not use up the budget.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)

#: The params a trial reads (the rest shape the prepared data, name paths or configure tuning).
TUNABLE = ("base.seed", "augment.online", "model.", "train.")

#: Keys a trial reads but must not vary.
FIXED = {
    "train.max_epochs": "tune.max_epochs sets the epochs of a trial",
    "train.monitor": "it is the objective",
    "train.monitor_mode": "it sets the study's direction",
}


def _space_problem(key: str, dim: Any, known: Mapping[str, Any]) -> tuple[str, str] | None:
    """Why ``key`` cannot be searched, and what to do, or None."""
    if key not in known:
        tunable = [k for k in known if k.startswith(TUNABLE) and k not in FIXED]
        close = difflib.get_close_matches(key, tunable, n=1)
        return "is not a params key", f"did you mean '{close[0]}'?" if close else "see params.yaml"
    if key in FIXED:
        return f"cannot be tuned ({FIXED[key]})", "remove it from tune.space"
    if not key.startswith(TUNABLE):
        return (
            "cannot be tuned: trials train on the prepared data and read only base.seed, "
            "augment.online, model.* and train.*",
            "remove it from tune.space",
        )
    current = known[key]
    if isinstance(dim, FloatDim) and isinstance(current, int) and not isinstance(current, bool):
        return "holds integers but is searched as type: float", "use type: int"
    return None


def _probes(dim: FloatDim | IntDim | CategoricalDim) -> list[Any]:
    """Values of ``dim`` that must all validate: its ends and middle, or every choice."""
    if isinstance(dim, CategoricalDim):
        return list(dim.choices)
    middle = math.sqrt(dim.low * dim.high) if dim.log else (dim.low + dim.high) / 2
    return [dim.low, dim.high, middle if isinstance(dim, FloatDim) else round(middle)]


def check_space(params: Params) -> None:
    """Refuse search-space keys a trial cannot vary, and ranges the schema would refuse.

    Raises:
        ConvpipeError: naming the key (and the closest valid one for a typo), or the schema's
            complaint about a value of the range.
    """
    known = dict(leaves(params.model_dump(mode="json")))
    for key, dim in params.tune.space.items():
        problem = _space_problem(key, dim, known)
        if problem is not None:
            raise ConvpipeError(
                f"tune.space key '{key}' {problem[0]}", "in params.yaml", problem[1]
            )
        for value in _probes(dim):
            with_values(params, {key: value}, f"tune.space ({key} = {value!r})")


def suggest(trial: Trial, key: str, dim: FloatDim | IntDim | CategoricalDim) -> Any:
    """Sample one value of ``key`` from its search dimension."""
    if isinstance(dim, FloatDim):
        return trial.suggest_float(key, dim.low, dim.high, log=dim.log)
    if isinstance(dim, IntDim):
        return trial.suggest_int(key, dim.low, dim.high, log=dim.log)
    return trial.suggest_categorical(key, dim.choices)


def with_values(params: Params, values: Mapping[str, Any], source: str = "tune.space") -> Params:
    """``params`` with dotted keys replaced by ``values``, validated by the schema again.

    Raises:
        ConvpipeError: if the result is not valid params (``source`` says where it came from).
    """
    raw = params.model_dump(mode="json")
    for key, value in values.items():
        set_dotted(raw, key, value, f"in {source}")
    return parse_params(raw, source)


def best_value(rows: list[dict[str, float]], monitor: str, mode: str) -> float:
    """The best ``monitor`` value over per-epoch history rows.

    Raises:
        ConvpipeError: if no epoch logged ``monitor``, or an epoch logged nan/inf.
    """
    found = [
        (int(row.get("epoch", i)), row[monitor]) for i, row in enumerate(rows) if monitor in row
    ]
    if not found:
        raise ConvpipeError(f"no epoch logged '{monitor}'", "in the trial", "check train.monitor")
    for epoch, value in found:
        if not math.isfinite(value):
            raise diverged(monitor, value, epoch)
    scores = [value for _, value in found]
    return min(scores) if mode == "min" else max(scores)


def diverged(monitor: str, value: float, epoch: int) -> ConvpipeError:
    """The error of a trial whose ``monitor`` became non-finite at ``epoch``."""
    return ConvpipeError(
        f"{monitor} became {value} at epoch {epoch}", "in the trial", "lower or narrow train.lr"
    )


def make_sampler(tune: TuneParams, seed: int, trial: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler of ``tune.sampler``, seeded.

    Args:
        tune: The ``tune`` section.
        seed: ``base.seed``.
        trial: The number of the trial about to be sampled: workers sampling at the same time
            then draw different values (``seed + trial``). QMC ignores it: its points are one
            scrambled Sobol sequence over the whole study, which every worker must share.

    Returns:
        TPE, random, GP and CMA-ES begin with ``tune.startup_trials`` random trials; NSGA-II
        breeds generations of ``tune.startup_trials`` (at least 2) trials.
    """
    samplers = optuna.samplers
    own = seed + trial
    startup = tune.startup_trials
    # the samplers that model constraints read the violations each trial stored with
    # Trial.set_constraint; the others (random,
    # QMC, CMA-ES) draw as before, and reports still choose among feasible trials only
    if tune.sampler == "random":
        return samplers.RandomSampler(seed=own)
    if tune.sampler == "gp":
        return samplers.GPSampler(seed=own, n_startup_trials=startup)
    if tune.sampler == "cmaes":
        return samplers.CmaEsSampler(seed=own, n_startup_trials=startup)
    if tune.sampler == "nsgaii":
        return samplers.NSGAIISampler(seed=own, population_size=max(2, startup))
    if tune.sampler == "qmc":
        with warnings.catch_warnings():  # "experimental since 3.0": asked for by name, no news
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return samplers.QMCSampler(seed=seed, scramble=True, qmc_type="sobol")
    return samplers.TPESampler(seed=own, n_startup_trials=startup)


def make_pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    """The pruner of ``tune.pruner``; epochs are its steps.

    None for several objectives: Optuna's pruners compare one intermediate value per epoch,
    which a multi-objective trial does not report (its diverging trials still fail).
    """
    if len(tune.objectives) > 1:
        return optuna.pruners.NopPruner()
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.startup_trials, n_warmup_steps=tune.warmup_epochs
        )
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, tune.warmup_epochs), max_resource=tune.max_epochs
        )
    return optuna.pruners.NopPruner()

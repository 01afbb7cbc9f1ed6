"""What a trial is scored on: ``tune.objectives`` and ``tune.constraints``.

An objective is a validation metric the training logs (``val/acc``, ``val/loss``, ...: its best
value over the trial's epochs) or a measured cost of the trial's network
(:mod:`convpipe.inference.cost`: ``params``, ``flops``, ``latency_ms``, ``batch_latency_ms``).
Directions are not written: a metric goes its :data:`~convpipe.training.trainer.MONITOR_MODES`
way, ``train.monitor`` its ``train.monitor_mode``, and every cost down. No objectives means
``train.monitor`` alone, the single-objective study of before.

A constraint bounds one of the same metrics (``latency_ms <= 10``); its violation (<= 0 when
met) is stored on the trial with Optuna's ``Trial.set_constraint``, keyed by the constraint's
text, which the samplers that model constraints (TPE, GP, NSGA-II) read, and optuna-dashboard
shows (:func:`violations`). An infeasible trial stays in the
study, marked; reports and ``--apply`` only choose among feasible ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from convpipe.config.schema import Params
from convpipe.errors import ConvpipeError
from convpipe.inference.cost import COST_METRICS
from convpipe.training.trainer import MONITOR_MODES

__all__ = [
    "COSTS_ATTR",
    "best_feasible",
    "check_objectives",
    "direction_of",
    "directions",
    "feasible",
    "named_metrics",
    "needs_costs",
    "objective_names",
    "pareto_front",
    "trial_scores",
    "violations",
]

#: Trial user attribute: the measured costs of the trial's network
COSTS_ATTR = "costs"

Direction = Literal["minimize", "maximize"]


def objective_names(params: Params) -> list[str]:
    """``tune.objectives``, or ``[train.monitor]`` when it is empty."""
    return list(params.tune.objectives) or [params.train.monitor]


def named_metrics(params: Params) -> list[str]:
    """Every metric the objectives and constraints name, each once, objectives first."""
    return list(
        dict.fromkeys([*objective_names(params), *(c.metric for c in params.tune.constraints)])
    )


def direction_of(name: str, params: Params) -> Direction:
    """The way ``name`` improves: costs down, metrics their monitor mode."""
    if name in COST_METRICS:
        return "minimize"
    mode = params.train.monitor_mode if name == params.train.monitor else MONITOR_MODES[name]
    return "minimize" if mode == "min" else "maximize"


def directions(params: Params) -> list[Direction]:
    """Optuna's direction of each objective, in order."""
    return [direction_of(name, params) for name in objective_names(params)]


def _unknown(name: str, where: str) -> ConvpipeError:
    known = [*MONITOR_MODES, *COST_METRICS]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(known)}"
    return ConvpipeError(f"{where} '{name}' is no metric a trial has", "in params.yaml", hint)


def check_objectives(params: Params) -> None:
    """Refuse unknown or repeated metrics, and a sampler that cannot optimise several.

    Raises:
        ConvpipeError: Naming the entry, with the closest known metric.
    """
    names = objective_names(params)
    known = {*MONITOR_MODES, *COST_METRICS}
    for name in params.tune.objectives:
        if name not in known:
            raise _unknown(name, "tune.objectives")
    for constraint in params.tune.constraints:
        if constraint.metric not in known:
            raise _unknown(constraint.metric, "tune.constraints")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConvpipeError(
            f"tune.objectives lists '{repeated[0]}' twice", "in params.yaml", "list it once"
        )
    devices = params.train.devices
    spawned = devices == "auto" or int(devices) > 1 or params.train.num_nodes > 1
    unreported = [
        n for n in named_metrics(params) if n not in COST_METRICS and n != params.train.monitor
    ]
    if spawned and unreported:
        raise ConvpipeError(
            f"a multi-process trial (train.devices {devices}) reports only train.monitor back "
            f"to the campaign, not '{unreported[0]}'",
            "in params.yaml",
            f"score such trials on {params.train.monitor} and costs, or tune with train.devices 1",
        )
    if len(names) > 1 and params.tune.sampler == "cmaes":
        raise ConvpipeError(
            f"tune.sampler cmaes optimises one objective, tune.objectives has {len(names)}",
            "in params.yaml",
            "use tune.sampler tpe, gp or nsgaii for several objectives",
        )


def needs_costs(params: Params) -> bool:
    """Whether an objective or a constraint is a cost (measuring latency takes a few seconds)."""
    return bool(set(named_metrics(params)) & set(COST_METRICS))


def trial_scores(
    best: Mapping[str, float], costs: Mapping[str, float], params: Params
) -> tuple[list[float], list[float]]:
    """The trial's objective values and constraint violations.

    Args:
        best: Each validation metric's best value over the trial's epochs.
        costs: The measured costs (empty when none is wanted).
        params: The trial's params.

    Returns:
        ``(values, violations)``, in the order of ``tune.objectives`` and ``tune.constraints``.
    """
    found = {**best, **costs}
    values = [float(found[name]) for name in objective_names(params)]
    violations = [c.violation(float(found[c.metric])) for c in params.tune.constraints]
    return values, violations


def violations(trial: FrozenTrial) -> dict[str, float]:
    """The violation of each of ``tune.constraints`` by ``trial``, by the constraint's text.

    Stored with Optuna's ``Trial.set_constraint`` (which the samplers read), so a trial that
    stored none (pruned or failed before they were known) has none.
    """
    return {key: float(value) for key, value in trial.constraints.items()}


def feasible(trial: FrozenTrial) -> bool:
    """Whether every constraint holds for ``trial`` (true for a study without constraints)."""
    return all(value <= 0 for value in violations(trial).values())


def _complete_feasible(study: optuna.Study) -> list[FrozenTrial]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in complete if feasible(t)]


def _key(trial: FrozenTrial, study: optuna.Study, index: int) -> float:
    value = float(trial.values[index])
    return -value if study.directions[index] == optuna.study.StudyDirection.MAXIMIZE else value


def best_feasible(study: optuna.Study) -> FrozenTrial | None:
    """The feasible complete trial best on the first objective (ties: the earliest)."""
    candidates = _complete_feasible(study)
    if not candidates:
        return None
    return min(candidates, key=lambda t: (_key(t, study, 0), t.number))


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The feasible complete trials no other feasible one beats on every objective."""
    trials = _complete_feasible(study)
    keys = {t.number: [_key(t, study, i) for i in range(len(study.directions))] for t in trials}

    def dominated(mine: list[float]) -> bool:
        return any(
            all(o <= m for o, m in zip(other, mine, strict=True)) and other != mine
            for other in keys.values()
        )

    return sorted((t for t in trials if not dominated(keys[t.number])), key=lambda t: t.number)

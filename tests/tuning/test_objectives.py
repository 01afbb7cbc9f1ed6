"""tuning/objectives.py and --apply's choice: directions, scores, constraints, the front."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from convpipe.config.schema import load_params
from convpipe.errors import ConvpipeError
from convpipe.tuning.apply import apply_best, chosen_trial
from convpipe.tuning.objectives import (
    best_feasible,
    check_objectives,
    directions,
    feasible,
    needs_costs,
    objective_names,
    pareto_front,
    trial_scores,
    violations,
)
from convpipe.tuning.reports import write_reports
from convpipe.tuning.space import make_pruner
from tests.helpers.project import ROOT

LR = FloatDistribution(1e-4, 1e-1, log=True)


def test_objectives_default_to_the_monitor_and_costs_go_down(make_params) -> None:
    params = make_params()
    assert objective_names(params) == [params.train.monitor] and not needs_costs(params)
    mixed = make_params(**{"tune.objectives": ["val/acc", "latency_ms", "params"]})
    assert directions(mixed) == ["maximize", "minimize", "minimize"] and needs_costs(mixed)
    bounded = make_params(**{"tune.constraints": ["flops <= 1e6"]})
    assert needs_costs(bounded) and objective_names(bounded) == [params.train.monitor]
    assert isinstance(make_pruner(mixed.tune), optuna.pruners.NopPruner)  # none for several


NOT_A_METRIC = "is no metric a trial has, in params.yaml, did you mean"
BAD = {
    "unknown": ({"tune.objectives": ["val/accuracy"]}, f"'val/accuracy' {NOT_A_METRIC} 'val/acc'?"),
    "unknown-constraint": (
        {"tune.constraints": ["latency <= 3"]},
        f"tune.constraints 'latency' {NOT_A_METRIC} 'latency_ms'?",
    ),
    "twice": ({"tune.objectives": ["val/acc", "val/acc"]}, "lists 'val/acc' twice"),
    "ddp-metric": (
        {"tune.objectives": ["val/acc", "latency_ms"], "train.devices": 2},
        "a multi-process trial (train.devices 2) reports only train.monitor back",
    ),
    "cmaes-several": (
        {"tune.objectives": ["val/acc", "params"], "tune.sampler": "cmaes"},
        "tune.sampler cmaes optimises one objective, tune.objectives has 2",
    ),
}


@pytest.mark.parametrize(("overrides", "said"), list(BAD.values()), ids=list(BAD))
def test_bad_objectives_are_one_line(make_params, overrides, said) -> None:
    with pytest.raises(ConvpipeError) as info:
        check_objectives(make_params(**overrides))
    assert said in str(info.value)


def test_a_constraint_that_is_not_a_comparison_is_refused(make_params) -> None:
    with pytest.raises(ConvpipeError, match="is not '<metric> <= <number>'"):
        make_params(**{"tune.constraints": ["latency_ms < 10"]})


def test_scores_and_violations(make_params) -> None:
    params = make_params(
        **{
            "tune.objectives": ["val/acc", "latency_ms"],
            "tune.constraints": ["latency_ms <= 10", "val/acc >= 0.9"],
        }
    )
    values, broken = trial_scores({"val/acc": 0.95}, {"latency_ms": 12.5}, params)
    assert values == [0.95, 12.5]
    assert broken == pytest.approx([2.5, -0.05])  # > 0: broken, <= 0: met
    assert violations(create_trial(value=1.0)) == {}  # none stored
    stored = create_trial(value=1.0, constraints={"latency_ms <= 10": 2.5})
    assert violations(stored) == {"latency_ms <= 10": 2.5} and not feasible(stored)


def _study(rows: list[tuple[float, float, list[float] | None]]) -> optuna.Study:
    """A two-objective study (maximise accuracy, minimise latency) with the given trials."""
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="front")
    with warnings.catch_warnings():  # experimental since Optuna 3.2, used as convpipe does
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val/acc", "latency_ms"])
    for number, (acc, latency, broken) in enumerate(rows):
        bounds = None if broken is None else {f"bound {i}": v for i, v in enumerate(broken)}
        study.add_trial(
            create_trial(
                values=[acc, latency],
                params={"train.lr": 0.001 * (number + 1)},
                distributions={"train.lr": LR},
                constraints=bounds,
            )
        )
    return study


def test_the_front_and_the_best_keep_to_feasible_trials() -> None:
    study = _study(
        [
            (0.90, 5.0, [-5.0]),  # 0: on the front
            (0.95, 9.0, [-1.0]),  # 1: on the front, the most accurate feasible one
            (0.99, 30.0, [20.0]),  # 2: the most accurate, but breaks latency_ms <= 10
            (0.85, 8.0, [-2.0]),  # 3: beaten by 0 on both
        ]
    )
    assert [t.number for t in pareto_front(study)] == [0, 1]
    best = best_feasible(study)
    assert best is not None and best.number == 1
    assert chosen_trial(study).number == 1
    with pytest.raises(ConvpipeError, match=r"--trial 2 breaks tune\.constraints"):
        chosen_trial(study, 2)
    with pytest.raises(ConvpipeError, match="--trial 7: no such trial"):
        chosen_trial(study, 7)


def test_no_feasible_trial_is_said_rather_than_applied(tmp_path: Path) -> None:
    study = _study([(0.99, 30.0, [20.0])])
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    with pytest.raises(
        ConvpipeError, match=r"none of the 1 complete trials meets tune\.constraints"
    ):
        apply_best(study, target)
    assert target.read_bytes() == (ROOT / "params.yaml").read_bytes()
    trial, values = apply_best(_study([(0.9, 5.0, [-1.0])]), target)
    assert trial.number == 0 and load_params(target).train.lr == values["train.lr"] == 0.001


def test_reports_of_several_objectives_have_the_front(tmp_path: Path) -> None:
    study = _study([(0.90, 5.0, [-5.0]), (0.95, 9.0, [-1.0]), (0.99, 30.0, [20.0])])
    study.add_trial(create_trial(state=TrialState.FAIL))
    out = write_reports(study, tmp_path / "reports")
    rows = (out / "pareto_front.csv").read_text().splitlines()
    assert rows[0] == "trial,val/acc,latency_ms,feasible,pareto,train.lr"
    assert rows[1:] == [
        "0,0.9,5.0,True,True,0.001",
        "1,0.95,9.0,True,True,0.002",
        "2,0.99,30.0,False,False,0.003",
    ]
    assert (out / "pareto_front.png").read_bytes().startswith(b"\x89PNG")
    best = (out / "best_params.yaml").read_text()
    assert "trial: 1" in best and "latency_ms: 9.0" in best
    assert not (out / "intermediate_values.png").exists()  # several objectives report none

"""Optuna campaigns: the pure pieces in-process, whole campaigns through the real `convpipe` CLI.

Unit tests use real Optuna storages (journal files, sqlite) in tmp_path and no MLflow. The
``slow`` tests run `convpipe tune` in one throwaway git + DVC copy of the project (data made by
`dvc repro augment` there), each with its own params file, study, journal and MLflow experiment
in the project's own sqlite store, so nothing is written into the repository.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages.journal import JournalStorage
from optuna.trial import TrialState, create_trial
from ruamel.yaml import YAML

from convpipe.config.edit import set_dotted
from convpipe.config.schema import (
    CategoricalDim,
    FloatDim,
    IntDim,
    Params,
    load_params,
    parse_params,
    read_yaml,
)
from convpipe.errors import ConvpipeError
from convpipe.tracking.store import ENV_URI
from convpipe.training.resume import start_record
from convpipe.tuning.apply import apply_best
from convpipe.tuning.campaign import RUN_ATTR, Campaign
from convpipe.tuning.launch import check_workers, plan_slots, split_trials
from convpipe.tuning.liveness import HEARTBEAT_ATTR, REASON_ATTR, fail_stale_trials, heartbeat
from convpipe.tuning.objective import WORKER_ATTR, Abandoned, TrialRunner
from convpipe.tuning.objectives import directions
from convpipe.tuning.retry import FAILED_TRIAL, RESTARTED_ATTR, RETRY_HISTORY, requeue
from convpipe.tuning.space import (
    best_value,
    check_space,
    make_pruner,
    make_sampler,
    suggest,
    with_values,
)
from convpipe.tuning.storage import load_study, open_storage
from tests.helpers.models import TINY_CONV
from tests.helpers.project import ROOT, Project, journal, make_project

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL_CONV = TINY_CONV
#: What every campaign of the slow tests shares: a tiny CNN, short trials, 1 s heartbeats.
FAST = {
    "model.conv": SMALL_CONV,
    "model.hidden": [16],
    "train.batch_size": 128,
    "tune.max_epochs": 4,
    "tune.heartbeat_seconds": 1,
    "tune.sampler": "random",
    "tune.pruner": "none",
    "tune.space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True}},
}


def comments(text: str) -> list[str]:
    """The comment part of every line (empty for lines without one)."""
    return [line.partition("#")[2] for line in text.splitlines()]


# --------------------------------------------------------------------------- search space


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("train.lrr", "is not a params key, in params.yaml, did you mean 'train.lr'?"),
        ("paths.model", "cannot be tuned: trials train on the prepared data"),
        ("tune.n_trials", "cannot be tuned"),
        ("data.val_fraction", "cannot be tuned"),
        ("mlflow.experiment", "cannot be tuned"),
        ("train.max_epochs", "cannot be tuned (tune.max_epochs sets the epochs of a trial)"),
        ("train.monitor_mode", "cannot be tuned (it sets the study's direction)"),
    ],
)
def test_check_space_refuses_keys(make_params, key: str, expected: str) -> None:
    params = make_params(**{"tune.space": {key: {"type": "categorical", "choices": [1]}}})
    with pytest.raises(ConvpipeError) as info:
        check_space(params)
    assert f"tune.space key '{key}' {expected}" in info.value.line()


def test_check_space_refuses_ranges_the_schema_refuses(make_params) -> None:
    space = {"model.dropout": {"type": "float", "low": 0.0, "high": 1.5, "log": False}}
    with pytest.raises(ConvpipeError, match=r"model\.dropout = 1\.5"):
        check_space(make_params(**{"tune.space": space}))
    space = {"train.patience": {"type": "float", "low": 2, "high": 8, "log": False}}
    with pytest.raises(ConvpipeError, match=r"holds integers.*use type: int"):
        check_space(make_params(**{"tune.space": space}))
    space = {"train.optimizer": {"type": "categorical", "choices": ["adam", "adagrad"]}}
    with pytest.raises(ConvpipeError, match="adagrad"):
        check_space(make_params(**{"tune.space": space}))


def test_check_space_accepts_the_shipped_space_and_every_section_trials_read(make_params) -> None:
    check_space(make_params())
    space = {
        "train.batch_size": {"type": "categorical", "choices": [32, "full"]},
        "train.patience": {"type": "int", "low": 2, "high": 9, "log": False},
        "augment.online": {"type": "categorical", "choices": [True, False]},
        "base.seed": {"type": "int", "low": 1, "high": 100, "log": True},
    }
    check_space(make_params(**{"tune.space": space}))


def test_with_values_validates_again(make_params) -> None:
    params = make_params()
    changed = with_values(params, {"model.dropout": 0.5, "train.optimizer": "sgd"})
    assert changed.model.dropout == 0.5 and changed.train.optimizer == "sgd"
    assert params.model.dropout == 0.25  # the original is untouched
    with pytest.raises(ConvpipeError, match=r"model\.dropout") as info:
        with_values(params, {"model.dropout": 1.5})
    assert "in tune.space" in info.value.line()


def test_suggest_each_kind_of_dimension() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        lr = suggest(trial, "train.lr", FloatDim(type="float", low=1e-4, high=1e-1, log=True))
        hidden = suggest(trial, "train.patience", IntDim(type="int", low=2, high=5, log=False))
        opt = suggest(
            trial, "train.optimizer", CategoricalDim(type="categorical", choices=["sgd", "adam"])
        )
        assert isinstance(lr, float) and 1e-4 <= lr <= 1e-1
        assert isinstance(hidden, int) and 2 <= hidden <= 5
        assert opt in ("sgd", "adam")
        assert trial.params == {"train.lr": lr, "train.patience": hidden, "train.optimizer": opt}
        study.tell(trial, 0.0)


def test_direction_and_best_value(make_params) -> None:
    assert directions(make_params()) == ["minimize"]
    flipped = make_params(**{"train.monitor": "val/acc", "train.monitor_mode": "max"})
    assert directions(flipped) == ["maximize"]
    rows = [{"epoch": 0.0, "val/loss": 0.5, "val/acc": 0.7}, {"epoch": 1.0, "val/loss": 0.3}]
    rows.append({"epoch": 2.0, "val/loss": 0.4, "val/acc": 0.9})
    assert best_value(rows, "val/loss", "min") == 0.3
    assert best_value(rows, "val/acc", "max") == 0.9
    with pytest.raises(ConvpipeError, match="no epoch logged 'train/acc'"):
        best_value(rows, "train/acc", "max")
    rows.append({"epoch": 3.0, "val/loss": float("nan")})
    with pytest.raises(ConvpipeError, match="val/loss became nan at epoch 3"):
        best_value(rows, "val/loss", "min")


def test_samplers_and_pruners(make_params) -> None:
    tpe = make_sampler(make_params().tune, 1)
    assert isinstance(tpe, optuna.samplers.TPESampler)
    random = make_sampler(make_params(**{"tune.sampler": "random"}).tune, 1)
    assert isinstance(random, optuna.samplers.RandomSampler)
    kinds = {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }
    for name, kind in kinds.items():
        assert isinstance(make_pruner(make_params(**{"tune.pruner": name}).tune), kind)


def load_params_with(overrides: dict[str, Any]) -> Params:
    """The shipped params with dotted-key overrides (for helpers outside a fixture)."""
    raw = read_yaml(ROOT / "params.yaml")
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return parse_params(raw)


SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "gp": optuna.samplers.GPSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "nsgaii": optuna.samplers.NSGAIISampler,
    "qmc": optuna.samplers.QMCSampler,
}
#: a float and an int dimension: every sampler can search it (CMA-ES has no categorical)
NUMERIC_SPACE = {
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "train.batch_size": {"type": "int", "low": 16, "high": 128, "log": False},
}


def _drive(sampler: str, trials: int, seed: int = 3) -> list[dict[str, Any]]:
    """Sample ``trials`` trials as ``run_trial`` does: the sampler reseeded per trial number."""
    tune = load_params_with(
        {"tune.sampler": sampler, "tune.startup_trials": 3, "tune.space": NUMERIC_SPACE}
    ).tune
    study = optuna.create_study(sampler=make_sampler(tune, seed))
    for _ in range(trials):
        trial = study.ask()
        study.sampler = make_sampler(tune, seed, trial.number)
        values = {key: suggest(trial, key, dim) for key, dim in tune.space.items()}
        study.tell(
            trial, (math.log10(values["train.lr"]) + 2) ** 2 + values["train.batch_size"] / 1e3
        )
    return [t.params for t in study.trials]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_is_seeded_and_searches_the_space(name: str) -> None:
    assert isinstance(
        make_sampler(load_params_with({"tune.sampler": name}).tune, 1), SAMPLERS[name]
    )
    first, again = _drive(name, 5), _drive(name, 5)  # 3 random, then 2 from the model
    assert first == again  # the same seed: the same trials, model-based ones included
    assert len({tuple(sorted(p.items())) for p in first}) >= 4  # it moves through the space
    for values in first:
        assert 1e-4 <= values["train.lr"] <= 1e-1 and 16 <= values["train.batch_size"] <= 128
    assert _drive(name, 5, seed=4) != first


def test_qmc_points_are_one_sequence_whatever_the_trial_seeds() -> None:
    """Reseeding per trial (parallel workers) must not restart the scrambled Sobol sequence."""
    tune = load_params_with({"tune.sampler": "qmc", "tune.space": NUMERIC_SPACE}).tune
    one_sampler = optuna.create_study(sampler=make_sampler(tune, 3))
    for _ in range(5):
        trial = one_sampler.ask()
        for key, dim in tune.space.items():
            suggest(trial, key, dim)
        one_sampler.tell(trial, 0.0)
    assert [t.params for t in one_sampler.trials] == _drive("qmc", 5)


def test_cmaes_with_a_categorical_dimension_is_refused_in_one_line() -> None:
    space = {
        **NUMERIC_SPACE,
        "train.optimizer": {"type": "categorical", "choices": ["adam", "sgd"]},
    }
    with pytest.raises(ConvpipeError) as info:
        load_params_with({"tune.sampler": "cmaes", "tune.space": space})
    assert "tune.sampler cmaes searches float and int dimensions only" in str(info.value)
    assert "'train.optimizer' is categorical" in str(info.value)


# --------------------------------------------------------------------------- storages


def test_open_storage_journal_and_sqlite_create_their_folder(tmp_path: Path) -> None:
    storage = open_storage(f"journal:{tmp_path / 'a' / 'b' / 'study.journal'}")
    assert isinstance(storage, JournalStorage)
    rdb = open_storage(f"sqlite:///{tmp_path / 'c' / 'optuna.db'}")
    assert isinstance(rdb, optuna.storages.RDBStorage)
    assert (tmp_path / "c" / "optuna.db").is_file()


def test_open_storage_errors_never_show_the_password() -> None:
    with pytest.raises(ConvpipeError) as info:
        open_storage(
            "postgresql://u:Ab/secret@127.0.0.1:1/db"
        )  # '/' unencoded: SQLAlchemy takes it
    line = info.value.line()
    assert line.startswith("convpipe: error: cannot open tune.storage")
    assert "secret" not in line and "u:***@127.0.0.1:1/db" in line
    assert "refused" in line.lower(), line  # the driver really tried: not a missing module
    with pytest.raises(ConvpipeError, match="is not a storage URL") as info:
        open_storage("u:secret@optuna.db")
    assert "secret" not in info.value.line()


def test_load_study_refuses_the_other_direction(make_params, tmp_path: Path) -> None:
    storage = f"journal:{tmp_path / 'study.journal'}"
    study = load_study(make_params(**{"tune.storage": storage}))
    assert study.direction.name == "MINIMIZE"
    again = load_study(make_params(**{"tune.storage": storage}))  # continues: no error
    assert again._study_id == study._study_id
    flipped = make_params(
        **{"tune.storage": storage, "train.monitor": "val/acc", "train.monitor_mode": "max"}
    )
    with pytest.raises(ConvpipeError, match=r"was created to minimize.*use a new tune\.study_name"):
        load_study(flipped)


# --------------------------------------------------------------------------- liveness


def test_heartbeat_updates_the_trial_until_it_ends(tmp_path: Path) -> None:
    study = optuna.create_study(storage=journal(tmp_path / "beat.journal"))
    trial = study.ask()
    with heartbeat(study, trial._trial_id, 0.2):
        first = study.trials[0].user_attrs[HEARTBEAT_ATTR]
        time.sleep(0.7)
        later = study.trials[0].user_attrs[HEARTBEAT_ATTR]
    assert time.time() - 2 < first < later
    time.sleep(0.4)
    assert study.trials[0].user_attrs[HEARTBEAT_ATTR] == later  # stopped with the context


def test_a_trial_failed_by_another_worker_is_lost_to_its_own_and_stops(tmp_path: Path) -> None:
    """A paused worker, taken for dead, must not touch the trial its retry now owns."""
    study = optuna.create_study(storage=journal(tmp_path / "lost.journal"))
    trial = study.ask()
    with heartbeat(study, trial._trial_id, 0.1) as lost:
        time.sleep(0.3)
        assert not lost.is_set()
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # the other one
        assert lost.wait(2.0)
    stop = Abandoned(trial, lost)
    with pytest.raises(ConvpipeError, match=f"trial {trial.number} was taken for dead"):
        stop.on_train_batch_end(None, None, None, None, 0)  # type: ignore[arg-type]
    spawned = pickle.loads(pickle.dumps(stop))  # a ddp_spawn rank gets no event
    spawned.on_train_batch_end(None, None, None, None, 0)  # type: ignore[arg-type]


def test_fail_stale_trials_fails_only_silent_ones(tmp_path: Path) -> None:
    study = optuna.create_study(storage=journal(tmp_path / "stale.journal"))
    dead, alive, new = study.ask(), study.ask(), study.ask()
    dead.set_user_attr(HEARTBEAT_ATTR, time.time() - 100)
    alive.set_user_attr(HEARTBEAT_ATTR, time.time())
    seen: list[optuna.trial.FrozenTrial] = []
    failed = fail_stale_trials(study, 3.0, seen.append)
    assert failed == [t.number for t in seen] == [dead.number]
    assert seen[0].state == TrialState.FAIL and REASON_ATTR in seen[0].user_attrs
    states = {t.number: t.state for t in study.trials}
    assert states == {
        dead.number: TrialState.FAIL,
        alive.number: TrialState.RUNNING,
        new.number: TrialState.RUNNING,  # no beat yet: its start time counts
    }
    assert (
        study.trials[dead.number]
        .user_attrs[REASON_ATTR]
        .startswith("worker stopped: no heartbeat for 10")
    )
    assert fail_stale_trials(study, 3.0, seen.append) == []


def test_a_stopped_trial_is_queued_again_with_its_params_until_retries_or_budget_run_out(
    make_params, tmp_path: Path
) -> None:
    params = make_params(**{"tune.n_trials": 3, "tune.retries": 2})
    study = optuna.create_study(storage=journal(tmp_path / "retry.journal"))
    folder = tmp_path / "trial-0"
    first = study.ask()
    first.suggest_float("train.lr", 1e-3, 1e-1, log=True)
    first.set_user_attr(RUN_ATTR, "run-0")
    first.set_user_attr(HEARTBEAT_ATTR, time.time() - 100)
    first.set_user_attr(REASON_ATTR, "worker stopped")
    frozen = study.tell(first, state=TrialState.FAIL)
    assert requeue(study, frozen, params, folder)
    waiting = study.trials[-1]
    assert waiting.state == TrialState.WAITING and waiting.params == frozen.params
    # the run goes on; neither the old beat (it would look dead) nor the old reason
    assert waiting.user_attrs == {RUN_ATTR: "run-0"}
    assert waiting.system_attrs[FAILED_TRIAL] == 0 and waiting.system_attrs[RETRY_HISTORY] == [0]
    # optuna's own reader agrees
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(waiting) == 0
    second = study.ask()  # a queued retry is what the next worker gets
    assert second.number == waiting.number and second.params == frozen.params
    frozen = study.tell(second, state=TrialState.FAIL)
    assert requeue(study, frozen, params, folder)
    third = study.ask()
    assert study.trials[third.number].system_attrs[RETRY_HISTORY] == [0, 1]
    frozen = study.tell(third, state=TrialState.FAIL)
    folder.mkdir()
    assert not requeue(study, frozen, params, folder)  # tried 1 + 2 retries: given up
    assert not folder.exists()  # its checkpoint is never used: removed
    for _ in range(3):  # the budget met: nothing queued
        study.tell(study.ask(), 1.0)
    again = study.tell(study.ask(), state=TrialState.FAIL)
    assert not requeue(study, again, params, folder)
    assert not [t for t in study.trials if t.state == TrialState.WAITING]


def test_a_retry_of_other_params_data_or_code_starts_over_and_says_why(
    make_params, tmp_path: Path, caplog
) -> None:
    params = make_params(**{"tune.n_trials": 3})
    study = optuna.create_study(storage=journal(tmp_path / "restart.journal"))
    first = study.ask()
    first.suggest_float("train.lr", 1e-3, 1e-1, log=True)
    requeue(study, study.tell(first, state=TrialState.FAIL), params, tmp_path / "unused")
    retry = study.ask()
    stored = study._storage.get_trial(retry._trial_id)
    folder = tmp_path / "trial-0"
    start_record(folder, "run-0", {"model": {"width": 1.0}, "code": "before"})
    (folder / "last.ckpt").write_bytes(b"a checkpoint of the older code")
    current = {"model": {"width": 1.0}, "code": "after"}
    with caplog.at_level(logging.WARNING, logger="convpipe"):
        assert TrialRunner._resume_point(retry, stored, folder, current) is None
    said = study._storage.get_trial(retry._trial_id).user_attrs[RESTARTED_ATTR]
    assert (
        "code changed" in said
        and f"trial {retry.number} (a retry of trial 0) starts over" in caplog.text
    )
    shutil.rmtree(folder)  # killed before its first epoch ended: nothing to go on from
    assert TrialRunner._resume_point(retry, stored, folder, current) is None
    assert study._storage.get_trial(retry._trial_id).user_attrs[RESTARTED_ATTR] == (
        "no checkpoint was saved"
    )
    fresh = study.ask()  # not a retry: never looks for a checkpoint
    assert (
        TrialRunner._resume_point(fresh, study._storage.get_trial(fresh._trial_id), folder, current)
        is None
    )
    assert RESTARTED_ATTR not in study._storage.get_trial(fresh._trial_id).user_attrs


# --------------------------------------------------------------------------- MLflow nesting


@pytest.mark.slow
def test_campaign_keeps_one_parent_run_per_study(make_params, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the new experiment's artifacts go under the cwd
    monkeypatch.delenv(ENV_URI, raising=False)
    params = make_params(
        **{
            "tune.storage": "journal:study.journal",
            "mlflow.tracking_uri": "sqlite:///mlflow.db",
            "mlflow.experiment": "nesting",
        }
    )
    study = load_study(params)
    first = Campaign(params, study)
    assert study.user_attrs[RUN_ATTR] == first.parent_id
    client = MlflowClient(first.uri)  # absolute: MLflow caches stores by URI string
    parent = client.get_run(first.parent_id)
    assert parent.info.status == "RUNNING" and parent.info.run_name == "tune-convpipe"
    assert parent.data.params["storage"] == "journal:study.journal"
    assert parent.data.params["train.lr"] == "0.003"  # the fixed params are on the parent
    # the id recorded on the study is lost (a worker died before writing it): found by its tag
    study.set_user_attr(RUN_ATTR, "0" * 32)
    second = Campaign(params, study)
    assert second.parent_id == first.parent_id == study.user_attrs[RUN_ATTR]
    # a worker elsewhere opened a parent at the same moment: the earlier one wins
    assert second._new_parent() == first.parent_id
    runs = client.search_runs([first.experiment_id])
    assert [r.info.run_id for r in runs] == [first.parent_id]
    # a trial whose worker died: its child run is closed FAIL with the reason
    trial = study.ask()
    run_id = first.start_trial(trial, {"train.lr": 0.01})
    trial.set_user_attr(HEARTBEAT_ATTR, time.time() - 60)
    assert fail_stale_trials(study, 3, second.end_stale) == [trial.number]
    child = client.get_run(run_id)
    assert child.info.status == "FAILED" and child.data.tags["optuna.state"] == "FAIL"
    assert child.data.tags["optuna.fail_reason"].startswith("worker stopped: no heartbeat")
    assert child.data.tags["mlflow.parentRunId"] == first.parent_id
    second.close("KILLED")
    assert client.get_run(first.parent_id).info.status == "KILLED"
    assert Path(parent.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path)


# --------------------------------------------------------------------------- --apply


def study_with(trials: list[tuple[dict[str, Any], TrialState]]) -> optuna.Study:
    distributions = {
        "train.lr": FloatDistribution(1e-5, 1.0, log=True),
        "model.dropout": FloatDistribution(0.0, 0.6),
        "train.optimizer": CategoricalDistribution(["adam", "sgd"]),
        "train.batch_size": IntDistribution(16, 256),
    }
    study = optuna.create_study(study_name="apply")
    for values, state in trials:
        value = 0.1 if state == TrialState.COMPLETE else None
        study.add_trial(
            create_trial(
                params=values,
                distributions={k: distributions[k] for k in values},
                value=value,
                state=state,
            )
        )
    return study


def test_apply_best_changes_only_the_values(tmp_path: Path) -> None:
    target = tmp_path / "params.yaml"
    original = "# café ≥ naïve: offsets are characters, not bytes\n" + (
        ROOT / "params.yaml"
    ).read_text(encoding="utf-8")
    target.write_text(original, encoding="utf-8")
    best = {
        "train.lr": 0.000123456789,
        "model.dropout": 0.3333333333,
        "train.optimizer": "sgd",
        "train.batch_size": 128,
    }
    study = study_with([(best, TrialState.COMPLETE)])
    trial, values = apply_best(study, target)
    assert trial.number == 0 and values == {
        "train.lr": 0.000123457,
        "model.dropout": 0.333333,
        "train.optimizer": "sgd",
        "train.batch_size": 128,
    }
    text = target.read_text(encoding="utf-8")
    assert comments(text) == comments(original)
    changed = [
        new.split(":")[0].strip()
        for old, new in zip(original.splitlines(), text.splitlines(), strict=True)
        if old != new
    ]
    assert changed == ["dropout", "optimizer", "lr", "batch_size"]
    lines = dict(zip(original.splitlines(), text.splitlines(), strict=True))
    lr = next(line for line in lines if line.startswith("  lr: 0.003 "))
    assert lines[lr] == lr.replace("0.003      ", "0.000123457", 1)  # comment column kept
    optimizer = next(line for line in lines if line.startswith("  optimizer: adam "))
    assert lines[optimizer] == optimizer.replace("adam ", "sgd  ", 1)  # comment column kept
    params = load_params(target)
    assert params.train.lr == 0.000123457 and params.model.dropout == 0.333333
    assert params.train.optimizer == "sgd" and params.train.batch_size == 128


def test_apply_best_needs_a_complete_trial(tmp_path: Path) -> None:
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    study = study_with([({"train.lr": 0.1}, TrialState.PRUNED), ({}, TrialState.FAIL)])
    with pytest.raises(ConvpipeError, match="has no complete trial"):
        apply_best(study, target)
    assert target.read_bytes() == (ROOT / "params.yaml").read_bytes()


def test_apply_best_refuses_a_result_that_does_not_validate(tmp_path: Path) -> None:
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    study = study_with([({"model.dropout": 0.5, "train.lr": 1.0}, TrialState.COMPLETE)])
    study.add_trial(
        create_trial(
            params={"train.batch_size": 0},
            distributions={"train.batch_size": IntDistribution(0, 4)},
            value=0.0,
        )
    )
    with pytest.raises(ConvpipeError, match=r"train\.batch_size"):
        apply_best(study, target)
    assert target.read_bytes() == (ROOT / "params.yaml").read_bytes()


# --------------------------------------------------------------------------- campaigns (CLI)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """A project copy with prepared + augmented digits, run with one thread per process."""
    proj = make_project(tmp_path_factory.mktemp("tuneproj"))
    proj.env["OMP_NUM_THREADS"] = "1"  # two cores: workers must not oversubscribe them
    proj.env.pop("MLFLOW_TRACKING_URI", None)  # the project's own sqlite store
    proj.run("dvc", "repro", "augment")
    return proj


def write_params(project: Project, name: str, **overrides: Any) -> str:
    """``<name>.yaml``: the project's params.yaml with FAST, a study of its own and overrides."""
    return project.params_copy(
        name,
        **{
            **FAST,
            "tune.study_name": name,
            "tune.storage": f"journal:{name}.journal",
            "paths.tuning_reports": f"reports/{name}",
            "mlflow.experiment": name,
            **overrides,
        },
    )


def stored_study(project: Project, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=journal(project.root / f"{name}.journal"))


def mlflow_runs(project: Project, experiment: str, db: str = "mlflow.db") -> tuple[Run, list[Run]]:
    """The one parent run of ``experiment`` and its child runs."""
    client = MlflowClient(f"sqlite:///{project.root / db}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    runs = client.search_runs([found.experiment_id])
    parents = [r for r in runs if r.data.tags.get("convpipe.kind") == "tuning"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    return parent, children


def run_workers(project: Project, cmd: list[str], logs: Path, workers: int = 2) -> None:
    """Start ``workers`` copies of ``cmd`` at once in the project; each must exit 0."""
    paths = [logs / f"worker{i}.log" for i in range(workers)]
    procs = []
    for path in paths:
        with open(path, "w", encoding="utf-8") as fh:
            procs.append(
                subprocess.Popen(
                    cmd, cwd=project.root, env=project.env, stdout=fh, stderr=subprocess.STDOUT
                )
            )
    try:
        codes = [proc.wait(timeout=200) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for code, path in zip(codes, paths, strict=True):
        assert code == 0, path.read_text()


def counted(trials: list[optuna.trial.FrozenTrial]) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)


@pytest.mark.slow
def test_campaign_prunes_and_nests_one_child_run_per_trial(project: Project) -> None:
    params = write_params(
        project,
        "t1",
        **{
            "tune.pruner": "median",
            "tune.startup_trials": 2,
            "tune.warmup_epochs": 1,
            "tune.space": {
                "train.lr": {"type": "float", "low": 1.0e-5, "high": 0.1, "log": True},
                "model.dropout": {"type": "float", "low": 0.0, "high": 0.5, "log": False},
            },
        },
    )
    out = project.run("convpipe", "--params", params, "tune", "--n-trials", "8")
    assert "study t1: " in out.stdout and "reports in reports/t1/" in out.stdout
    study = stored_study(project, "t1")
    trials = study.trials
    states = [t.state for t in trials]
    assert len(trials) == 8 and set(states) == {TrialState.COMPLETE, TrialState.PRUNED}, states
    parent, children = mlflow_runs(project, "t1")
    assert parent.info.status == "FINISHED"
    assert study.user_attrs[RUN_ATTR] == parent.info.run_id
    assert parent.data.params["storage"] == "journal:t1.journal"
    assert parent.data.metrics["trials_finished"] == 8
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert len(children) == 8
    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    for trial in trials:
        run = by_number[trial.number]
        assert run.info.run_id == trial.user_attrs[RUN_ATTR]
        assert run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[trial.state.name]
        assert set(run.data.params) == {"train.lr", "model.dropout"}
        metric = sorted(
            client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step
        )
        history = [m.value for m in metric]
        assert history == pytest.approx(list(trial.intermediate_values.values()))
        if trial.state == TrialState.COMPLETE:
            assert len(history) == 4 and run.data.metrics["objective"] == trial.value
        # the objective only ever saw validation: no test split was evaluated
        assert not [key for key in run.data.metrics if key.startswith("test/")]
    assert not [key for key in parent.data.metrics if key.startswith("test/")]
    reports = project.root / "reports" / "t1"
    assert sorted(p.name for p in reports.iterdir()) == sorted(
        [
            "best_params.yaml",
            "trials.csv",
            "optimization_history.png",
            "intermediate_values.png",
            "parallel_coordinate.png",
            "param_importances.png",
        ]
    )
    for png in reports.glob("*.png"):
        assert png.read_bytes().startswith(PNG_MAGIC), png.name
    with open(reports / "trials.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["state"] for row in rows] == [t.state.name for t in trials]
    best = YAML(typ="safe").load(reports / "best_params.yaml")
    assert best["trial"] == study.best_trial.number and best["params"] == study.best_params


def _start(project: Project, cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w", encoding="utf-8") as fh:
        return subprocess.Popen(
            cmd,
            cwd=project.root,
            env=project.env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _when_running_with(project: Project, name: str, proc: subprocess.Popen, epochs: int) -> int:
    """The number of the running trial once it has reported ``epochs`` epochs."""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if not (project.root / f"{name}.journal").exists():
            continue
        for trial in stored_study(project, name).trials:
            if trial.state == TrialState.RUNNING and len(trial.intermediate_values) >= epochs:
                return trial.number
    raise AssertionError(f"never saw a running trial with {epochs} epochs (exit {proc.poll()})")


@pytest.mark.slow
def test_a_preempted_then_killed_trial_goes_on_from_its_checkpoint_and_counts_once(
    project: Project, tmp_path: Path
) -> None:
    """SIGTERM, then kill -9 of the next worker: the one trial ends in one MLflow run."""
    params = write_params(project, "t2", **{"tune.n_trials": 2, "tune.max_epochs": 12})
    cmd = ["convpipe", "--params", params, "tune"]
    first = _start(project, cmd, tmp_path / "first.log")
    try:
        victim = _when_running_with(project, "t2", first, 2)
        first.send_signal(signal.SIGTERM)  # a scheduler's preemption notice
        code = first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    said = (tmp_path / "first.log").read_text()
    assert code == 128 + signal.SIGTERM, said
    assert "convpipe: error: stopped by SIGTERM at epoch" in said and "Traceback" not in said
    assert "rerun `convpipe tune`" in said
    second = _start(project, cmd, tmp_path / "second.log")
    try:
        retry = _when_running_with(project, "t2", second, 6)
    finally:
        os.killpg(second.pid, signal.SIGKILL)  # a worker that dies without a word
        second.wait()
    out = project.run(*cmd)
    assert f"trial {retry} marked FAIL: worker stopped" in out.stderr
    assert f"goes on with trial {victim} from" in (tmp_path / "second.log").read_text()
    assert f"goes on with trial {victim} from" in out.stderr
    study = stored_study(project, "t2")
    trials = study.trials
    assert counted(trials) == 2
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert trials[victim].state == trials[retry].state == TrialState.FAIL
    assert trials[victim].user_attrs[REASON_ATTR].startswith("stopped by SIGTERM at epoch")
    (last,) = [t for t in trials if t.system_attrs.get(FAILED_TRIAL) == victim and t.number > retry]
    assert last.state == TrialState.COMPLETE
    assert last.system_attrs[RETRY_HISTORY] == [victim, retry]
    assert RESTARTED_ATTR not in last.user_attrs
    assert sorted(last.intermediate_values) == list(range(12))  # every epoch, once
    # one MLflow child run for the three attempts, and one for the other trial
    parent, children = mlflow_runs(project, "t2")
    assert parent.info.status == "FINISHED"
    assert len(children) == 2
    run_id = trials[victim].user_attrs[RUN_ATTR]
    assert trials[retry].user_attrs[RUN_ATTR] == last.user_attrs[RUN_ATTR] == run_id
    run = {r.info.run_id: r for r in children}[run_id]
    assert run.info.status == "FINISHED"
    assert run.data.tags["optuna.attempts"] == f"{victim}, {retry}, {last.number}"
    assert run.data.tags["optuna.state"] == "COMPLETE"
    client = MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(run_id, "val/loss")]
    assert sorted(set(steps)) == list(range(12))
    assert steps.count(0) == steps.count(1) == 1  # resumed, not trained again from the start
    assert len(steps) < 16
    assert not list((project.root / "tuning-checkpoints").rglob("*.ckpt"))  # cleaned up


@pytest.mark.slow
def test_two_workers_at_once_share_one_study(project: Project, tmp_path: Path) -> None:
    params = write_params(
        project, "t3", **{"mlflow.tracking_uri": "sqlite:///workers.db", "tune.max_epochs": 3}
    )
    cmd = ["convpipe", "--params", params, "tune", "--n-trials", "3"]
    run_workers(project, cmd, tmp_path)
    study = stored_study(project, "t3")
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert len({t.params["train.lr"] for t in study.trials}) == 6  # no two drew the same point
    # both workers started on a fresh MLflow store: one schema, one parent, six children
    parent, children = mlflow_runs(project, "t3", db="workers.db")
    assert study.user_attrs[RUN_ATTR] == parent.info.run_id
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == list(range(6))
    assert {r.info.status for r in children} == {"FINISHED"}


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_two_workers_start_together_on_a_fresh_sqlite_storage(
    project: Project, tmp_path: Path, attempt: int
) -> None:
    # the default storage kind (sqlite), created by both workers at the same moment
    name = f"race{attempt}"
    params = write_params(
        project,
        name,
        **{"tune.storage": f"sqlite:///{name}.db", "tune.max_epochs": 1, "tune.n_trials": 2},
    )
    cmd = ["convpipe", "--params", params, "tune", "--n-trials", "1"]
    run_workers(project, cmd, tmp_path)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{project.root / name}.db")
    assert sorted(t.number for t in study.trials) == [0, 1]  # each asked-for trial, once
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}


@pytest.mark.slow
def test_apply_writes_the_best_values_and_train_must_rerun(project: Project) -> None:
    project.set_params(
        **{
            **FAST,
            "train.max_epochs": 1,
            "tune.max_epochs": 2,
            "tune.space": {
                "train.lr": {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True},
                "model.dropout": {"type": "float", "low": 0.0, "high": 0.5, "log": False},
            },
        },
    )
    project.run("git", "commit", "-qam", "small model for the tuning test")
    project.run("dvc", "repro", "train")
    assert not re.search(r"^train:", project.run("dvc", "status").stdout, re.MULTILINE)
    before = (project.root / "params.yaml").read_text(encoding="utf-8")
    project.run("convpipe", "tune", "--n-trials", "1")  # the shipped sqlite:///optuna.db storage
    assert (project.root / "optuna.db").is_file()
    assert (project.root / "params.yaml").read_text(encoding="utf-8") == before
    out = project.run("convpipe", "tune", "--n-trials", "0", "--apply")
    assert "params.yaml: applied trial 0: train.lr=" in out.stdout
    after = (project.root / "params.yaml").read_text(encoding="utf-8")
    assert after != before and comments(after) == comments(before)
    study = optuna.load_study(
        study_name="convpipe", storage=f"sqlite:///{project.root / 'optuna.db'}"
    )
    assert len(study.trials) == 1  # --n-trials 0 ran nothing
    params = load_params(project.root / "params.yaml")
    assert params.train.lr == pytest.approx(study.best_params["train.lr"], rel=1e-5)
    assert params.model.dropout == pytest.approx(study.best_params["model.dropout"], rel=1e-5)
    diff = project.run("dvc", "params", "diff").stdout
    assert "train.lr" in diff and "model.dropout" in diff
    status = project.run("dvc", "status").stdout
    train = re.search(r"^train:\n((?:\s.*\n)*)", status, re.MULTILINE)
    assert train is not None, status
    # dvc.yaml lists train's params by section: both tuned sections changed
    assert re.findall(r"modified:\s+(\S+)", train[1]) == ["model", "train"], status


@pytest.mark.slow
def test_diverged_trials_fail_and_the_campaign_goes_on(project: Project) -> None:
    params = write_params(
        project,
        "t5",
        **{
            "train.optimizer": "sgd",
            "tune.n_trials": 3,
            "tune.max_epochs": 2,
            "tune.space": {"train.lr": {"type": "categorical", "choices": [0.05, 1.0e6]}},
        },
    )
    project.run("convpipe", "--params", params, "tune")
    study = stored_study(project, "t5")
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and {t.params["train.lr"] for t in failed} == {1.0e6}
    assert all(re.search("became (nan|inf)", t.user_attrs[REASON_ATTR]) for t in failed)
    assert counted(study.trials) == 3  # failed trials do not use the budget
    assert {t.state for t in study.trials} == {TrialState.COMPLETE, TrialState.FAIL}
    _, children = mlflow_runs(project, "t5")
    by_id = {r.info.run_id: r for r in children}
    for trial in failed:
        run = by_id[trial.user_attrs[RUN_ATTR]]
        assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "FAIL"
        assert re.search("became (nan|inf)", run.data.tags["optuna.fail_reason"])


# --------------------------------------------------------------------------- --workers


def test_n_trials_are_shared_out_exactly_over_the_workers() -> None:
    assert split_trials(5, 2) == [3, 2]
    assert split_trials(1, 3) == [1, 0, 0]
    assert split_trials(None, 2) == [None, None]
    # a worker with nothing to run is not started
    assert [s.n_trials for s in plan_slots(3, [0, 1], [], 1)] == [1]


def test_workers_are_pinned_to_a_share_of_the_cores_or_one_gpu_each() -> None:
    cpu = plan_slots(2, [1, 0], [], None)
    assert [s.cpus for s in cpu] == [(0,), (1,)] and {s.gpu for s in cpu} == {None}
    assert cpu[0].env({"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
    wide = plan_slots(4, list(range(16)), [], None)
    assert [s.cpus for s in wide] == [tuple(range(4 * i, 4 * i + 4)) for i in range(4)]
    assert wide[1].describe() == "CPUs 4-7"
    # eight GPUs, eight workers: one each; more workers than GPUs go round robin
    gpus = [str(i) for i in range(8)]
    assert [s.gpu for s in plan_slots(8, list(range(16)), gpus, None)] == gpus
    shared = plan_slots(3, [0, 1], ["4", "6"], None)
    assert [s.gpu for s in shared] == ["4", "6", "4"]
    assert [s.cpus for s in shared] == [(0,), (1,), (0,)]  # more workers than cores: shared
    env = shared[1].env({})
    assert env == {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "6"}
    assert shared[1].describe() == "GPU 6, CPU 1"


def test_workers_need_single_device_trials(make_params) -> None:
    check_workers(make_params(), 2)
    with pytest.raises(ConvpipeError, match="--workers must be 1 or more, got 0"):
        check_workers(make_params(), 0)
    with pytest.raises(ConvpipeError) as info:
        check_workers(make_params(**{"train.devices": 2}), 2)
    assert "set train.devices: 1 and train.num_nodes: 1" in info.value.line()
    check_workers(make_params(**{"train.devices": 2}), 1)  # one worker: DDP trials as before


@pytest.mark.slow
def test_workers_flag_runs_the_exact_budget_in_parallel_pinned_processes(
    project: Project,
) -> None:
    """Also the accuracy-against-cost question: two objectives, a latency bound, --apply."""
    # trials long enough (~10 s) that the second worker starts before the first ends them all
    overrides = {
        "tune.n_trials": 4,
        "tune.max_epochs": 10,
        "tune.objectives": ["val/acc", "latency_ms"],
        "tune.constraints": ["latency_ms <= 10000", "val/loss <= 100"],  # a cost and a metric
    }
    params = write_params(project, "tw", **overrides)
    env = {k: v for k, v in project.env.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        ["convpipe", "--params", params, "tune", "--workers", "2", "--apply"],
        cwd=project.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    study = stored_study(project, "tw")
    assert len(study.trials) == 4 and {t.state for t in study.trials} == {TrialState.COMPLETE}
    workers = [t.user_attrs[WORKER_ATTR] for t in study.trials]
    cores = len(os.sched_getaffinity(0))
    assert {w["cpus"] for w in workers} == {max(1, cores // 2)}  # each pinned to its share
    assert len({w["pid"] for w in workers}) == 2  # both workers ran trials
    assert re.search(r"worker 0 \(pid \d+\): CPU", done.stderr)
    assert re.search(r"worker 1 \(pid \d+\): CPU", done.stderr)
    # the summary once (the launcher's), then what --apply wrote
    assert done.stdout.splitlines() == [
        "study tw: 4 complete; reports in reports/tw/",
        done.stdout.splitlines()[-1],
    ]
    # two objectives: a Pareto front among trials meeting the bound, each trial's costs stored
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val/acc", "latency_ms"]
    for trial in study.trials:
        assert trial.values[1] == trial.user_attrs["costs"]["latency_ms"] > 0
        bounds = trial.constraints  # Optuna's own record (Trial.set_constraint), by the bound
        assert bounds["latency_ms <= 10000"] == pytest.approx(trial.values[1] - 10000)
        assert -100 < bounds["val/loss <= 100"] < 0
    front = (project.root / "reports" / "tw" / "pareto_front.csv").read_text().splitlines()
    assert front[0].startswith("trial,val/acc,latency_ms,feasible,pareto") and len(front) == 5
    assert (project.root / "reports" / "tw" / "pareto_front.png").is_file()
    best = max(study.trials, key=lambda t: (t.values[0], -t.number))  # all feasible here
    applied = f"{params}: applied trial {best.number}: train.lr="
    assert done.stdout.splitlines()[-1].startswith(applied)
    assert load_params(project.root / params).train.lr == pytest.approx(
        best.params["train.lr"], rel=1e-5
    )
    parent, children = mlflow_runs(project, "tw")
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert parent.data.params["objectives"] == "val/acc, latency_ms"
    assert parent.data.tags["best_trial"] == str(best.number)
    assert {int(n) for n in parent.data.tags["pareto_front"].split(", ")} <= {0, 1, 2, 3}
    assert all("objective/latency_ms" in child.data.metrics for child in children)

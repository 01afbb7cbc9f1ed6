"""The MLflow side of a campaign: one parent run per study, one child run per trial."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial

from convpipe.config.schema import Params
from convpipe.errors import ConvpipeError
from convpipe.redact import mask
from convpipe.tracking.params import log_params, params_for_mlflow
from convpipe.tracking.provenance import run_tags
from convpipe.tracking.runs import INPUT_STAGES
from convpipe.tracking.store import (
    artifact_location,
    check_reachable,
    mark_model_training,
    mlflow_error,
    store_lock,
)
from convpipe.tracking.store import tracking_uri as resolve_uri
from convpipe.tuning.liveness import REASON_ATTR
from convpipe.tuning.objectives import best_feasible, directions, objective_names, pareto_front
from convpipe.tuning.reports import REPORTS
from convpipe.tuning.space import COUNTED
from convpipe.tuning.storage import storage_file

log = logging.getLogger("convpipe")

RUN_ATTR = "mlflow_run_id"

STUDY_KEY_TAG = "convpipe.study_key"

MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def study_key(params: Params, study: optuna.Study) -> str:
    """An id of this study in this storage, tagged on its parent run (file storages are local)."""
    storage = params.tune.storage
    where = mask(storage)
    path = storage_file(storage)
    if path is not None:
        where = f"{socket.gethostname()}:{path.resolve()}"
    text = f"{where}\n{study.study_name}\n{study._study_id}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


class Campaign:
    """The MLflow side of a study: one parent run, one nested child run per trial."""

    def __init__(self, params: Params, study: optuna.Study) -> None:
        from mlflow.tracking import MlflowClient

        self.params = params
        self.study = study
        self.uri = resolve_uri(params.mlflow)
        self.key = study_key(params, study)
        check_reachable(self.uri)
        try:
            with store_lock(self.uri):
                self.client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = self._experiment()
                mark_model_training(self.client, self.experiment_id)
                self.parent_id = self._parent()
        except ConvpipeError:
            raise
        except Exception as exc:
            raise mlflow_error(exc, self.uri, "opening the tuning run") from None

    def _experiment(self) -> str:
        name = self.params.mlflow.experiment
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(
                    name, artifact_location=artifact_location(self.uri)
                )
            except Exception:  # created by a worker on another machine meanwhile
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        return str(found.experiment_id)

    def _alive(self, run_id: str) -> bool:
        try:
            run = self.client.get_run(run_id)
        except Exception:  # deleted for good, or a run of another tracking store
            return False
        return run.info.lifecycle_stage == "active" and run.info.experiment_id == self.experiment_id

    def _find_parent(self) -> str | None:
        """The earliest parent run tagged with this study's key (workers on other machines)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{STUDY_KEY_TAG}` = '{self.key}'"
        )
        if not runs:
            return None
        return str(min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id)

    def _parent(self) -> str:
        run_id = self.study.user_attrs.get(RUN_ATTR)
        if not (run_id and self._alive(str(run_id))):
            run_id = self._find_parent() or self._new_parent()
            self.study.set_user_attr(RUN_ATTR, run_id)
        self.client.update_run(str(run_id), status="RUNNING")
        return str(run_id)

    def _new_parent(self) -> str:
        tune = self.params.tune
        tags = {
            **run_tags(INPUT_STAGES),
            "convpipe.kind": "tuning",
            "optuna.study_name": tune.study_name,
            STUDY_KEY_TAG: self.key,
        }
        run_id = self.client.create_run(
            self.experiment_id, run_name=f"tune-{tune.study_name}", tags=tags
        ).info.run_id
        winner = self._find_parent() or run_id
        if winner != run_id:  # a worker elsewhere opened the campaign at the same moment
            self.client.delete_run(run_id)
            return winner
        space = {k: v.model_dump(mode="json") for k, v in tune.space.items()}
        values = {
            **params_for_mlflow(self.params),
            "tune.storage": mask(tune.storage),
            "study_name": tune.study_name,
            "storage": mask(tune.storage),
            "objectives": ", ".join(objective_names(self.params)),
            "directions": ", ".join(directions(self.params)),
            "constraints": ", ".join(map(str, tune.constraints)) or "none",
            "monitor": self.params.train.monitor,
            "search_space": json.dumps(space),
        }
        log_params(self.client, run_id, values)
        return run_id

    def start_trial(
        self,
        trial: Trial,
        values: Mapping[str, Any],
        resumed: str | None = None,
        attempts: Sequence[int] = (),
    ) -> str:
        """Open the child run of ``trial`` with its sampled values as params.

        Args:
            trial: The trial starting.
            values: Its sampled values.
            resumed: The child run of the attempt it goes on from (a retry resumed from a
                checkpoint): reopened, and the epochs continue in it.
            attempts: The numbers of the attempts before it, first first (a retry).
        """
        if resumed is not None:
            self.client.update_run(resumed, status="RUNNING")
            self.client.set_tag(resumed, "optuna.trial_number", str(trial.number))
            self.client.set_tag(resumed, "optuna.state", "RUNNING")
            self.client.set_tag(resumed, "optuna.fail_reason", "")
            tried = ", ".join(map(str, [*attempts, trial.number]))
            self.client.set_tag(resumed, "optuna.attempts", tried)
            return resumed
        tags = {
            "mlflow.parentRunId": self.parent_id,
            "convpipe.kind": "trial",
            "optuna.trial_number": str(trial.number),
        }
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial.number}", tags=tags
        )
        log_params(self.client, run.info.run_id, {k: str(v) for k, v in values.items()})
        trial.set_user_attr(RUN_ATTR, run.info.run_id)
        return run.info.run_id

    def end_trial(
        self, run_id: str, state: str, reason: str | None = None, status: str | None = None
    ) -> None:
        """Record the trial's final Optuna ``state`` on its child run (``status`` overrides)."""
        self.client.set_tag(run_id, "optuna.state", state)
        if reason:
            self.client.set_tag(run_id, "optuna.fail_reason", mask(reason)[:5000])
        self.client.set_terminated(run_id, status or MLFLOW_STATUS[state])

    def _child_runs(self, trial: FrozenTrial) -> list[str]:
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id:
            return [str(run_id)]
        # killed between opening the run and recording its id on the trial
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' "
            f"and tags.`optuna.trial_number` = '{trial.number}'",
        )
        return [r.info.run_id for r in runs]

    def end_stale(self, trial: FrozenTrial) -> None:
        """Close the child run of a trial that was marked FAIL (its worker died)."""
        reason = trial.user_attrs.get(REASON_ATTR, "worker stopped (no heartbeat)")
        try:
            for run_id in self._child_runs(trial):
                self.end_trial(run_id, "FAIL", str(reason))
        except Exception as exc:  # tracking trouble must not stop the campaign
            log.warning("could not close the MLflow run of trial %d: %s", trial.number, exc)

    def finish(self, report_dir: Path) -> None:
        """Summarise the study on the parent run, attach the reports, mark it FINISHED."""
        counted = self.study.get_trials(deepcopy=False, states=COUNTED)
        self.client.log_metric(self.parent_id, "trials_finished", float(len(counted)))
        best = best_feasible(self.study)
        if best is not None:  # on the first objective, among trials meeting the constraints
            self.client.log_metric(self.parent_id, "best_value", float(best.values[0]))
            self.client.set_tag(self.parent_id, "best_trial", str(best.number))
            for key, value in best.params.items():
                self.client.set_tag(self.parent_id, f"best.{key}", str(value))
        if len(self.study.directions) > 1:
            front = [t.number for t in pareto_front(self.study)]
            self.client.log_metric(self.parent_id, "pareto_trials", float(len(front)))
            self.client.set_tag(self.parent_id, "pareto_front", ", ".join(map(str, front)))
        for path in sorted(report_dir.glob("*")):
            if path.name in REPORTS:
                self.client.log_artifact(self.parent_id, str(path), "tuning")
        self.client.set_terminated(self.parent_id, "FINISHED")

    def close(self, status: str) -> None:
        """Mark the parent run ``status`` after an error or interrupt (never raises)."""
        try:
            self.client.set_terminated(self.parent_id, status)
        except Exception as exc:  # already failing: the first error is the one to report
            log.warning("could not mark MLflow run %s %s: %s", self.parent_id, status, exc)

"""Tuning: one parent run per Optuna study, one child run per trial (StudyTracker)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from transfer.tracking.runs import (
    EpochLog,
)
from transfer.tracking.store import (
    TrackingError,
    use_experiment,
)

log = logging.getLogger(__name__)

TRIAL_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


class StudyTracker:
    """The MLflow side of `transfer tune`: a parent run per study, a child run per trial.

    Runs are addressed by id through MlflowClient (no active-run state), so several worker processes,
    possibly on several machines, add child runs to the one parent run of their shared study.
    """

    def __init__(self, experiment: str, study_name: str, root: Path | None = None):
        self.experiment_id = use_experiment(experiment, root)
        self.client = MlflowClient()
        self.study_name = study_name
        self.parent_run_id: str | None = None
        self._epoch_logs: dict[str, EpochLog] = {}  # by trial run id

    def create_parent(self, settings: dict[str, Any], tags: dict[str, str]) -> str:
        """The study's parent run: the tune settings as params; returns its id."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"tune {self.study_name}",
            tags={**tags, "tune.study": self.study_name, "tune.role": "study"},
        )
        _log_params(self.client, run.info.run_id, settings)
        self.parent_run_id = run.info.run_id
        return run.info.run_id

    def start_trial(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> str:
        """A child run for trial `number`, holding the trial's training params; returns its id."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.study_name} trial {number}",
            tags={
                **tags,
                "mlflow.parentRunId": self.parent_run_id,
                "tune.study": self.study_name,
                "tune.role": "trial",
                "tune.trial": str(number),
            },
        )
        _log_params(self.client, run.info.run_id, params)
        return run.info.run_id

    def log_trial_epoch(self, run_id: str, row: dict[str, Any]) -> None:
        """One history row as metrics at step `epoch`; probe epochs (fractions of a second) are sent in one batch."""
        self._epoch_log(run_id)(row)

    def _epoch_log(self, run_id: str) -> EpochLog:
        return self._epoch_logs.setdefault(run_id, EpochLog(run_id, self.client))

    def end_trial(self, run_id: str, state: str, value: float | None) -> None:
        """Close a trial's run: tag tune.state (complete, pruned, failed), metric `objective`, status."""
        log = self._epoch_log(run_id)
        if value is not None and not math.isnan(value):
            log.pending.append(Metric("objective", float(value), int(time.time() * 1000), 0))
        log.flush(tags=[RunTag("tune.state", state)])
        del self._epoch_logs[run_id]
        self.client.set_terminated(run_id, TRIAL_STATUS[state])

    def log_study(self, metrics: dict[str, float], best: dict[str, Any], artifacts: list[Path]) -> None:
        """The study's summary on the parent run (each worker's last word: the whole study so far)."""
        run_id = self.parent_run_id
        timestamp = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), timestamp, 0) for k, v in metrics.items()],
            tags=[RunTag(f"best.{k}", _param_text(v)) for k, v in best.items()],
        )
        for path in artifacts:
            if Path(path).exists():
                self.client.log_artifact(run_id, str(path), artifact_path="tune")
        self.client.set_terminated(run_id, "FINISHED")


def _param_text(value: Any) -> str:
    return "null" if value is None else str(value)


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(key, _param_text(value)) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])


def find_study_runs(experiment: str, study_name: str, root: Path | None = None):
    """The parent and trial runs of a study as a pandas DataFrame (for tests and notebooks)."""
    use_experiment(experiment, root)
    quote = next((q for q in ("'", '"') if q not in study_name), None)
    if quote is None:
        raise TrackingError(f"tune.study_name {study_name!r}: a name with both quote characters cannot be searched")
    return mlflow.search_runs(
        experiment_names=[experiment], filter_string=f"tags.`tune.study` = {quote}{study_name}{quote}"
    )

"""A pipeline run: its name and tags, opening and reopening it, and what the stages log into it (EpochLog)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from transfer.pipeline.params import fine_tunes, flatten_dict
from transfer.tracking.store import (
    use_experiment,
)

log = logging.getLogger(__name__)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def run_tags(backbone: str, data_hash: str) -> dict[str, str]:
    tags = {"git_commit": git_commit(), "backbone": backbone, "data_hash": data_hash}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def readable_run_name(params: dict[str, Any]) -> str:
    """A name for a run outside `dvc exp run` (plain `dvc repro`), from its flattened params:
    `efficientnet_lite0 probe lr=0.01`, `resnet18 k=3 lr=0.002 5ep`."""
    backbone = params.get("backbone.name", "model")
    if not fine_tunes(params.get("freeze_layers", "all")):
        return f"{backbone} probe lr={params.get('head.lr')}"
    return f"{backbone} k={params['freeze_layers']} lr={params.get('finetune.lr')} {params.get('finetune.epochs')}ep"


def run_name(params: dict[str, Any]) -> str:
    """The DVC experiment's name inside `dvc exp run` (queued ones too), else one read from the params."""
    return os.environ.get("DVC_EXP_NAME") or readable_run_name(params)


@contextlib.contextmanager
def training_run(
    experiment: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None
) -> Iterator[str]:
    """Open (or, given run_id, reopen) the pipeline's MLflow run; yields its id."""
    use_experiment(experiment)
    with (
        mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name(params), tags=tags) as run,
        _killed_on_interrupt(run.info.run_id),
    ):
        if run_id is None:
            mlflow.log_params(params)
        yield run.info.run_id


@contextlib.contextmanager
def _killed_on_interrupt(run_id: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM (KeyboardInterrupt) ends the run as KILLED, other errors as FAILED (MLflow's own);
    the interruption carries a note saying so, which the stage prints."""
    try:
        yield
    except KeyboardInterrupt as exc:
        mlflow.end_run("KILLED")
        exc.add_note(f"MLflow run {run_id} is marked KILLED")
        raise
    except Exception as exc:
        exc.add_note(f"MLflow run {run_id} is marked FAILED")
        raise


@contextlib.contextmanager
def reopen_run(run_id: str, experiment: str) -> Iterator[str]:
    use_experiment(experiment)
    with mlflow.start_run(run_id=run_id) as run, _killed_on_interrupt(run.info.run_id):
        yield run.info.run_id


MODEL_DIGEST_TAG = "model_digest"


@contextlib.contextmanager
def model_run(experiment: str, digest: str) -> Iterator[str]:
    """The newest run tagged with this model digest, reopened; a new run when none has it.

    There is none when the model came from elsewhere (`dvc pull` from a teammate's remote while logging to
    another store): the evaluation is then recorded in a run of its own, tagged with the same digest.
    """
    experiment_id = use_experiment(experiment)
    found = MlflowClient().search_runs(
        [experiment_id], f"tags.{MODEL_DIGEST_TAG} = '{digest}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if found:
        with reopen_run(found[0].info.run_id, experiment) as run_id:
            yield run_id
        return
    log.info(f"mlflow: no run of experiment {experiment!r} trained this model; recording the evaluation in a new run")
    with (
        mlflow.start_run(experiment_id=experiment_id, tags={MODEL_DIGEST_TAG: digest}) as run,
        _killed_on_interrupt(run.info.run_id),
    ):
        yield run.info.run_id


def epoch_metrics(row: dict[str, Any]) -> list[Metric]:
    """One history row as MLflow metrics at step `epoch` (numbers only: `phase` and the like are not metrics)."""
    timestamp, step = int(time.time() * 1000), int(row["epoch"])
    return [
        Metric(key, float(value), timestamp, step)
        for key, value in row.items()
        if key not in ("epoch", "phase") and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


def log_metric_batches(client: MlflowClient, run_id: str, metrics: list[Metric], tags: list[RunTag] = ()) -> None:
    for start in range(0, max(len(metrics), 1), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000], tags=tags if start == 0 else ())


class EpochLog:
    """Per-epoch metrics into a run (`run_id`, or the active run) with the epoch as step, so the MLflow UI
    draws curves.

    Call it with each history row. Linear-probe epochs (fractions of a second each; a write per epoch cost
    0.2 s of every head-only run) are written in one batch, with the first row of another phase, on `flush`
    or on leaving the `with` block; every other row (a fine-tuning epoch, a fitted head) is written as it
    arrives.
    """

    def __init__(self, run_id: str | None = None, client: MlflowClient | None = None):
        self.run_id, self.client = run_id, client
        self.pending: list[Metric] = []

    def __call__(self, row: dict[str, Any]) -> None:
        self.pending += epoch_metrics(row)
        if row.get("phase") != "probe":
            self.flush()

    def flush(self, tags: list[RunTag] = ()) -> None:
        """Write what is pending, with `tags` in the same request."""
        if self.pending or tags:
            run_id = self.run_id or mlflow.active_run().info.run_id
            log_metric_batches(self.client or MlflowClient(), run_id, self.pending, tags)
            self.pending = []

    def __enter__(self) -> "EpochLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()  # after a failure too: the epochs before it belong to the run


def log_metrics(metrics: dict[str, Any], prefix: str = "") -> None:
    """Log a (possibly nested) metrics dict under dotted keys; non-numbers are skipped."""
    flat = {
        key: float(value)
        for key, value in flatten_dict(metrics, prefix).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    # MLflow metric keys allow only alphanumerics and _-. /; class names may have others.
    mlflow.log_metrics({"".join(c if c.isalnum() or c in "_-./ " else "_" for c in k): v for k, v in flat.items()})


def log_key_metrics(test_acc: float, test_f1: float) -> None:
    """The metrics the runs view shows first, under short names (KEY_METRICS)."""
    mlflow.log_metrics({"test_acc": float(test_acc), "test_f1": float(test_f1)})


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    for path in paths:
        if Path(path).exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_tags(tags: dict[str, str]) -> None:
    """String facts about the run (e.g. the fit verdict), searchable and shown as columns in the UI."""
    mlflow.set_tags(tags)


@contextlib.contextmanager
def stage_training_run(
    experiment: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None, enabled: bool = True
) -> Iterator[tuple[str | None, EpochLog | None]]:
    """The train stage's run (`training_run`) and an `EpochLog` into it: yields (run id, log). Not `enabled`
    (a torchrun rank other than 0: one rank logs), it opens nothing and yields (None, None)."""
    if not enabled:
        yield None, None
        return
    with training_run(experiment, params, tags, run_id=run_id) as opened, EpochLog() as log:
        yield opened, log


def log_evaluation(
    metrics: dict[str, Any],
    summary: dict[str, Any],
    calibration: dict[str, float],
    report_files: list[Path],
    reliability_files: list[Path],
    diagnostic_files: list[Path],
    label_issue_count: int,
    label_issue_files: list[Path],
    tags: dict[str, str],
) -> None:
    """Into the active run (the model's, reopened by the evaluate stage): the test metrics (test.*, the key
    metrics, the fit/health/top-k `summary`, test.calibration.*), the reports, the reliability data, the
    diagnostics folder and the label_issues stage's list (that stage runs before train, with no run to log to).

    `tags` (e.g. test_tta) are tags, not params: an evaluate-only change (-S evaluate.tta=flip) reopens the train
    stage's run, whose params are immutable and were logged before this value was chosen."""
    log_metrics(metrics, prefix="test")
    log_key_metrics(test_acc=metrics["accuracy"], test_f1=metrics["macro_f1"])
    log_artifacts(report_files)
    log_metrics(summary)  # fit.*, health.*, topk.*: sortable in the MLflow UI
    log_metrics({"calibration": calibration}, prefix="test")
    log_artifacts(reliability_files, artifact_path="reliability")
    log_tags({"fit_verdict": summary["fit"]["verdict"], **tags})
    log_artifacts(diagnostic_files, artifact_path="diagnostics")
    log_metrics({"label_issues": {"count": label_issue_count}})
    log_artifacts(label_issue_files, artifact_path="label_issues")

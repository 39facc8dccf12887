"""The MLflow side of comparing runs, in a real local store (SQLite + artifacts): the experiment's kind and
key-columns view, named runs, and the epoch log's batched writes."""

from __future__ import annotations

import json

from mlflow import MlflowClient
from mlflow_view_helpers import PARAMS, record_runs

from transfer import tracking


def test_local_store_experiment_has_kind_view_and_named_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # the repository store of a repository at tmp_path
    record_runs()
    experiment = MlflowClient(tracking.tracking_uri()).get_experiment_by_name("transfer")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{tracking.RUNS_VIEW_KEY}"])
    assert view["selectedColumns"][:2] == ["metrics.`test_acc`", "metrics.`test_f1`"]
    assert "params.`head.lr`" in view["selectedColumns"] and view["orderByKey"] == "metrics.`test_acc`"
    assert experiment.artifact_location == (tmp_path / "mlruns" / "artifacts").as_uri()
    runs = tracking.find_runs("transfer", root=tmp_path)
    assert sorted(runs["tags.mlflow.runName"]) == ["bushy-tile", "efficientnet_lite0 probe lr=0.01"]
    assert sorted(runs["metrics.test_acc"]) == [0.8267, 0.8433]
    # An experiment made before these tags existed gets them on next use.
    client = MlflowClient(tracking.tracking_uri())
    client.delete_experiment_tag(experiment.experiment_id, "mlflow.experimentKind")
    tracking.use_experiment("transfer")
    assert client.get_experiment(experiment.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_epoch_log_batches_probe_epochs_and_writes_every_other_row_as_it_ends(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    client = MlflowClient(tracking.tracking_uri())

    def steps(run_id: str) -> list[int]:
        return sorted(metric.step for metric in client.get_metric_history(run_id, "val_acc"))

    with tracking.training_run("transfer", PARAMS, {}) as run_id, tracking.EpochLog() as log_epoch:
        for epoch in (1, 2, 3):
            log_epoch({"epoch": epoch, "phase": "probe", "val_acc": 0.5 + epoch / 100, "lr": 0.01})
        assert steps(run_id) == []  # probe epochs wait for one batch
        log_epoch({"epoch": 4, "phase": "start", "val_acc": 0.53, "val_loss": 1.2})
        assert steps(run_id) == [1, 2, 3, 4]  # a fine-tuning row is written as it ends, with what came before
        log_epoch({"epoch": 5, "phase": "finetune", "val_acc": 0.6, "kept": True})
        assert steps(run_id) == [1, 2, 3, 4, 5]
        log_epoch({"epoch": 6, "phase": "probe", "val_acc": 0.61})
    assert steps(run_id) == [1, 2, 3, 4, 5, 6]  # the rest on leaving the block
    assert [m.value for m in client.get_metric_history(run_id, "val_acc")][-1] == 0.61
    assert "kept" not in client.get_run(run_id).data.metrics and "phase" not in client.get_run(run_id).data.metrics

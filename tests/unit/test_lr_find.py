"""`transfer lr-find`: the sweep, its suggestion, the plot and the MLflow run, on real training steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mlflow import MlflowClient
from tune_helpers import blobs, head_project, image_project

from transfer import tracking
from transfer.cli import main as cli_main
from transfer.pipeline.params import HeadParams
from transfer.train.lr_find import exponential_lrs, probe_step, smooth, suggest, sweep
from transfer.train.probe import train_linear_probe


@pytest.fixture(autouse=True)
def own_mlflow_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # see tests/test_tune.py


def lr_find_runs(root):
    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    experiment = client.get_experiment_by_name("transfer")
    return client.search_runs([experiment.experiment_id], "tags.`lr_find.recipe` != ''"), client


def test_smoothing_is_bias_corrected_and_the_suggestion_is_the_steepest_descent_before_the_minimum():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull toward 0 at the start
    lrs = exponential_lrs(1e-6, 10.0, 120)
    # A loss that falls fastest at lr = 1e-3 (log-logistic), bottoms out near 0.3 and explodes past it.
    loss = [2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + max(0.0, math.log10(lr) + 0.5) ** 2 for lr in lrs]
    steepest, lowest = suggest(lrs, loss)
    assert steepest == pytest.approx(1e-3, rel=0.3)
    assert lowest == lrs[int(np.argmin(loss))]
    assert suggest(lrs[:5], loss[:5]) == (None, None)  # too short a sweep to say anything


def test_probe_sweep_stops_once_the_loss_diverges_and_its_suggestion_trains_well():
    train, val = blobs(40, seed=0), blobs(20, seed=1)
    step = probe_step(train, num_classes=3, batch_size=16, weight_decay=0.0, seed=0)
    result = sweep(step, exponential_lrs(1e-5, 1e3, 200), progress=False)
    assert result.diverged and len(result.lrs) < 200 and len(result.losses) == len(result.smoothed)
    assert 1e-4 < result.suggested_lr < result.min_loss_lr < 1e3
    probe = train_linear_probe(train, val, 3, HeadParams(lr=result.suggested_lr, epochs=10, batch_size=16), seed=0)
    assert max(row["val_acc"] for row in probe.history) > 0.8


def test_lr_find_command_saves_the_plot_and_logs_one_mlflow_run(tmp_path, monkeypatch, capsys):
    root = head_project(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert cli_main(["lr-find", "--steps", "120", "--min-lr", "1e-5", "--max-lr", "1000"]) == 0

    summary = json.loads((root / "data/lr_find/probe.json").read_text())
    assert summary["key"] == "head.lr" and summary["steps"] == len(summary["lrs"]) == len(summary["losses"])
    assert (root / "data/lr_find/probe.png").stat().st_size > 10_000
    assert "dvc exp run -S head.lr=" in capsys.readouterr().out
    (run,), client = lr_find_runs(root)
    assert run.data.tags["lr_find.recipe"] == "probe" and run.info.status == "FINISHED"
    assert run.data.metrics["lr_find.suggested_lr"] == pytest.approx(summary["suggested_lr"])
    assert len(client.get_metric_history(run.info.run_id, "lr_find.loss")) == summary["steps"]
    assert run.data.params["head.batch_size"] == "16"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "lr_find")} == {
        "lr_find/probe.png",
        "lr_find/probe.json",
    }


def test_fine_tuning_sweep_runs_the_recipe_on_images(tmp_path, monkeypatch):
    root = image_project(tmp_path / "project", **{"freeze_layers": "all"})
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert cli_main(["lr-find", "--recipe", "finetune"]) == 2  # freeze_layers: all has nothing to fine-tune
    code = cli_main(["lr-find", "--freeze-layers", "4", "--steps", "24", "--min-lr", "1e-4", "--max-lr", "100"])
    summary = json.loads((root / "data/lr_find/finetune.json").read_text())
    assert summary["key"] == "finetune.lr" and summary["recipe"] == "finetune"
    assert code == (0 if summary["suggested_lr"] else 1)
    assert all(math.isfinite(loss) for loss in summary["losses"][:12])
    (run,), _ = lr_find_runs(root)
    assert run.data.tags["lr_find.recipe"] == "finetune" and run.data.params["freeze_layers"] == "4"

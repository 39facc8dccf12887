"""`transfer lr-find` through the command: the plot and one MLflow run in a real store, and the fine-tuning
sweep running the recipe on real images."""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient
from tune_helpers import (
    head_project,
    image_project,
    own_mlflow_store,  # noqa: F401 - an autouse fixture
)

from transfer import tracking
from transfer.cli import main as cli_main


def lr_find_runs(root):
    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    experiment = client.get_experiment_by_name("transfer")
    return client.search_runs([experiment.experiment_id], "tags.`lr_find.recipe` != ''"), client


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

"""The train stage through real DVC and MLflow on a tiny folder source (resnet18, random init, 32-64 px):
outputs and layer movement, data-parallel under torchrun, and resume after a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import write_image_folder
from project_helpers import PATIENCE_S

from transfer import tracking
from transfer.models.saved import model_digest

REPO = Path(__file__).resolve().parents[2]


def project(tmp_path: Path, **overrides) -> Path:
    """A git + DVC repository with the project's code and params.yaml, on 3 classes x 14 tiny PNGs."""
    images = write_image_folder(tmp_path / "images", {"cat": 14, "dog": 14, "fox": 14})
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("src", "stages", "assets", "weights"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] = {"source": "folder", "path": str(images)}
    params["backbone"] = {"name": "resnet18", "weights": "none", "image_size": 32}
    params["head"]["epochs"] = 3
    params["freeze_layers"] = 3
    params["finetune"].update(epochs=2, batch_size=8)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            params[section][name] = value
        else:
            params[section] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        run(cmd, repo)
    return repo


def runs_in(repo: Path) -> list:
    """The runs of the repository's own store (an explicit client: MLflow caches the global one's store)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri(repo))
    experiment = client.get_experiment_by_name("transfer")
    return client.search_runs([experiment.experiment_id]), client


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PYTHONPATH="src",
        DVC_NO_ANALYTICS="1",
        OMP_NUM_THREADS="1",
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    return env


def run(cmd: list[str], cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=PATIENCE_S)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_data_parallel_train_stage_logs_one_run_with_grad_norms_and_layer_movement(tmp_path):
    repo = project(tmp_path, **{"finetune.nproc": 2})
    output = run(["dvc", "repro", "train"], repo)
    assert "2 data-parallel processes" in output

    movement = json.loads((repo / "reports/layer_movement.json").read_text())
    assert set(movement) == {"stem", "layer1", "layer2", "layer3", "layer4", "head"}
    assert movement["stem"] == movement["layer1"] == movement["layer2"] == 0.0  # frozen (freeze_layers=3)
    selection = json.loads((repo / "reports/train.json").read_text())
    # the shipped model moved unless the start (the probe-initialised network, epoch 0) won the selection
    assert (movement["layer3"] > 0 and movement["layer4"] > 0) == (selection["selected"] == "finetune")
    history = pd.read_csv(repo / "reports/history.csv")
    finetune = history[history["phase"] == "finetune"]
    assert len(finetune) == 2 and (finetune["grad_norm/stem"] == 0).all() and (finetune["grad_norm/head"] > 0).all()
    assert history["grad_norm/head"].isna().sum() == 4  # probe rows and the start row (epoch 0) have none
    start = history[history["phase"] == "start"].iloc[0]
    assert start["epoch"] == 4 and list(finetune["epoch"]) == [5, 6]  # after the 3 probe epochs
    selection = json.loads((repo / "reports/train.json").read_text())
    assert selection["selected"] in ("start", "finetune") and selection["kept_start"] == (
        selection["selected"] == "start"
    )
    assert selection["best_epoch"] in (4, 5, 6) and "val_macro_f1" in selection
    assert sorted(p.name for p in (repo / "data/checkpoints").iterdir()) == ["status.json"]  # cleared

    runs, _ = runs_in(repo)
    assert len(runs) == 1
    logged = runs[0].data
    assert logged.tags["model_digest"] == model_digest(repo / "data/model")  # how evaluate finds this run
    assert logged.metrics["weight_change/layer4"] == pytest.approx(movement["layer4"])
    assert logged.metrics["grad_norm/head"] > 0 and logged.params["finetune.nproc"] == "2"
    assert logged.tags["selected_model"] == selection["selected"]
    assert logged.metrics["kept_start"] == selection["kept_start"]
    assert logged.metrics["finetune_gain"] == pytest.approx(selection["finetune_gain"])
    description = json.loads((repo / "data/model/model.json").read_text())
    assert description["training"]["freeze_layers"] == 3 and description["classes"] == ["cat", "dog", "fox"]


def test_a_killed_train_stage_resumes_on_the_next_repro_in_the_same_mlflow_run(tmp_path):
    repo = project(
        tmp_path, **{"finetune.epochs": 8, "backbone": {"name": "resnet18", "weights": "none", "image_size": 64}}
    )
    run(["dvc", "repro", "features"], repo)
    process = subprocess.Popen(
        ["dvc", "repro", "train"],
        cwd=repo,
        env=environment(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = repo / "data/checkpoints/last.pt"
    deadline = time.monotonic() + PATIENCE_S
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # dvc and the stage: a kill -9 mid-training
    process.wait()
    done = torch.load(last, weights_only=False)["done"]
    assert 1 <= done < 8, "the stage finished before it could be killed"
    first_run = torch.load(last, weights_only=False)["extra"]["run_id"]

    output = run(["dvc", "repro", "train"], repo)
    assert "resuming after epoch" in output
    runs, client = runs_in(repo)
    assert [r.info.run_id for r in runs] == [first_run]
    assert runs[0].data.tags["model_digest"] == model_digest(repo / "data/model")
    steps = sorted({m.step for m in client.get_metric_history(first_run, "val_acc")})
    assert steps == list(range(1, 3 + 1 + 8 + 1))  # 3 probe epochs, the start (epoch 0), 8 fine-tuning epochs
    history = pd.read_csv(repo / "reports/history.csv")
    assert list(history["epoch"]) == list(range(1, 13)) and (history["phase"] == "start").sum() == 1
    assert not last.exists()

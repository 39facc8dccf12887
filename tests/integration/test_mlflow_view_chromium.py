"""The MLflow UI: a real `mlflow server` on loopback, two runs recorded through transfer.tracking, and the runs
view with its key columns in headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_view_helpers import record_runs
from PIL import Image
from project_helpers import PATIENCE_S
from team_helpers import mlflow_server

from transfer import tracking


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def headless(browser: str, profile: Path, *args: str, timeout: float = PATIENCE_S) -> subprocess.CompletedProcess:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1600,1000",
        "--virtual-time-budget=30000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_runs_view_shows_key_columns_in_headless_chromium(tmp_path, monkeypatch):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (CI installs it: .ci/run)")
    with mlflow_server(tmp_path / "server") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.delenv("DVC_EXP_NAME", raising=False)
        record_runs()
        experiment = MlflowClient(url).get_experiment_by_name("transfer")
        # On a server the server places artifacts (mlflow-artifacts:), not the client's local folder.
        assert experiment.artifact_location.startswith("mlflow-artifacts:")
        view = tracking.runs_view_url(url, experiment.experiment_id)

        shot = tmp_path / "runs_view.png"
        dom = headless(browser, tmp_path / "profile", f"--screenshot={shot}", "--dump-dom", view).stdout

    with Image.open(shot) as png:
        assert png.size == (1600, 1000)
        assert len(png.convert("L").getcolors(maxcolors=1 << 16) or range(999)) > 20  # drawn, not blank
    text = dom.replace("\u200b", "")
    # The runs table (not the GenAI overview) with the key columns and both runs, by name.
    assert "Run Name" in text, f"runs table missing; screenshot: {shot}"
    for column in ("test_acc", "test_f1", "backbone.name", "finetune.lr", "freeze_layers", "head.lr"):
        assert f">{column}<" in text, f"column {column} missing; screenshot: {shot}"
    assert "bushy-tile" in text and "efficientnet_lite0 probe lr=0.01" in text
    assert ">0.8433<" in text

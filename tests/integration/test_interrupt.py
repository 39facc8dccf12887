"""Ctrl-C and SIGTERM end a stage with one line, the MLflow run marked KILLED: real processes, a real store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from project_helpers import PATIENCE_S

from transfer import tracking

REPO_ROOT = Path(__file__).resolve().parents[2]

# A stage that opens the pipeline's MLflow run (as the train stage does), then works until interrupted.
STAGE = """
import sys, time
from transfer import tracking
from transfer.pipeline.errors import run_stage

def main():
    with tracking.training_run("interrupts", {"lr": 0.1}, {}) as run_id:
        print(run_id, flush=True)
        time.sleep(3600)  # until the signal

run_stage("train", main)
"""

# A stage interrupted before it opens any run (download, split, features...).
PLAIN_STAGE = """
import time
from transfer.pipeline.errors import run_stage

def main():
    print("working", flush=True)
    time.sleep(3600)  # until the signal

run_stage("features", main)
"""


def start(script: Path, repo: Path, launcher: bool = False) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT / "src"),
        "DVC_ROOT": str(repo),
        "TRANSFER_SERVER_DIR": str(repo / "no-server"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    command = (
        [sys.executable, "-m", "transfer.pipeline.stage", str(script)] if launcher else [sys.executable, str(script)]
    )
    return subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_stage_prints_one_line_and_marks_the_run_killed(tmp_path, signum, monkeypatch):
    (tmp_path / "stage.py").write_text(STAGE)
    process = start(tmp_path / "stage.py", tmp_path, launcher=True)
    run_id = process.stdout.readline().strip()  # the run is open once its id is printed
    assert run_id, process.stderr.read()
    process.send_signal(signum)
    _, err = process.communicate(timeout=PATIENCE_S)
    assert process.returncode == 128 + signum
    # MLflow logs creating its store when the run opens; after the signal, one line and no traceback.
    lines = [line for line in err.strip().splitlines() if " INFO mlflow.store.db" not in line]
    assert len(lines) == 1, err
    name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
    assert lines[0].startswith(
        f"train: interrupted by {name}; MLflow run {run_id} is marked KILLED; `dvc repro` resumes"
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
    runs = tracking.find_runs("interrupts", root=tmp_path)
    assert list(runs["status"]) == ["KILLED"] and list(runs["run_id"]) == [run_id]


def test_interrupt_without_a_run_says_so(tmp_path):
    (tmp_path / "stage.py").write_text(PLAIN_STAGE)
    process = start(tmp_path / "stage.py", tmp_path)
    assert process.stdout.readline().strip() == "working"  # in main(): run_stage handles the signal
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=PATIENCE_S)
    assert process.returncode == 130
    assert err.strip().splitlines() == [
        "features: interrupted by Ctrl-C (SIGINT); no MLflow run was open; `dvc repro` resumes: finished stages "
        "are kept and fine-tuning continues from its last epoch checkpoint"
    ]

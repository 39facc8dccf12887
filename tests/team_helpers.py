"""Helpers of the team-workflow tests: a small real git + DVC project and an MLflow server.

The small project has one stage, a Python script that writes the files the real pipeline's evaluate and
train stages write (reports/metrics.json, train.json, history.csv, confusion.csv) as a function of its
params, so commands that read DVC's params, metrics and plots run against real DVC in seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from project_helpers import DVC, PATIENCE_S, git_env, run

SMALL_STAGE = """
import json, yaml
from pathlib import Path
params = yaml.safe_load(open("params.yaml"))
lr = params["head"]["lr"]
accuracy = round(0.9 - abs(lr - 0.02) * 2, 4)
Path("reports").mkdir(exist_ok=True)
json.dump({"accuracy": accuracy, "macro_f1": accuracy - 0.01, "fit": {"verdict": "good"}},
          open("reports/metrics.json", "w"), indent=2)
json.dump({"best_epoch": 3, "val_acc": accuracy + 0.01}, open("reports/train.json", "w"), indent=2)
rows = ["epoch,phase,lr,train_loss,train_acc,val_loss,val_acc"]
rows += [f"{e},probe,{lr},{1 / e:.4f},{accuracy - 0.1 / e:.4f},{1.2 / e:.4f},{accuracy - 0.12 / e:.4f}"
         for e in range(1, 5)]
Path("reports/history.csv").write_text("\\n".join(rows) + "\\n")
labels = ["cat", "dog", "fox"]
wrong = 1 if lr > 0.05 else 0
pairs = [(f"data/{i}.png", labels[i % 3], labels[(i + (i < 3 * wrong)) % 3]) for i in range(12)]
Path("reports/confusion.csv").write_text("path,actual,predicted\\n" + "".join(f"{p},{a},{b}\\n" for p, a, b in pairs))
"""

SMALL_DVC_YAML = """
stages:
  train:
    cmd: python stage.py
    deps: [stage.py]
    params: [head, freeze_layers, backbone]
    metrics:
      - reports/metrics.json: {cache: false}
      - reports/train.json: {cache: false}
    plots:
      - reports/history.csv: {cache: false}
      - reports/confusion.csv: {cache: false}
"""

SMALL_PARAMS = """
backbone:
  name: efficientnet_lite0
  image_size: 112
freeze_layers: all
head:
  lr: 0.01
  epochs: 40
"""


def small_dvc_project(repo: Path, env: dict) -> Path:
    """A git + DVC repository with one stage and the real pipeline's metrics and plot files, committed."""
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "stage.py").write_text(SMALL_STAGE)
    (repo / "dvc.yaml").write_text(SMALL_DVC_YAML)
    (repo / "params.yaml").write_text(SMALL_PARAMS)
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run(DVC + ["init", "-q"], repo, env)
    run(DVC + ["repro", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)
    return repo


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store: Path, timeout: float = PATIENCE_S) -> Iterator[str]:
    """A real `mlflow server` on loopback (SQLite backend, artifacts served), stopped on exit; yields its URL."""
    store.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        str(store / "artifacts"),
    ]
    log = open(store / "server.log", "w")
    # As `make server-mlflow` runs it: without MLflow's GenAI job runner (eight more processes, never used here).
    env = git_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (store / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health in time"
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()

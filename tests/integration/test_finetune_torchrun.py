"""Data-parallel fine-tuning: two gloo processes under torchrun compute what one process computes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import run
from project_helpers import PATIENCE_S

HERE = Path(__file__).resolve().parents[1]  # tests/: the torchrun workers live with the helpers


def test_two_gloo_processes_match_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(HERE / "ddp_worker.py"),
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=PATIENCE_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = torch.load(out, weights_only=False)
    assert ddp["world_size"] == 2

    single = run()
    for key, value in single.model.state_dict().items():
        assert torch.allclose(value, ddp["state_dict"][key], atol=1e-5), key
    assert len(single.history) == len(ddp["history"]) == 3  # the start (epoch 0), then 2 epochs
    assert single.history[0]["val_acc"] == ddp["history"][0]["val_acc"]
    for one, two in zip(single.history[1:], ddp["history"][1:]):
        assert one["val_acc"] == two["val_acc"] and one["frozen_groups"] == two["frozen_groups"]
        assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-5)
        assert one["grad_norm/head"] == pytest.approx(two["grad_norm/head"], rel=1e-4)

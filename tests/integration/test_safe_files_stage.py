"""A pickle model.pt refused by the real evaluate stage in one line, its payload never run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from hostile_helpers import hostile_file
from project_helpers import PATIENCE_S

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_stage_refuses_a_pickle_model_in_one_line(tmp_path):
    """`dvc pull` may bring data/model/model.pt: `dvc repro -s evaluate` must not run code from it."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copytree(REPO_ROOT / "stages", copy / "stages")
    shutil.copy(REPO_ROOT / "params.yaml", copy / "params.yaml")
    marker = tmp_path / "pwned"
    hostile_file(copy / "data/model/model.pt", marker)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "TRANSFER_STAGE_SERVER": "off"}
    done = subprocess.run(
        [sys.executable, "stages/evaluate.py"], cwd=copy, env=env, capture_output=True, text=True, timeout=PATIENCE_S
    )
    assert done.returncode == 1 and not marker.exists()
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("evaluate: data/model/model.pt is not a usable model file"), done.stderr

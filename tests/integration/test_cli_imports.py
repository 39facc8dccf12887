"""`transfer --help` answers without importing torch, MLflow or DVC: each command imports its libraries when it runs."""

from __future__ import annotations

import subprocess
import sys

from project_helpers import PATIENCE_S, REPO_ROOT, git_env

CHECK = """
import sys
from transfer.cli import build_parser
build_parser().format_help()
heavy = sorted(name for name in ("torch", "mlflow", "dvc", "timm", "sklearn") if name in sys.modules)
print("heavy:", ",".join(heavy))
"""


def test_the_command_line_help_imports_no_heavy_library():
    done = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=REPO_ROOT, env=git_env(), capture_output=True, text=True, timeout=PATIENCE_S
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "heavy:", done.stdout
    help_text = subprocess.run(
        [sys.executable, "-m", "transfer.cli", "--help"],
        env=git_env(),
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
    ).stdout
    for command in ("predict", "promote", "export", "compare", "report", "tune", "lr-find"):
        assert command in help_text

"""Helpers of the tests that run real git, DVC and the pipeline in a copy of this project.

One place for what those tests all need: the environment of a child git/DVC process, running a command and
failing with its output, a copy of the project as a fresh clone would have it, the stages a DVC run ran, and
waiting for DVC's queue to drain.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
# How long a test waits for an event (a line, a file, a signal's effect, a process's exit) before calling it
# hung: generous, so the suite passes on a machine running another heavy job. A limit, never a timing check.
PATIENCE_S = 900


def git_env(extra: dict[str, str] | None = None, importable: bool = True) -> dict[str, str]:
    """The test process's environment without MLflow/DVC variables, with a git identity and the venv first.

    `importable`: this checkout's package on PYTHONPATH (`python -m transfer.cli` from any folder); without
    it a command imports the package the venv has installed, or the copy's own through the stages' commands.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@localhost",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@localhost",
    )
    if importable:
        env["PYTHONPATH"] = str(REPO_ROOT / "src")
    env.update(extra or {})
    return env


def run(args: list[str], cwd: Path, env: dict, timeout: float = PATIENCE_S) -> str:
    """Run a command; its stdout and stderr, or a failed assertion showing their end."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed ({done.returncode}):\n{output[-4000:]}"
    return output


def copy_project(repo: Path) -> Path:
    """This project's files (tracked and new, never ignored ones, no outputs) in `repo`."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith(("data/", "reports/", "mlruns/", "dvc.lock")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, repo / name)
    return repo


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` ran, in order."""
    return re.findall(r"Running stage '(\w+)'", output)


def wait_for_queue(repo: Path, env: dict, timeout: float = PATIENCE_S) -> str:
    """`dvc queue status` once nothing is queued or running (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(DVC + ["queue", "status"], repo, env)
        if not re.search(r"\b(Queued|Running)\b", status) or time.monotonic() > deadline:
            return status
        time.sleep(3)


def table_lines(text: str) -> list[list[str]]:
    """The cells of a table printed by `transfer compare` / `dvc exp show` (columns two or more spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]

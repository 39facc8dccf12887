"""The project as a fresh checkout would hold it, copied for a benchmark to run the pipeline in.

Tracked and new (not ignored) files only, without results (data/, mlruns/, dvc.lock, reports/,
bench/results): what `git clone` plus the uncommitted work gives, so a benchmark measures a cold pipeline.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = ("data/", "mlruns/", "dvc.lock", "reports/", "bench/results")


def copy_project(dest: Path, repo_root: Path = REPO_ROOT) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo_root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = repo_root / name
        if source.is_file() and not name.startswith(RESULTS):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def bench_environment(**extra: str) -> dict[str, str]:
    """This environment without MLflow/DVC variables, with this venv first and a git identity for the copy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@localhost",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@localhost",
        **extra,
    )
    return env

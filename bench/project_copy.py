"""The project as a fresh checkout would hold it, copied for a benchmark to run the pipeline in.

Tracked and new (not ignored) files only, without results (data/, mlruns/, dvc.lock, reports/,
bench/results): what `git clone` plus the uncommitted work gives, so a benchmark measures a cold pipeline.
"""

from __future__ import annotations

import shutil
import subprocess
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

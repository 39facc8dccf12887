"""A stage that fails leaves the last successful run's outputs: the real `dvc repro` in a copy of the project.

DVC deletes a stage's outputs before running it. The reports kept in git (reports/*.json, *.csv: `cache:
false`) cannot be restored from DVC's cache, so they are `persist: true` and replaced only once their stage
has succeeded (transfer.pipeline.files.staged_outputs). The failure here comes after DVC has started the
stage, where no check of params.yaml can see it: a corrupted feature file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from project_helpers import PATIENCE_S, run, stages_run

DVC = [sys.executable, "-m", "dvc"]
TRAIN_REPORTS = ["reports/train.json", "reports/layer_movement.json", "reports/history.csv"]
EVALUATE_REPORTS = ["reports/metrics.json", "reports/confusion.csv"]


def corrupt(path: Path) -> None:
    path.unlink()  # a new file, never a write through a link into DVC's cache
    path.write_bytes(b"not a feature cache")


def failed_repro(stage: str, repo: Path, env: dict) -> str:
    done = subprocess.run(
        DVC + ["repro", "--single-item", stage], cwd=repo, env=env, capture_output=True, text=True, timeout=PATIENCE_S
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert stages_run(done.stdout) == [stage]  # DVC did start it (and would have deleted plain outputs)
    return done.stdout + done.stderr


def test_a_failed_train_or_evaluate_keeps_the_previous_reports(pipeline):
    repo, env = pipeline  # the session's build, where train and evaluate have succeeded
    before = {name: (repo / name).read_bytes() for name in TRAIN_REPORTS + EVALUATE_REPORTS}

    for name in ("train.pt", "val.pt", "test.pt"):
        corrupt(repo / "data/features" / name)
    output = failed_repro("train", repo, env)
    assert "feature cache" in output
    assert not (repo / "data/model").exists()  # deleted by DVC before train ran; cached, so it comes back:
    run(DVC + ["checkout", "data/model"], repo, env)
    output = failed_repro("evaluate", repo, env)
    assert "feature cache" in output

    after = {name: (repo / name).read_bytes() if (repo / name).exists() else None for name in before}
    assert after == before
    assert not list((repo / "reports").glob(".staged.*"))  # nothing half-published left behind
    # The cached outputs (the corrupted features, the diagnostics DVC deleted) as the last good run left them.
    run(DVC + ["checkout", "--force"], repo, env)
    assert (repo / "reports/diagnostics/report.html").is_file()
    assert "Data and pipelines are up to date" in run(DVC + ["status"], repo, env)

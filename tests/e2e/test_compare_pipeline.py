"""`transfer compare` and `transfer report` end to end, in a real git + DVC repository with two commits and
experiments that differ in their params."""

from __future__ import annotations

import re
import subprocess
import sys

from PIL import Image
from project_helpers import DVC, git_env, run, table_lines
from team_helpers import small_dvc_project


def test_compare_and_report_in_a_real_dvc_repository(tmp_path):
    env = git_env()
    repo = small_dvc_project(tmp_path / "repo", env)
    transfer = [sys.executable, "-m", "transfer.cli"]

    # A second commit with other params: what a pull request's branch holds.
    run(["git", "checkout", "-qb", "feature"], repo, env)
    run(DVC + ["exp", "run", "-q", "-n", "lr-high", "-S", "head.lr=0.1"], repo, env)  # applied to the workspace
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "head.lr 0.1"], repo, env)
    run(DVC + ["exp", "run", "-q", "--queue", "-n", "lr-mid", "-S", "head.lr=0.03"], repo, env)

    lines = table_lines(run(transfer + ["compare"], repo, env))
    assert lines[0] == ["experiment", "state", "head.lr", "test_acc", "test_f1", "val_acc", "verdict"]
    assert lines[2:] == [
        ["workspace", "workspace", "0.1", "0.74", "0.73", "0.75", "good"],
        ["feature", "commit", "0.1", "0.74", "0.73", "0.75", "good"],
        ["lr-mid", "queued", "0.03", "-", "-", "-", "-"],
    ]
    # Every commit: the baseline and its experiment too.
    names = [line[0] for line in table_lines(run(transfer + ["compare", "--all-commits"], repo, env))[2:]]
    assert names[0] == "main" and {"lr-high", "feature", "lr-mid"} <= set(names)

    run(transfer + ["report", "--base", "main"], repo, env)
    report = (repo / "reports/pr/report.md").read_text()
    assert "| test_acc | 0.8800 | 0.7400 | -0.1400 |" in report
    assert re.search(r"\| params.yaml \| head.lr +\| 0.01 +\| 0.1 ", report)
    for image in ("learning_curves.png", "confusion_matrix.png"):
        assert f"]({image})" in report
        with Image.open(repo / "reports/pr" / image) as png:
            assert png.format == "PNG" and png.width > 200
    # Only reports/pr is new: the report writes nothing else in the repository.
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], repo, env)
    assert {line[3:] for line in status.splitlines()} == {
        "reports/pr/report.md",
        "reports/pr/learning_curves.png",
        "reports/pr/confusion_matrix.png",
    }

    missing = subprocess.run(
        transfer + ["report", "--base", "nosuch"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "'nosuch' is not a commit" in missing.stderr

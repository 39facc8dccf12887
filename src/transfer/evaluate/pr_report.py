"""`transfer report --base REV`: the markdown report CI posts on a pull request, built the same way locally.

    make report BASE=main        # after `dvc repro`: reports/pr/report.md and its images

The report holds the key metrics against the base revision (from `dvc metrics diff`), every changed
metric and param (`dvc metrics diff`, `dvc params diff`), and the key plots drawn from the DVC plot files
(reports/history.csv, reports/confusion.csv) as PNG files beside the markdown, linked by relative paths,
which CI's comment step uploads. It reads the workspace as it is: run it after `dvc repro`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from transfer.evaluate.compare import KEY_METRICS
from transfer.pipeline.errors import UserError
from transfer.pipeline.files import write_text
from transfer.pipeline.layout import REPORTS_DIR
from transfer.pipeline.params import flatten_dict

REPORT_DIR = REPORTS_DIR / "pr"
HISTORY_FILE = REPORTS_DIR / "history.csv"
CONFUSION_FILE = REPORTS_DIR / "confusion.csv"
KEY_METRICS_FILE = "reports/metrics.json"
KEY_TRAIN_FILE = "reports/train.json"


class ReportError(UserError):
    pass


def dvc(args: list[str], repo: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ReportError(f"`dvc {' '.join(args)}` failed in {repo}:\n{done.stderr.strip()[-2000:]}")
    return done.stdout


def check_revision(base: str, repo: Path) -> None:
    done = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ReportError(
            f"base revision {base!r} is not a commit of {repo}: fetch it first "
            f"(`git fetch origin {base.removeprefix('origin/')}`; in GitHub Actions check out "
            f"with fetch-depth: 0)"
        )


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _signed(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:+.4f}" if isinstance(value, float) else f"{value:+d}"
    return "-" if value is None else str(value)


def key_metrics_markdown(metrics_diff: dict[str, Any], workspace: dict[str, Any]) -> str:
    """Key metrics, base -> this branch, from `dvc metrics diff --json --all` and the workspace's metrics."""
    changes = {
        key: change
        for file in (KEY_METRICS_FILE, KEY_TRAIN_FILE)
        for key, change in (metrics_diff.get(file) or {}).items()
    }
    lines = ["| metric | base | this branch | change |", "| --- | ---: | ---: | ---: |"]
    for short, key in KEY_METRICS.items():
        change = changes.get(key) or {}
        new = change.get("new", workspace.get(key))
        lines.append(f"| {short} | {_number(change.get('old'))} | {_number(new)} | {_signed(change.get('diff'))} |")
    return "\n".join(lines)


def workspace_metrics(repo: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name in (KEY_TRAIN_FILE, KEY_METRICS_FILE):
        if (repo / name).is_file():
            merged.update(flatten_dict(json.loads((repo / name).read_text())))
    return merged


def confusion_counts(confusion_csv: Path):
    """(counts, class names) from the confusion plot file (path, actual, predicted per test image)."""
    import pandas as pd

    from transfer.evaluate.metrics import confusion

    pairs = pd.read_csv(confusion_csv)
    classes = sorted(set(pairs["actual"].astype(str)) | set(pairs["predicted"].astype(str)))
    index = {name: i for i, name in enumerate(classes)}
    return confusion(
        pairs["actual"].astype(str).map(index), pairs["predicted"].astype(str).map(index), len(classes)
    ), classes


def render_plots(repo: Path, out_dir: Path) -> list[tuple[str, str]]:
    """Learning curves and confusion matrix as PNGs in out_dir; returns (title, file name) of each drawn."""
    import pandas as pd

    from transfer.evaluate.plots import plot_confusion_matrix, plot_learning_curves

    drawn = []
    if (repo / HISTORY_FILE).is_file():
        plot_learning_curves(pd.read_csv(repo / HISTORY_FILE), out_dir / "learning_curves.png")
        drawn.append(("Learning curves", "learning_curves.png"))
    if (repo / CONFUSION_FILE).is_file():
        counts, classes = confusion_counts(repo / CONFUSION_FILE)
        plot_confusion_matrix(counts, classes, out_dir / "confusion_matrix.png")
        drawn.append(("Test confusion matrix", "confusion_matrix.png"))
    return drawn


def build_report(base: str, repo: Path = Path("."), out_dir: Path | None = None) -> Path:
    """Write out_dir/report.md (default reports/pr/) and its images; returns the markdown's path."""
    repo = repo.resolve()
    out_dir = repo / REPORT_DIR if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    check_revision(base, repo)
    metrics_diff = json.loads(dvc(["metrics", "diff", base, "--all", "--json"], repo) or "{}")
    changed_metrics = dvc(["metrics", "diff", base, "--md", "--precision", "4"], repo).strip()
    changed_params = dvc(["params", "diff", base, "--md"], repo).strip()
    plots = render_plots(repo, out_dir)

    sections = [
        f"## Pipeline report: this branch against `{base}`",
        "",
        key_metrics_markdown(metrics_diff, workspace_metrics(repo)),
        "",
        "### Changed params",
        "",
        changed_params or "No param changed.",
        "",
        "<details><summary>Every changed metric</summary>",
        "",
        changed_metrics or "No metric changed.",
        "",
        "</details>",
        "",
    ]
    for title, name in plots:
        sections += [f"### {title}", "", f"![{title}]({name})", ""]
    report = out_dir / "report.md"
    write_text(report, "\n".join(sections))
    return report

"""`transfer report --base REV`: the pull-request report (built by transfer.evaluate.pr_report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from transfer.evaluate.pr_report import build_report


def run(args: argparse.Namespace) -> int:
    report = build_report(args.base, Path(args.repo), Path(args.out) if args.out else None)
    print(f"report: {report}")
    return 0


# The `transfer report` command (transfer.cli builds its parser from these and `add_arguments`).
COMMAND = "report"
COMMAND_HELP = "markdown report of this branch against a base revision (what CI posts on a PR)"
COMMAND_DESCRIPTION = (
    "Key metrics, changed metrics and params (dvc metrics/params diff) against --base, and the "
    "learning curves and confusion matrix as images, in reports/pr/report.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="main", help="the revision to compare with (default: main)")
    parser.add_argument("--repo", default=".", help="the repository (default: here)")
    parser.add_argument("--out", default=None, help="output folder (default: reports/pr under the repository)")

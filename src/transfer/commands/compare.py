"""`transfer compare`: the experiments side by side (the table: transfer.evaluate.compare)."""

from __future__ import annotations

import argparse
from pathlib import Path

from transfer.evaluate.compare import DEFAULT_SORT, KEY_METRICS, comparison_table, dvc_exp_show, experiment_rows


def run(args: argparse.Namespace) -> int:
    print(comparison_table(experiment_rows(dvc_exp_show(Path(args.repo), args.all_commits)), args.sort_by))
    return 0


# The `transfer compare` command (transfer.cli builds its parser from these and `add_arguments`).
COMMAND = "compare"
COMMAND_HELP = "the experiments side by side: changed params and key metrics"
COMMAND_DESCRIPTION = (
    "The workspace, HEAD and its DVC experiments (queued, failed ones too) with the params that "
    "differ between them and the key metrics, best first. Built from `dvc exp show --json`."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sort-by",
        default=DEFAULT_SORT,
        help=f"a key metric ({', '.join(KEY_METRICS)}) or a param key (default {DEFAULT_SORT})",
    )
    parser.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not HEAD's")
    parser.add_argument("--repo", default=".", help="the repository (default: here)")

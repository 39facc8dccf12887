"""`transfer compare`: this repository's experiments in a table that fits a terminal.

`dvc exp show` prints every param and metric, about 60 columns, most of them equal in every row. This
keeps only the params whose values differ between the rows and the key metrics, under the short names
the MLflow runs view uses (test_acc, test_f1), best first.

The source is `dvc exp show --json`, not MLflow: it needs no server, it lists queued, running and failed
experiments too, and every name it prints is one `dvc exp apply NAME` restores (the MLflow run of an
experiment carries the same name). The table is built from the parsed JSON by functions that take plain
data, so it is tested without a repository.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer.pipeline.errors import UserError
from transfer.pipeline.params import flatten_dict

# Short name -> dotted key in the merged metrics files (reports/metrics.json, reports/train.json).
KEY_METRICS: dict[str, str] = {
    "test_acc": "accuracy",
    "test_f1": "macro_f1",
    "val_acc": "val_acc",
    "verdict": "fit.verdict",
}
DEFAULT_SORT = "test_acc"


class CompareError(UserError):
    pass


@dataclass
class ExperimentRow:
    name: str
    state: str  # workspace, commit, success, queued, running, failed
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def _merged(files: dict[str, Any] | None) -> dict[str, Any]:
    """The `data` of every params or metrics file of one revision, flattened into one dict."""
    merged: dict[str, Any] = {}
    for content in (files or {}).values():
        merged.update(flatten_dict((content or {}).get("data") or {}))
    return merged


def _row(entry: dict[str, Any], name: str, state: str) -> ExperimentRow:
    data = entry.get("data") or {}
    return ExperimentRow(name, state, _merged(data.get("params")), _merged(data.get("metrics")))


def experiment_rows(exp_show: list[dict[str, Any]]) -> list[ExperimentRow]:
    """Rows of `dvc exp show --json`: the workspace, each commit, then each of its experiments."""
    rows = []
    for commit in exp_show:
        if commit.get("rev") == "workspace":
            rows.append(_row(commit, "workspace", "workspace"))
            continue
        rows.append(_row(commit, commit.get("name") or commit["rev"][:7], "commit"))
        for experiment in commit.get("experiments") or []:
            state = (experiment.get("executor") or {}).get("state") or "success"
            for revision in experiment.get("revs") or []:
                failed = revision.get("error") is not None
                rows.append(
                    _row(
                        revision,
                        revision.get("name") or experiment.get("name") or revision["rev"][:7],
                        "failed" if failed else state,
                    )
                )
    return rows


def changed_params(rows: list[ExperimentRow]) -> list[str]:
    """The param keys whose values are not the same in every row, in params.yaml order."""
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row.params if key not in keys]
    return [key for key in keys if len({json.dumps(row.params.get(key)) for row in rows}) > 1]


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _sort_value(row: ExperimentRow, column: str) -> tuple[int, Any]:
    value = row.metrics.get(KEY_METRICS[column]) if column in KEY_METRICS else row.params.get(column)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, -value)  # best (largest) first; rows without the value last
    return (1, str(value)) if value is not None else (2, "")


def comparison_table(rows: list[ExperimentRow], sort_by: str = DEFAULT_SORT) -> str:
    """A plain-text table: name, state, the changed params, the key metrics; sorted by `sort_by`."""
    params = changed_params(rows)
    if sort_by not in KEY_METRICS and sort_by not in {key for row in rows for key in row.params}:
        raise CompareError(
            f"--sort-by {sort_by!r} is neither a key metric ({', '.join(KEY_METRICS)}) nor a param of these experiments"
        )
    header = ["experiment", "state", *params, *KEY_METRICS]
    body = [
        [
            row.name,
            row.state,
            *(_format(row.params.get(key)) for key in params),
            *(_format(row.metrics.get(key)) for key in KEY_METRICS.values()),
        ]
        for row in sorted(rows, key=lambda row: _sort_value(row, sort_by))
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * width for width in widths]), *map(line, body)])


def dvc_exp_show(repo: Path, all_commits: bool = False) -> list[dict[str, Any]]:
    """`dvc exp show --json` of the repository at `repo`, parsed."""
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CompareError(f"`dvc exp show` failed in {repo} (is it a DVC repository?):\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout or "[]")

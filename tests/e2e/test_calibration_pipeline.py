"""Temperature scaling through the real pipeline on the embedded default (32 px: the backbone is not under test):
the train stage fits and stores the temperature, the evaluate stage reports ECE/NLL/Brier before and after, the
reliability diagram (DVC plot data, report.html) and the MLflow metrics; `evaluate.calibration: none` re-runs
train and evaluate only, keeps T = 1 and predicts exactly the same classes (accuracy unchanged)."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
from project_helpers import run, stages_run
from test_pipeline import mlflow_runs


def test_temperature_fitted_reported_logged_and_accuracy_unchanged(built_small_pipeline, small_pipeline):
    repo, env = small_pipeline  # the session's build at 32 px; its newest run is that build's
    dvc = [sys.executable, "-m", "dvc"]
    assert "train" in stages_run(built_small_pipeline.output) and "evaluate" in stages_run(built_small_pipeline.output)

    temperature = json.loads((repo / "data/model/model.json").read_text())["temperature"]
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    calibration = metrics["calibration"]
    assert calibration["temperature"] == temperature and temperature != 1.0
    # Fitted on val, T need not lower the test NLL (at 32 px here: 0.7609 -> 0.7615); tests/unit/test_calibration.py
    # checks that it does on over-confident logits. Here: every metric is there, before and after.
    assert {f"{name}_{when}" for name in ("ece", "nll", "brier") for when in ("before", "after")} <= set(calibration)
    test_images = len(pd.read_csv(repo / "reports/confusion.csv"))
    for when in ("before", "after"):
        assert pd.read_csv(repo / f"reports/reliability/{when}.csv")["count"].sum() == test_images
    report = (repo / "reports/diagnostics/report.html").read_text()
    assert "<h2>Calibration</h2>" in report and "reliability" in report
    runs = mlflow_runs(repo)
    assert runs["metrics.test.calibration.temperature"].iloc[0] == pytest.approx(temperature)
    assert runs["metrics.test.calibration.ece_after"].iloc[0] == pytest.approx(calibration["ece_after"])
    predicted = (repo / "reports/confusion.csv").read_text()

    output = run(dvc + ["exp", "run", "-S", "evaluate.calibration=none"], repo, env)
    assert stages_run(output) == ["params", "train", "evaluate"]
    assert json.loads((repo / "data/model/model.json").read_text())["temperature"] == 1.0
    uncalibrated = json.loads((repo / "reports/metrics.json").read_text())
    assert uncalibrated["accuracy"] == metrics["accuracy"] and uncalibrated["macro_f1"] == metrics["macro_f1"]
    assert (repo / "reports/confusion.csv").read_text() == predicted  # every test image: the same class
    assert uncalibrated["calibration"]["ece_before"] == pytest.approx(calibration["ece_before"])
    assert uncalibrated["calibration"]["ece_after"] == uncalibrated["calibration"]["ece_before"]

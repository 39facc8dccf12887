"""Calibration metrics against hand-computed values, and temperature scaling on over-confident logits."""

import numpy as np
import pytest
import torch
from test_diagnostics import image_files, predictions  # noqa: F401 (fixtures)

from transfer.evaluate.calibration import (
    brier,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_diagram,
    reliability_frame,
    softmax,
)
from transfer.models.backbones import Classifier

# Four images, two classes. Top-1 confidences 0.9, 0.8, 0.6, 0.55; the first and third are right.
PROBS = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
LABELS = np.array([0, 0, 0, 0])


def test_ece_by_hand():
    # 15 bins of width 1/15: 0.9 -> bin 13 (0.8667, 0.9333], 0.8 -> bin 11 (0.7333, 0.8], 0.6 -> bin 8
    # (0.5333, 0.6], 0.55 -> bin 8. Bin 13: |1 - 0.9|; bin 11: |0 - 0.8|; bin 8: |0.5 - 0.575| x 2 images.
    expected = (0.1 + 0.8 + 2 * 0.075) / 4
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(expected)
    rows = reliability_diagram(PROBS, LABELS)
    assert [row["count"] for row in rows] == [0] * 8 + [2, 0, 0, 1, 0, 1, 0]
    assert rows[8]["confidence"] == pytest.approx(0.575) and rows[8]["accuracy"] == 0.5
    assert rows[0]["accuracy"] is None
    # Perfectly calibrated in every bin: ECE 0.
    assert expected_calibration_error([[0.5, 0.5], [0.5, 0.5]], [0, 1]) == pytest.approx(0.0)


def test_nll_and_brier_by_hand():
    assert nll(PROBS, LABELS) == pytest.approx(-(np.log(0.9) + np.log(0.2) + np.log(0.6) + np.log(0.45)) / 4)
    # (0.1^2 + 0.1^2), (0.8^2 + 0.8^2), (0.4^2 + 0.4^2), (0.55^2 + 0.55^2)
    assert brier(PROBS, LABELS) == pytest.approx((0.02 + 1.28 + 0.32 + 0.605) / 4)
    assert brier([[1.0, 0.0, 0.0]], [0]) == 0.0 and brier([[0.0, 1.0, 0.0]], [0]) == 2.0


def overconfident(seed=0, n=2000, classes=5):
    """Logits whose softmax claims far more than their 70 % accuracy: the true class's logit is the largest
    70 % of the time, and every logit is multiplied by 8."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    right = rng.random(n) < 0.7
    logits[np.arange(n), labels] += np.where(right, 2.5, -1.0)
    return logits * 8, labels


def test_fitting_on_overconfident_logits_lowers_nll_and_ece_and_keeps_the_classes():
    logits, labels = overconfident()
    temperature = fit_temperature(logits, labels)
    assert temperature > 2  # the logits were inflated 8x
    report = calibration_report(logits, labels, temperature)
    assert report["after"]["nll"] < report["before"]["nll"]
    assert report["after"]["ece"] < report["before"]["ece"] / 2
    assert report["after"]["brier"] < report["before"]["brier"]
    assert (softmax(logits, temperature).argmax(1) == logits.argmax(1)).all()
    # Held-out logits of the same kind: the temperature generalises.
    test_logits, test_labels = overconfident(seed=1)
    held_out = calibration_report(test_logits, test_labels, temperature)
    assert held_out["after"]["ece"] < held_out["before"]["ece"] / 2
    # NLL is minimal at the fitted temperature (L-BFGS found the optimum, not a nearby point).
    best = nll(softmax(logits, temperature), labels)
    assert best <= min(nll(softmax(logits, temperature * f), labels) for f in (0.9, 1.1))
    table = reliability_frame(report["diagram_after"])
    assert table["count"].sum() == len(labels) and table["accuracy"].notna().all()


def test_an_underconfident_model_gets_a_temperature_below_one():
    logits, labels = overconfident()
    assert fit_temperature(logits / 40, labels) < 1


def test_classifier_divides_its_logits_by_the_temperature():
    backbone = torch.nn.Flatten()
    backbone.num_features, backbone.groups = 4, {}
    model = Classifier(backbone, 3).eval()
    x = torch.randn(5, 4)
    raw = model(x)
    model.temperature = 2.5
    assert torch.allclose(model(x), raw / 2.5)
    assert (model(x).argmax(1) == raw.argmax(1)).all()


def test_the_report_shows_the_reliability_diagram_and_the_metrics(tmp_path, image_files, predictions):  # noqa: F811
    from PIL import Image
    from test_diagnostics import CLASSES, TinyModel, history_frame

    from transfer.evaluate import diagnostics as diag

    y_true, probs = predictions
    y_true, probs = y_true[: len(image_files)], probs[: len(image_files)]
    report = calibration_report(np.log(probs), y_true, 1.7)
    _, files = diag.write_run_diagnostics(
        tmp_path,
        class_names=CLASSES,
        y_true=y_true,
        probs=softmax(np.log(probs), 1.7),
        history=history_frame(fine_tune=False),
        image_paths=[str(p) for p in image_files],
        load_image=lambda p: Image.open(p).convert("RGB"),
        features=torch.randn(len(y_true), 16),
        model=TinyModel(),
        batch=torch.randn(2, 3, 32, 32),
        calibration=report,
    )
    assert tmp_path / diag.RELIABILITY_PNG in files
    assert Image.open(tmp_path / diag.RELIABILITY_PNG).format == "PNG"
    page = (tmp_path / diag.REPORT_HTML).read_text()
    assert "<h2>Calibration</h2>" in page and "Temperature 1.7" in page
    assert f"{report['after']['ece']:.4g}" in page and f"{report['before']['nll']:.4g}" in page

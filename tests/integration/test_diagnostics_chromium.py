"""The run report of the diagnostics opens from disk in a real browser (headless Chromium)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diagnostics_helpers import CLASSES, TinyModel, history_frame, make_predictions, write_image_files
from PIL import Image
from report_helpers import CHROMIUM, chromium_run

from transfer.evaluate import diagnostics as diag


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")
def test_run_report_renders_its_six_images_in_headless_chromium(tmp_path) -> None:
    """The report of tests/unit/test_diagnostics.py::test_write_run_diagnostics, rendered."""
    image_files = write_image_files(tmp_path / "images")
    y_true, probs = make_predictions()
    y_true, probs = y_true[: len(image_files)], probs[: len(image_files)]
    torch.manual_seed(0)
    out = tmp_path / "diagnostics"
    diag.write_run_diagnostics(
        out,
        class_names=CLASSES,
        y_true=y_true,
        probs=probs,
        history=history_frame(),
        image_paths=[str(p) for p in image_files],
        load_image=lambda path: Image.open(path).convert("RGB"),
        features=torch.randn(len(y_true), 16),
        model=TinyModel(),
        batch=torch.randn(4, 3, 32, 32),
        weight_change={"stem": 0.0, "stage1": 0.02, "stage2": 0.05, "head": 0.4},
        thresholds={"overfit_gap": 0.05, "underfit_acc": 0.6},
        summary={"macro_f1": 0.5},
    )
    # the real report opens in a browser from disk: the DOM keeps all six images, pixels are drawn
    report = (out / diag.REPORT_HTML).as_uri()
    chromium_run(tmp_path, report, f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1200,2000")
    with Image.open(tmp_path / "shot.png") as shot:
        assert np.asarray(shot.convert("L")).var() > 0
    dom = chromium_run(tmp_path, report, "--dump-dom").stdout
    assert dom.count("<img ") == 6

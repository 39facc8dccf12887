"""The HTML report renders its images in a real browser (headless Chromium)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_helpers import CHROMIUM, SWATCHES, TagCollector, chromium_run, write_report


@pytest.fixture()
def report(tmp_path) -> Path:
    return write_report(tmp_path)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path, report) -> None:
    screenshot = tmp_path / "shot.png"
    chromium_run(tmp_path, report.as_uri(), f"--screenshot={screenshot}", "--window-size=1200,2000")
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    assert pixels.var() > 0, "blank screenshot"
    # every swatch image was painted: a block of its exact colour is on screen
    for name, colour in SWATCHES.items():
        matches = np.all(np.abs(pixels - np.array(colour)) <= 4, axis=-1)
        assert matches.sum() >= 0.8 * 220 * 100, f"{name} image not rendered"

    # the browser's DOM holds exactly the images written, all decoded inline
    dom = chromium_run(tmp_path, report.as_uri(), "--dump-dom").stdout
    parser = TagCollector()
    parser.feed(dom)
    assert len(parser.tags["img"]) == len(SWATCHES)

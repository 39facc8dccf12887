"""The HTML report is self-contained and renders its images in a real browser."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from transfer.evaluate.report import write_html_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# pure colours that the page's own CSS never uses: finding them in the
# screenshot proves that each inlined image was decoded and painted
SWATCHES = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255)}


class TagCollector(HTMLParser):
    """Collect the attributes of every tag of the page, by tag name."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, list[dict[str, str]]] = {}

    def handle_starttag(self, tag: str, attrs) -> None:
        self.tags.setdefault(tag, []).append(dict(attrs))


def swatch_png(folder: Path, name: str, colour: tuple[int, int, int]) -> Path:
    """A real PNG: a solid colour block with a white border."""
    image = Image.new("RGB", (240, 120), "white")
    image.paste(Image.new("RGB", (220, 100), colour), (10, 10))
    path = folder / f"{name}_swatch.png"
    image.save(path, format="PNG")
    return path


@pytest.fixture()
def report(tmp_path) -> Path:
    """A report with three images, a table, metrics and text."""
    images = [swatch_png(tmp_path, name, colour) for name, colour in SWATCHES.items()]
    table = pd.DataFrame({"class": ["cat", "<dog>"], "precision": [0.91234, 0.5], "support": [10, 12]})
    sections = {
        "Metrics": [{"test_accuracy": 0.87654321, "verdict": "good fit", "epochs": 6}],
        "Pictures": [images[0], "Two more below.", images[1], images[2]],
        "Per-class quality": [table],
    }
    return write_html_report(tmp_path / "out" / "report.html", "Run <42> report", sections)


def test_report_is_self_contained(report) -> None:
    page = report.read_text(encoding="utf-8")
    parser = TagCollector()
    parser.feed(page)
    images = parser.tags["img"]
    assert len(images) == len(SWATCHES)
    for attrs in images:
        assert attrs["src"].startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1])))
        assert decoded.format == "PNG" and decoded.size == (240, 120)
    # no external asset of any kind
    assert not {"script", "link", "iframe"} & set(parser.tags)
    assert "http" not in page.replace("http-equiv", "")
    # text is escaped, numbers formatted, tables present
    assert "Run &lt;42&gt; report" in page and "&lt;dog&gt;" in page
    assert "0.8765" in page and "0.9123" in page
    assert len(parser.tags["table"]) == 2
    assert not list(report.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_report_rejects_non_png(tmp_path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a not a png")
    with pytest.raises(ValueError, match="not a PNG"):
        write_html_report(tmp_path / "r.html", "x", {"s": [fake]})
    with pytest.raises(TypeError):
        write_html_report(tmp_path / "r.html", "x", {"s": [3.5]})


def chromium_run(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """Run headless Debian chromium on ``url`` with a fresh profile, offline."""
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=True)


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

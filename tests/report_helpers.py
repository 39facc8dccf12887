"""A real HTML report with three coloured images, and headless Chromium to render it (report tests)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
from PIL import Image
from project_helpers import PATIENCE_S

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


def write_report(folder: Path) -> Path:
    """A report with three images, a table, metrics and text."""
    images = [swatch_png(folder, name, colour) for name, colour in SWATCHES.items()]
    table = pd.DataFrame({"class": ["cat", "<dog>"], "precision": [0.91234, 0.5], "support": [10, 12]})
    sections = {
        "Metrics": [{"test_accuracy": 0.87654321, "verdict": "good fit", "epochs": 6}],
        "Pictures": [images[0], "Two more below.", images[1], images[2]],
        "Per-class quality": [table],
    }
    return write_html_report(folder / "out" / "report.html", "Run <42> report", sections)


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
    return subprocess.run(command, capture_output=True, text=True, timeout=PATIENCE_S, check=True)

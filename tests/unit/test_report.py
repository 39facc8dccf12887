"""The HTML report is self-contained: every image inlined as a decodable PNG."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image
from report_helpers import SWATCHES, TagCollector, write_report

from transfer.evaluate.report import write_html_report


@pytest.fixture()
def report(tmp_path) -> Path:
    return write_report(tmp_path)


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

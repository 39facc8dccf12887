"""A self-contained static HTML report for one run.

The page inlines every picture as a base64 PNG data URI and renders tables as
plain HTML, so it opens from disk in any browser with no server and no network:
the file can be attached to an MLflow run or kept as a DVC output and still
read years later.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import pandas as pd

from transfer.pipeline.files import write_text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# One section item: a PNG file (Path) shown as an image, a DataFrame shown as a
# table, a mapping shown as a two-column metrics table, or a str paragraph.
SectionItem = Union[Path, pd.DataFrame, Mapping, str]

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
figure { margin: .8em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; }
"""


def png_data_uri(png_path: str | os.PathLike) -> str:
    """Return the PNG file at `png_path` as a `data:image/png;base64` URI.

    Raises ValueError for a file that is not a PNG, because a browser would
    silently show a broken image instead.
    """
    data = Path(png_path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{png_path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _format_value(value: object) -> str:
    """Format one metric value: floats to 4 significant digits, rest as text."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        return str(number) if math.isnan(number) or math.isinf(number) else f"{number:.4g}"
    return str(value)


def metrics_table_html(metrics: Mapping) -> str:
    """Render a flat metrics mapping as a two-column HTML table."""
    rows = "".join(
        f"<tr><td>{html.escape(str(name))}</td><td>{html.escape(_format_value(value))}</td></tr>"
        for name, value in metrics.items()
    )
    return f'<table class="metrics"><tr><th>metric</th><th>value</th></tr>{rows}</table>'


def dataframe_html(frame: pd.DataFrame) -> str:
    """Render a DataFrame as an HTML table (values escaped by pandas)."""
    return frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4g}", escape=True)


def image_html(png_path: str | os.PathLike) -> str:
    """Render a PNG file as an inlined <figure> with its file stem as caption."""
    name = html.escape(Path(png_path).stem.replace("_", " "))
    return f'<figure><img alt="{name}" src="{png_data_uri(png_path)}"><figcaption>{name}</figcaption></figure>'


def section_item_html(item: SectionItem) -> str:
    """Dispatch one section item to its HTML renderer by type."""
    if isinstance(item, Path):
        return image_html(item)
    if isinstance(item, pd.DataFrame):
        return dataframe_html(item)
    if isinstance(item, Mapping):
        return metrics_table_html(item)
    if isinstance(item, str):
        return f"<p>{html.escape(item)}</p>"
    raise TypeError(f"unsupported report item of type {type(item).__name__}")


def render_html_report(title: str, sections: Mapping[str, Sequence[SectionItem]]) -> str:
    """Return the report page as a string: one <h2> per section, in order."""
    body = []
    for heading, items in sections.items():
        body.append(f"<h2>{html.escape(heading)}</h2>")
        body.extend(section_item_html(item) for item in items)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_html_report(path: str | os.PathLike, title: str, sections: Mapping[str, Sequence[SectionItem]]) -> Path:
    """Write one self-contained HTML page gathering `sections`; return its path.

    `sections` maps a heading to its items, each a PNG `Path` (inlined as a
    data URI), a `DataFrame` (table), a mapping (metrics table) or a `str`
    (paragraph). Nothing outside the file is referenced.
    """
    write_text(path, render_html_report(title, sections))
    return Path(path)

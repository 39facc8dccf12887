"""The README's Grad-CAM figure: the overlays `transfer predict --explain` wrote, in one captioned grid.

    awk -F, 'NR>1 && !seen[$2]++ {print $1}' data/split/test.csv \
        | xargs transfer predict --model data/model --out /tmp/explain.csv --explain /tmp/explain
    python scripts/gradcam_figure.py /tmp/explain.csv /tmp/explain docs/gradcam.png

Each cell is one input (its folder, which is its class in an ImageFolder tree, and the predicted class with
its probability), at the model's input size: the image as the model saw it, then its Grad-CAM overlay.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from PIL import Image, ImageDraw

CAPTION = 14  # pixels of caption above each cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, help="the CSV `transfer predict --out` wrote")
    parser.add_argument("overlays", type=Path, help="the folder `transfer predict --explain` wrote")
    parser.add_argument("out", type=Path, help="the figure (PNG)")
    parser.add_argument("--columns", type=int, default=2)
    parser.add_argument("--side", type=int, default=112, help="each image's side in the figure")
    args = parser.parse_args(argv)
    with args.predictions.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if not row["error"]]
    cells = []
    for index, row in enumerate(rows):
        (overlay,) = args.overlays.glob(f"{index:04d}_*.png")
        image = Image.open(overlay).convert("RGB").resize((2 * args.side, args.side), Image.Resampling.NEAREST)
        cell = Image.new("RGB", (image.width, image.height + CAPTION), "white")
        cell.paste(image, (0, CAPTION))
        caption = f"{Path(row['path']).parent.name} -> {row['class_1']} ({float(row['probability_1']):.2f})"
        ImageDraw.Draw(cell).text((2, 1), caption, fill="black")
        cells.append(cell)
    rows_count = -(-len(cells) // args.columns)
    width, height = cells[0].size
    figure = Image.new("RGB", (args.columns * width + (args.columns - 1) * 4, rows_count * height), "white")
    for index, cell in enumerate(cells):
        figure.paste(cell, ((index % args.columns) * (width + 4), (index // args.columns) * height))
    figure.save(args.out, format="PNG", optimize=True)
    print(f"{args.out}: {len(cells)} overlays, {args.out.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

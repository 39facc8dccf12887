"""`transfer export --format onnx`: write the ONNX file (transfer.models.export), then check it against PyTorch
on real images (transfer.evaluate.export_check; the test split by default) and report the largest difference."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transfer.models.export import ExportError, export_onnx

DEFAULT_OUT = Path("data/export/model.onnx")
DEFAULT_CHECK_SPLIT = Path("data/split/test.csv")
MAX_CHECK_IMAGES = 64


def default_check_images(limit: int = MAX_CHECK_IMAGES) -> list[str]:
    """The first test-split images (the split stage's manifest), when there is one."""
    if not DEFAULT_CHECK_SPLIT.is_file():
        return []
    import pandas as pd

    return list(pd.read_csv(DEFAULT_CHECK_SPLIT)["path"].head(limit))


def run(args: argparse.Namespace) -> int:
    from transfer.commands.predict import collect_images
    from transfer.evaluate.export_check import check_onnx
    from transfer.pipeline.files import write_json
    from transfer.tracking import resolve_model

    if args.format != "onnx":
        raise ExportError(f"--format {args.format}: only onnx is supported")
    saved = resolve_model(args.model)
    if args.check_images:
        images, problems = collect_images(args.check_images)
        if problems:
            raise ExportError("--check-images: " + "; ".join(f"{source}: {error}" for source, error in problems))
        images = images[: args.max_check_images]
    else:
        images = default_check_images(args.max_check_images)
    export_onnx(saved, args.out)
    check = check_onnx(args.out, saved, images)
    write_json(args.out.with_suffix(".check.json"), {"onnx": str(args.out), **check})
    print(
        f"export: {args.out} (dynamic batch, classes and preprocessing in metadata_props); onnxruntime vs PyTorch "
        f"on {check['images']} image(s): max |probability difference| {check['max_abs_diff_probabilities']:.2e}, "
        f"same top-1 class for {check['same_top1']}/{check['images']}",
        file=sys.stderr,
    )
    return 0


# The `transfer export` command (transfer.cli builds its parser from these and `add_arguments`).
COMMAND = "export"
COMMAND_HELP = "export a trained model to ONNX, checked against PyTorch"
COMMAND_DESCRIPTION = (
    "Write an ONNX model (dynamic batch; outputs logits and probabilities; class names and "
    "preprocessing in metadata_props) and compare it with PyTorch on real images."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="onnx", choices=("onnx",), help="export format (onnx)")
    parser.add_argument(
        "--model",
        default="data/model",
        help="a model folder (default data/model), runs:/<run_id> or models:/<name>@<alias>",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})")
    parser.add_argument(
        "--check-images",
        nargs="+",
        metavar="PATH",
        help="images, folders or globs to compare on (default: the test split, data/split/test.csv)",
    )
    parser.add_argument(
        "--max-check-images",
        type=int,
        default=MAX_CHECK_IMAGES,
        help=f"compare on at most this many images (default {MAX_CHECK_IMAGES})",
    )

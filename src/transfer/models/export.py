"""Export a trained classifier to ONNX, checked against PyTorch on real images (`transfer export --format onnx`).

The ONNX graph takes the preprocessed batch `image` (float32 [batch, 3, S, S]: RGB, resized, centre-cropped,
scaled to [0, 1] and normalised, as `transfer.commands.predict.model_input` makes it) with a dynamic batch
size, and returns `logits` (divided by the model's calibration temperature, as every prediction path does)
and `probabilities` (softmax). Its metadata_props carry what a consumer needs
without this package: `classes` (JSON list, in output order), `preprocessing` (JSON: image_size,
resize_size, interpolation, mean, std), `backbone`, `temperature` and `format`.

After writing, the file is run with onnxruntime on real images (the test split by default) and compared
with the PyTorch model: the largest absolute difference of the probabilities is reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from transfer.pipeline.errors import UserError

if TYPE_CHECKING:  # torch and the model load inside the command, so `transfer --help` answers at once
    from transfer.models.saved import SavedModel

DEFAULT_OUT = Path("data/export/model.onnx")
DEFAULT_CHECK_SPLIT = Path("data/split/test.csv")
MAX_CHECK_IMAGES = 64


class ExportError(UserError, RuntimeError):
    """The export could not be written or checked (missing onnx packages, no images to check on)."""


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the onnx, onnxscript and onnxruntime packages ({exc.name} is missing): "
            "pip install 'transfer[onnx]'"
        ) from None
    return onnx, onnxruntime


def onnx_metadata(saved: SavedModel) -> dict[str, str]:
    from transfer.models.saved import FORMAT

    return {
        "format": FORMAT,
        "backbone": saved.backbone_name,
        "classes": json.dumps(saved.classes),
        "preprocessing": json.dumps(saved.description["preprocessing"], sort_keys=True),
        "input": "image: float32 [batch, 3, S, S], RGB resized (short side resize_size), centre-cropped to "
        "image_size, scaled to [0, 1], normalised with mean and std",
        "outputs": "logits, probabilities (softmax): float32 [batch, classes], in the order of classes",
        # Already applied by the graph (logits are divided by it): informative, not for the consumer to apply.
        "temperature": repr(float(saved.model.temperature)),
    }


def export_onnx(saved: SavedModel, path: str | Path) -> Path:
    """Write the classifier as ONNX (dynamic batch, outputs logits and probabilities, metadata_props)."""
    import torch

    from transfer.pipeline.files import atomic_path

    class LogitsAndProbabilities(torch.nn.Module):
        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.model(image)
            return logits, logits.softmax(dim=1)

    onnx, _ = _require_onnx()
    path = Path(path)
    size = saved.data_config.image_size
    wrapper = LogitsAndProbabilities(saved.model.cpu().eval().to(memory_format=torch.contiguous_format)).eval()
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with atomic_path(path) as tmp:
        torch.onnx.export(
            wrapper,
            (example,),
            str(tmp),
            input_names=["image"],
            output_names=["logits", "probabilities"],
            dynamo=True,
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
        model = onnx.load(str(tmp))
        for key, value in onnx_metadata(saved).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
    return path


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    onnx, _ = _require_onnx()
    return {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}


def check_onnx(path: str | Path, saved: SavedModel, images: Sequence[str | Path], batch_size: int = 32) -> dict:
    """Run the ONNX file (onnxruntime, CPU) and the PyTorch model on the same preprocessed images; compare."""
    import numpy as np
    import torch

    from transfer.evaluate.inference import model_input

    _, onnxruntime = _require_onnx()
    if not images:
        raise ExportError(
            f"no images to check the export on: pass --check-images, or run the split stage ({DEFAULT_CHECK_SPLIT})"
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = saved.model.cpu().eval()
    max_diff, same_top1, count = 0.0, 0, 0
    for start in range(0, len(images), batch_size):
        batch = torch.stack([model_input(image, saved.data_config) for image in images[start : start + batch_size]])
        with torch.inference_mode():
            expected = model(batch).float().softmax(1).numpy()
        _, probabilities = session.run(["logits", "probabilities"], {"image": batch.numpy()})
        max_diff = max(max_diff, float(np.abs(probabilities - expected).max()))
        same_top1 += int((probabilities.argmax(1) == expected.argmax(1)).sum())
        count += len(batch)
    return {
        "images": count,
        "max_abs_diff_probabilities": max_diff,
        "same_top1": same_top1,
        "batch_sizes": sorted({min(batch_size, count - s) for s in range(0, count, batch_size)}),
    }


def default_check_images(limit: int = MAX_CHECK_IMAGES) -> list[str]:
    """The first test-split images (the split stage's manifest), when there is one."""
    if not DEFAULT_CHECK_SPLIT.is_file():
        return []
    import pandas as pd

    return list(pd.read_csv(DEFAULT_CHECK_SPLIT)["path"].head(limit))


def run(args: argparse.Namespace) -> int:
    from transfer.commands.predict import collect_images
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

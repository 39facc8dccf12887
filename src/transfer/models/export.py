"""Export a trained classifier to ONNX, checked against PyTorch on real images (`transfer export --format onnx`).

The ONNX graph takes the preprocessed batch `image` (float32 [batch, 3, S, S]: RGB, resized, centre-cropped,
scaled to [0, 1] and normalised, as `transfer.commands.predict.model_input` makes it) with a dynamic batch
size, and returns `logits` (divided by the model's calibration temperature, as every prediction path does)
and `probabilities` (softmax). Its metadata_props carry what a consumer needs
without this package: `classes` (JSON list, in output order), `preprocessing` (JSON: image_size,
resize_size, interpolation, mean, std), `backbone`, `temperature` and `format`.

`transfer export` (transfer.commands.export) then runs the file with onnxruntime on real images and compares
it with the PyTorch model (transfer.evaluate.export_check).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from transfer.pipeline.errors import UserError

if TYPE_CHECKING:  # torch and the model load inside the command, so `transfer --help` answers at once
    from transfer.models.saved import SavedModel


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

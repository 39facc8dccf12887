"""An exported ONNX file checked against the PyTorch model on the same preprocessed images (onnxruntime, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from transfer.models.export import ExportError, _require_onnx

if TYPE_CHECKING:
    from transfer.models.saved import SavedModel


def check_onnx(path: str | Path, saved: SavedModel, images: Sequence[str | Path], batch_size: int = 32) -> dict:
    """Run the ONNX file (onnxruntime, CPU) and the PyTorch model on the same preprocessed images; compare."""
    import numpy as np
    import torch

    from transfer.evaluate.inference import model_input

    _, onnxruntime = _require_onnx()
    if not images:
        raise ExportError("no images to check the export on: pass --check-images, or run the split stage")
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

"""Inference: an image file (or its bytes) in, class probabilities out, exactly as the evaluation prepares it.

An image goes through what the evaluation does: `decode_to_cache_form` (transfer.data.cache, the decoding
the image cache stores for every split) then `eval_batch_transform` of the model's own preprocessing (size,
resize, interpolation, mean, std, read from the saved model). `model_input` is that one path; `transfer
predict`, the MLflow pyfunc model and the ONNX check all call it, and nothing re-implements it. Images
that cannot be used are kept in the results with their error, never dropped.

    from transfer.evaluate.inference import predict_images, resolve_model

    saved = resolve_model("data/model")            # or "runs:/<run_id>", "models:/<name>@champion"
    for p in predict_images(saved, ["photo.jpg"]):
        print(p.source, saved.classes[p.probabilities.argmax()], p.error)
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from transfer.data.cache import cache_geometry, decode_to_cache_form
from transfer.data.config import DataConfig
from transfer.data.images import ImageError
from transfer.data.transforms import eval_batch_transform
from transfer.models.saved import SavedModel, load_model
from transfer.pipeline.errors import UserError

MLFLOW_SCHEMES = ("runs:/", "models:/")


class InferenceError(UserError, ValueError):
    """Unusable inference input: a DataFrame without an image column, a value that is no image reference."""


@dataclass
class Prediction:
    source: str  # the file path, or a label for in-memory bytes
    probabilities: np.ndarray | None  # float32 [num_classes], None when the image could not be used
    error: str | None = None


@functools.lru_cache(maxsize=8)
def _eval_batch_transform(config: DataConfig):
    return eval_batch_transform(config)


def model_input(source: str | Path | bytes, data_config: DataConfig) -> torch.Tensor:
    """An image file (or its encoded bytes) -> the model's float input [3, S, S], as the evaluation prepares it."""
    pixels = decode_to_cache_form(source, cache_geometry(data_config))  # uint8 [S, S, 3], as the cache holds it
    batch = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    return _eval_batch_transform(data_config)(batch)[0]


def resolve_model(reference: str | Path = "data/model") -> SavedModel:
    """Load a model folder, or the classifier of an MLflow model (`runs:/<id>`, `models:/<name>@<alias>`)."""
    reference = str(reference)
    if reference.startswith(MLFLOW_SCHEMES) or "://" in reference:
        import tempfile

        from transfer import tracking  # MLflow only when asked for

        with tempfile.TemporaryDirectory(prefix="transfer-model-") as tmp:
            return load_model(tracking.download_classifier(reference, Path(tmp)))
    return load_model(reference)


def _decode_all(
    sources: Sequence[str | Path | bytes], labels: Sequence[str], data_config: DataConfig
) -> Iterable[tuple[int, torch.Tensor | None, str | None]]:
    for index, (source, label) in enumerate(zip(sources, labels)):
        try:
            yield index, model_input(source, data_config), None
        except ImageError as error:
            yield index, None, str(error).removeprefix(f"{label}: ")


def predict_images(
    saved: SavedModel,
    sources: Sequence[str | Path | bytes],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    labels: Sequence[str] | None = None,
    progress: bool = True,
) -> list[Prediction]:
    """Class probabilities for each image (path or encoded bytes), in order; unusable images carry their error."""
    labels = (
        list(labels)
        if labels is not None
        else [f"<bytes #{i}>" if isinstance(s, bytes) else str(s) for i, s in enumerate(sources)]
    )
    device = torch.device(device)
    # channels_last: as the features and evaluate stages run the backbone (about 2x faster on CPU). Moved
    # outside inference mode: parameters converted inside it could never take part in autograd again.
    model = saved.model.eval().to(device, memory_format=torch.channels_last)
    results: list[Prediction | None] = [None] * len(sources)
    batch: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        images = torch.stack([tensor for _, tensor in batch]).to(device, memory_format=torch.channels_last)
        with torch.inference_mode():
            probabilities = model(images).float().softmax(1).cpu().numpy()
        for (index, _), row in zip(batch, probabilities):
            results[index] = Prediction(labels[index], row)
        batch.clear()

    bar = tqdm(total=len(sources), desc="predict", unit="img", disable=not progress)
    for index, tensor, error in _decode_all(sources, labels, saved.data_config):
        if tensor is None:
            results[index] = Prediction(labels[index], None, error)
        else:
            batch.append((index, tensor))
            if len(batch) == batch_size:
                flush()
        bar.update(1)
    flush()
    bar.close()
    return results  # type: ignore[return-value]


def top_k(probabilities: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable classes, most probable first (ties: the lower class index first)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[i], float(probabilities[i])) for i in order]


# --- The pyfunc model's predict: a DataFrame of images in, class names and probabilities out ---------

IMAGE_COLUMN = "image"


def image_source(value) -> str | bytes:
    """A cell of the image column: encoded bytes, a base64 string of them, or a file path."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        if Path(value).is_file():
            return value
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return value  # neither: reported as a missing file
    raise InferenceError(
        f"column {IMAGE_COLUMN!r}: expected image bytes, base64 text or a file path, got {type(value).__name__}"
    )


def predict_frame(
    saved: SavedModel, frame: pd.DataFrame, batch_size: int = 64, device: torch.device | str = "cpu"
) -> pd.DataFrame:
    """Columns class (the most probable), probability (its probability), probabilities ({class: p}), error."""
    if IMAGE_COLUMN not in frame.columns:
        raise InferenceError(
            f"the input needs a column {IMAGE_COLUMN!r} (encoded image bytes, base64 in JSON, "
            f"or a file path); got columns {list(frame.columns)}"
        )
    sources = [image_source(value) for value in frame[IMAGE_COLUMN]]
    labels = [f"row {i}" if isinstance(s, bytes) else s for i, s in enumerate(sources)]
    predictions = predict_images(saved, sources, batch_size, device, labels=labels, progress=False)
    rows = []
    for p in predictions:
        if p.probabilities is None:
            rows.append({"class": "", "probability": float("nan"), "probabilities": {}, "error": p.error})
        else:
            best = int(np.argmax(p.probabilities))
            rows.append(
                {
                    "class": saved.classes[best],
                    "probability": float(p.probabilities[best]),
                    "probabilities": {name: float(v) for name, v in zip(saved.classes, p.probabilities)},
                    "error": "",
                }
            )
    return pd.DataFrame(rows, columns=["class", "probability", "probabilities", "error"])

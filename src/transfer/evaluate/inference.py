"""Inference: image files or encoded bytes in, class probabilities out, exactly as the evaluation prepares them.

An image goes through what the evaluation does: `decode_to_cache_form` (transfer.data.cache, the decoding
the image cache stores for every split) then `eval_batch_transform` of the model's own preprocessing (size,
resize, interpolation, mean, std, read from the saved model). `model_input` is that one path; `transfer
predict`, the MLflow pyfunc model and the ONNX check all call it, and nothing re-implements it. Images
that cannot be used are kept in the results with their error, never dropped.

Files and bytes are separate doors. `predict_paths` reads files: it is for `transfer predict` and Python
callers on their own machine. `predict_images` and `predict_frame` (the served pyfunc model) take encoded
bytes or base64 text only and never touch the disk, so a request cannot make a server open its own files;
`ServingLimits` bounds what one request may cost (rows, encoded bytes, decoded pixels), row by row.

    from transfer.evaluate.inference import predict_paths
    from transfer.tracking import resolve_model

    saved = resolve_model("data/model")            # or "runs:/<run_id>", "models:/<name>@champion"
    for p in predict_paths(saved, ["photo.jpg"]):
        print(p.source, saved.classes[p.probabilities.argmax()], p.error)
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from transfer.data.cache import cache_geometry, decode_to_cache_form
from transfer.data.config import DataConfig
from transfer.data.images import DEFAULT_MAX_PIXELS, ImageError
from transfer.data.transforms import eval_batch_transform
from transfer.models.saved import SavedModel
from transfer.pipeline.errors import UserError

log = logging.getLogger(__name__)


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


def model_input(
    source: str | Path | bytes, data_config: DataConfig, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """An image file (or its encoded bytes) -> the model's float input [3, S, S], as the evaluation prepares it.

    An image over `max_pixels` is refused from its header, before anything is decoded."""
    # uint8 [S, S, 3], as the cache holds it
    pixels = decode_to_cache_form(source, cache_geometry(data_config), max_pixels=max_pixels)
    batch = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    return _eval_batch_transform(data_config)(batch)[0]


def _decode_all(
    sources: Sequence[str | Path | bytes], data_config: DataConfig, max_pixels: int
) -> Iterable[tuple[int, torch.Tensor | None, str | None]]:
    for index, source in enumerate(sources):
        try:
            yield index, model_input(source, data_config, max_pixels), None
        except ImageError as error:
            yield index, None, str(error).removeprefix(f"{error.path}: ")
        except Exception as error:  # noqa: BLE001 - one hostile image must not fail the others (or the request)
            log.exception("inference: decoding input %d failed", index)
            yield index, None, f"the image could not be decoded ({type(error).__name__})"


def _predict(
    saved: SavedModel,
    sources: Sequence[str | Path | bytes],
    labels: Sequence[str],
    batch_size: int,
    device: torch.device | str,
    progress: bool,
    max_pixels: int,
) -> list[Prediction]:
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
    for index, tensor, error in _decode_all(sources, saved.data_config, max_pixels):
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


def predict_paths(
    saved: SavedModel,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[Prediction]:
    """Class probabilities for each image file, in order; unusable files carry their error.

    Reads the files named: for the command line and for callers on their own machine, never for a request
    from elsewhere (the served model takes bytes: `predict_frame`)."""
    if any(isinstance(path, (bytes, bytearray, memoryview)) for path in paths):
        raise InferenceError("predict_paths takes file paths; encoded image bytes go to predict_images")
    sources = [os.fspath(path) for path in paths]
    return _predict(saved, sources, sources, batch_size, device, progress, DEFAULT_MAX_PIXELS)


def predict_images(
    saved: SavedModel,
    images: Sequence[bytes],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    labels: Sequence[str] | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Prediction]:
    """Class probabilities for each encoded image (bytes), in order; unusable images carry their error.

    Never reads a file: a string here is an error (file paths go to `predict_paths`)."""
    if not all(isinstance(image, bytes) for image in images):
        raise InferenceError("predict_images takes encoded image bytes; file paths go to predict_paths")
    labels = list(labels) if labels is not None else [f"<bytes #{i}>" for i in range(len(images))]
    return _predict(saved, images, labels, batch_size, device, progress, max_pixels)


def top_k(probabilities: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The k most probable classes, most probable first (ties: the lower class index first)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(classes[i], float(probabilities[i])) for i in order]


# --- The pyfunc model's predict: a DataFrame of images in, class names and probabilities out ---------

IMAGE_COLUMN = "image"


@dataclass(frozen=True)
class ServingLimits:
    """What one request to the served model may cost. Past a limit a row is refused with its error, before
    anything is decoded (the pixel count comes from the image header).

    The single source of these defaults: `tracking.log_model` writes them into each logged model's config
    (MLmodel `model_config`); a server may override them (`SERVING_MODEL_CONFIG='{"max_rows": 8}'` with
    `mlflow models serve`, or `mlflow.pyfunc.load_model(uri, model_config={...})`)."""

    # Rows per request: a request with more is refused whole (every row gets the error), undecoded.
    max_rows: int = 32
    # Encoded bytes per image (for base64 text: the bytes it decodes to, counted before decoding).
    max_image_bytes: int = 10_000_000
    # Decoded pixels (width x height) per image, read from the header before decoding: a 25 MP photo
    # decodes to 75 MB of RGB; a 61 KB PNG can claim 63 MP (a decompression bomb).
    max_pixels: int = 25_000_000

    @classmethod
    def from_config(cls, config: Mapping | None) -> "ServingLimits":
        """The limits of a model config (missing keys: the defaults); unknown keys or non-positive values fail."""
        config = dict(config or {})
        names = {field.name for field in dataclasses.fields(cls)}
        if unknown := sorted(set(config) - names):
            raise InferenceError(f"model config: unknown serving limit(s) {unknown}; known: {sorted(names)}")
        for name, value in config.items():
            if type(value) is not int or value < 1:
                raise InferenceError(f"model config: {name} must be a positive integer (got {value!r})")
        return cls(**config)


class RowError(InferenceError):
    """One row of a request that is refused (not an image, over a limit); the other rows go on."""


def image_bytes(value, max_bytes: int) -> bytes:
    """A cell of the image column -> encoded image bytes: bytes as they are, a string as base64 text.

    Never a file path: a string that is not base64 is refused as such, without looking at any disk."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        text = "".join(value.split())  # base64 wrapped over lines (MIME, `base64` without -w0)
        decoded_size = len(text) * 3 // 4 - (len(text) - len(text.rstrip("=")))
        if decoded_size > max_bytes:
            raise RowError(
                f"the image is {decoded_size:,} bytes (base64 text of {len(text):,} characters); the limit is "
                f"{max_bytes:,} bytes per image (max_image_bytes): send a smaller image"
            )
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RowError(
                "not an image: a text value must be the base64 of an encoded image (PNG, JPEG, ...); "
                "the served model never reads files (file paths are for `transfer predict`)"
            ) from None
    else:
        raise RowError(f"expected encoded image bytes or base64 text, got {type(value).__name__}")
    if len(data) > max_bytes:
        raise RowError(
            f"the image is {len(data):,} bytes; the limit is {max_bytes:,} bytes per image (max_image_bytes): "
            "send a smaller image"
        )
    return data


def predict_frame(
    saved: SavedModel,
    frame: pd.DataFrame,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    limits: ServingLimits = ServingLimits(),
) -> pd.DataFrame:
    """Columns class (the most probable), probability (its probability), probabilities ({class: p}), error.

    The `image` column holds encoded bytes or base64 text (never file paths); every row gets its result or
    its error, within `limits`."""
    if IMAGE_COLUMN not in frame.columns:
        raise InferenceError(
            f"the input needs a column {IMAGE_COLUMN!r} (encoded image bytes, or their base64 text); "
            f"got columns {list(frame.columns)}"
        )
    values = list(frame[IMAGE_COLUMN])
    errors: list[str | None] = [None] * len(values)
    if len(values) > limits.max_rows:
        errors = [
            f"the request has {len(values):,} rows; the limit is {limits.max_rows:,} per request (max_rows): "
            "send the images in smaller requests"
        ] * len(values)
    sources: dict[int, bytes] = {}
    for index, value in enumerate(values):
        if errors[index] is None:
            try:
                sources[index] = image_bytes(value, limits.max_image_bytes)
            except RowError as error:
                errors[index] = str(error)
    predictions = predict_images(
        saved,
        list(sources.values()),
        batch_size,
        device,
        labels=[f"row {i}" for i in sources],
        progress=False,
        max_pixels=limits.max_pixels,
    )
    by_row = dict(zip(sources, predictions))
    rows = []
    for index, error in enumerate(errors):
        p = by_row.get(index)
        if p is None or p.probabilities is None:
            error = error or (p.error if p is not None else "") or "not classified"
            rows.append({"class": "", "probability": float("nan"), "probabilities": {}, "error": error})
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

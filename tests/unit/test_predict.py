"""Using a trained model: the safe model folder, `transfer predict`, the MLflow pyfunc model that takes images,
the registry alias, and the ONNX export. A tiny random-init resnet18 (32 px, 3 classes) on generated PNGs."""

# The fixtures imported from predict_helpers are this module's test parameters.
# ruff: noqa: F811

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from predict_helpers import CLASSES, images, mlflow_store, model_dir  # noqa: F401 - shared fixtures

from transfer.data.cache import CachedImages, cache_geometry, write_split_cache
from transfer.data.datasets import ImageDataset
from transfer.data.transforms import eval_batch_transform
from transfer.evaluate.inference import model_input, predict_frame, predict_paths
from transfer.models.saved import ModelFileError, load_model, save_model


def copy_model(model_dir: Path, destination: Path) -> Path:
    destination.mkdir()
    for file in model_dir.iterdir():
        (destination / file.name).write_bytes(file.read_bytes())
    return destination


def test_saved_model_round_trip_is_exact_described_and_byte_stable(model_dir, tmp_path):
    saved = load_model(model_dir)
    description = json.loads((model_dir / "model.json").read_text())
    assert description["classes"] == CLASSES == saved.classes
    assert description["head"] == {"kind": "linear", "in_features": 512, "num_classes": 3}
    assert description["backbone"]["name"] == "resnet18" and description["backbone"]["weights"] == "none"
    assert description["preprocessing"]["image_size"] == 32 and len(description["preprocessing"]["mean"]) == 3
    assert saved.freeze_layers == 2 and saved.model.frozen_groups == 2 and not saved.model.training

    again = tmp_path / "again"
    save_model(
        again, saved.model, saved.classes, saved.data_config, backbone="resnet18", weights="none", freeze_layers=2
    )
    for name in ("model.safetensors", "model.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes()
    images = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(load_model(again).model(images), saved.model(images))


class _Payload:
    """Unpickling this creates a file: proof that the loader executed code from the model file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_model_is_an_error_never_code_execution(model_dir, tmp_path):
    marker = tmp_path / "executed"
    payload = pickle.dumps({"state_dict": _Payload(marker)})
    pickle.loads(payload)  # the payload works: unpickling it does create the file
    assert marker.exists()
    marker.unlink()

    # A pickle in place of the weights, the description's sha256 updated to match: refused as not safetensors.
    swapped = copy_model(model_dir, tmp_path / "swapped")
    (swapped / "model.safetensors").write_bytes(payload)
    description = json.loads((swapped / "model.json").read_text())
    import hashlib

    description["weights_sha256"] = hashlib.sha256(payload).hexdigest()
    (swapped / "model.json").write_text(json.dumps(description))
    with pytest.raises(ModelFileError, match="not a valid safetensors file"):
        load_model(swapped)

    # The old format (a pickled model.pt) is never unpickled.
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"state_dict": _Payload(marker)}, old / "model.pt")
    with pytest.raises(ModelFileError, match="model.pt is not a usable model file.*never loaded"):
        load_model(old)
    with pytest.raises(ModelFileError, match="never loaded"):
        load_model(old / "model.pt")

    # Weights modified after saving, a description edited, a folder without description.
    modified = copy_model(model_dir, tmp_path / "modified")
    data = bytearray((modified / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (modified / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="sha256 differs"):
        load_model(modified)
    edited = copy_model(model_dir, tmp_path / "edited")
    description = json.loads((edited / "model.json").read_text())
    description["classes"].append("wolf")
    (edited / "model.json").write_text(json.dumps(description))
    with pytest.raises(ModelFileError, match="4 class names for a head of 3"):
        load_model(edited)
    description["classes"].pop()
    description["head"]["kind"] = "xgboost"
    (edited / "model.json").write_text(json.dumps(description))
    with pytest.raises(ModelFileError, match="unknown head kind"):
        load_model(edited)
    with pytest.raises(ModelFileError, match="model.json not found"):
        load_model(tmp_path / "nowhere")
    assert not marker.exists()


def test_predict_prepares_images_exactly_as_the_evaluation_datasets(model_dir, images, tmp_path):
    saved = load_model(model_dir)
    paths = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
    # The evaluation's input: the image cache stage's file, read back and transformed as evaluate does.
    write_split_cache(tmp_path / "test.npy", [images / p for p in paths], cache_geometry(saved.data_config))
    dataset = ImageDataset(
        CachedImages(tmp_path / "test.npy"),
        [0] * len(paths),
        paths,
        batch_transform=eval_batch_transform(saved.data_config),
    )
    evaluated = dataset.transformed(list(range(len(paths))))
    for index, path in enumerate(paths):
        assert torch.equal(model_input(images / path, saved.data_config), evaluated[index])
        assert torch.equal(model_input((images / path).read_bytes(), saved.data_config), evaluated[index])
    predictions = predict_paths(saved, [images / p for p in paths], batch_size=4, progress=False)
    with torch.inference_mode():
        expected = saved.model(evaluated).softmax(1).numpy()
    np.testing.assert_allclose(np.stack([p.probabilities for p in predictions]), expected, atol=1e-5)


def test_pyfunc_dataframe_of_images_bytes_base64_and_a_bad_one(model_dir, images):
    saved = load_model(model_dir)
    path = images / "dog" / "0001.png"
    frame = pd.DataFrame({"image": [path.read_bytes(), base64.b64encode(path.read_bytes()).decode(), b"garbage"]})
    result = predict_frame(saved, frame)
    assert list(result.columns) == ["class", "probability", "probabilities", "error"]
    assert result["class"][0] == result["class"][1] in CLASSES
    assert set(result["probabilities"][0]) == set(CLASSES)
    assert abs(sum(result["probabilities"][0].values()) - 1) < 1e-5
    assert result["probability"][0] == max(result["probabilities"][0].values())
    assert result["class"][2] == "" and "not a recognised image format" in result["error"][2]

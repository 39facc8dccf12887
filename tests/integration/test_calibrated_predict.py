"""A calibrated model gives the same probabilities on every path: the evaluate stage's, `predict_paths`
(`transfer predict`), the ONNX export under onnxruntime and the MLflow pyfunc model, to 1e-5. A tiny
random-init resnet18 (32 px, 3 classes) made over-confident, its temperature fitted, on generated PNGs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_image_folder

from transfer.data.cache import CachedImages, cache_geometry, write_split_cache
from transfer.data.datasets import ImageDataset
from transfer.data.transforms import eval_batch_transform
from transfer.evaluate.calibration import fit_temperature
from transfer.evaluate.inference import model_input, predict_paths
from transfer.evaluate.metrics import predict_logits_and_features
from transfer.models.backbones import Classifier, load_backbone
from transfer.models.heads import FEATURE_HEADS
from transfer.models.saved import ModelFileError, load_model, save_model

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("calibrated") / "images", {name: 4 for name in CLASSES})


def image_paths(images: Path) -> list[Path]:
    return sorted(images.rglob("*.png"))


def labels_of(paths: list[Path]) -> np.ndarray:
    return np.array([CLASSES.index(path.parent.name) for path in paths])


def evaluation_dataset(saved, paths: list[Path], folder: Path) -> ImageDataset:
    """The evaluate stage's input: the image cache's file, read back with the model's eval transform."""
    write_split_cache(folder / "test.npy", paths, cache_geometry(saved.data_config))
    return ImageDataset(
        CachedImages(folder / "test.npy"),
        labels_of(paths).tolist(),
        [str(path) for path in paths],
        batch_transform=eval_batch_transform(saved.data_config),
    )


def evaluate_probabilities(saved, dataset) -> tuple[np.ndarray, np.ndarray]:
    """What stages/evaluate.py computes: the head's logits, then the model's temperature; (calibrated, raw)."""
    head_logits, _ = predict_logits_and_features(saved.model, dataset, 4, torch.device("cpu"))
    return saved.model.calibrate(head_logits).softmax(1).numpy(), head_logits.softmax(1).numpy()


@pytest.fixture(scope="module")
def calibrated_dir(tmp_path_factory, images) -> Path:
    """An over-confident model (head weights x 200) with the temperature fitted on the images' logits."""
    torch.manual_seed(0)
    loaded = load_backbone("resnet18", "none", 32)
    model = Classifier(loaded.backbone, len(CLASSES)).eval()
    with torch.no_grad():
        model.head.weight.mul_(200)
    paths = image_paths(images)
    batch = torch.stack([model_input(path, loaded.data_config) for path in paths])
    with torch.inference_mode():
        model.temperature = fit_temperature(model(batch), labels_of(paths))
    directory = tmp_path_factory.mktemp("model")
    save_model(directory, model, CLASSES, loaded.data_config, backbone="resnet18", weights="none", freeze_layers=2)
    return directory


def test_the_temperature_is_saved_in_model_json_and_restored(calibrated_dir, tmp_path):
    description = json.loads((calibrated_dir / "model.json").read_text())
    saved = load_model(calibrated_dir)
    assert saved.model.temperature == description["temperature"]
    assert abs(description["temperature"] - 1) > 0.5  # the logits were inflated: T is far from 1
    # An edited temperature is an error naming the file; a model.json without one (older models) means 1.0.
    for value, expected in ((-1.0, "positive number"), ("hot", "positive number"), (None, None)):
        copy = tmp_path / f"copy-{value}"
        copy.mkdir()
        for file in calibrated_dir.iterdir():
            (copy / file.name).write_bytes(file.read_bytes())
        edited = dict(description)
        if value is None:
            del edited["temperature"]
        else:
            edited["temperature"] = value
        (copy / "model.json").write_text(json.dumps(edited))
        if expected:
            with pytest.raises(ModelFileError, match=f"model.json.*{expected}"):
                load_model(copy)
        else:
            assert load_model(copy).model.temperature == 1.0


def test_predict_onnx_and_pyfunc_agree_with_the_evaluate_path_after_calibration(calibrated_dir, images, tmp_path):
    import mlflow
    import onnxruntime

    from transfer import tracking
    from transfer.models.export import export_onnx, read_onnx_metadata

    saved = load_model(calibrated_dir)
    paths = image_paths(images)
    expected, uncalibrated = evaluate_probabilities(saved, evaluation_dataset(saved, paths, tmp_path))
    assert np.abs(expected - uncalibrated).max() > 0.05  # the temperature matters for these images
    assert (expected.argmax(1) == uncalibrated.argmax(1)).all()  # but never changes the class

    # `transfer predict`
    predicted = np.stack([p.probabilities for p in predict_paths(saved, paths, batch_size=5, progress=False)])
    np.testing.assert_allclose(predicted, expected, atol=1e-5)

    # ONNX under onnxruntime: the temperature is in the graph.
    onnx_path = export_onnx(saved, tmp_path / "model.onnx")
    assert float(read_onnx_metadata(onnx_path)["temperature"]) == saved.model.temperature
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = torch.stack([model_input(path, saved.data_config) for path in paths]).numpy()
    _, onnx_probabilities = session.run(["logits", "probabilities"], {"image": batch})
    np.testing.assert_allclose(onnx_probabilities, expected, atol=1e-5)

    # The pyfunc model, logged as the train stage logs it, in a fresh store.
    previous = {key: os.environ.get(key) for key in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    os.environ["DVC_ROOT"] = str(tmp_path / "store")
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(tmp_path / "store")
    try:
        with tracking.training_run("calibration-test", {"x": 1}, {}) as run_id:
            tracking.log_model(calibrated_dir, saved.model, paths[0].read_bytes(), batch[:1])
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        result = pyfunc.predict(pd.DataFrame({"image": [path.read_bytes() for path in paths]}))
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    served = np.array([[row[name] for name in CLASSES] for row in result["probabilities"]])
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_a_scikit_learn_head_is_calibrated_on_its_log_probabilities(images, tmp_path):
    """A non-linear head (knn) outputs log-probabilities: the temperature divides them (softmax(log p / T))."""
    torch.manual_seed(0)
    loaded = load_backbone("resnet18", "none", 32)
    model = Classifier(loaded.backbone, len(CLASSES)).eval()
    paths = image_paths(images)
    batch = torch.stack([model_input(path, loaded.data_config) for path in paths])
    with torch.inference_mode():
        features = model.backbone(batch).numpy()
    knn = FEATURE_HEADS["knn"].build(3, 0).fit(features, labels_of(paths))
    model.temperature = 2.0
    save_model(
        tmp_path / "model",
        model,
        CLASSES,
        loaded.data_config,
        backbone="resnet18",
        weights="none",
        freeze_layers="all",
        feature_head=knn,
        head_kind="knn",
    )
    saved = load_model(tmp_path / "model")
    assert saved.head_kind == "knn" and saved.model.temperature == 2.0
    expected, uncalibrated = evaluate_probabilities(saved, evaluation_dataset(saved, paths, tmp_path))
    predicted = np.stack([p.probabilities for p in predict_paths(saved, paths, progress=False)])
    np.testing.assert_allclose(predicted, expected, atol=1e-5)
    # softmax(log p / 2) is proportional to sqrt(p): the head's probabilities, softened.
    softened = np.sqrt(np.clip(uncalibrated, 1e-12, None))
    np.testing.assert_allclose(expected, softened / softened.sum(1, keepdims=True), atol=1e-5)
    assert (expected.argmax(1) == uncalibrated.argmax(1)).all()

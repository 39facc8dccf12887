"""A trained model through MLflow and ONNX: the logged pyfunc model takes images, the registry alias and the
raw PyTorch flavour load it; the ONNX export keeps a dynamic batch, its metadata, and agrees with PyTorch."""

# The fixtures imported from predict_helpers are this module's test parameters.
# ruff: noqa: F811

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pytest
import torch
from predict_helpers import CLASSES, images, mlflow_store, model_dir  # noqa: F401 - shared fixtures

from transfer.evaluate.inference import predict_paths
from transfer.models.saved import load_model
from transfer.tracking import resolve_model


def test_logged_model_takes_images_registry_alias_and_raw_pytorch(mlflow_store, model_dir, images, capsys):
    import mlflow

    from transfer import tracking

    _, (best_run, other_run) = mlflow_store
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{other_run}/model")
    inputs = pyfunc.metadata.get_input_schema().to_dict()
    assert inputs == [{"type": "string", "name": "image", "required": True}]  # base64 text (or bytes in-process)
    assert [col["name"] for col in pyfunc.metadata.get_output_schema().to_dict()] == [
        "class",
        "probability",
        "probabilities",
        "error",
    ]
    assert pyfunc.metadata.metadata["classes"] == CLASSES
    path = images / "fox" / "0002.png"
    result = pyfunc.predict(pd.DataFrame({"image": [path.read_bytes(), base64.b64encode(path.read_bytes()).decode()]}))
    expected = predict_paths(load_model(model_dir), [path], progress=False)[0].probabilities
    assert list(result["class"]) == [CLASSES[int(expected.argmax())]] * 2
    np.testing.assert_allclose([result["probabilities"][0][name] for name in CLASSES], expected, atol=1e-5)

    raw = mlflow.pytorch.load_model(f"runs:/{other_run}/pytorch_model")
    assert raw(torch.rand(2, 3, 32, 32)).shape == (2, 3)

    promoted = tracking.promote_best("predict-test", "tiny", "test.accuracy")
    assert promoted["run_id"] == best_run and promoted["value"] == 0.9
    assert (
        tracking.promote_best("predict-test", "tiny", "test.accuracy", alias="worst", higher_is_better=False)["run_id"]
        == other_run
    )
    champion = resolve_model("models:/tiny@champion")
    assert champion.classes == CLASSES and champion.description == load_model(model_dir).description
    assert resolve_model(f"runs:/{other_run}").description == champion.description
    with pytest.raises(tracking.TrackingError, match="metrics there"):
        tracking.promote_best("predict-test", "tiny", "test.nonexistent")
    with pytest.raises(tracking.TrackingError, match="cannot load it"):
        resolve_model("models:/tiny@nobody")

    # The commands: promote by the metric, then predict with the alias.
    from transfer.cli import main

    capsys.readouterr()
    assert main(["promote", "--experiment", "predict-test", "--name", "tiny", "--alias", "cli"]) == 0
    assert f"run {best_run}" in capsys.readouterr().err
    assert main(["predict", str(path), "--model", "models:/tiny@cli", "--top-k", "1"]) == 0
    assert f"{path},{CLASSES[int(expected.argmax())]}," in capsys.readouterr().out
    assert main(["promote", "--experiment", "predict-test", "--name", "tiny", "--metric", "nope"]) == 2
    assert "no run of experiment 'predict-test'" in capsys.readouterr().err


def test_onnx_export_dynamic_batch_metadata_and_agreement(model_dir, images, tmp_path):
    import onnxruntime

    from transfer.evaluate.export_check import check_onnx
    from transfer.models.export import export_onnx, read_onnx_metadata

    saved = load_model(model_dir)
    path = export_onnx(saved, tmp_path / "model.onnx")
    metadata = read_onnx_metadata(path)
    assert json.loads(metadata["classes"]) == CLASSES
    assert json.loads(metadata["preprocessing"]) == saved.description["preprocessing"]
    files = sorted(images.rglob("*.png"))
    check = check_onnx(path, saved, files, batch_size=4)
    assert check["images"] == len(files) and check["same_top1"] == len(files)
    assert check["max_abs_diff_probabilities"] < 1e-4 and check["batch_sizes"] == [1, 4]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    logits, probabilities = session.run(None, {"image": np.zeros((7, 3, 32, 32), np.float32)})
    assert logits.shape == probabilities.shape == (7, 3)

"""The served model's pyfunc, limits and model references, loaded from a real MLflow store (two logged runs):
encoded images only, never a path; limits refused per row; hostile promote names and model references."""

# The fixtures imported from predict_helpers (one tiny model, one store) are this module's test parameters.
# ruff: noqa: F811

from __future__ import annotations

import base64
import dataclasses
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from predict_helpers import (  # noqa: F401 - fixtures shared with test_predict
    CLASSES,
    assert_nobody_opened,
    bomb_png,
    images,
    mlflow_store,
    model_dir,
    noise_png,
    server_files,
)

from transfer import tracking
from transfer.evaluate.inference import ServingLimits, predict_paths
from transfer.models.saved import load_model

NOT_AN_IMAGE = "not an image: a text value must be the base64 of an encoded image"


def test_pyfunc_takes_bytes_and_base64_never_a_path(mlflow_store, model_dir, images, server_files):
    _, (run_id, _) = mlflow_store
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    png = Path(server_files["image"]).read_bytes()
    text = base64.b64encode(png).decode()
    opened: list[str] = []
    watched = str(Path(server_files["fifo"]).parent), str(images)

    def audit(event: str, args: tuple) -> None:  # every open() of the process, os.open included
        if event == "open" and isinstance(args[0], str) and args[0].startswith(watched):
            opened.append(args[0])

    sys.addaudithook(audit)  # cannot be removed: it only records opens under this test's folders
    paths = list(server_files.values())
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # `base64` output, with line breaks
    # The base64 of a photo-sized image: longer than any file name (it made main raise "File name too long").
    photo = base64.b64encode(noise_png(64)).decode()
    frame = pd.DataFrame({"image": [*paths, png, text, wrapped, 7, None, photo]})
    result = pyfunc.predict(frame)
    opened_while_predicting = list(opened)
    assert opened_while_predicting == []
    assert_nobody_opened(server_files["fifo"])

    # Every path gets the same error, whatever is there: the reply says nothing about the server's disk.
    assert list(result["class"][: len(paths)]) == [""] * len(paths)
    (error,) = set(result["error"][: len(paths)])
    assert error.startswith(NOT_AN_IMAGE) and "never reads files" in error
    # Bytes, base64 text and base64 wrapped over lines are the same image; other types are row errors.
    expected = predict_paths(load_model(model_dir), [server_files["image"]], progress=False)[0]
    for row in (4, 5, 6):
        assert result["error"][row] == "" and result["class"][row] == CLASSES[int(expected.probabilities.argmax())]
        np.testing.assert_allclose(
            [result["probabilities"][row][name] for name in CLASSES], expected.probabilities, atol=1e-5
        )
    assert "got int" in result["error"][7] and "got NoneType" in result["error"][8]
    assert result["error"][9] == "" and result["class"][9] in CLASSES


def test_serving_limits_live_in_the_model_config_and_refuse_per_row(mlflow_store, images):
    _, (run_id, _) = mlflow_store
    uri = f"runs:/{run_id}/model"
    assert mlflow.pyfunc.load_model(uri).model_config == dataclasses.asdict(ServingLimits())
    png = (images / "dog" / "0000.png").read_bytes()
    big = noise_png(200)  # about 120 KB
    limits = {"max_rows": 4, "max_image_bytes": 100_000, "max_pixels": 1_000_000}
    pyfunc = mlflow.pyfunc.load_model(uri, model_config=limits)
    result = pyfunc.predict(pd.DataFrame({"image": [png, bomb_png(), big, base64.b64encode(big).decode()]}))
    assert result["error"][0] == "" and result["class"][0] in CLASSES
    assert "8000x8000 (64,000,000 pixels); the limit is 1,000,000 pixels" in result["error"][1]
    assert (
        f"the image is {len(big):,} bytes; the limit is 100,000 bytes per image (max_image_bytes)" in result["error"][2]
    )
    assert "the limit is 100,000 bytes per image (max_image_bytes)" in result["error"][3]
    assert list(result["class"][1:]) == ["", "", ""]

    too_many = pyfunc.predict(pd.DataFrame({"image": [png] * 5}))
    assert list(too_many["class"]) == [""] * 5
    assert set(too_many["error"]) == {
        "the request has 5 rows; the limit is 4 per request (max_rows): send the images in smaller requests"
    }
    # The defaults refuse the bomb too (64 MP over 25 MP), from its header.
    default = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": [bomb_png()]}))
    assert "the limit is 25,000,000 pixels" in default["error"][0]


def test_promote_with_a_hostile_or_unknown_name_is_a_clear_error(mlflow_store, capsys):
    from transfer.cli import main

    capsys.readouterr()
    for name in ("x' OR name LIKE '%", 'x" OR 1=1 --', "nobody"):
        assert main(["promote", "--experiment", "predict-test", "--name", name]) == 2, name
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"--name {name!r}: no such registered model" in err, err


def test_model_reference_that_is_not_a_model_fails_before_copying(mlflow_store, tmp_path):
    tree = tmp_path / "etc"
    for index in range(30):
        (tree / f"d{index}").mkdir(parents=True)
        (tree / f"d{index}" / "file.conf").write_text("x" * 10_000)
    destination = tmp_path / "download"
    destination.mkdir()
    with pytest.raises(tracking.TrackingError, match="not an MLflow model"):
        tracking.download_classifier(tree.as_uri(), destination)
    assert list(destination.rglob("*")) == []
    # A real model: only the MLmodel file and the classifier folder come down (not the raw PyTorch copy).
    _, (run_id, _) = mlflow_store
    classifier = tracking.download_classifier(f"runs:/{run_id}", destination)
    assert sorted(p.name for p in classifier.iterdir()) == ["model.json", "model.safetensors"]
    assert not list(destination.rglob("python_model*")) and not list(destination.rglob("*.pkl"))

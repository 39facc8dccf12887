"""Using a trained model: the safe model folder, `transfer predict`, the MLflow pyfunc model that takes images,
the registry alias, and the ONNX export. A tiny random-init resnet18 (32 px, 3 classes) on generated PNGs."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, write_image_folder

from transfer.data.cache import CachedImages, cache_geometry, write_split_cache
from transfer.data.datasets import ImageDataset
from transfer.data.transforms import eval_batch_transform
from transfer.evaluate.inference import model_input, predict_frame, predict_paths, resolve_model
from transfer.models.backbones import Classifier, load_backbone
from transfer.models.saved import ModelFileError, load_model, save_model

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("predict") / "images", {name: 3 for name in CLASSES})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    loaded = load_backbone("resnet18", "none", 32)
    model = Classifier(loaded.backbone, len(CLASSES)).eval()
    directory = tmp_path_factory.mktemp("model")
    save_model(directory, model, CLASSES, loaded.data_config, backbone="resnet18", weights="none", freeze_layers=2)
    return directory


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


def transfer_cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "transfer.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_predict_command_files_folders_globs_and_unreadable_files(model_dir, images, tmp_path):
    (images / "cat" / "broken.png").write_bytes(b"not an image at all")
    (images / "notes.txt").write_text("ignored: not an image by extension")
    out = tmp_path / "predictions.csv"
    done = transfer_cli(
        "predict",
        str(images / "cat"),
        str(images / "dog" / "0000.png"),
        str(images / "f*" / "*.png"),
        str(tmp_path / "missing.jpg"),
        "--model",
        str(model_dir),
        "--top-k",
        "2",
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--device",
        "cpu",
    )
    (images / "cat" / "broken.png").unlink()
    assert done.returncode == 1, done.stderr  # some inputs could not be classified: listed, and the status says so
    assert "predict:" in done.stderr and "2 input(s) could not be classified" in done.stderr
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["path", "class_1", "probability_1", "class_2", "probability_2", "error"]
    by_path = table.set_index("path")
    classified = by_path[by_path["error"] == ""]
    assert len(classified) == 3 + 1 + 3
    assert set(classified["class_1"]) <= set(CLASSES)
    assert (classified["probability_1"].astype(float) >= classified["probability_2"].astype(float)).all()
    assert "not a recognised image format" in by_path.loc[str(images / "cat" / "broken.png"), "error"]
    assert by_path.loc[str(tmp_path / "missing.jpg"), "error"] == "no such file or folder"

    # The same probabilities as the library, and JSON output.
    saved = load_model(model_dir)
    fox = sorted(str(p) for p in (images / "fox").glob("*.png"))
    expected = predict_paths(saved, fox, progress=False)
    for path, prediction in zip(fox, expected):
        assert by_path.loc[path, "class_1"] == CLASSES[int(prediction.probabilities.argmax())]
        assert abs(float(by_path.loc[path, "probability_1"]) - prediction.probabilities.max()) < 1e-5
    from transfer.cli import main

    json_out = tmp_path / "predictions.json"
    assert main(["predict", str(images / "fox"), "--model", str(model_dir), "--out", str(json_out)]) == 0
    rows = json.loads(json_out.read_text())
    assert [row["path"] for row in rows] == fox and all(row["error"] is None for row in rows)
    assert [len(row["predictions"]) for row in rows] == [3, 3, 3]
    assert all(abs(sum(p["probability"] for p in row["predictions"]) - 1) < 1e-5 for row in rows)


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


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory, model_dir, images):
    """Two real runs in a fresh SQLite store, each logging the model as the train stage does and registering it."""
    import mlflow

    from transfer import tracking

    store = tmp_path_factory.mktemp("store")
    # The store (database and artifacts) of a repository rooted there, not this checkout's mlruns/.
    previous = {key: os.environ.get(key) for key in ("DVC_ROOT", "MLFLOW_TRACKING_URI")}
    os.environ["DVC_ROOT"] = str(store)
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(store)
    saved = load_model(model_dir)
    example = model_input(images / "cat" / "0000.png", saved.data_config).unsqueeze(0).numpy()
    run_ids = []
    for accuracy in (0.9, 0.5):
        with tracking.training_run("predict-test", {"x": accuracy}, {}) as run_id:
            tracking.log_model(
                model_dir, saved.model, (images / "cat" / "0000.png").read_bytes(), example, registered_model="tiny"
            )
            mlflow.log_metric("test.accuracy", accuracy)
        run_ids.append(run_id)
    yield store, run_ids
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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

    from transfer.models.export import check_onnx, export_onnx, read_onnx_metadata

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


@pytest.mark.slow
def test_mlflow_models_serve_answers_an_image_over_http(mlflow_store, images):
    """`mlflow models serve --env-manager local` on the logged model; one JSON request with a base64 PNG."""
    import socket
    import time
    import urllib.request

    _, (_, run_id) = mlflow_store
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # uvicorn, which MLflow starts, is on the PATH of the environment's bin folder.
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT / "src"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"runs:/{run_id}/model",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 240  # a generous wait for start-up on a loaded machine, not a timing check
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.time() < deadline, "the server did not answer /ping"
                time.sleep(1)
        png = (images / "dog" / "0002.png").read_bytes()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    (row,) = answer["predictions"]
    assert row["class"] in CLASSES and set(row["probabilities"]) == set(CLASSES) and row["error"] == ""
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-5

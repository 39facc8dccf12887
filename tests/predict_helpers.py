"""The fixtures of the model-use tests (predict, serving): a tiny random-init resnet18 (32 px, 3 classes)
saved as the train stage saves it, generated PNGs, a fresh MLflow store with two runs logging that model, and
the hostile inputs of the serving tests (a decompression bomb, files a caller might name on the server)."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

from transfer.evaluate.inference import model_input
from transfer.models.backbones import Classifier, load_backbone
from transfer.models.saved import load_model, save_model

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


def bomb_png() -> bytes:
    """8000 x 8000 black pixels: 64 MP from a PNG of about 60 KB (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buffer, "PNG")
    return buffer.getvalue()


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 * side^2 bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server_files(tmp_path_factory, images):
    """Paths a hostile caller might name on the server's disk: an image, a FIFO (opening it blocks until a writer
    comes: a server that opened it would hang), a folder and a path that does not exist."""
    folder = tmp_path_factory.mktemp("private")
    fifo = folder / "fifo"
    os.mkfifo(fifo)
    return {
        "image": str(images / "cat" / "0001.png"),
        "fifo": str(fifo),
        "folder": str(folder),
        "missing": str(folder / "missing.png"),
    }


def assert_nobody_opened(fifo: str) -> None:
    """A FIFO held open for reading accepts a non-blocking writer; nobody reading it: ENXIO."""
    with pytest.raises(OSError) as raised:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert raised.value.errno == errno.ENXIO

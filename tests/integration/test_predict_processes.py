"""Using a trained model from outside the test process: the `transfer predict` command, and `mlflow models
serve` answering an image over HTTP. A tiny random-init resnet18 (32 px, 3 classes) on generated PNGs."""

# The fixtures imported from predict_helpers are this module's test parameters.
# ruff: noqa: F811

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from conftest import REPO_ROOT
from predict_helpers import CLASSES, images, mlflow_store, model_dir  # noqa: F401 - shared fixtures
from project_helpers import PATIENCE_S

from transfer.evaluate.inference import predict_paths
from transfer.models.saved import load_model


def transfer_cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "transfer.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
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
        deadline = time.monotonic() + PATIENCE_S  # a generous wait for start-up on a loaded machine, not a timing check
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "the server did not answer /ping"
                time.sleep(1)
        png = (images / "dog" / "0002.png").read_bytes()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=PATIENCE_S) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    (row,) = answer["predictions"]
    assert row["class"] in CLASSES and set(row["probabilities"]) == set(CLASSES) and row["error"] == ""
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-5

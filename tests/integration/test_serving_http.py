"""The served model over HTTP (`mlflow models serve`): a path on the server's disk is refused per row in every
content type, and nothing on the server is opened."""

# The fixtures imported from predict_helpers (one tiny model, one store) are this module's test parameters.
# ruff: noqa: F811

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pandas as pd
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
from serve_helpers import invoke, json_split, served_model


def test_served_model_refuses_paths_per_row_in_every_content_type(mlflow_store, images, server_files, tmp_path):
    """`mlflow models serve` on loopback: JSON (dataframe_split, dataframe_records, inputs, instances), CSV and
    parquet, each with the server's own paths and a base64 image; limits per row; no traceback in any reply."""
    store, (run_id, _) = mlflow_store
    png = Path(server_files["image"]).read_bytes()
    text = base64.b64encode(png).decode()
    paths = list(server_files.values())
    values = [*paths, base64.b64encode(noise_png(64)).decode(), text]  # a photo-sized base64 too

    def parquet(column: list) -> bytes:
        buffer = io.BytesIO()
        pd.DataFrame({"image": column}).to_parquet(buffer)
        return buffer.getvalue()

    requests = {
        "dataframe_split": (json_split(values), "application/json"),
        "dataframe_records": (json.dumps({"dataframe_records": [{"image": v} for v in values]}), "application/json"),
        "inputs": (json.dumps({"inputs": {"image": values}}), "application/json"),
        "instances": (json.dumps({"instances": [{"image": v} for v in values]}), "application/json"),
        "csv": (pd.DataFrame({"image": values}).to_csv(index=False), "text/csv"),
        "parquet text": (parquet(values), "application/vnd.apache.parquet"),
        "parquet bytes": (parquet([p.encode() for p in paths] + [png]), "application/vnd.apache.parquet"),
    }
    limits = {"max_rows": 8, "max_image_bytes": 100_000}
    replies = {}
    with served_model(
        f"runs:/{run_id}/model", {"SERVING_MODEL_CONFIG": json.dumps(limits)}, log=tmp_path / "server.log"
    ) as (url, _):
        for name, (body, content_type) in requests.items():
            replies[name] = invoke(url, body, content_type)
        big = base64.b64encode(noise_png(200)).decode()  # about 120 KB
        replies["limits"] = invoke(
            url, json_split([base64.b64encode(bomb_png()).decode(), big, text]), "application/json"
        )
        replies["rows"] = invoke(url, pd.DataFrame({"image": [text] * 9}).to_csv(index=False), "text/csv")
        replies["no image column"] = invoke(
            url, json.dumps({"dataframe_split": {"columns": ["x"], "data": [[1]]}}), "application/json"
        )
        assert_nobody_opened(server_files["fifo"])

    for name, (_, reply) in replies.items():
        assert "Traceback" not in reply and "site-packages" not in reply, (name, reply)
        assert str(store) not in reply and str(Path(server_files["fifo"]).parent) not in reply, (name, reply)
    for name in requests:
        status, reply = replies[name]
        assert status == 200, (name, reply)
        rows = json.loads(reply)["predictions"]
        assert [row["class"] for row in rows[: len(paths)]] == [""] * len(paths), (name, rows)
        errors = {row["error"] for row in rows[: len(paths)]}
        assert len(errors) == 1, (name, errors)  # one answer whatever the path names: nothing about the disk
        assert all(row["error"] == "" and row["class"] in CLASSES for row in rows[len(paths) :]), (name, rows)
    bomb, oversize, fine = json.loads(replies["limits"][1])["predictions"]
    assert "the limit is 25,000,000 pixels" in bomb["error"] and bomb["class"] == ""
    assert "the limit is 100,000 bytes per image (max_image_bytes)" in oversize["error"]
    assert fine["error"] == "" and fine["class"] in CLASSES
    rows = json.loads(replies["rows"][1])["predictions"]
    assert len(rows) == 9 and all("the limit is 8 per request (max_rows)" in row["error"] for row in rows)
    status, reply = replies["no image column"]
    assert status == 400 and "missing inputs ['image']" in reply

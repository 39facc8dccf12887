"""The served model as an outer surface: it takes encoded images only (never a path on the server's disk), gives
every row its own result or error, bounds what a request may cost, and never replies with a traceback. Also the
other doors a careless or hostile input reaches: prediction CSVs (formula injection), `transfer promote --name`,
`--model` references that are not models."""

# The fixtures imported from predict_helpers (one tiny model, one store) are this module's test parameters.
# ruff: noqa: F811

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

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
from serve_helpers import REPO_ROOT

from transfer.evaluate.inference import InferenceError, ServingLimits


def test_serving_limits_config_is_checked():
    assert ServingLimits.from_config(None) == ServingLimits()
    assert ServingLimits.from_config({"max_rows": 3}).max_rows == 3
    for bad in ({"max_row": 3}, {"max_rows": 0}, {"max_rows": True}, {"max_pixels": "10"}, {"max_rows": 2.0}):
        with pytest.raises(InferenceError, match="model config"):
            ServingLimits.from_config(bad)


def test_readme_states_the_serving_limits_defaults():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for field in dataclasses.fields(ServingLimits):
        assert f"`{field.name}` | {field.default:,}" in readme, field.name


def test_prediction_csv_escapes_cells_a_spreadsheet_would_run(model_dir, images, tmp_path, monkeypatch, capsys):
    from transfer.cli import main

    monkeypatch.chdir(tmp_path)
    names = ["=1+2.png", "+SUM(1).png", "-3.png", "@A1.png", "plain.png"]
    for name in names:
        Path(name).write_bytes((images / "cat" / "0000.png").read_bytes())
    assert main(["predict", "--model", str(model_dir), "--out", "predictions.csv", "--", *names, "=missing.png"]) == 1
    with open("predictions.csv", newline="") as handle:
        cells = {row[0]: row for row in csv.reader(handle)}
    assert set(cells) == {"path", *(f"'{name}" for name in names[:4]), "plain.png", "'=missing.png"}
    assert cells["'=1+2.png"][1] in CLASSES and cells["'=missing.png"][-1] == "no such file or folder"
    # CSV on stdout too; JSON keeps the names as they are (no spreadsheet reads it).
    capsys.readouterr()
    assert main(["predict", "--model", str(model_dir), "=1+2.png"]) == 0
    assert "\n'=1+2.png," in capsys.readouterr().out
    assert main(["predict", "=1+2.png", "--model", str(model_dir), "--out", "p.json"]) == 0
    assert json.loads(Path("p.json").read_text())[0]["path"] == "=1+2.png"

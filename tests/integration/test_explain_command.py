"""Grad-CAM (transfer.evaluate.explain): on a data set where a bright patch in one corner decides the class,
a small CNN trained on it looks at that corner; a ViT's map is on its patch grid; overlays stay in their folder."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import REPO_ROOT, write_image_folder
from PIL import Image

from transfer.models.backbones import Classifier, load_backbone
from transfer.models.saved import save_model

SIZE, PATCH = 32, 8


def test_predict_explain_writes_one_overlay_per_classified_image_inside_the_folder_only(tmp_path):
    """`transfer predict --explain DIR` in a real process, with a saved random-init resnet18 (32 px)."""
    torch.manual_seed(0)
    loaded = load_backbone("resnet18", "none", 32)
    model_dir = tmp_path / "model"
    model = Classifier(loaded.backbone, 2).eval()
    save_model(model_dir, model, ["a", "b"], loaded.data_config, backbone="resnet18", weights="none", freeze_layers=0)
    inputs = tmp_path / "inputs"
    write_image_folder(inputs, {"x": 2, "..y": 1}, size=40)
    (inputs / "x" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "work" / "overlays"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}

    def predict(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "transfer.cli", "predict", *args, "--model", str(model_dir)]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    done = predict(str(inputs), "--explain", str(out), "--device", "cpu")
    assert done.returncode == 1, done.stderr  # the broken file is listed, as without --explain
    assert "3 Grad-CAM overlay(s)" in done.stderr
    rows = [line.split(",")[0] for line in done.stdout.splitlines()[1:]]
    written = sorted(path.name for path in out.iterdir())
    # each classified input's position in the output, then its stem
    expected = [f"{rows.index(str(path)):04d}_{path.stem}.png" for path in sorted(inputs.rglob("0*.png"))]
    assert written == sorted(expected) and len(written) == 3
    assert Image.open(out / written[0]).size == (448, 224)  # 32 px view + overlay, enlarged 7x
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["overlays"]  # nothing beside the folder

    (tmp_path / "a_file").write_text("not a folder")
    refused = predict(str(inputs / "x" / "0000.png"), "--explain", str(tmp_path / "a_file"))
    assert refused.returncode != 0 and "exists and is not a folder" in refused.stderr

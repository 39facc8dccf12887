"""backbone.weights as a DVC dependency: a local weights file lives in weights/, which the features and train
stages depend on, so editing the file re-runs features (and what follows); a path elsewhere is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from transfer.pipeline.params import ParamsError, parse_params

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def with_backbone(backbone) -> dict:
    return {**yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), "backbone": backbone}


@pytest.mark.parametrize("weights", ["weights/model.safetensors", "./weights/sub/model.pth", "imagenet", "none"])
def test_weights_in_the_tracked_folder_or_named_are_accepted(weights):
    assert parse_params(with_backbone({"name": "resnet10t", "weights": weights})).backbone.weights == weights


@pytest.mark.parametrize(
    "weights", ["/tmp/model.pth", "models/model.pth", "weights/../model.pth", "weights", "model.safetensors"]
)
def test_weights_outside_the_tracked_folder_are_refused(weights):
    with pytest.raises(ParamsError, match=r"backbone.weights: .*inside the repository's weights/ folder"):
        parse_params(with_backbone({"name": "resnet10t", "weights": weights}))
    with pytest.raises(ParamsError, match=r"backbone.1.weights: .*weights/ folder"):  # each entry of a list
        parse_params(with_backbone([{"name": "resnet10t"}, {"name": "resnet10t", "weights": weights}]))


def test_the_stages_that_load_backbone_weights_depend_on_the_folder():
    assert "weights" in STAGES["features"]["deps"] and "weights" in STAGES["train"]["deps"]
    assert (REPO_ROOT / "weights").is_dir()  # a dep must exist, even when no file is in use

"""The params stage resolves backbone names and layer-group ranges from the model libraries, before any stage."""

from __future__ import annotations

import json

import pytest

from transfer.models.backbone_check import check_layer_groups
from transfer.models.backbones import BackboneError, layer_group_names, load_backbone
from transfer.models.groups import LayerGroupError
from transfer.pipeline.params import BackboneParams

LITE0 = BackboneParams(name="efficientnet_lite0", weights="none", image_size=64)


def test_groups_from_the_meta_device_are_the_built_backbones():
    assert (
        layer_group_names("efficientnet_lite0", 64)
        == load_backbone("efficientnet_lite0", "none", 64).backbone.group_names
    )
    assert layer_group_names("torchvision:resnet18") == ["stem", "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize(
    "backbone, freeze_layers, layers, error, message",
    [
        (BackboneParams(name="resnet_9000"), "all", [-1], BackboneError, r"unknown backbone 'resnet_9000'"),
        (LITE0, 99, [-1], LayerGroupError, r"freeze_layers=99 is outside 0\.\.9; .*1=stem"),
        (LITE0, "all", ["stage9"], LayerGroupError, r"features\.layers: 'stage9' is not a layer group"),
        (LITE0, "all", [10], LayerGroupError, r"features\.layers: 10 is not a layer group"),
        ([LITE0, BackboneParams(name="torchvision:nope")], "all", [-1], BackboneError, r"'torchvision:nope'"),
    ],
)
def test_what_the_libraries_reject_fails_and_is_not_recorded(tmp_path, backbone, freeze_layers, layers, error, message):
    record = tmp_path / "params.checked.json"
    with pytest.raises(error, match=message):
        check_layer_groups(backbone, freeze_layers, layers, record)
    assert not record.exists()


def test_a_valid_choice_is_recorded_and_not_resolved_again(tmp_path):
    record = tmp_path / "params.checked.json"
    assert check_layer_groups(LITE0, 9, ["stage3", -1], record) is True
    assert json.loads(record.read_text())["freeze_layers"] == 9
    assert check_layer_groups(LITE0, 9, ["stage3", -1], record) is False  # unchanged: timm not consulted
    assert check_layer_groups(LITE0, 3, ["stage3", -1], record) is True  # any change: resolved again

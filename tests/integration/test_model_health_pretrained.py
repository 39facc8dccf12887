"""Class-balanced fine-tuning of the pretrained EfficientNet-Lite0 keeps its features alive (issue 13)."""

from __future__ import annotations

import copy
import io
import tarfile

import torch
from conftest import REPO_ROOT
from PIL import Image

from transfer.features import FeatureCache, extract_features
from transfer.pipeline.params import FinetuneParams, HeadParams
from transfer.train.finetune import fine_tune
from transfer.train.losses import grad_clip_norm
from transfer.train.probe import train_linear_probe

CPU = torch.device("cpu")


# ---------------------------------------------------------------- never ship worse than the start


# ---------------------------------------------------------------- class balance


def fashion_mnist_look_alikes(train_counts: dict[str, int], val_per_class: int) -> tuple[list, list, list, list]:
    """Images of the committed Fashion-MNIST subset (MIT): the first train_counts[c] of each class for training,
    the last val_per_class for validation."""
    images: dict[str, list[Image.Image]] = {name: [] for name in train_counts}
    with tarfile.open(REPO_ROOT / "assets" / "fashion-mnist-mini.tar.gz") as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[1] in images:
                images[parts[1]].append(Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB"))
    train_x, train_y, val_x, val_y = [], [], [], []
    for label, (name, count) in enumerate(train_counts.items()):
        train_x += images[name][:count]
        train_y += [label] * count
        val_x += images[name][-val_per_class:]
        val_y += [label] * val_per_class
    return train_x, train_y, val_x, val_y


def test_class_balanced_fine_tuning_keeps_its_features_alive():
    """class_balance: loss on 14:1 look-alike classes with the pretrained EfficientNet-Lite0 (64 px).

    The class weights (up to 5.6 here) multiply the gradients of the rarest, worst-classified images: the
    first steps from the fitted probe reached global gradient norms of 120 (30 unweighted) and drove most
    ReLU6 channels of the unfrozen groups to zero in the first epoch. The default clipping (global norm 2
    for a weighted loss, plus adaptive clipping at 0.1) keeps them alive and the model no worse than its
    start, and so does adaptive clipping alone; with neither the features collapse."""
    from transfer.data.cache import cache_geometry, to_cache_form
    from transfer.data.datasets import ImageDataset
    from transfer.data.transforms import eval_batch_transform, train_transforms
    from transfer.models.backbones import Classifier, load_backbone

    train_x, train_y, val_x, val_y = fashion_mnist_look_alikes(
        {"T-shirt_top": 140, "Pullover": 40, "Coat": 20, "Shirt": 10}, val_per_class=20
    )
    loaded = load_backbone("efficientnet_lite0", "imagenet", image_size=64)
    geometry = cache_geometry(loaded.data_config)

    def cached(images: list) -> torch.Tensor:  # as the image cache stage stores them
        return torch.stack([torch.from_numpy(to_cache_form(image, geometry)).permute(2, 0, 1) for image in images])

    train_pixels, evaluate = cached(train_x), eval_batch_transform(loaded.data_config)
    val = ImageDataset(cached(val_x), val_y, batch_transform=evaluate)
    backbone = copy.deepcopy(loaded.backbone)
    train_features = extract_features(backbone, ImageDataset(train_pixels, train_y, batch_transform=evaluate), 64, CPU)
    probe = train_linear_probe(
        FeatureCache(train_features, torch.tensor(train_y), []),
        FeatureCache(extract_features(backbone, val, 64, CPU), torch.tensor(val_y), []),
        4,
        HeadParams(),
        0,
    )
    val_images = val.transformed(list(range(len(val))))

    def fine_tune_balanced(**overrides) -> list[dict]:
        model = Classifier(copy.deepcopy(loaded.backbone), 4)
        model.head.load_state_dict(probe.model.state_dict())
        finetune = FinetuneParams(class_balance="loss", epochs=1, **overrides)
        sample_transform, batch_transform = train_transforms(
            loaded.data_config, finetune.augment, finetune.crop_min_scale, finetune.hflip
        )
        train = ImageDataset(train_pixels, train_y, batch_transform=batch_transform, sample_transform=sample_transform)

        @torch.no_grad()
        def measure(row: dict) -> None:  # share of pooled channels that are zero for every val image
            model.eval()
            row["dead_share"] = float((model.backbone(val_images).amax(0) <= 0).float().mean())

        return fine_tune(model, 4, train, val, finetune, 0, CPU, on_epoch=measure).history

    assert grad_clip_norm(FinetuneParams().grad_clip_norm, "loss") == 2.0  # auto clips a weighted loss
    assert grad_clip_norm("auto", "none") is None and grad_clip_norm(5.0, "none") == 5.0
    clipped = fine_tune_balanced()
    start, tuned = clipped
    assert start["phase"] == "start" and start["dead_share"] < 0.1
    assert tuned["dead_share"] < 0.2 and tuned["val_macro_f1"] > start["val_macro_f1"] - 0.05
    unclipped = fine_tune_balanced(grad_clip_norm=None, grad_clip_agc=None)[1]  # the cause: unclipped, they die
    assert unclipped["dead_share"] > 0.5 and unclipped["val_macro_f1"] < start["val_macro_f1"] - 0.15
    adaptive_only = fine_tune_balanced(grad_clip_norm=None)[1]  # the default adaptive clipping alone
    assert adaptive_only["dead_share"] < 0.2 and adaptive_only["val_macro_f1"] > start["val_macro_f1"] - 0.05


# ---------------------------------------------------------------- the verdict's detectors


# ---------------------------------------------------------------- the data report's imbalance warning

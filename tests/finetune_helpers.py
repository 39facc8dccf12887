"""Tiny real models and data for the fine-tuning tests (shared by the tests of tests/*/test_finetune_*.py)."""

from __future__ import annotations

import torch
from torch import nn

from transfer.data.datasets import ImageDataset, to_float
from transfer.models.backbones import Backbone, Classifier
from transfer.pipeline.params import FinetuneParams


def tiny_backbone(batch_norm: bool = True, seed: int = 0) -> Backbone:
    """Three conv layer groups (stem, block1, block2): seconds to train on a CPU."""
    torch.manual_seed(seed)

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(cout)] if batch_norm else []
        return nn.Sequential(*layers, nn.ReLU())

    return Backbone([("stem", block(3, 8, 2)), ("block1", block(8, 16, 2)), ("block2", block(16, 16, 1))])


def tiny_classifier(num_classes: int = 3, batch_norm: bool = True, seed: int = 0) -> Classifier:
    return Classifier(tiny_backbone(batch_norm, seed), num_classes)


def tiny_dataset(
    per_class: int = 8, num_classes: int = 3, size: int = 16, seed: int = 0, batch_transform=to_float
) -> ImageDataset:
    """uint8 images whose brightness depends on the class (learnable in a few steps)."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for label in range(num_classes):
        for _ in range(per_class):
            base = 40 + 80 * label
            noise = torch.randn(3, size, size, generator=generator) * 20
            images.append((base + noise).clamp(0, 255).to(torch.uint8))
            labels.append(label)
    return ImageDataset(torch.stack(images), labels, batch_transform=batch_transform)


def params(**overrides) -> FinetuneParams:
    defaults = dict(epochs=3, lr=0.05, batch_size=8, warmup_epochs=0.0)
    return FinetuneParams(**{**defaults, **overrides})

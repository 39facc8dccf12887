"""Train and eval transform presets, built from a backbone's DataConfig (torchvision.transforms.v2).

Inputs are decoded uint8 CHW tensors (see data.decode_images), so the transforms run on tensors and
no image is decoded twice.
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

from .backbones import DataConfig


def _interpolation(config: DataConfig) -> InterpolationMode:
    return InterpolationMode(config.interpolation)


def eval_transform(config: DataConfig) -> v2.Compose:
    """Resize, centre-crop and normalise: what the features and the evaluation see."""
    return v2.Compose([
        v2.Resize(config.resize_size, interpolation=_interpolation(config), antialias=True),
        v2.CenterCrop(config.image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(config.mean, config.std),
    ])


def train_transform(config: DataConfig) -> v2.Compose:
    """RandomResizedCrop and horizontal flip, then the same normalisation as evaluation."""
    return v2.Compose([
        v2.RandomResizedCrop(config.image_size, scale=(0.35, 1.0), interpolation=_interpolation(config),
                             antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(config.mean, config.std),
    ])

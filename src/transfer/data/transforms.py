"""Train and eval transform presets, built from a backbone's DataConfig (torchvision.transforms.v2).

Inputs are decoded uint8 CHW tensors (see data.decode_images), so the transforms run on tensors and
no image is decoded twice. Size, resize ratio, interpolation and normalisation all come from the
backbone's pretrained config (timm's data config, torchvision's weight transforms), never from constants.
Batch-level augmentation (mixup, cutmix) needs the whole batch, so it is a separate `batch_mixer`
applied by the training loop.
"""

from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import InterpolationMode, v2

from transfer.models.backbones import DataConfig


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


# finetune.augment -> the stronger policy applied after crop and flip (on uint8 images, as they expect).
AUGMENT_POLICIES: dict[str, Callable[[DataConfig], list]] = {
    "none": lambda config: [],
    "trivialaugment": lambda config: [v2.TrivialAugmentWide(interpolation=_interpolation(config))],
    "randaugment": lambda config: [v2.RandAugment(interpolation=_interpolation(config))],
    "autoaugment": lambda config: [v2.AutoAugment(interpolation=_interpolation(config))],
}


def train_transform(config: DataConfig, augment: str = "none", crop_min_scale: float = 0.35,
                    hflip: float = 0.5) -> v2.Compose:
    """RandomResizedCrop, horizontal flip and an optional policy, then the same normalisation as evaluation."""
    if augment not in AUGMENT_POLICIES:
        raise ValueError(f"finetune.augment: unknown policy {augment!r}; choose one of {sorted(AUGMENT_POLICIES)}")
    return v2.Compose([
        v2.RandomResizedCrop(config.image_size, scale=(crop_min_scale, 1.0), interpolation=_interpolation(config),
                             antialias=True),
        v2.RandomHorizontalFlip(hflip),
        *AUGMENT_POLICIES[augment](config),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(config.mean, config.std),
    ])


BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mixer(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> BatchMixer | None:
    """Mixup and/or cutmix on a batch (one of the two, at random, when both are on); None when both are off.

    Returns (images, soft targets [B, num_classes]); cross-entropy accepts the soft targets directly.
    """
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

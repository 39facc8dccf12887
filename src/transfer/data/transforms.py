"""Train and eval transforms, built from a backbone's DataConfig, run on whole batches on the device.

Inputs are batches of the image cache's uint8 squares ([B, 3, S, S], S = the eval resize size, see
transfer.data.cache), moved to the device as uint8 (a quarter of float32's bytes) and transformed there:

- evaluation (`eval_batch_transform`): centre crop to the backbone's input size, then normalise. The cache
  already holds the resized image, so this is exactly timm's/torchvision's Resize + CenterCrop.
- training with `finetune.augment: none` (`TrainBatchTransform`): a RandomResizedCrop box and a flip
  drawn per sample, all crops of the batch resampled in one `torchvision.ops.roi_align` call (bilinear,
  averaging over each output pixel's footprint when shrinking), then normalised.
- training with `trivialaugment`, `randaugment` or `autoaugment`: these policies work per image on uint8,
  so crop, flip and policy run per sample in the DataLoader workers (`train_sample_transform`, on the CPU)
  and only the normalisation runs on the device (`NormaliseBatch`).
- mixup and cutmix (`batch_mixer`) always run on the device batch, after the transform.

The same code runs on the CPU, where CI runs it. Random draws use torch's global generator on the CPU,
so a seeded (or resumed) run draws the same crops on any device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torchvision.transforms import InterpolationMode, v2

from transfer.data.config import DataConfig

BatchTransform = Callable[[torch.Tensor], torch.Tensor]


def _interpolation(config: DataConfig) -> InterpolationMode:
    return InterpolationMode(config.interpolation)


class NormaliseBatch:
    """uint8 [B, 3, H, W] -> float32 normalised with the backbone's mean and std (on the batch's device)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean, self.std = tuple(mean), tuple(std)
        # (x / 255 - mean) / std as one scale and shift, kept per device (no host copy per batch).
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._constants:
            scale = torch.tensor([1 / (255 * s) for s in self.std]).view(1, 3, 1, 1)
            shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(1, 3, 1, 1)
            self._constants[device] = (scale.to(device), shift.to(device))
        return self._constants[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        scale, shift = self._on(images.device)
        return images.float() * scale + shift


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central size x size window of a batch (torchvision's CenterCrop offsets)."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(
            f"cannot centre-crop {size} px from {height}x{width} images; rebuild the image cache "
            f"for this backbone (dvc repro cache)"
        )
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


class EvalBatch:
    """Centre crop to the input size, then normalise: what features, validation and evaluation see."""

    def __init__(self, config: DataConfig):
        self.image_size = config.image_size
        self.normalise = NormaliseBatch(config.mean, config.std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalise(centre_crop(images, self.image_size))


def eval_batch_transform(config: DataConfig) -> EvalBatch:
    """The evaluation transform of a batch of cached images (uint8 [B, 3, S, S]) on any device.

    With `cache.decode_to_cache_form` this is the whole evaluation preprocessing: prediction on new
    image files uses these two functions, so it sees exactly what evaluation saw.
    """
    return EvalBatch(config)


def random_resized_boxes(
    count: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop's boxes for `count` images, [count, 4] as (x1, y1, x2, y2) pixel edges, on the CPU.

    torchvision's sampling, vectorised: up to `attempts` (area, aspect) draws per image, the first that
    fits is kept; when none fits, the largest centred box within the aspect range.
    """
    area = height * width
    target_area = area * torch.empty(count, attempts).uniform_(scale[0], scale[1])
    log_ratio = torch.empty(count, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    widths = torch.sqrt(target_area * aspect).round()
    heights = torch.sqrt(target_area / aspect).round()
    fits = (widths > 0) & (heights > 0) & (widths <= width) & (heights <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((count,), -1))
    chosen = first.clamp(min=0).unsqueeze(1)
    w, h = widths.gather(1, chosen).squeeze(1), heights.gather(1, chosen).squeeze(1)
    # Fallback (no draw fitted): the whole image clamped to the aspect range, centred (torchvision's).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    missing = first < 0
    w = torch.where(missing, torch.full_like(w, fallback_w), w)
    h = torch.where(missing, torch.full_like(h, fallback_h), h)
    top = torch.floor(torch.rand(count) * (height - h + 1))
    left = torch.floor(torch.rand(count) * (width - w + 1))
    top = torch.where(missing, torch.floor((height - h) / 2), top)
    left = torch.where(missing, torch.floor((width - w) / 2), left)
    return torch.stack([left, top, left + w, top + h], dim=1)


class TrainBatchTransform:
    """Per-sample RandomResizedCrop and horizontal flip on a whole batch (roi_align), then normalisation."""

    def __init__(self, config: DataConfig, crop_min_scale: float, hflip: float):
        self.image_size, self.scale, self.hflip = config.image_size, (crop_min_scale, 1.0), hflip
        self.normalise = NormaliseBatch(config.mean, config.std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        count, _, height, width = images.shape
        boxes = random_resized_boxes(count, height, width, self.scale)
        flips = torch.rand(count) < self.hflip
        rois = torch.cat([torch.arange(count, dtype=torch.float32).unsqueeze(1), boxes], dim=1).to(images.device)
        # aligned=True: box edges are pixel edges; sampling_ratio=0 averages ceil(box/out) points per output
        # pixel and axis, so shrinking a crop is antialiased and enlarging it is plain bilinear.
        # NCHW-contiguous input: roi_align runs about twice as fast on it as on the cache's channels_last batch.
        crops = roi_align(
            images.float().contiguous(),
            rois,
            output_size=self.image_size,
            spatial_scale=1.0,
            sampling_ratio=0,
            aligned=True,
        )
        crops = torch.where(flips.to(images.device).view(-1, 1, 1, 1), crops.flip(-1), crops)
        # The crops are float 0..255 already: normalising them is the same affine map as for uint8.
        return self.normalise(crops)


# finetune.augment -> the stronger policy applied after crop and flip (on uint8 images, as they expect).
AUGMENT_POLICIES: dict[str, Callable[[DataConfig], list]] = {
    "none": lambda config: [],
    "trivialaugment": lambda config: [v2.TrivialAugmentWide(interpolation=_interpolation(config))],
    "randaugment": lambda config: [v2.RandAugment(interpolation=_interpolation(config))],
    "autoaugment": lambda config: [v2.AutoAugment(interpolation=_interpolation(config))],
}


def train_sample_transform(config: DataConfig, augment: str, crop_min_scale: float, hflip: float) -> v2.Compose:
    """Per image, in DataLoader workers: RandomResizedCrop, flip and a policy, uint8 in and out."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                config.image_size, scale=(crop_min_scale, 1.0), interpolation=_interpolation(config), antialias=True
            ),
            v2.RandomHorizontalFlip(hflip),
            *AUGMENT_POLICIES[augment](config),
        ]
    )


def train_transforms(
    config: DataConfig, augment: str, crop_min_scale: float, hflip: float
) -> tuple[Callable | None, BatchTransform]:
    """(per-sample transform for the workers or None, batch transform for the device) of a training set.

    The values come from `finetune:` (augment, crop_min_scale, hflip), whose defaults live in the params schema.
    """
    if augment not in AUGMENT_POLICIES:
        raise ValueError(f"finetune.augment: unknown policy {augment!r}; choose one of {sorted(AUGMENT_POLICIES)}")
    if augment == "none":
        return None, TrainBatchTransform(config, crop_min_scale, hflip)
    return train_sample_transform(config, augment, crop_min_scale, hflip), NormaliseBatch(config.mean, config.std)


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

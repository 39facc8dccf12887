"""Batch transforms on the device (run on the CPU here): eval centre crop, per-sample random resized crops
and flips through roi_align, normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfer.data.config import DataConfig
from transfer.data.transforms import TrainBatchTransform, eval_batch_transform, random_resized_boxes

CONFIG = DataConfig(
    image_size=24, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear"
)


def test_eval_batch_is_the_normalised_centre_crop():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    out = eval_batch_transform(CONFIG)(images)
    expected = (images[:, :, 4:28, 4:28].float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(out, expected)


def test_random_resized_boxes_respect_scale_and_aspect_and_stay_inside():
    torch.manual_seed(0)
    boxes = random_resized_boxes(2000, 32, 48, scale=(0.3, 1.0))
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 32).all()
    area = widths * heights / (32 * 48)
    assert area.min() > 0.25 and area.max() <= 1.0
    assert ((widths / heights) > 0.7).all() and ((widths / heights) < 1.45).all()  # 3/4..4/3 up to rounding
    assert len(set(map(tuple, boxes.tolist()))) > 1500  # per-sample boxes, not one per batch
    torch.manual_seed(0)
    assert torch.equal(boxes, random_resized_boxes(2000, 32, 48, scale=(0.3, 1.0)))  # seeded: reproducible


def test_a_full_crop_with_certain_flip_is_the_mirrored_resized_image():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    out = TrainBatchTransform(CONFIG, crop_min_scale=1.0, hflip=1.0)(images)
    # scale 1 on a square image: the whole image, averaged 2x2 per output pixel (32 -> 24 averages ceil(32/24)=2).
    assert out.shape == (3, 3, 24, 24)
    unflipped = TrainBatchTransform(CONFIG, crop_min_scale=1.0, hflip=0.0)(images)
    torch.testing.assert_close(out, unflipped.flip(-1))
    resized = F.interpolate(images.float(), size=24, mode="bilinear", align_corners=False, antialias=True)
    assert ((unflipped * 0.25 + 0.5) * 255 - resized).abs().mean() < 6  # the same picture, resampled

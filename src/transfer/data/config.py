"""DataConfig: how a backbone wants its images prepared (size, resize, mean, std, interpolation).

It comes from the backbone's pretrained config (transfer.models.backbones reads it from timm or torchvision);
the image cache, the datasets and the transforms of this package take it as a plain value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DataConfig:
    """How images must be prepared for a backbone (from its pretrained config, never hard-coded)."""

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic"

    def with_image_size(self, image_size: int | None) -> "DataConfig":
        """Keep the backbone's crop ratio when the user asks for another input size."""
        if image_size is None or image_size == self.image_size:
            return self
        crop_ratio = self.image_size / self.resize_size
        return DataConfig(image_size, int(math.floor(image_size / crop_ratio)), self.mean, self.std, self.interpolation)

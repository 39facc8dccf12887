"""Datasets over the images of one split: decoded once into uint8 tensors, transformed per sample."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from transfer.data.images import load_rgb, load_rgb_bytes
from transfer.data.split import read_manifest


def decode_image(source: str | Path | bytes) -> torch.Tensor:
    """One image file (or its encoded bytes) as an upright RGB uint8 CHW tensor; ImageError when unusable."""
    image = load_rgb_bytes(source) if isinstance(source, bytes) else load_rgb(source)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_images(paths: list[str], repo_root: Path, desc: str = "decode") -> list[torch.Tensor]:
    """Decode every image once into a uint8 CHW tensor (small datasets: cheaper than decoding per epoch)."""
    return [decode_image(repo_root / path) for path in tqdm(paths, desc=desc, unit="img", leave=False)]


class ImageDataset(Dataset):
    """(transformed image, label) pairs from decoded uint8 tensors."""

    def __init__(self, images: list[torch.Tensor], labels: list[int], transform: Callable,
                 paths: list[str] | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform, self.paths = images, labels, transform, paths

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.labels[index]


def load_split_dataset(split_dir: Path, split: str, repo_root: Path, transform: Callable) -> ImageDataset:
    manifest = read_manifest(split_dir, split)
    images = decode_images(manifest.paths, repo_root, desc=f"decode {split}")
    return ImageDataset(images, manifest.labels, transform, manifest.paths)

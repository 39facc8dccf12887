"""Pooled features of the frozen backbone, cached as one tensor file per split.

The cache is what makes iteration fast: the backbone runs once per split, and every head experiment
(learning rate, epochs, weight decay) trains on these tensors in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from transfer.models.backbones import Backbone
from transfer.data.datasets import ImageDataset
from transfer.pipeline.files import load_torch, save_torch


@dataclass
class FeatureCache:
    features: torch.Tensor  # float32 [N, D]
    labels: torch.Tensor  # int64 [N]
    paths: list[str]


@torch.inference_mode()
def extract_features(backbone: Backbone, dataset: ImageDataset, batch_size: int, device: torch.device,
                     desc: str = "features") -> torch.Tensor:
    """Run the backbone in eval mode over a dataset, in order; returns float32 [N, D] on the CPU."""
    # channels_last: oneDNN's (and cuDNN's) depthwise convolutions run about 2x faster in it on CPU.
    backbone.eval().to(device, memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks = []
    for images, _ in tqdm(loader, desc=desc, unit="batch"):
        chunks.append(backbone(images.to(device, memory_format=torch.channels_last)).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, backbone.num_features)


def save_feature_cache(path: Path, cache: FeatureCache) -> None:
    save_torch(path, {"features": cache.features, "labels": cache.labels, "paths": cache.paths})


def load_feature_cache(path: Path) -> FeatureCache:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the features stage first (dvc repro features)")
    payload = load_torch(path, "feature cache", "rerun the features stage (dvc repro -f features)")
    cache = FeatureCache(payload["features"], payload["labels"], list(payload["paths"]))
    if len(cache.features) != len(cache.labels):
        raise ValueError(f"{path} is inconsistent: {len(cache.features)} feature rows, {len(cache.labels)} labels")
    return cache

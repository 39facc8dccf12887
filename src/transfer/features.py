"""Pooled features of the frozen backbone, cached as one tensor file per split.

The cache is what makes iteration fast: the backbone runs once per split, and every head experiment
(learning rate, epochs, weight decay) trains on these tensors in seconds.

The input path: batches of the image cache's uint8 squares go to the device and are centre-cropped and
normalised there (`transforms.eval_batch_transform`); the backbone runs in channels_last, under bf16
autocast on CUDA (`amp`; the features are saved as float32), optionally compiled (`compile`). Under
torchrun each rank extracts a contiguous shard of the split and rank 0 gathers them in order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from transfer.data.datasets import DeviceLoader, ImageDataset
from transfer.models.backbones import Backbone
from transfer.pipeline.distributed import SINGLE, DistContext
from transfer.pipeline.files import load_torch, save_torch
from transfer.pipeline.heap import release_free_heap


@dataclass
class FeatureCache:
    features: torch.Tensor  # float32 [N, D]
    labels: torch.Tensor  # int64 [N]
    paths: list[str]


def contiguous_shard(size: int, context: DistContext) -> range:
    """This rank's block of consecutive rows (sizes differ by at most one; rank order is data order)."""
    base, extra = divmod(size, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return range(start, start + base + (1 if context.rank < extra else 0))


def _gather_in_order(shard: torch.Tensor, size: int, context: DistContext, device: torch.device) -> torch.Tensor:
    """Every rank's shard of features, concatenated in rank order (on every rank), on the CPU."""
    counts = [len(contiguous_shard(size, DistContext(rank, context.world_size))) for rank in range(context.world_size)]
    # nccl moves CUDA tensors only; gloo CPU tensors.
    comm = device if device.type == "cuda" else torch.device("cpu")
    padded = torch.zeros(max(counts), shard.shape[1], dtype=shard.dtype, device=comm)
    padded[: len(shard)] = shard.to(comm)
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:count].cpu() for piece, count in zip(pieces, counts)])


@torch.inference_mode()
def extract_features(
    backbone: Backbone,
    dataset: ImageDataset,
    batch_size: int,
    device: torch.device,
    desc: str = "features",
    amp: bool = True,
    compile: bool = False,
    num_workers: int = 0,
    context: DistContext = SINGLE,
) -> torch.Tensor:
    """Run the backbone in eval mode over a dataset, in order; returns float32 [N, D] on the CPU.

    `amp`: bf16 autocast, on CUDA only (on a CPU without AMX it is slower than fp32). Under torchrun
    (`context`) every rank calls this and every rank gets all N rows.
    """
    cuda = device.type == "cuda"
    # channels_last: oneDNN's (and cuDNN's) depthwise convolutions run about 2x faster in it on CPU.
    model = backbone.eval().to(device, memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    shard = contiguous_shard(len(dataset), context)
    source = dataset if len(shard) == len(dataset) else dataset.subset(shard)
    loader = DeviceLoader(source, device, batch_size=batch_size, num_workers=num_workers, resident=False)
    # Written in place without a host-device synchronisation per batch (pinned, non-blocking on CUDA).
    features = torch.empty(len(shard), backbone.num_features, dtype=torch.float32, pin_memory=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and amp else contextlib.nullcontext()
    position = 0
    with autocast:
        for images, _ in tqdm(loader, desc=desc, unit="batch", disable=not context.is_main):
            output = model(images.contiguous(memory_format=torch.channels_last))
            features[position : position + len(output)].copy_(output.float(), non_blocking=cuda)
            position += len(output)
            release_free_heap()  # peak memory must not grow with the number of batches (pipeline.heap)
    if cuda:
        torch.cuda.synchronize(device)
    if context.enabled:
        return _gather_in_order(features, len(dataset), context, device)
    return features


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

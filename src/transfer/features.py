"""Pooled features of the frozen backbone, cached as one tensor file per split.

The cache is what makes iteration fast: the backbone runs once per split, and every head experiment
(learning rate, epochs, weight decay) trains on these tensors in seconds.

The input path: batches of the image cache's uint8 squares go to the device and are centre-cropped and
normalised there (`transforms.eval_batch_transform`); the backbone runs in channels_last, under bf16
autocast on CUDA (`amp`; the features are saved as float32), optionally compiled (`compile`). Under
torchrun each rank extracts a contiguous shard of the split and rank 0 gathers them in order.

The batch on CPU comes from a memory budget (`feature_batch_size`): activations grow with the square of
the image size, so a fixed batch that fits at 112 px does not at 384. On CUDA the configured batch is kept.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from transfer.data.datasets import DeviceLoader, ImageDataset
from transfer.models.backbones import Backbone
from transfer.pipeline.distributed import SINGLE, DistContext
from transfer.pipeline.files import load_torch, save_torch
from transfer.pipeline.heap import release_free_heap

# The CPU batch stops at 32: from 8 to 32 images extraction got 2.2x faster per CPU-second, from 32 to 128
# only about 1.2x, for 4x the activations (bench/feature_batch.py: EfficientNet-Lite0, 224 px, a shared
# 2-core CPU under heavy load; README "Memory at any image size").
CPU_BATCH_LIMIT = 32
# Images in the forward pass that measures activation memory: two, so that what a batch of one does not
# show (an op that allocates per image pair) is in the figure, at a fraction of a second even at 384 px.
_PROBE_BATCH = 2


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


class LiveTensorBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while the mode is active (what the ops allocate).

    Every op's output storage is counted when it appears and uncounted when Python frees it, so the
    peak is that of the real forward pass (freed intermediates do not add up), with the real kernels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        self.peak = max(self.peak, self.live)
        return output

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # the C++ storage: views and in-place outputs share it and are counted once
        if key not in self._sizes:
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


@torch.inference_mode()
def activation_bytes_per_image(model: torch.nn.Module, image_size: int) -> int:
    """Peak bytes of activations (input included) per image of the model's forward pass at this size, on CPU.

    Measured, not tabulated: one forward of a small batch of zeros, run as `extract_features` runs it
    (eval, channels_last), with every tensor the ops allocate counted while it is alive. Works for any
    backbone (on the CPU) and image size; the model is left in eval mode and channels_last.
    """
    model = model.eval().to(memory_format=torch.channels_last)
    with LiveTensorBytes() as live:
        images = torch.zeros(_PROBE_BATCH, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
        model(images)
    return -(-live.peak // _PROBE_BATCH)


def feature_batch_size(batch_size: int, device: torch.device, bytes_per_image: int, max_memory_mb: int) -> int:
    """The batch of feature extraction: on CUDA `batch_size`; on CPU the largest whose activations fit
    in `max_memory_mb`, at most `batch_size` and `CPU_BATCH_LIMIT` (at least 1: one image is the floor)."""
    if device.type == "cuda":
        return batch_size
    fits = max_memory_mb * 2**20 // max(bytes_per_image, 1)
    return max(1, min(batch_size, CPU_BATCH_LIMIT, fits))


def choose_feature_batch(
    model: torch.nn.Module, image_size: int, batch_size: int, device: torch.device, max_memory_mb: int
) -> int:
    """`feature_batch_size` with the model's measured activations (measured only where they decide it)."""
    if device.type == "cuda":
        return batch_size
    return feature_batch_size(batch_size, device, activation_bytes_per_image(model, image_size), max_memory_mb)


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

"""Datasets over one split of the image cache, read a batch at a time, and loaders that deliver the
batches to the device already transformed there.

An `ImageDataset` holds no pixels: its `images` source (`cache.CachedImages`, or `InMemoryImages` for
small tensors in tests) reads the images of one batch when asked, so memory holds one batch per reader
(plus the loader's prefetch) whatever the number of images. `DeviceLoader` moves uint8 batches to the
device (pinned memory and non-blocking copies on CUDA) and applies the dataset's `batch_transform` there.
On CUDA a split that fits comfortably in GPU memory is uploaded once and indexed on the GPU instead.

- GPU-resident: on CUDA, without a per-sample transform, for a split of at most a quarter of the free GPU
  memory (about 50,000 images of 256 px, 196 KB each, per 10 GB).
- streamed: otherwise, and always on the CPU; any size, each batch read from the cache file (pinned on CUDA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from transfer.data.cache import CachedImages, open_split
from transfer.data.config import DataConfig
from transfer.data.split import read_manifest


class InMemoryImages:
    """A uint8 [N, 3, H, W] tensor behind the same `read` interface as `CachedImages` (tests, small data)."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 [N, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        return self.images[torch.as_tensor(list(indices), dtype=torch.long)]


class _Selection:
    """Some rows of an image source, in the given order."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def nbytes(self) -> int:
        return self.source.nbytes * len(self.indices) // max(len(self.source), 1)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        return self.source.read([self.indices[i] for i in indices])


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]: the batch transform of datasets that need no other."""
    return images.float() / 255


class ImageDataset(Dataset):
    """(uint8 image, label) pairs of one split, read from an image source a batch at a time.

    `sample_transform` (optional) runs per image where the batch is read (DataLoader workers) and must
    return uint8; `batch_transform` runs on the device on the whole batch (crop, flip, normalise).
    """

    def __init__(
        self,
        images,
        labels: Sequence[int],
        paths: list[str] | None = None,
        batch_transform: Callable[[torch.Tensor], torch.Tensor] = to_float,
        sample_transform: Callable | None = None,
    ):
        if isinstance(images, torch.Tensor):
            images = InMemoryImages(images)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.paths = images, list(labels), paths
        self.batch_transform, self.sample_transform = batch_transform, sample_transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([index])
        return images[0], int(labels[0])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: uint8 [B, 3, H, W] (one read of the source) and int64 labels [B]."""
        images = self.images.read(indices)
        if self.sample_transform is not None:
            images = torch.stack([self.sample_transform(image) for image in images])
        return images, torch.tensor([self.labels[i] for i in indices], dtype=torch.int64)

    def subset(self, indices: Sequence[int]) -> "ImageDataset":
        """The same dataset restricted to `indices` (a rank's shard), still reading per batch."""
        indices = list(indices)
        return ImageDataset(
            _Selection(self.images, indices),
            [self.labels[i] for i in indices],
            None if self.paths is None else [self.paths[i] for i in indices],
            self.batch_transform,
            self.sample_transform,
        )

    def transformed(self, indices: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """The batch transform's output for a few images (an example input, a diagnostics batch)."""
        images, _ = self.__getitems__(indices)
        return self.batch_transform(images.to(device))


def load_split_dataset(
    cache_dir: Path,
    split_dir: Path,
    split: str,
    config: DataConfig | None = None,
    batch_transform: Callable[[torch.Tensor], torch.Tensor] = to_float,
    sample_transform: Callable | None = None,
) -> ImageDataset:
    """A split's dataset over the image cache (labels and paths from its manifest)."""
    manifest = read_manifest(split_dir, split)
    images: CachedImages = open_split(cache_dir, split, manifest.paths, config)
    return ImageDataset(images, manifest.labels, manifest.paths, batch_transform, sample_transform)


def _already_batched(batch):
    return batch  # ImageDataset.__getitems__ returns a whole batch


# A split goes to GPU memory when it takes at most this share of the free memory (the rest is the model's).
RESIDENT_SHARE = 0.25


def fits_on_device(dataset: Dataset, device: torch.device) -> bool:
    """True when the dataset's uint8 images should live on the GPU for the whole run."""
    if device.type != "cuda" or not isinstance(dataset, ImageDataset) or dataset.sample_transform is not None:
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return dataset.images.nbytes <= RESIDENT_SHARE * free


class DeviceLoader:
    """Batches (images transformed on `device`, labels on `device`) of a dataset, in the sampler's order.

    `batch_sampler` yields lists of indices (default: consecutive batches of `batch_size`). Datasets other
    than `ImageDataset` (e.g. a TensorDataset of float images) go through a plain DataLoader, untransformed.
    `resident`: None decides by size (`fits_on_device`); False always streams.
    """

    def __init__(
        self,
        dataset: Dataset,
        device: torch.device,
        batch_size: int | None = None,
        batch_sampler=None,
        num_workers: int = 0,
        resident: bool | None = None,
    ):
        if batch_sampler is None:
            batch_sampler = BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False)
        self.dataset, self.device, self.batch_sampler = dataset, device, batch_sampler
        self.images_on_device = self.labels_on_device = None
        if resident is None:
            resident = fits_on_device(dataset, device)
        if resident:
            self._upload(dataset, batch_size or 256)
            return
        image_dataset = isinstance(dataset, ImageDataset)
        cuda = device.type == "cuda"
        self.loader = DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            pin_memory=cuda,
            persistent_workers=num_workers > 0,
            **({"collate_fn": _already_batched} if image_dataset else {}),
        )
        self.transform = dataset.batch_transform if image_dataset else None

    def _upload(self, dataset: ImageDataset, chunk: int) -> None:
        """The whole split to the GPU once, a chunk at a time (host memory holds one chunk)."""
        first = dataset.images.read([0]) if len(dataset) else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        shape = (len(dataset), *first.shape[1:])
        on_device = torch.empty(shape, dtype=torch.uint8, device=self.device).contiguous(
            memory_format=torch.channels_last
        )
        for start in range(0, len(dataset), chunk):
            rows = list(range(start, min(start + chunk, len(dataset))))
            on_device[start : start + len(rows)].copy_(dataset.images.read(rows).pin_memory(), non_blocking=True)
        self.images_on_device = on_device
        self.labels_on_device = torch.tensor(dataset.labels, dtype=torch.int64).to(self.device)
        self.transform = dataset.batch_transform

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.images_on_device is not None:
            for indices in self.batch_sampler:
                rows = torch.as_tensor(indices, dtype=torch.long).to(self.device, non_blocking=True)
                yield self.transform(self.images_on_device[rows]), self.labels_on_device[rows]
            return
        cuda = self.device.type == "cuda"
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=cuda)
            labels = labels.to(self.device, non_blocking=cuda)
            yield (self.transform(images) if self.transform is not None else images), labels

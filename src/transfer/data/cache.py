"""The decode-once image cache: every image of a split decoded once, resized, stored as uint8 pixels.

The cache stage (between split and features) writes `data/cache/{train,val,test}.npy`, each a plain
NumPy array file of shape [N, S, S, 3] uint8 in manifest order, and `data/cache/meta.json` (side,
interpolation, and per split the image count and a hash of its manifest). Every later stage (features,
fine-tuning, evaluation, the diagnostics' pictures) reads pixels only from here, never the source files.

What the cache keeps of an image: it is resized so its short side is S, the backbone's *eval resize
size* (`DataConfig.resize_size`, e.g. 256 for a 224 px ResNet, 128 for EfficientNet-Lite0 at 112 px),
with the backbone's interpolation, then centre-cropped to S x S. That square is exactly what evaluation
needs (its centre crop is the eval crop, no resampling), and it is what training crops come from:
RandomResizedCrop draws its boxes inside this square, so a training crop never sees the strips of the
long side outside it nor detail finer than S px. That is the trade FFCV and timm's dataset caches make
too: a fixed, small, memory-mappable array per split instead of decoding full photos every epoch.

The file is written with ordinary writes (not through a memory map) and read per batch with positional
reads (`CachedImages.read`), so no process's resident memory grows with the number of images: pages of
a memory map that have been touched count as the process's resident memory until the kernel drops them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from transfer.data.config import DataConfig
from transfer.data.images import DEFAULT_MAX_PIXELS, load_rgb, load_rgb_bytes
from transfer.data.split import SPLITS, read_manifest
from transfer.pipeline.errors import UserError
from transfer.pipeline.files import atomic_path, read_json, write_json

META_FILE = "meta.json"
_PIL_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class CacheError(UserError, ValueError):
    """The image cache is missing, stale or does not match what a stage needs."""


@dataclass(frozen=True)
class CacheGeometry:
    """What the cached pixels depend on: the square side S and the resize interpolation."""

    side: int
    interpolation: str


def cache_geometry(config: DataConfig) -> CacheGeometry:
    """The cache a backbone's data config needs: its eval resize size, with its interpolation."""
    if config.interpolation not in _PIL_RESAMPLE:
        raise CacheError(
            f"interpolation {config.interpolation!r} of the backbone's data config is not one of "
            f"{sorted(_PIL_RESAMPLE)}"
        )
    return CacheGeometry(config.resize_size, config.interpolation)


def decode_to_cache_form(
    source: str | os.PathLike | bytes, geometry: CacheGeometry, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one image file (or its encoded bytes) into the cached form: uint8 [S, S, 3] (`to_cache_form`).

    The single definition of "what the model's input pipeline starts from": the cache stage calls it for
    every image, and prediction on new files calls it too (then `transforms.eval_batch_transform`). An image
    over `max_pixels` is refused from its header (the served model passes a lower limit than the data's).
    """
    side = geometry.side
    if isinstance(source, bytes):
        return to_cache_form(load_rgb_bytes(source, draft_size=side, max_pixels=max_pixels), geometry)
    return to_cache_form(load_rgb(source, draft_size=side, max_pixels=max_pixels), geometry)


def to_cache_form(image: Image.Image, geometry: CacheGeometry) -> np.ndarray:
    """A decoded RGB image -> uint8 [S, S, 3]: the short side resized to S, the centre square kept."""
    side = geometry.side
    width, height = image.size
    # torchvision's Resize(int) rounding: the short side becomes `side`, the long side is truncated.
    if width <= height:
        size = (side, max(side, int(side * height / width)))
    else:
        size = (max(side, int(side * width / height)), side)
    if size != image.size:
        image = image.resize(size, resample=_PIL_RESAMPLE[geometry.interpolation])
    left, top = int(round((size[0] - side) / 2.0)), int(round((size[1] - side) / 2.0))
    if size != (side, side):
        image = image.crop((left, top, left + side, top + side))
    return np.array(image, dtype=np.uint8)


def manifest_hash(paths: list[str]) -> str:
    """sha256 of a split's ordered paths: a cache row belongs to the manifest row of the same index."""
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


class _DecodeFiles(Dataset):
    def __init__(self, paths: list[Path], geometry: CacheGeometry):
        self.paths, self.geometry = paths, geometry

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return decode_to_cache_form(self.paths[index], self.geometry)


def _keep_array(array: np.ndarray) -> np.ndarray:
    return array


def write_split_cache(
    path: Path, files: list[Path], geometry: CacheGeometry, workers: int = 0, desc: str = "cache"
) -> None:
    """Decode `files` in order into one [N, S, S, 3] uint8 .npy at `path`, one image in memory at a time.

    `workers` > 0 decodes in that many processes (results still written in order, so the file's bytes do
    not depend on it). The header is NumPy's own, so `np.load(path, mmap_mode="r")` opens the file.
    """
    side = geometry.side
    loader = DataLoader(
        _DecodeFiles(files, geometry),
        batch_size=None,
        num_workers=workers,
        collate_fn=_keep_array,
        prefetch_factor=2 if workers else None,
    )
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle,
            {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False,
                "shape": (len(files), side, side, 3),
            },
        )
        for array in tqdm(loader, total=len(files), desc=desc, unit="img"):
            handle.write(np.ascontiguousarray(array).tobytes())
        handle.flush()
        os.fsync(handle.fileno())


def build_image_cache(
    cache_dir: Path, split_dir: Path, repo_root: Path, geometry: CacheGeometry, workers: int | None = None
) -> dict[str, int]:
    """The cache stage: every split's images decoded once into `cache_dir`; returns the image count per split.

    `workers`: decoding processes; None picks per split (`decode_workers`). The bytes written do not depend on it.
    """
    meta: dict = {"side": geometry.side, "interpolation": geometry.interpolation, "splits": {}}
    for split in SPLITS:
        manifest = read_manifest(split_dir, split)
        files = [repo_root / p for p in manifest.paths]
        write_split_cache(
            cache_dir / f"{split}.npy",
            files,
            geometry,
            decode_workers(files) if workers is None else workers,
            desc=f"cache {split}",
        )
        meta["splits"][split] = {"count": len(manifest.paths), "manifest_sha256": manifest_hash(manifest.paths)}
    write_json(cache_dir / META_FILE, meta)
    return {split: entry["count"] for split, entry in meta["splits"].items()}


# Below this many bytes of image files a split decodes in the stage's own process: starting workers would
# cost more than they save (the embedded default's 1,500 small PNGs decode in about a second).
PARALLEL_DECODE_BYTES = 64 * 2**20


def decode_workers(files: list[Path]) -> int:
    """Decoding processes for one split: one per available core (at most 8, each holds one photo) for photos."""
    if sum(path.stat().st_size for path in files) < PARALLEL_DECODE_BYTES:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores)


# --- Reading ---------------------------------------------------------------------------------------


class CachedImages:
    """One split of the cache: `read(indices)` returns those images as a uint8 [B, 3, S, S] tensor.

    Reads are positional (`os.preadv`) into a fresh batch buffer, so memory holds at most the batch being
    read; nothing is memory-mapped or kept between calls. The file descriptor is opened lazily in each
    process, so DataLoader workers (forked) each read with their own.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"{self.path} not found: run the cache stage first (dvc repro cache)")
        try:
            with open(self.path, "rb") as handle:  # only the header: NumPy's own reader
                version = np.lib.format.read_magic(handle)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(handle)
                offset = handle.tell()
        except ValueError as exc:
            raise CacheError(f"{self.path} is not a NumPy array file ({exc}); re-run dvc repro cache") from exc
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise CacheError(f"{self.path} holds {dtype} {shape}, not uint8 [N, S, S, 3]; re-run dvc repro cache")
        self.count, self.side = shape[0], shape[1]
        self.offset = offset
        self.image_bytes = self.side * self.side * 3
        expected = offset + self.count * self.image_bytes
        if self.path.stat().st_size != expected:
            raise CacheError(
                f"{self.path} is truncated ({self.path.stat().st_size} bytes, expected {expected}); "
                f"re-run dvc repro cache"
            )
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        return self.count * self.image_bytes

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}  # a descriptor does not travel to another process

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, indices) -> torch.Tensor:
        indices = [int(i) for i in indices]
        out = np.empty((len(indices), self.side, self.side, 3), dtype=np.uint8)
        fd = self._descriptor()
        start = 0
        while start < len(indices):
            # Consecutive indices (evaluation, feature extraction) are one read.
            end = start + 1
            while end < len(indices) and indices[end] == indices[end - 1] + 1:
                end += 1
            first = indices[start]
            if first < 0 or indices[end - 1] >= self.count:
                raise IndexError(f"image index out of range 0..{self.count - 1} in {self.path}")
            view = memoryview(out[start:end]).cast("B")
            got = os.preadv(fd, [view], self.offset + first * self.image_bytes)
            if got != len(view):
                raise CacheError(f"{self.path}: short read ({got} of {len(view)} bytes); re-run dvc repro cache")
            start = end
        # NHWC bytes viewed as NCHW: channels_last strides, which the models run in anyway.
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def read_cache_meta(cache_dir: Path) -> dict:
    path = cache_dir / META_FILE
    if not path.is_file():
        raise CacheError(f"{path} not found: run the cache stage first (dvc repro cache)")
    return read_json(path)


def open_split(cache_dir: Path, split: str, paths: list[str], config: DataConfig | None = None) -> CachedImages:
    """A split's cached images, checked against its manifest (and, given a data config, its geometry)."""
    meta = read_cache_meta(cache_dir)
    entry = meta["splits"].get(split)
    if entry is None or entry["count"] != len(paths) or entry["manifest_sha256"] != manifest_hash(paths):
        raise CacheError(
            f"{cache_dir} was built from another {split} manifest than data/split holds; "
            f"re-run the cache stage (dvc repro cache)"
        )
    if config is not None:
        wanted = cache_geometry(config)
        if (meta["side"], meta["interpolation"]) != (wanted.side, wanted.interpolation):
            raise CacheError(
                f"{cache_dir} holds {meta['side']} px images ({meta['interpolation']}), but the backbone "
                f"needs {wanted.side} px ({wanted.interpolation}); re-run dvc repro cache"
            )
    images = CachedImages(cache_dir / f"{split}.npy")
    if len(images) != len(paths):
        raise CacheError(f"{images.path} holds {len(images)} images, its manifest {len(paths)}; re-run dvc repro cache")
    return images

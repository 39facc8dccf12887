"""The decode-once image cache on real image files: what it keeps, byte-stability, bounded memory."""

from __future__ import annotations

import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import index_of, write_image_folder
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from transfer.data.cache import (
    CachedImages,
    CacheError,
    CacheGeometry,
    build_image_cache,
    decode_to_cache_form,
    write_split_cache,
)
from transfer.data.config import DataConfig
from transfer.data.datasets import DeviceLoader, load_split_dataset
from transfer.data.images import load_rgb
from transfer.data.split import stratified_split, write_split
from transfer.data.transforms import eval_batch_transform

CONFIG = DataConfig(image_size=56, resize_size=64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), interpolation="bilinear")
GEOMETRY = CacheGeometry(64, "bilinear")


def photo(path: Path, width: int, height: int, seed: int = 0, quality: int = 90) -> Path:
    """A smooth picture with some texture, saved as a real JPEG or PNG (by suffix)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=quality) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)
    return path


def test_an_image_is_cached_as_torchvisions_resize_then_centre_square(tmp_path: Path):
    path = photo(tmp_path / "wide.png", 150, 100)
    cached = decode_to_cache_form(path, GEOMETRY)
    assert cached.shape == (64, 64, 3) and cached.dtype == np.uint8
    full = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
    expected = v2.CenterCrop(64)(v2.Resize(64, interpolation=InterpolationMode.BILINEAR, antialias=True)(full))
    difference = np.abs(cached.astype(int) - expected.permute(1, 2, 0).numpy().astype(int))
    assert difference.mean() < 1.5  # PIL's and torch's antialiased resize agree to rounding
    # Evaluation's centre crop of the cached square is the eval crop of the original image.
    evaluated = eval_batch_transform(CONFIG)(torch.from_numpy(cached).permute(2, 0, 1).unsqueeze(0))
    assert evaluated.shape == (1, 3, 56, 56)


def test_a_large_jpeg_decodes_at_reduced_scale_never_below_the_cache_side(tmp_path: Path):
    path = photo(tmp_path / "big.jpg", 2400, 1800)
    assert load_rgb(path, draft_size=64).size == (300, 225)  # 1/8 scale, short side still >= 64
    assert load_rgb(path, draft_size=1000).size == (2400, 1800)  # not twice the target: full decode
    assert load_rgb(tmp_path / "big.jpg").size == (2400, 1800)
    drafted = decode_to_cache_form(path, GEOMETRY).astype(int)
    full = np.asarray(load_rgb(path).resize((85, 64), Image.Resampling.BILINEAR).crop((10, 0, 74, 64))).astype(int)
    assert np.abs(drafted - full).mean() < 3  # the same picture


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    folder = write_image_folder(tmp_path / "images", {"cat": 10, "dog": 10, "fox": 10}, size=40)
    manifests = stratified_split(index_of(folder, tmp_path), 0.2, 0.2, seed=0)
    write_split(tmp_path / "split", manifests, ["cat", "dog", "fox"], {})
    return tmp_path / "split"


def test_the_cache_holds_every_split_in_manifest_order_byte_stably(split_dir: Path, tmp_path: Path):
    counts = build_image_cache(tmp_path / "cache", split_dir, tmp_path, GEOMETRY)
    assert counts == {"train": 18, "val": 6, "test": 6}
    stored = np.load(tmp_path / "cache/val.npy", mmap_mode="r")  # a plain NumPy file: memory-mappable
    assert stored.shape == (6, 64, 64, 3) and stored.dtype == np.uint8
    dataset = load_split_dataset(tmp_path / "cache", split_dir, "val", CONFIG)
    for row, path in enumerate(dataset.paths):
        assert np.array_equal(stored[row], decode_to_cache_form(tmp_path / path, GEOMETRY))
    # Any order of rows reads the same pixels (random training batches).
    picked = dataset.images.read([5, 0, 3, 4])
    assert torch.equal(picked.permute(0, 2, 3, 1), torch.from_numpy(np.array(stored[[5, 0, 3, 4]])))

    first = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    build_image_cache(tmp_path / "again", split_dir, tmp_path, GEOMETRY, workers=2)  # parallel decoding
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "again").iterdir()}
    assert sorted(first) == ["meta.json", "test.npy", "train.npy", "val.npy"]


def test_a_stale_or_foreign_cache_is_refused_naming_the_stage_to_run(split_dir: Path, tmp_path: Path):
    with pytest.raises(CacheError, match="dvc repro cache"):
        load_split_dataset(tmp_path / "cache", split_dir, "val")
    build_image_cache(tmp_path / "cache", split_dir, tmp_path, GEOMETRY)
    other_size = DataConfig(224, 256, CONFIG.mean, CONFIG.std, "bilinear")
    with pytest.raises(CacheError, match="256 px"):
        load_split_dataset(tmp_path / "cache", split_dir, "val", other_size)
    (split_dir / "val.csv").write_text((split_dir / "val.csv").read_text().replace("cat/", "dog/", 1))
    with pytest.raises(CacheError, match="another val manifest"):
        load_split_dataset(tmp_path / "cache", split_dir, "val")
    truncated = tmp_path / "cache/test.npy"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(CacheError, match="truncated"):
        CachedImages(truncated)


def test_memory_holds_one_batch_whatever_the_number_of_images(tmp_path: Path):
    """Writing and reading the cache: peak allocations stay a few images / a batch, not the data set."""
    files = [photo(tmp_path / f"img/{i}.png", 80, 60, seed=i) for i in range(3)] * 40  # 120 real decodes
    image_bytes = 64 * 64 * 3
    tracemalloc.start()
    write_split_cache(tmp_path / "split.npy", files, GEOMETRY)
    _, write_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert write_peak < 10 * image_bytes < len(files) * image_bytes / 10

    images = CachedImages(tmp_path / "split.npy")
    from transfer.data.datasets import ImageDataset

    dataset = ImageDataset(images, [0] * len(files), batch_transform=eval_batch_transform(CONFIG))
    assert len(pickle.dumps(dataset)) < 2_000  # what a DataLoader worker receives: no pixels
    batch = 8
    tracemalloc.start()
    seen = 0
    for transformed, labels in DeviceLoader(dataset, torch.device("cpu"), batch_size=batch):
        seen += len(labels)
        shape = transformed.shape
    _, read_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seen == len(files) and shape[1:] == (3, 56, 56)
    assert read_peak < 3 * batch * image_bytes  # the uint8 batch being read (float crops are torch's, untraced)

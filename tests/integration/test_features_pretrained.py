"""Feature extraction with the pretrained Lite0: manifest order and batch independence, and two gloo processes
under torchrun extracting what one process extracts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import index_of
from project_helpers import PATIENCE_S

from transfer.data.cache import CachedImages, cache_geometry, write_split_cache
from transfer.data.datasets import ImageDataset
from transfer.data.transforms import eval_batch_transform
from transfer.features import activation_bytes_per_image, choose_feature_batch, extract_features
from transfer.models.backbones import load_backbone

HERE = Path(__file__).resolve().parents[1]  # tests/: the torchrun workers live with the helpers


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0", "imagenet", image_size=64)


def cached_dataset(image_folder: Path, repo_root: Path, config, count: int = 12) -> ImageDataset:
    paths = list(index_of(image_folder, repo_root)["path"])[:count]
    write_split_cache(repo_root / "cache.npy", [repo_root / p for p in paths], cache_geometry(config))
    return ImageDataset(CachedImages(repo_root / "cache.npy"), [0] * len(paths), paths, eval_batch_transform(config))


def test_features_are_in_manifest_order_and_batch_independent(image_folder: Path, tmp_path: Path, lite0):
    dataset = cached_dataset(image_folder, tmp_path, lite0.data_config)
    assert dataset.images.side == lite0.data_config.resize_size  # 28 px PNGs resized to the eval resize size
    whole = extract_features(lite0.backbone, dataset, batch_size=12, device=torch.device("cpu"))
    pieces = extract_features(lite0.backbone, dataset, batch_size=5, device=torch.device("cpu"))
    single = extract_features(lite0.backbone, dataset.subset([3]), batch_size=1, device=torch.device("cpu"))
    assert whole.shape == (12, 1280) and whole.dtype == torch.float32
    torch.testing.assert_close(whole, pieces, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whole[3:4], single, rtol=1e-4, atol=1e-5)


def test_two_gloo_processes_extract_the_features_of_one_process(image_folder: Path, tmp_path: Path, lite0):
    """features.nproc: each rank reads its shard of the cache; rank 0 gets all rows, in order."""
    dataset = cached_dataset(image_folder, tmp_path, lite0.data_config, count=11)
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(HERE / "features_worker.py"),
        str(tmp_path / "cache.npy"),
        str(out),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=PATIENCE_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    gathered = torch.load(out, weights_only=True)
    assert gathered["world_size"] == 2
    assert gathered["rows_read"] == [list(range(0, 6)), list(range(6, 11))]  # each rank read its shard only
    one = extract_features(lite0.backbone, dataset, batch_size=4, device=torch.device("cpu"))
    torch.testing.assert_close(gathered["features"], one, rtol=1e-4, atol=1e-5)


def test_activation_memory_is_measured_from_the_forward_pass_and_decides_the_batch(lite0):
    small = activation_bytes_per_image(lite0.backbone, 64)
    large = activation_bytes_per_image(lite0.backbone, 128)
    assert small > 3 * 64 * 64 * 4  # more than the float input it includes
    assert 3.5 < large / small < 4.5  # activations grow with the image's area
    budget_mb = 3 * large // 2**20 + 1  # room for three images at 128 px, not four
    assert choose_feature_batch(lite0.backbone, 128, 128, torch.device("cpu"), budget_mb) == 3
    assert choose_feature_batch(lite0.backbone, 128, 128, torch.device("cuda"), budget_mb) == 128

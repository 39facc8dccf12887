"""Feature extraction over real images and the on-disk feature cache."""

from pathlib import Path

import pytest
import torch

from conftest import index_of
from transfer.models.backbones import load_backbone
from transfer.data.datasets import ImageDataset, decode_images
from transfer.features import FeatureCache, extract_features, load_feature_cache, save_feature_cache
from transfer.data.transforms import eval_transform


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0", "imagenet", image_size=64)


def test_features_are_in_manifest_order_and_batch_independent(image_folder: Path, tmp_path: Path, lite0):
    index = index_of(image_folder, tmp_path)
    paths = list(index["path"])[:12]
    images = decode_images(paths, tmp_path)
    assert images[0].dtype == torch.uint8 and images[0].shape == (3, 28, 28)
    dataset = ImageDataset(images, [0] * len(images), eval_transform(lite0.data_config), paths)
    whole = extract_features(lite0.backbone, dataset, batch_size=12, device=torch.device("cpu"))
    pieces = extract_features(lite0.backbone, dataset, batch_size=5, device=torch.device("cpu"))
    single = extract_features(lite0.backbone, ImageDataset(images[3:4], [0], dataset.transform),
                              batch_size=1, device=torch.device("cpu"))
    assert whole.shape == (12, 1280)
    torch.testing.assert_close(whole, pieces, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whole[3:4], single, rtol=1e-4, atol=1e-5)


def test_feature_cache_round_trip(tmp_path: Path):
    cache = FeatureCache(torch.randn(5, 8), torch.tensor([0, 1, 0, 1, 1]), [f"p/{i}.png" for i in range(5)])
    save_feature_cache(tmp_path / "f" / "train.pt", cache)
    assert not list((tmp_path / "f").glob(".*tmp"))  # no temporary file left behind
    back = load_feature_cache(tmp_path / "f" / "train.pt")
    assert torch.equal(back.features, cache.features) and torch.equal(back.labels, cache.labels)
    assert back.paths == cache.paths


def test_missing_cache_names_the_stage_to_run(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="dvc repro features"):
        load_feature_cache(tmp_path / "nope.pt")

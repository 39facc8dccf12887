"""Feature extraction over the real image cache and the on-disk feature cache; data-parallel extraction."""

from pathlib import Path

import pytest
import torch

from transfer.features import (
    CPU_BATCH_LIMIT,
    FeatureCache,
    contiguous_shard,
    feature_batch_size,
    load_feature_cache,
    save_feature_cache,
)
from transfer.pipeline.distributed import DistContext


def test_contiguous_shards_cover_the_rows_in_rank_order():
    shards = [contiguous_shard(11, DistContext(rank, 3)) for rank in range(3)]
    assert [list(s) for s in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert list(contiguous_shard(2, DistContext(2, 3))) == []


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


def test_the_cpu_feature_batch_fits_the_memory_budget_and_cuda_keeps_the_configured_batch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    per_image = 10 * 2**20  # 10 MB of activations per image (EfficientNet-Lite0 at 224 px measures about 11)
    for budget in (1, 15, 100, 250, 1500, 100_000):
        for configured in (1, 7, 32, 128):
            batch = feature_batch_size(configured, cpu, per_image, budget)
            assert 1 <= batch <= min(configured, CPU_BATCH_LIMIT)
            assert batch == 1 or batch * per_image <= budget * 2**20  # one image is the floor, else it fits
            assert (batch + 1) * per_image > budget * 2**20 or batch in (configured, CPU_BATCH_LIMIT)  # the largest
            assert feature_batch_size(configured, cuda, per_image, budget) == configured
    assert feature_batch_size(128, cpu, per_image, 100) == 10
    assert feature_batch_size(128, cpu, per_image, 1500) == CPU_BATCH_LIMIT
    assert feature_batch_size(128, cuda, per_image, 1) == 128

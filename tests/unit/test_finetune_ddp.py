"""Data-parallel fine-tuning: two gloo processes under torchrun compute what one process computes."""

from __future__ import annotations

import pytest

from transfer.pipeline.distributed import SINGLE, DistContext, EpochBatchSampler


def test_each_rank_gets_its_slice_of_the_same_global_batches():
    single = list(EpochBatchSampler(10, 4, seed=3))
    ranks = [list(EpochBatchSampler(10, 4, seed=3, context=DistContext(rank, 2))) for rank in (0, 1)]
    assert len(single) == 3 and [len(b) for b in single] == [4, 4, 2]
    for batch, first, second in zip(single, *ranks):
        assert sorted(first + second) == sorted(batch) and not set(first) & set(second)
    assert len(EpochBatchSampler(9, 4, 0, DistContext(0, 2))) == 2  # a last batch of 1 for 2 ranks is dropped
    sampler = EpochBatchSampler(10, 4, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != single  # a new order every epoch
    with pytest.raises(ValueError, match="finetune.nproc"):
        EpochBatchSampler(10, 1, 0, DistContext(0, 2))
    assert not SINGLE.enabled and SINGLE.is_main

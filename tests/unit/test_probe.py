"""The linear probe on cached features: it learns, it is reproducible, it keeps its best epoch."""

import torch

from transfer.features import FeatureCache
from transfer.pipeline.params import HeadParams
from transfer.train.probe import train_linear_probe


def blobs(n_per_class: int, seed: int) -> FeatureCache:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    labels = torch.arange(3).repeat_interleave(n_per_class)
    features = centres[labels] + torch.randn(len(labels), 4, generator=generator)
    return FeatureCache(features, labels, [f"{i}.png" for i in range(len(labels))])


def test_probe_learns_separable_classes_and_records_every_epoch():
    params = HeadParams(lr=0.05, epochs=15, batch_size=16, weight_decay=0.0)
    result = train_linear_probe(blobs(40, 0), blobs(20, 1), num_classes=3, params=params, seed=0)
    assert [row["epoch"] for row in result.history] == list(range(1, 16))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    val = blobs(20, 1)
    accuracy = (result.model(val.features).argmax(1) == val.labels).float().mean().item()
    assert accuracy > 0.9
    assert accuracy == max(row["val_acc"] for row in result.history)  # the best epoch is what is kept
    assert result.history[result.best_epoch - 1]["val_acc"] == accuracy


def test_probe_is_reproducible_for_a_seed():
    params = HeadParams(lr=0.05, epochs=5, batch_size=8, weight_decay=1e-4)
    a = train_linear_probe(blobs(30, 0), blobs(10, 1), 3, params, seed=7)
    b = train_linear_probe(blobs(30, 0), blobs(10, 1), 3, params, seed=7)
    assert torch.equal(a.model.weight, b.model.weight)
    assert a.history == b.history


def test_epoch_callback_sees_each_row():
    seen = []
    train_linear_probe(
        blobs(10, 0), blobs(5, 1), 3, HeadParams(lr=0.01, epochs=3, batch_size=8), 0, on_epoch=seen.append
    )
    assert [row["epoch"] for row in seen] == [1, 2, 3] and {"train_loss", "val_acc", "lr"} <= set(seen[0])

"""Heads on cached features (head.kind): each kind fits and chooses its hyperparameter on val, the saved
file loads without pickle (and refuses anything else), linear kinds fold into a torch head exactly."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from transfer.features import FeatureCache
from transfer.models.heads import (
    FEATURE_HEADS,
    FittedHead,
    HeadFileError,
    fold_into_linear,
    head_logits,
    load_feature_head,
    save_feature_head,
)
from transfer.train.probe import GRID_PATIENCE, fit_feature_head


@pytest.fixture(scope="module")
def digits() -> tuple[FeatureCache, FeatureCache, FeatureCache]:
    features, labels = load_digits(return_X_y=True)
    features, labels = torch.tensor(features, dtype=torch.float32), torch.tensor(labels)
    parts = [slice(0, 600), slice(600, 900), slice(900, 1300)]
    return tuple(FeatureCache(features[part], labels[part], []) for part in parts)


@pytest.mark.parametrize("kind", list(FEATURE_HEADS))
def test_each_kind_chooses_on_val_and_round_trips_through_its_file(kind, digits, tmp_path):
    train, val, test = digits
    seen = []
    fitted = fit_feature_head(kind, train, val, seed=0, on_epoch=seen.append)
    spec = FEATURE_HEADS[kind]
    tried = [row[spec.hyperparameter] for row in fitted.history]
    assert tried == list(spec.grid[: len(tried)]) and seen == fitted.history
    best = max(row["val_acc"] for row in fitted.history)
    if len(tried) < len(spec.grid):  # the search stopped: the last GRID_PATIENCE values did not beat the best
        assert all(row["val_acc"] <= best for row in fitted.history[-GRID_PATIENCE:])
        assert fitted.best_epoch == len(tried) - GRID_PATIENCE
    assert fitted.history[fitted.best_epoch - 1]["val_acc"] == best
    assert fitted.chosen == spec.grid[fitted.best_epoch - 1]
    logits = head_logits(fitted.estimator, test.features.numpy(), kind)
    assert logits.shape == (400, 10) and np.isfinite(logits).all()
    assert (logits.argmax(1) == test.labels.numpy()).mean() > 0.7  # ten classes: chance is 0.1

    path = tmp_path / "head.skops"
    save_feature_head(path, fitted.estimator)
    first = path.read_bytes()
    save_feature_head(path, fitted.estimator)
    assert path.read_bytes() == first  # byte-stable
    head = FittedHead(load_feature_head(path), kind)
    assert torch.allclose(head(test.features), torch.as_tensor(logits, dtype=torch.float32))


@pytest.mark.parametrize("kind", [kind for kind, spec in FEATURE_HEADS.items() if spec.linear])
def test_linear_kinds_fold_their_standardisation_into_a_torch_head(kind, digits):
    train, val, test = digits
    fitted = fit_feature_head(kind, train, val, seed=0)
    linear = torch.nn.Linear(64, 10)
    fold_into_linear(fitted.estimator, kind, linear)
    expected = torch.as_tensor(head_logits(fitted.estimator, test.features.numpy(), kind), dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(linear(test.features), expected, atol=1e-3)


def test_a_head_file_with_code_is_refused(tmp_path):
    import skops.io

    path = tmp_path / "head.skops"
    skops.io.dump(make_pipeline(FunctionTransformer(eval)), path)  # a function that runs code
    with pytest.raises(HeadFileError, match="does not load"):
        load_feature_head(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(HeadFileError, match="not a readable"):
        load_feature_head(path)
    with pytest.raises(HeadFileError, match="not found"):
        load_feature_head(tmp_path / "missing.skops")


def test_train_scores_use_a_fixed_sample_of_large_training_sets(digits, monkeypatch):
    from transfer.train import probe

    train, val, _ = digits
    monkeypatch.setattr(probe, "TRAIN_SCORE_ROWS", 100)
    sample = probe._score_sample(train, seed=0)
    assert len(sample.labels) == 100 and torch.equal(probe._score_sample(train, seed=0).features, sample.features)
    rows = {tuple(row.tolist()) for row in train.features}
    assert all(tuple(row.tolist()) in rows for row in sample.features)
    # The history's train accuracy is the train-only fit's on those rows.
    fitted = fit_feature_head("bayes", train, val, seed=0)
    spec = FEATURE_HEADS["bayes"]
    train_only = spec.build(spec.grid[0], 0).fit(train.features.numpy(), train.labels.numpy())
    expected = (train_only.predict(sample.features.numpy()) == sample.labels.numpy()).mean()
    assert fitted.history[0]["train_acc"] == pytest.approx(expected)

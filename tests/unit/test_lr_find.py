"""`transfer lr-find`: the sweep, its suggestion, the plot and the MLflow run, on real training steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tune_helpers import blobs

from transfer.pipeline.params import HeadParams
from transfer.train.lr_find import exponential_lrs, probe_step, smooth, suggest, sweep
from transfer.train.probe import train_linear_probe


def test_smoothing_is_bias_corrected_and_the_suggestion_is_the_steepest_descent_before_the_minimum():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no pull toward 0 at the start
    lrs = exponential_lrs(1e-6, 10.0, 120)
    # A loss that falls fastest at lr = 1e-3 (log-logistic), bottoms out near 0.3 and explodes past it.
    loss = [2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + max(0.0, math.log10(lr) + 0.5) ** 2 for lr in lrs]
    steepest, lowest = suggest(lrs, loss)
    assert steepest == pytest.approx(1e-3, rel=0.3)
    assert lowest == lrs[int(np.argmin(loss))]
    assert suggest(lrs[:5], loss[:5]) == (None, None)  # too short a sweep to say anything


def test_probe_sweep_stops_once_the_loss_diverges_and_its_suggestion_trains_well():
    train, val = blobs(40, seed=0), blobs(20, seed=1)
    step = probe_step(train, num_classes=3, batch_size=16, weight_decay=0.0, seed=0)
    result = sweep(step, exponential_lrs(1e-5, 1e3, 200), progress=False)
    assert result.diverged and len(result.lrs) < 200 and len(result.losses) == len(result.smoothed)
    assert 1e-4 < result.suggested_lr < result.min_loss_lr < 1e3
    probe = train_linear_probe(train, val, 3, HeadParams(lr=result.suggested_lr, epochs=10, batch_size=16), seed=0)
    assert max(row["val_acc"] for row in probe.history) > 0.8

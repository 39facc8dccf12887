"""Heads on cached backbone features: the linear probe (AdamW), and the scikit-learn heads of head.kind."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from transfer.evaluate.metrics import macro_f1_from_confusion
from transfer.features import FeatureCache
from transfer.models.heads import FEATURE_HEADS, head_logits
from transfer.pipeline.params import HeadParams
from transfer.pipeline.runtime import seed_everything, single_threaded
from transfer.train.losses import class_weights, classification_loss, improves
from transfer.train.result import EpochCallback, TrainResult


def _loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def _split_scores(logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    """Plain (unweighted) cross-entropy, accuracy and macro-F1 of a split."""
    num_classes = logits.shape[1]
    confusion = torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
    return {
        f"{prefix}_loss": F.cross_entropy(logits, labels).item(),
        f"{prefix}_acc": (logits.argmax(1) == labels).float().mean().item(),
        f"{prefix}_macro_f1": macro_f1_from_confusion(confusion.reshape(num_classes, num_classes).numpy()),
    }


# --- Linear probe --------------------------------------------------------------------------------


@single_threaded()  # [batch, ~1000] x [~1000, classes] matmuls: threads cost more than they give
def train_linear_probe(
    train: FeatureCache,
    val: FeatureCache,
    num_classes: int,
    params: HeadParams,
    seed: int,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Fit a linear classifier on cached features with AdamW; keep the best epoch by `params.monitor`.

    `params.class_balance: loss` weights each sample by the inverse frequency of its class.
    """
    seed_everything(seed)
    head = nn.Linear(train.features.shape[1], num_classes)
    initial_state = copy.deepcopy(head.state_dict())
    optimizer = torch.optim.AdamW(head.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
    loader = DataLoader(
        TensorDataset(train.features, train.labels),
        batch_size=params.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    loss_fn = classification_loss(
        weights=class_weights(train.labels, num_classes) if params.class_balance == "loss" else None
    )
    result, best_value, best_state = TrainResult(head, initial_state=initial_state), None, None
    for epoch in range(1, params.epochs + 1):
        head.train()
        lr = optimizer.param_groups[0]["lr"]
        for features, labels in loader:
            loss = loss_fn(head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        head.eval()
        with torch.no_grad():
            row = dict(
                epoch=epoch,
                phase="probe",
                lr=lr,
                **_split_scores(head(train.features), train.labels, "train"),
                **_split_scores(head(val.features), val.labels, "val"),
            )
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
        if improves(params.monitor, row[params.monitor], best_value):
            best_value, best_state, result.best_epoch = row[params.monitor], copy.deepcopy(head.state_dict()), epoch
    head.load_state_dict(best_state)
    return result


# --- scikit-learn heads (head.kind other than linear) -------------------------------------------------


@dataclass
class FittedFeatureHead:
    estimator: Any  # the sklearn Pipeline, refitted on train + val with the chosen value
    kind: str
    chosen: Any  # the hyperparameter value chosen on val
    history: list[dict] = field(default_factory=list)  # one row per value tried ("epoch" = its position)
    best_epoch: int = 0
    fit_seconds: float = 0.0
    # The chosen train-only fit's logits on val (held out, unlike the refit's): what calibration is fitted on.
    val_logits: np.ndarray | None = None


# The search over a head's grid stops once val accuracy has failed to beat the best value this many times in a
# row. The grids run from strong to weak regularisation (C) or from few to many neighbours (k), val accuracy is
# unimodal along them in practice, and the weakly regularised fits are the slow ones (a linear SVM at C = 1 on
# 54k x 1280 features did not finish in hours; at C = 1e-4 it takes a minute).
GRID_PATIENCE = 2
# The train loss and accuracy of each fit on the grid are measured on at most this many training rows (a fixed
# sample): they are a diagnostic (the train-val gap), and predicting every training row would cost knn a full
# pairwise-distance pass per k (54k x 54k on Fashion-MNIST) and the forest a pass of every tree.
TRAIN_SCORE_ROWS = 5000


def _scores(estimator, kind: str, cache: FeatureCache) -> tuple[float, float]:
    logits = torch.as_tensor(head_logits(estimator, cache.features.numpy(), kind), dtype=torch.float32)
    return _loss_and_accuracy(logits, cache.labels)


def _score_sample(train: FeatureCache, seed: int) -> FeatureCache:
    """At most TRAIN_SCORE_ROWS training rows, drawn once (the same rows for every value of the grid)."""
    if len(train.labels) <= TRAIN_SCORE_ROWS:
        return train
    rows = np.random.default_rng(seed).choice(len(train.labels), TRAIN_SCORE_ROWS, replace=False)
    index = torch.from_numpy(np.sort(rows))
    return FeatureCache(train.features[index], train.labels[index], [])


@single_threaded()  # BLAS threads spin-wait for each other on a busy 2-core machine (a fit took 10x longer)
def fit_feature_head(
    kind: str, train: FeatureCache, val: FeatureCache, seed: int, on_epoch: EpochCallback | None = None
) -> FittedFeatureHead:
    """Fit head.kind on cached features: the values of its grid on train, the best on val, refitted on train + val.

    The grid is searched in order until val accuracy has not improved GRID_PATIENCE times in a row. The
    history's train/val numbers are those of the train-only fits (val is held out for them; train on a sample
    of at most TRAIN_SCORE_ROWS rows); the returned estimator is the refit, as in Kornblith et al. 2019's protocol.
    """
    spec = FEATURE_HEADS[kind]
    started = time.perf_counter()
    estimator = spec.build(spec.grid[0], seed)
    x_train, y_train = train.features.numpy(), train.labels.numpy()
    train_sample = _score_sample(train, seed)
    result, best_acc, best_value, misses = FittedFeatureHead(None, kind, None), -1.0, None, 0
    for position, value in enumerate(tqdm(spec.grid, desc=f"{kind} on val", unit="fit", leave=False), start=1):
        estimator = _refitted(spec, estimator, value, seed, x_train, y_train)
        train_loss, train_acc = _scores(estimator, kind, train_sample)
        val_loss, val_acc = _scores(estimator, kind, val)
        row = dict(
            epoch=position,
            phase=kind,
            **{spec.hyperparameter: value},
            train_loss=train_loss,
            train_acc=train_acc,
            val_loss=val_loss,
            val_acc=val_acc,
        )
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
        if val_acc > best_acc:
            best_acc, best_value, result.best_epoch, misses = val_acc, value, position, 0
            best_estimator = copy.deepcopy(estimator)
        else:
            misses += 1
            if misses == GRID_PATIENCE:
                break
    x_all = np.concatenate([x_train, val.features.numpy()])
    y_all = np.concatenate([y_train, val.labels.numpy()])
    result.val_logits = head_logits(best_estimator, val.features.numpy(), kind)
    result.estimator = _refitted(spec, best_estimator, best_value, seed, x_all, y_all)
    result.chosen, result.fit_seconds = best_value, time.perf_counter() - started
    return result


def _refitted(spec, estimator, value, seed: int, features: np.ndarray, labels: np.ndarray):
    """Fit `estimator` with the hyperparameter at `value` (the same object: warm starts carry over)."""
    if len(spec.grid) > 1:
        step = estimator.steps[-1][0]
        key = {"C": "C", "k": "n_neighbors"}[spec.hyperparameter]
        estimator.set_params(**{f"{step}__{key}": value})
    with warnings.catch_warnings():
        # An unconverged weakly-regularised fit is still scored on val; it is rarely the one chosen.
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        return estimator.fit(features, labels)

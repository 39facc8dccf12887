"""The train stage's recipe as in-process functions, for commands that train many times (tune, lr-find).

`train_and_score` trains what the train stage would train for the same params (the same data, seeds and
calls: `train_linear_probe`, then `fine_tune` for an integer `freeze_layers`) and scores the kept model on
the validation split, writing nothing. Only the train and val splits are ever read: the test split stays
for the evaluate stage. The cached features, the decoded images and the pretrained backbone are loaded
once (`TrainingInputs`); every call starts from a fresh copy of the backbone.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from transfer.data.datasets import ImageDataset, load_split_dataset
from transfer.data.split import read_classes
from transfer.data.transforms import eval_batch_transform, train_transforms
from transfer.evaluate.metrics import classification_metrics, predict_logits
from transfer.features import FeatureCache, load_feature_cache
from transfer.models.backbones import Classifier, LoadedBackbone, load_backbones
from transfer.models.groups import relative_weight_change
from transfer.models.heads import (
    FEATURE_HEADS,
    FINETUNE_INIT_KINDS,
    LINEAR_PROBE,
    fold_into_linear,
    imagenet_overlap_head,
    xavier_head,
)
from transfer.pipeline.files import read_json
from transfer.pipeline.layout import CACHE_DIR, FEATURES_DIR, SPLIT_DIR
from transfer.pipeline.params import Params, backbone_list, backbone_specs
from transfer.pipeline.runtime import resolve_device
from transfer.train.finetune import fine_tune
from transfer.train.probe import FittedFeatureHead, fit_feature_head, train_linear_probe
from transfer.train.result import EpochCallback

logger = logging.getLogger(__name__)

# Validation metrics a trial can be scored on (tune.metric); the history rows carry val_acc and val_loss.
METRICS = ("val_acc", "val_macro_f1", "val_loss")

# (value of the fine-tuning epoch, fine-tuning epoch index from 1): tune reports it to Optuna's pruner.
ScoreCallback = Callable[[float, int], None]


@dataclass
class TrainingInputs:
    """What every training run reads, loaded once: classes, train/val features, the data hash."""

    root: Path
    classes: list[str]
    train_features: FeatureCache
    val_features: FeatureCache
    data_hash: str
    _backbones: dict = field(default_factory=dict, repr=False)
    _images: dict = field(default_factory=dict, repr=False)

    def backbone(self, params: Params) -> LoadedBackbone:
        """A fresh copy of params' pretrained backbone(s) (training changes the copy, never the loaded original)."""
        specs, layers = backbone_specs(params.backbone), params.features.layers
        key = json.dumps([specs, layers], default=str)
        if key not in self._backbones:
            self._backbones[key] = load_backbones(specs, layers)
        return copy.deepcopy(self._backbones[key])

    def images(self, split: str, config, batch_transform, sample_transform=None) -> ImageDataset:
        """The split's images from the image cache (opened once) with these transforms (see data.transforms)."""
        if split not in self._images:
            self._images[split] = load_split_dataset(self.root / CACHE_DIR, self.root / SPLIT_DIR, split, config)
        cached = self._images[split]
        return ImageDataset(cached.images, cached.labels, cached.paths, batch_transform, sample_transform)


def load_training_inputs(root: Path | None = None) -> TrainingInputs:
    """The split's classes and the cached train/val features under `root` (the pipeline must have run to features)."""
    root = Path.cwd() if root is None else root
    return TrainingInputs(
        root=root,
        classes=read_classes(root / SPLIT_DIR),
        train_features=load_feature_cache(root / FEATURES_DIR / "train.pt"),
        val_features=load_feature_cache(root / FEATURES_DIR / "val.pt"),
        data_hash=read_json(root / SPLIT_DIR / "summary.json")["data_hash"],
    )


@dataclass
class TrialOutcome:
    """A trained candidate: its validation score, the epochs it ran and the epoch training kept."""

    value: float
    history: list[dict]
    best_epoch: int


def _score_row(
    row: dict, metric: str, predict: Callable[[], tuple[np.ndarray, np.ndarray]], classes: list[str]
) -> float:
    if metric in row:
        return float(row[metric])
    y_true, y_pred = predict()  # val_macro_f1: not in the history rows, computed from predictions
    return classification_metrics(y_true, y_pred, classes)["macro_f1"]


def pretrained(params: Params) -> bool:
    """Whether the (first) backbone starts from pretrained weights: decides finetune.batchnorm auto."""
    return backbone_list(params.backbone)[0].weights != "none"


def initial_model(
    params: Params, inputs: TrainingInputs, loaded: LoadedBackbone, on_epoch: EpochCallback | None = None
) -> tuple[Classifier, list[dict], int]:
    """The model fine-tuning starts from, as the train stage builds it: (model, head history, head best epoch).

    finetune.head_init probe fits head.kind on the cached features first (linear or logreg; other kinds
    start from a linear probe, as in the train stage).
    """
    model = Classifier(loaded.backbone, len(inputs.classes))
    if params.freeze_layers == "all" or params.finetune.head_init == "probe":
        kind = params.head.kind
        if kind != LINEAR_PROBE and kind in FINETUNE_INIT_KINDS:
            fitted = fit_feature_head(kind, inputs.train_features, inputs.val_features, params.seed, on_epoch=on_epoch)
            fold_into_linear(fitted.estimator, kind, model.head)
            return model, fitted.history, fitted.best_epoch
        probe = train_linear_probe(
            inputs.train_features, inputs.val_features, len(inputs.classes), params.head, params.seed, on_epoch=on_epoch
        )
        model.head.load_state_dict(probe.model.state_dict())
        return model, probe.history, probe.best_epoch
    if params.finetune.head_init == "xavier":
        xavier_head(model.head, params.seed)
    else:
        imagenet_overlap_head(model.head, inputs.classes, loaded.imagenet_classifier, params.seed)
    return model, [], 0


def probe_head(
    model: Classifier, params: Params, classes: list[str], log, fine_tuning: bool
) -> tuple[list[dict], int, dict, FittedFeatureHead | None]:
    """The head.kind head on cached features; a linear one becomes model.head. Returns (history, best epoch,
    the head's state before fitting, the fitted scikit-learn head when it is the model's head)."""
    train_features = load_feature_cache(FEATURES_DIR / "train.pt")
    val_features = load_feature_cache(FEATURES_DIR / "val.pt")
    kind = params.head.kind
    if kind != LINEAR_PROBE and (not fine_tuning or kind in FINETUNE_INIT_KINDS):
        fitted = fit_feature_head(kind, train_features, val_features, params.seed, on_epoch=log)
        if FEATURE_HEADS[kind].linear:
            fold_into_linear(fitted.estimator, kind, model.head)  # the torch head gives the same logits
        best = fitted.history[fitted.best_epoch - 1]
        print(
            f"train: head {kind}, {FEATURE_HEADS[kind].hyperparameter}={fitted.chosen} chosen on val (val accuracy "
            f"{best['val_acc']:.4f}), refitted on train + val in {fitted.fit_seconds:.1f} s"
            + ("; fine-tuning starts from its weights" if fine_tuning else "")
        )
        return fitted.history, fitted.best_epoch, {}, None if fine_tuning else fitted
    if kind != LINEAR_PROBE:
        print(
            f"train: head.kind {kind} cannot start fine-tuning (only {' or '.join(FINETUNE_INIT_KINDS)} can): "
            f"the head starts from a linear probe (head.kind: linear) instead"
        )
    probe = train_linear_probe(train_features, val_features, len(classes), params.head, params.seed, on_epoch=log)
    model.head.load_state_dict(probe.model.state_dict())
    best = probe.history[probe.best_epoch - 1]
    print(
        f"train: linear probe, best {params.head.monitor} {best[params.head.monitor]:.4f} at epoch {probe.best_epoch} "
        f"(val accuracy {best['val_acc']:.4f}, macro-F1 {best['val_macro_f1']:.4f})"
    )
    return probe.history, probe.best_epoch, {f"head.{k}": v for k, v in probe.initial_state.items()}, None


def init_head(model: Classifier, params: Params, classes: list[str], loaded: LoadedBackbone) -> None:
    """finetune.head_init xavier or imagenet (probe is `probe_head`)."""
    if params.finetune.head_init == "xavier":
        xavier_head(model.head, params.seed)
    else:
        matches = imagenet_overlap_head(model.head, classes, loaded.imagenet_classifier, params.seed)
        print(f"train: head rows from the ImageNet classifier for {len(matches)} class(es): {matches}")


def layer_movement(initial_state: dict, model: Classifier) -> dict[str, float | None]:
    """||w - w0|| / ||w0|| per layer group (null where undefined: JSON has no NaN)."""
    change = relative_weight_change(initial_state, model)
    return {group: (None if math.isnan(value) else value) for group, value in change.items()}


def train_and_score(
    params: Params,
    inputs: TrainingInputs,
    metric: str,
    on_epoch: EpochCallback | None = None,
    on_score: ScoreCallback | None = None,
) -> TrialOutcome:
    """Train `params` as the train stage would and return the val `metric` of the model it keeps.

    `on_epoch` receives every history row (probe, then fine-tuning); `on_score` each fine-tuning epoch's
    val metric, and may raise (optuna.TrialPruned) to stop training there.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    val = inputs.val_features
    if params.freeze_layers == "all" and params.head.kind != LINEAR_PROBE:
        # scikit-learn heads choose their own hyperparameter on val: the score is that of the chosen fit
        # (held out), not of the refit on train + val the train stage keeps.
        fitted = fit_feature_head(params.head.kind, inputs.train_features, val, params.seed, on_epoch=on_epoch)
        best = fitted.history[fitted.best_epoch - 1]
        if metric not in best:
            raise ValueError(
                f"tune.metric {metric} is not available for head.kind {params.head.kind}: use val_acc or val_loss"
            )
        return TrialOutcome(float(best[metric]), fitted.history, fitted.best_epoch)
    if params.freeze_layers == "all":
        probe = train_linear_probe(
            inputs.train_features, val, len(inputs.classes), params.head, params.seed, on_epoch=on_epoch
        )
        best = probe.history[probe.best_epoch - 1]
        with torch.no_grad():
            predictions = probe.model(val.features).argmax(1).numpy()
        value = _score_row(best, metric, lambda: (val.labels.numpy(), predictions), inputs.classes)
        return TrialOutcome(value, probe.history, probe.best_epoch)

    if params.finetune.nproc > 1:
        logger.warning("finetune.nproc=%d: in-process training runs one process", params.finetune.nproc)
    device = resolve_device(params.device)
    loaded = inputs.backbone(params)
    model, history, _ = initial_model(params, inputs, loaded, on_epoch)
    finetune = params.finetune
    config = loaded.data_config
    sample_transform, batch_transform = train_transforms(
        config, finetune.augment, finetune.crop_min_scale, finetune.hflip
    )
    train_data = inputs.images("train", config, batch_transform, sample_transform)
    val_data = inputs.images("val", config, eval_batch_transform(config))
    first_epoch = len(history) + 2  # as the train stage: the start model is the row after the probe's
    values: dict[int, float] = {}

    def predict() -> tuple[np.ndarray, np.ndarray]:
        logits = predict_logits(model, val_data, 2 * finetune.batch_size, device)
        return np.asarray(val_data.labels), logits.argmax(1).numpy()

    def score_epoch(row: dict) -> None:
        if on_epoch:
            on_epoch(row)
        value = _score_row(row, metric, predict, inputs.classes)
        values[row["epoch"]] = value
        if on_score and not math.isnan(value):
            on_score(value, row["epoch"] - first_epoch + 1)

    result = fine_tune(
        model,
        params.freeze_layers,
        train_data,
        val_data,
        finetune,
        params.seed,
        device,
        first_epoch=first_epoch,
        on_epoch=score_epoch,
        pretrained=pretrained(params),
    )
    return TrialOutcome(values[result.best_epoch], history + result.history, result.best_epoch)

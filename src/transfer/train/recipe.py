"""The train stage's recipe, in one function: `train_model`.

What the train stage trains, and what the tuner's trials and the LR finder start from: the head.kind head
on the cached features (`train_head`), the model fine-tuning starts from (`initial_model`: that head, or a
xavier / ImageNet-overlap head), then, for an integer `freeze_layers`, `fine_tune` with the first k groups
frozen, whose selection never returns a model worse on val than the one it started from. The result
carries the history, the epoch kept, which model won (`selection`) and how far each layer group moved
(`movement`). Nothing here writes a file or logs to MLflow: the caller passes `on_epoch` (each history row)
and `report` (each line for the user), and writes the outputs.

`train_and_score` is the tuner's trial: `train_model` for the same params, scored on the validation split.
Only the train and val splits are ever read: the test split stays for the evaluate stage. The cached
features, the decoded images and the pretrained backbone are loaded once (`TrainingInputs`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from transfer.data.config import DataConfig
from transfer.data.datasets import ImageDataset, load_split_dataset
from transfer.data.split import read_classes
from transfer.data.transforms import eval_batch_transform, train_transforms
from transfer.evaluate.calibration import fit_temperature
from transfer.evaluate.metrics import classification_metrics, predict_logits
from transfer.features import FeatureCache, load_feature_cache
from transfer.models.backbones import Classifier, LoadedBackbone, load_backbones
from transfer.models.groups import check_freeze_layers, relative_weight_change
from transfer.models.heads import (
    FEATURE_HEADS,
    FINETUNE_INIT_KINDS,
    LINEAR_PROBE,
    fold_into_linear,
    imagenet_overlap_head,
    xavier_head,
)
from transfer.models.saved import save_model
from transfer.pipeline.distributed import SINGLE, DistContext
from transfer.pipeline.files import read_json
from transfer.pipeline.layout import CACHE_DIR, FEATURES_DIR, SPLIT_DIR
from transfer.pipeline.params import FinetuneParams, HeadParams, Params, backbone_list, backbone_specs
from transfer.pipeline.runtime import resolve_device
from transfer.train.checkpoint import Checkpointer, cpu_state_dict
from transfer.train.finetune import fine_tune
from transfer.train.probe import FittedFeatureHead, fit_feature_head, train_linear_probe
from transfer.train.result import SELECTION_METRICS, EpochCallback, model_selection, selection_message

logger = logging.getLogger(__name__)

# Validation metrics a trial can be scored on (tune.metric); the history rows carry val_acc and val_loss.
METRICS = ("val_acc", "val_macro_f1", "val_loss")

# (value of the fine-tuning epoch, fine-tuning epoch index from 1): tune reports it to Optuna's pruner.
ScoreCallback = Callable[[float, int], None]
Report = Callable[[str], None]  # one line for the user (the stage prints them; the tuner's trials stay quiet)


def _quiet(message: str) -> None:
    logger.debug(message)


@dataclass
class TrainingInputs:
    """What every training run reads, loaded once: classes, train/val features, the data hash."""

    root: Path
    classes: list[str]
    train_features: FeatureCache
    val_features: FeatureCache
    data_hash: str
    _backbones: dict = field(default_factory=dict, repr=False)
    split_images: dict[str, ImageDataset] = field(default_factory=dict, repr=False)  # decoded once, on first use

    def backbone(self, params: Params) -> LoadedBackbone:
        """A fresh copy of params' pretrained backbone(s) (training changes the copy, never the loaded original)."""
        specs, layers = backbone_specs(params.backbone), params.features.layers
        key = json.dumps([specs, layers], default=str)
        if key not in self._backbones:
            self._backbones[key] = load_backbones(specs, layers)
        return copy.deepcopy(self._backbones[key])

    def images(self, split: str, config, batch_transform, sample_transform=None) -> ImageDataset:
        """The split's images from the image cache (opened once) with these transforms (see data.transforms)."""
        if split not in self.split_images:
            self.split_images[split] = load_split_dataset(self.root / CACHE_DIR, self.root / SPLIT_DIR, split, config)
        cached = self.split_images[split]
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


def pretrained(params: Params) -> bool:
    """Whether the (first) backbone starts from pretrained weights: decides finetune.batchnorm auto."""
    return backbone_list(params.backbone)[0].weights != "none"


def recipe_values(params: Params) -> dict[str, Any]:
    """`train_model`'s keyword arguments from params: the values the recipe uses, read in this one place.

    `freeze_layers` is None for a head-only run (params' freeze_layers: all).
    """
    return dict(
        head=params.head,
        finetune=params.finetune,
        freeze_layers=params.freeze_layers if params.fine_tuning else None,
        seed=params.seed,
        pretrained=pretrained(params),
    )


# --- The head on cached features ----------------------------------------------------------------------


@dataclass
class HeadFit:
    """The head fitted on cached features: its history and best epoch, and what it leaves in the torch head."""

    history: list[dict]
    best_epoch: int
    initial_state: dict[str, torch.Tensor]  # a linear probe's weights before fitting (layer movement); else {}
    feature_head: FittedFeatureHead | None  # the scikit-learn head, when it is the model's head (head only)
    probe: nn.Linear | None = None  # the fitted linear probe (head.kind linear, or its stand-in)


def train_head(
    inputs: TrainingInputs,
    head: HeadParams,
    seed: int,
    fine_tuning: bool,
    into: nn.Linear | None = None,
    on_epoch: EpochCallback | None = None,
    report: Report = _quiet,
) -> HeadFit:
    """The head.kind head on the cached features; a linear one's weights are loaded `into` the torch head.

    Before fine-tuning only the linear kinds (FINETUNE_INIT_KINDS) can start it: another kind is replaced by
    a linear probe, and the scikit-learn head is not kept.
    """
    kind = head.kind
    if kind != LINEAR_PROBE and (not fine_tuning or kind in FINETUNE_INIT_KINDS):
        fitted = fit_feature_head(kind, inputs.train_features, inputs.val_features, seed, on_epoch=on_epoch)
        if FEATURE_HEADS[kind].linear and into is not None:
            fold_into_linear(fitted.estimator, kind, into)  # the torch head gives the same logits
        best = fitted.history[fitted.best_epoch - 1]
        report(
            f"train: head {kind}, {FEATURE_HEADS[kind].hyperparameter}={fitted.chosen} chosen on val (val accuracy "
            f"{best['val_acc']:.4f}), refitted on train + val in {fitted.fit_seconds:.1f} s"
            + ("; fine-tuning starts from its weights" if fine_tuning else "")
        )
        return HeadFit(fitted.history, fitted.best_epoch, {}, None if fine_tuning else fitted)
    if kind != LINEAR_PROBE:
        report(
            f"train: head.kind {kind} cannot start fine-tuning (only {' or '.join(FINETUNE_INIT_KINDS)} can): "
            f"the head starts from a linear probe (head.kind: linear) instead"
        )
    probe = train_linear_probe(
        inputs.train_features, inputs.val_features, len(inputs.classes), head, seed, on_epoch=on_epoch
    )
    if into is not None:
        into.load_state_dict(probe.model.state_dict())
    best = probe.history[probe.best_epoch - 1]
    report(
        f"train: linear probe, best {head.monitor} {best[head.monitor]:.4f} at epoch {probe.best_epoch} "
        f"(val accuracy {best['val_acc']:.4f}, macro-F1 {best['val_macro_f1']:.4f})"
    )
    initial = {f"head.{k}": v for k, v in probe.initial_state.items()}
    return HeadFit(probe.history, probe.best_epoch, initial, None, probe.model)


def init_head(
    model: Classifier, head_init: str, classes: list[str], loaded: LoadedBackbone, seed: int, report: Report = _quiet
) -> None:
    """finetune.head_init xavier or imagenet (probe is `train_head`)."""
    if head_init == "xavier":
        xavier_head(model.head, seed)
    else:
        matches = imagenet_overlap_head(model.head, classes, loaded.imagenet_classifier, seed)
        report(f"train: head rows from the ImageNet classifier for {len(matches)} class(es): {matches}")


def layer_movement(initial_state: dict, model: Classifier) -> dict[str, float | None]:
    """||w - w0|| / ||w0|| per layer group (null where undefined: JSON has no NaN)."""
    change = relative_weight_change(initial_state, model)
    return {group: (None if math.isnan(value) else value) for group, value in change.items()}


# --- The model and the recipe ---------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """A model, the history that made it and the epoch kept; `initial_state` is what its movement is measured
    from (the pretrained backbone, and the probe's head before fitting)."""

    model: Classifier
    classes: list[str]
    data_config: DataConfig  # the backbone's preprocessing, saved with the model
    history: list[dict]
    best_epoch: int
    initial_state: dict[str, torch.Tensor]
    monitor: str  # the val metric the epoch was kept by
    feature_head: FittedFeatureHead | None = None  # the scikit-learn head, when it is the model's head
    fine_tuned: bool = False

    def selection(self) -> dict:
        """reports/train.json: the epoch kept, its val scores, which model won (transfer.train.result)."""
        return model_selection(self.history, self.best_epoch, self.monitor)

    def selection_metrics(self) -> dict[str, float]:
        """The numbers of `selection` the run records (SELECTION_METRICS)."""
        return {key: value for key, value in self.selection().items() if key in SELECTION_METRICS}

    def movement(self) -> dict[str, float | None]:
        """reports/layer_movement.json: each layer group's relative weight change."""
        return layer_movement(self.initial_state, self.model)


def initial_model(
    inputs: TrainingInputs,
    loaded: LoadedBackbone,
    head: HeadParams,
    head_init: str,
    seed: int,
    fine_tuning: bool,
    on_epoch: EpochCallback | None = None,
    report: Report = _quiet,
) -> TrainedModel:
    """The model fine-tuning starts from (or, head only, the trained model): the backbone with its head.

    finetune.head_init probe (always, head only) fits head.kind on the cached features; xavier and imagenet
    initialise the head without training (an empty history).
    """
    model = Classifier(loaded.backbone, len(inputs.classes))
    if fine_tuning and head_init != "probe":
        init_head(model, head_init, inputs.classes, loaded, seed, report)
        return TrainedModel(model, inputs.classes, loaded.data_config, [], 0, cpu_state_dict(model), head.monitor)
    fit = train_head(inputs, head, seed, fine_tuning, into=model.head, on_epoch=on_epoch, report=report)
    # What moved: from the pretrained backbone (and the head before it was fitted, for a probe; a
    # scikit-learn head has no initial weights, so it is left out).
    initial_state = cpu_state_dict(model) if fine_tuning else {**cpu_state_dict(model), **fit.initial_state}
    if fit.feature_head is not None:
        initial_state = {k: v for k, v in initial_state.items() if not k.startswith("head.")}
    return TrainedModel(
        model,
        inputs.classes,
        loaded.data_config,
        fit.history,
        fit.best_epoch,
        initial_state,
        head.monitor,
        fit.feature_head,
    )


def train_model(
    inputs: TrainingInputs,
    loaded: LoadedBackbone,
    head: HeadParams,
    finetune: FinetuneParams,
    freeze_layers: int | None,
    seed: int,
    pretrained: bool,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
    checkpointer: Checkpointer | None = None,
    resumed: dict | None = None,
    context: DistContext = SINGLE,
    report: Report = _quiet,
) -> TrainedModel:
    """What the train stage trains: the head on cached features, then, for an integer `freeze_layers` (None:
    head only), fine-tuning with the first `freeze_layers` groups frozen, from the model `initial_model` builds.

    With a `checkpointer`, fine-tuning checkpoints every epoch (with the head's history in its `extra`);
    `resumed` is the checkpoint (`checkpointer.load_last()`) a killed run continues from: the head is not
    trained again. `on_epoch` receives every history row; under torchrun every rank calls this, and only
    rank 0 should log. `report` receives the lines that say what was trained and which model was kept.
    """
    fine_tuning = freeze_layers is not None
    if fine_tuning:
        check_freeze_layers(loaded.backbone, freeze_layers)  # before any training: a bad k lists the groups
    if resumed is not None:
        extra = resumed["extra"]
        model = Classifier(loaded.backbone, len(inputs.classes))
        history, best_epoch = extra["probe_history"], extra["probe_best_epoch"]
        start = TrainedModel(model, inputs.classes, loaded.data_config, history, best_epoch, {}, finetune.monitor)
        # Without initial.pt (deleted by hand), movement is measured from the pretrained backbone.
        start.initial_state = checkpointer.load_initial() or cpu_state_dict(start.model)
    else:
        start = initial_model(
            inputs, loaded, head, finetune.head_init, seed, fine_tuning, on_epoch=on_epoch, report=report
        )
    if not fine_tuning:
        return start

    history, best_epoch, model = start.history, start.best_epoch, start.model
    if checkpointer is not None:
        if resumed is None:
            checkpointer.save_initial(start.initial_state)
        checkpointer.extra.update(probe_history=history, probe_best_epoch=best_epoch)
    config = loaded.data_config
    sample_transform, batch_transform = train_transforms(
        config, finetune.augment, finetune.crop_min_scale, finetune.hflip
    )
    train_data = inputs.images("train", config, batch_transform, sample_transform)
    val_data = inputs.images("val", config, eval_batch_transform(config))
    # The start model (epoch len(history) + 1) is the probe's best epoch: the same train scores.
    start_train = (
        {key: value for key, value in history[best_epoch - 1].items() if key.startswith("train_")} if history else None
    )
    result = fine_tune(
        model,
        freeze_layers,
        train_data,
        val_data,
        finetune,
        seed,
        device,
        first_epoch=len(history) + 2,
        on_epoch=on_epoch,
        checkpointer=checkpointer,
        context=context,
        pretrained=pretrained,
        start_train=start_train,
    )
    if context.is_main:
        start_name = "the linear probe" if finetune.head_init == "probe" else "the initial model"
        report(selection_message(result.history, finetune.monitor, result.kept_start, start_name))
    return TrainedModel(
        model,
        inputs.classes,
        loaded.data_config,
        history + result.history,
        result.best_epoch,
        start.initial_state,
        finetune.monitor,
        fine_tuned=True,
    )


# --- The tuner's trial ------------------------------------------------------------------------------------


@dataclass
class TrialOutcome:
    """A trained candidate: its validation score, the epochs it ran and the epoch training kept."""

    value: float
    history: list[dict]
    best_epoch: int


def train_and_score(
    params: Params,
    inputs: TrainingInputs,
    metric: str,
    on_epoch: EpochCallback | None = None,
    on_score: ScoreCallback | None = None,
) -> TrialOutcome:
    """Train `params` as the train stage would (`train_head`, or `train_model` when fine-tuning) and return the
    val `metric` of the model it keeps, writing nothing.

    `on_epoch` receives every history row (head, then fine-tuning); `on_score` each fine-tuning epoch's val
    metric (the start model's as step 0), and may raise (optuna.TrialPruned) to stop training there.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    if not params.fine_tuning:
        # Head only: no backbone is needed, the head trains on the cached features.
        fit = train_head(inputs, params.head, params.seed, fine_tuning=False, on_epoch=on_epoch)
        best = fit.history[fit.best_epoch - 1]
        if fit.feature_head is not None:
            # scikit-learn heads choose their own hyperparameter on val: the score is that of the chosen fit
            # (held out), not of the refit on train + val the train stage keeps.
            if metric not in best:
                raise ValueError(
                    f"tune.metric {metric} is not available for head.kind {params.head.kind}: use val_acc or val_loss"
                )
            return TrialOutcome(float(best[metric]), fit.history, fit.best_epoch)
        val = inputs.val_features
        with torch.no_grad():
            predictions = fit.probe(val.features).argmax(1).numpy()
        value = _score_row(best, metric, lambda: (val.labels.numpy(), predictions), inputs.classes)
        return TrialOutcome(value, fit.history, fit.best_epoch)

    if params.finetune.nproc > 1:
        logger.warning("finetune.nproc=%d: in-process training runs one process", params.finetune.nproc)
    values: dict[int, float] = {}
    start_epoch: list[int] = []

    def score_epoch(row: dict) -> None:
        if on_epoch:
            on_epoch(row)
        if row["phase"] not in ("start", "finetune"):
            return  # the head's epochs: fine-tuning is scored from the model it starts from
        if row["phase"] == "start":
            start_epoch[:] = [row["epoch"]]
        value = float(row[metric])  # fine-tuning rows carry every val metric (finetune.evaluate)
        values[row["epoch"]] = value
        if on_score and not math.isnan(value):
            on_score(value, row["epoch"] - start_epoch[0])

    trained = train_model(
        inputs,
        inputs.backbone(params),
        **recipe_values(params),
        device=resolve_device(params.device),
        on_epoch=score_epoch,
    )
    return TrialOutcome(values[trained.best_epoch], trained.history, trained.best_epoch)


def _score_row(
    row: dict, metric: str, predict: Callable[[], tuple[np.ndarray, np.ndarray]], classes: list[str]
) -> float:
    if metric in row:
        return float(row[metric])
    y_true, y_pred = predict()  # val_macro_f1: not in the history rows, computed from predictions
    return classification_metrics(y_true, y_pred, classes)["macro_f1"]


def save_trained(directory: Path, trained: TrainedModel, backbones: list, layers: list | None, freeze_layers) -> Path:
    """data/model for a trained model (transfer.models.saved): the weights, model.json, and head.skops for a
    scikit-learn head. `backbones` are the params' backbone entries (name, weights, image_size); `layers` and
    `freeze_layers` the params' values, recorded in model.json."""
    trained.model.cpu().eval()
    feature_head = trained.feature_head
    return save_model(
        directory,
        trained.model,
        trained.classes,
        trained.data_config,
        backbone="+".join(b.name for b in backbones),
        weights=",".join(b.weights for b in backbones),
        freeze_layers=freeze_layers,
        backbones=[(b.name, b.image_size) for b in backbones],
        layers=layers,
        feature_head=feature_head.estimator if feature_head else None,
        head_kind=feature_head.kind if feature_head else LINEAR_PROBE,
    )


def calibrate(
    trained: TrainedModel, val_features: FeatureCache, val_images: ImageDataset, batch_size: int, device: torch.device
) -> float:
    """Fit the model's temperature on val (evaluate.calibration: temperature): the one scalar that minimises
    the val NLL, stored in the model (its logits are divided by it; the predicted class never changes).

    Fitted on logits of images the model did not learn from: a scikit-learn head's train-only fit (the saved
    head is refitted on train + val, so its own val logits would be over-confident), the linear probe on the
    cached features, or the fine-tuned model on the val images (val only chose their epoch).
    """
    model = trained.model
    if trained.feature_head is not None:
        logits = trained.feature_head.val_logits
    elif not trained.fine_tuned:
        with torch.inference_mode():
            logits = model.head(val_features.features)
    else:
        logits = predict_logits(model, val_images, batch_size, device)
    model.temperature = fit_temperature(logits, val_features.labels)
    return model.temperature

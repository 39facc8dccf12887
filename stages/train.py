"""Stage train: the head.kind head on the cached features, then fine-tuning when `freeze_layers` is an integer.

A scikit-learn head (head.kind other than linear) is saved in data/model/head.skops and logged to MLflow in
the sklearn flavour (predicting from features); fine-tuning starts from the linear or logreg head, and from
a linear probe for the other kinds.

Params: freeze_layers, head, finetune, seed, backbone, tracking.registered_model. Opens the pipeline run
in MLflow (params, tags, per-epoch metrics, the model, registered under tracking.registered_model) and
tags it with the model's digest, by which the evaluate stage finds the run. The model is
data/model/model.safetensors + model.json (transfer.models.saved).
Fine-tuning checkpoints every epoch in data/checkpoints (persisted by DVC): a killed run continues on the
next `dvc repro`, in the same MLflow run. `finetune.nproc` > 1 re-launches this script under torchrun
(data-parallel); rank 0 logs and writes the outputs. Besides the model it writes the per-group relative
weight change (reports/layer_movement.json, MLflow `weight_change/<group>`).
"""

import contextlib
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from transfer import tracking
from transfer.data.datasets import load_split_dataset
from transfer.data.split import read_classes
from transfer.data.transforms import eval_batch_transform, train_transforms
from transfer.features import load_feature_cache
from transfer.models.backbones import Classifier, LoadedBackbone, load_backbones
from transfer.models.groups import freeze_first_groups
from transfer.models.heads import (
    FEATURE_HEADS,
    FINETUNE_INIT_KINDS,
    LINEAR_PROBE,
    TRUSTED_TYPES,
    fold_into_linear,
    imagenet_overlap_head,
    xavier_head,
)
from transfer.models.saved import model_digest, save_model
from transfer.pipeline.errors import run_stage
from transfer.pipeline.files import read_json, staged_outputs, write_csv, write_json
from transfer.pipeline.layout import (
    CACHE_DIR,
    CHECKPOINT_DIR,
    DATA_REPORT_FILE,
    FEATURES_DIR,
    MODEL_DIR,
    REPORTS_DIR,
    SPLIT_DIR,
)
from transfer.pipeline.params import Params, backbone_list, backbone_specs, flatten, load_params
from transfer.pipeline.runtime import resolve_device
from transfer.train.checkpoint import Checkpointer, cpu_state_dict, training_fingerprint
from transfer.train.distributed import (
    DistContext,
    device_for,
    init_from_env,
    relaunch_with_torchrun,
    shutdown,
    under_torchrun,
)
from transfer.train.finetune import fine_tune
from transfer.train.layer_stats import relative_weight_change
from transfer.train.probe import FittedFeatureHead, fit_feature_head, train_linear_probe
from transfer.train.result import SELECTION_METRICS, model_selection, selection_message


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


def train(params: Params, context: DistContext) -> None:
    classes = read_classes(SPLIT_DIR)
    loaded = load_backbones(backbone_specs(params.backbone), params.features.layers)
    model = Classifier(loaded.backbone, len(classes))
    fine_tuning = params.freeze_layers != "all"
    if fine_tuning:
        freeze_first_groups(model, params.freeze_layers)  # fails fast, listing the groups, on a bad k
    data_hash = read_json(SPLIT_DIR / "summary.json")["data_hash"]
    backbones = backbone_list(params.backbone)
    backbone_name = "+".join(backbone.name for backbone in backbones)
    tags = tracking.run_tags(backbone_name, data_hash)
    checkpointer = Checkpointer(CHECKPOINT_DIR, training_fingerprint(params, data_hash), writer=context.is_main)
    saved = checkpointer.load_last() if fine_tuning and params.finetune.resume else None
    # Rank 0 writes the history rows into the run; other ranks log nothing.
    epoch_log = tracking.EpochLog() if context.is_main else contextlib.nullcontext(None)
    # One MLflow run per pipeline run, opened by rank 0 only; a resumed run reopens the run it started.
    run = (
        tracking.training_run(
            params.tracking.experiment, flatten(params), tags, run_id=saved["extra"]["run_id"] if saved else None
        )
        if context.is_main
        else contextlib.nullcontext(None)
    )

    # reports/*: moved into place only when the whole block, MLflow included, has succeeded (staged_outputs).
    with run as run_id, epoch_log as log, staged_outputs(REPORTS_DIR) as staged:
        if saved is None and context.is_main:
            # What the download stage skipped or ignored, and why (see transfer.data_report).
            tracking.log_artifacts([DATA_REPORT_FILE], artifact_path="data")
        feature_head = None
        if saved is not None:
            history, best_epoch = saved["extra"]["probe_history"], saved["extra"]["probe_best_epoch"]
            # Without initial.pt (deleted by hand), movement is measured from the pretrained backbone.
            initial_state = checkpointer.load_initial() or cpu_state_dict(model)
        elif not fine_tuning or params.finetune.head_init == "probe":
            history, best_epoch, probe_initial, feature_head = probe_head(model, params, classes, log, fine_tuning)
            # What moved: from the pretrained backbone (and the head before it was fitted, for a probe;
            # a scikit-learn head has no initial weights, so it is left out).
            initial_state = cpu_state_dict(model) if fine_tuning else {**cpu_state_dict(model), **probe_initial}
            if feature_head is not None:
                initial_state = {k: v for k, v in initial_state.items() if not k.startswith("head.")}
        else:
            init_head(model, params, classes, loaded)
            history, best_epoch, initial_state = [], 0, cpu_state_dict(model)
        config = loaded.data_config
        val_data = load_split_dataset(CACHE_DIR, SPLIT_DIR, "val", config, batch_transform=eval_batch_transform(config))
        if fine_tuning:
            if saved is None:
                checkpointer.save_initial(initial_state)
            checkpointer.extra = {"run_id": run_id, "probe_history": history, "probe_best_epoch": best_epoch}
            finetune = params.finetune
            sample_transform, batch_transform = train_transforms(
                config, finetune.augment, finetune.crop_min_scale, finetune.hflip
            )
            train_data = load_split_dataset(
                CACHE_DIR,
                SPLIT_DIR,
                "train",
                config,
                batch_transform=batch_transform,
                sample_transform=sample_transform,
            )
            # The start model (epoch len(history) + 1) is the probe's best epoch: the same train scores.
            start_train = (
                {key: value for key, value in history[best_epoch - 1].items() if key.startswith("train_")}
                if history
                else None
            )
            result = fine_tune(
                model,
                params.freeze_layers,
                train_data,
                val_data,
                finetune,
                params.seed,
                device_for(context, resolve_device(params.device)),
                first_epoch=len(history) + 2,
                on_epoch=log,
                checkpointer=checkpointer,
                context=context,
                pretrained=backbones[0].weights != "none",
                start_train=start_train,
            )
            history, best_epoch = history + result.history, result.best_epoch
            if context.is_main:
                print(
                    selection_message(
                        result.history,
                        finetune.monitor,
                        result.kept_start,
                        "the linear probe" if finetune.head_init == "probe" else "the initial model",
                    )
                )
        if not context.is_main:
            return  # rank 0 writes every output

        model.cpu().eval()
        save_model(
            MODEL_DIR,
            model,
            classes,
            loaded.data_config,
            backbone=backbone_name,
            weights=",".join(b.weights for b in backbones),
            freeze_layers=params.freeze_layers,
            backbones=[(b.name, b.image_size) for b in backbones],
            layers=params.features.layers,
            feature_head=feature_head.estimator if feature_head else None,
            head_kind=feature_head.kind if feature_head else LINEAR_PROBE,
        )
        write_csv(staged / "history.csv", pd.DataFrame(history))
        selection = model_selection(
            history, best_epoch, params.finetune.monitor if fine_tuning else params.head.monitor
        )
        write_json(staged / "train.json", selection)
        tracking.log_metrics({key: value for key, value in selection.items() if key in SELECTION_METRICS})
        tracking.log_tags({"selected_model": selection["selected"]})
        movement = layer_movement(initial_state, model)
        write_json(staged / "layer_movement.json", movement)
        tracking.log_metrics(
            {f"weight_change/{group}": value for group, value in movement.items() if value is not None}
        )
        if feature_head is None:
            example = val_data.transformed([0]).numpy().astype(np.float32)
            tracking.log_model(
                MODEL_DIR,
                model,
                (Path.cwd() / val_data.paths[0]).read_bytes(),
                example,
                registered_model=params.tracking.registered_model,
            )
        else:  # the scikit-learn head alone, predicting from features (skops, not pickle)
            example = load_feature_cache(FEATURES_DIR / "val.pt").features[:2].numpy()
            tracking.log_feature_head(feature_head.estimator, example, TRUSTED_TYPES)
            tracking.log_metrics({"head_fit_seconds": feature_head.fit_seconds})
            tracking.log_tags({f"head_{FEATURE_HEADS[feature_head.kind].hyperparameter}": str(feature_head.chosen)})
        tracking.log_tags({tracking.MODEL_DIGEST_TAG: model_digest(MODEL_DIR)})
        checkpointer.finish()
    print(f"train: model -> {MODEL_DIR}, MLflow run {run_id}")


def main() -> None:
    params = load_params()
    if params.freeze_layers != "all" and params.finetune.nproc > 1 and not under_torchrun():
        sys.exit(relaunch_with_torchrun(__file__, params.finetune.nproc))
    context = init_from_env(params.device)
    try:
        train(params, context)
    finally:
        shutdown(context)


if __name__ == "__main__":
    run_stage("train", main)

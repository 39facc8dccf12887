"""Stage train: a linear probe on the cached features, then fine-tuning when `freeze_layers` is an integer.

Params: freeze_layers, head, finetune, seed, backbone. Opens the pipeline run in MLflow (params, tags,
per-epoch metrics, the model) and records its id in data/model/run.json for the evaluate stage.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from transfer import tracking
from transfer.backbones import Classifier, freeze_first_groups, load_backbone
from transfer.data import load_split_dataset, read_classes
from transfer.features import load_feature_cache
from transfer.files import read_json, save_torch, write_csv, write_json
from transfer.layout import FEATURES_DIR, MODEL_FILE, RAW_DIR, REPORTS_DIR, RUN_FILE, SPLIT_DIR
from transfer.params import flatten, load_params
from transfer.training import fine_tune, resolve_device, train_linear_probe
from transfer.transforms import eval_transform, train_transform


def main() -> None:
    params = load_params()
    root = Path.cwd()
    classes = read_classes(SPLIT_DIR)
    loaded = load_backbone(params.backbone.name, params.backbone.weights, params.backbone.image_size)
    model = Classifier(loaded.backbone, len(classes))
    fine_tuning = params.freeze_layers != "all"
    if fine_tuning:
        freeze_first_groups(model, params.freeze_layers)  # fails fast, listing the groups, on a bad k
    train_features = load_feature_cache(FEATURES_DIR / "train.pt")
    val_features = load_feature_cache(FEATURES_DIR / "val.pt")
    tags = tracking.run_tags(params.backbone.name, read_json(SPLIT_DIR / "summary.json")["data_hash"])

    with tracking.training_run(params.tracking.experiment, flatten(params), tags) as run_id:
        # What the download stage skipped or ignored, and why (see transfer.data_report).
        tracking.log_artifacts([RAW_DIR / "data_report.json"], artifact_path="data")
        probe = train_linear_probe(train_features, val_features, len(classes), params.head, params.seed,
                                   on_epoch=tracking.log_epoch)
        model.head.load_state_dict(probe.model.state_dict())
        history, best_epoch = probe.history, probe.best_epoch
        print(f"train: linear probe, best val accuracy {max(r['val_acc'] for r in history):.4f} "
              f"at epoch {best_epoch}")
        val_data = load_split_dataset(SPLIT_DIR, "val", root, eval_transform(loaded.data_config))
        if fine_tuning:
            train_data = load_split_dataset(SPLIT_DIR, "train", root, train_transform(loaded.data_config))
            result = fine_tune(model, params.freeze_layers, train_data, val_data, params.finetune, params.seed,
                               resolve_device(params.device), first_epoch=len(history) + 1,
                               on_epoch=tracking.log_epoch)
            history, best_epoch = history + result.history, result.best_epoch
            print(f"train: fine-tuned with {params.freeze_layers} frozen group(s), best val accuracy "
                  f"{max(r['val_acc'] for r in result.history):.4f} at epoch {best_epoch}")

        model.cpu().eval()
        save_torch(MODEL_FILE, {
            "backbone": params.backbone.name, "image_size": loaded.data_config.image_size,
            "classes": classes, "freeze_layers": params.freeze_layers, "state_dict": model.state_dict()})
        write_csv(REPORTS_DIR / "history.csv", pd.DataFrame(history))
        best = next(row for row in history if row["epoch"] == best_epoch)
        write_json(REPORTS_DIR / "train.json", {"best_epoch": best_epoch, "val_acc": best["val_acc"],
                                                "val_loss": best["val_loss"], "train_acc": best["train_acc"]})
        example = val_data[0][0].unsqueeze(0).numpy().astype(np.float32)
        tracking.log_model(model, example)
        write_json(RUN_FILE, {"run_id": run_id})
    print(f"train: model -> {MODEL_FILE}, MLflow run {run_id}")


if __name__ == "__main__":
    main()

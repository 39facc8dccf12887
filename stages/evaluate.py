"""Stage evaluate: test accuracy, macro-F1, per-class accuracy and the confusion matrix.

Writes DVC metrics (reports/metrics.json) and the confusion plot data (reports/confusion.csv), and logs
them into the MLflow run of the model it evaluates (the id in data/model/run.json).
"""

from pathlib import Path

import torch

from transfer import tracking
from transfer.backbones import Classifier, load_backbone
from transfer.data import load_split_dataset
from transfer.evaluation import classification_metrics, confusion_pairs, predict_logits
from transfer.features import load_feature_cache
from transfer.files import read_json, write_csv, write_json
from transfer.layout import FEATURES_DIR, MODEL_FILE, REPORTS_DIR, RUN_FILE, SPLIT_DIR
from transfer.params import load_params
from transfer.training import resolve_device
from transfer.transforms import eval_transform


def load_model(path: Path) -> tuple[Classifier, dict]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    loaded = load_backbone(checkpoint["backbone"], "none", checkpoint["image_size"])
    model = Classifier(loaded.backbone, len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), {**checkpoint, "data_config": loaded.data_config}


def main() -> None:
    params = load_params()
    model, checkpoint = load_model(MODEL_FILE)
    classes = checkpoint["classes"]
    test = load_feature_cache(FEATURES_DIR / "test.pt")
    if checkpoint["freeze_layers"] == "all":
        # The backbone is the untouched pretrained one: its test features are already cached.
        with torch.inference_mode():
            logits = model.head(test.features)
    else:
        dataset = load_split_dataset(SPLIT_DIR, "test", Path.cwd(), eval_transform(checkpoint["data_config"]))
        logits = predict_logits(model, dataset, params.finetune.batch_size * 2, resolve_device(params.device))
    y_true, y_pred = test.labels.numpy(), logits.argmax(1).numpy()

    metrics = classification_metrics(y_true, y_pred, classes)
    write_json(REPORTS_DIR / "metrics.json", metrics)
    write_csv(REPORTS_DIR / "confusion.csv", confusion_pairs(test.paths, y_true, y_pred, classes))
    print(f"evaluate: test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}")

    with tracking.reopen_run(read_json(RUN_FILE)["run_id"], params.tracking.experiment):
        tracking.log_metrics(metrics, prefix="test")
        tracking.log_artifacts([Path("params.yaml"), Path("dvc.lock"), REPORTS_DIR / "metrics.json",
                                REPORTS_DIR / "confusion.csv", REPORTS_DIR / "history.csv"])


if __name__ == "__main__":
    main()

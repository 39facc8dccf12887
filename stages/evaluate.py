"""Stage evaluate: test accuracy, macro-F1, per-class recall, the confusion matrix and the diagnostics.

Writes DVC metrics (reports/metrics.json, with the verdict, model health, top-k accuracy and calibration: ECE,
NLL and Brier before and after the model's temperature), the confusion and reliability plot data
(reports/confusion.csv, reports/reliability/{before,after}.csv) and the run's diagnostics folder
(reports/diagnostics: PNGs, per-class CSV, self-contained report.html), and logs them into the MLflow run of
the model it evaluates (the run tagged with the model's digest).
"""

from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from transfer import tracking
from transfer.data.datasets import load_split_dataset
from transfer.data.transforms import eval_batch_transform
from transfer.evaluate.calibration import CALIBRATION_METRICS, calibration_report, reliability_frame
from transfer.evaluate.diagnostics import write_run_diagnostics
from transfer.evaluate.metrics import classification_metrics, confusion_pairs, predict_logits_and_features
from transfer.evaluate.plots import image_batch
from transfer.features import load_feature_cache
from transfer.models.saved import SavedModel, load_model, model_digest
from transfer.pipeline.errors import run_stage
from transfer.pipeline.files import read_json, staged_outputs, write_csv, write_json
from transfer.pipeline.layout import (
    CACHE_DIR,
    DIAGNOSTICS_DIR,
    FEATURES_DIR,
    LABEL_ISSUES_CSV,
    LABEL_ISSUES_DIR,
    MODEL_DIR,
    REPORTS_DIR,
    SPLIT_DIR,
)
from transfer.pipeline.params import load_params
from transfer.pipeline.runtime import resolve_device


def layer_movement() -> dict[str, float]:
    """Relative weight change per layer group, as the train stage measured it against its own theta0
    (reports/layer_movement.json; its nulls, groups where it is undefined, are left out)."""
    return {
        group: value for group, value in read_json(REPORTS_DIR / "layer_movement.json").items() if value is not None
    }


def calibration_metrics_of(calibration: dict) -> dict[str, float]:
    """metrics.json's `calibration`: the temperature and ECE, NLL, Brier on test before (T = 1) and after it."""
    return {
        "temperature": calibration["temperature"],
        **{f"{name}_{when}": calibration[when][name] for name in CALIBRATION_METRICS for when in ("before", "after")},
    }


def label_issues_section() -> tuple[int, list, list[Path]]:
    """The label_issues stage's list and grid: (count, report items, files to log).

    Its outputs are deps of this stage, so they are there and current; shown as they are, never acted on.
    """
    issues = pd.read_csv(LABEL_ISSUES_CSV, keep_default_na=False)
    grids = sorted(LABEL_ISSUES_DIR.glob("*.png"))
    note = (
        f"{len(issues)} training labels look wrong to a head that never saw them (out-of-fold confident learning). "
        f"Nothing was changed: check them in {LABEL_ISSUES_CSV}, most suspect first, and fix the source if so."
    )
    return len(issues), [note, *grids, issues.head(10)], [LABEL_ISSUES_CSV, *grids]


def diagnose(
    saved: SavedModel,
    params,
    test,
    images,
    logits: torch.Tensor,
    model_features,
    summary: dict,
    calibration: dict,
    label_items: list,
) -> tuple[dict, list[Path]]:
    """Pictures, per-class table, verdict (with what to try next) and report.html; returns (metrics, files).

    The pictures show the test images as the image cache holds them (`images`: the test split's dataset).
    """
    row_of = {path: index for index, path in enumerate(images.paths)}

    def load_image(path: str) -> Image.Image:
        return Image.fromarray(images.images.read([row_of[path]])[0].permute(1, 2, 0).numpy())

    def transform(image: torch.Tensor) -> torch.Tensor:
        return images.batch_transform(image.unsqueeze(0))[0]

    def model_input(path: str) -> torch.Tensor:
        return images.batch_transform(images.images.read([row_of[path]]))[0]

    batch = image_batch(test.paths, load_image, transform, params.diagnostics.batch_size)
    selection = read_json(REPORTS_DIR / "train.json")
    return write_run_diagnostics(
        DIAGNOSTICS_DIR,
        class_names=saved.classes,
        y_true=test.labels.numpy(),
        probs=torch.softmax(logits.float(), dim=1).numpy(),
        history=pd.read_csv(REPORTS_DIR / "history.csv"),
        image_paths=test.paths,
        load_image=load_image,
        features=test.features,
        model=saved.model,
        batch=batch,
        weight_change=layer_movement(),
        thresholds=params.diagnostics.thresholds(),
        best_epoch=selection["best_epoch"],
        summary={"accuracy": summary["accuracy"], "macro_f1": summary["macro_f1"]},
        title=f"Run report: {saved.backbone_name}, head {saved.head_kind}, freeze_layers={saved.freeze_layers}",
        projection=params.diagnostics.projection,
        max_mistakes=params.diagnostics.mistakes,
        model_features=model_features,
        selection=selection,
        train_counts=read_json(SPLIT_DIR / "summary.json")["per_class"]["train"],
        calibration=calibration,
        model_input=model_input,
        mean=saved.data_config.mean,
        std=saved.data_config.std,
        gradcam_per_class=params.diagnostics.gradcam_per_class,
        extra_sections={"Labels that look wrong": label_items},
    )


def main() -> None:
    params = load_params()
    saved = load_model(MODEL_DIR)
    model, classes = saved.model, saved.classes
    test = load_feature_cache(FEATURES_DIR / "test.pt")
    config = saved.data_config
    dataset = load_split_dataset(CACHE_DIR, SPLIT_DIR, "test", config, batch_transform=eval_batch_transform(config))
    model_features = None  # a probe's features are the cached pretrained ones
    if not saved.fine_tuned and params.evaluate.tta == "none":
        # The backbone is the untouched pretrained one: its test features are already cached.
        with torch.inference_mode():
            head_logits = model.head(test.features)
    else:
        head_logits, features = predict_logits_and_features(
            model, dataset, params.finetune.batch_size * 2, resolve_device(params.device), tta=params.evaluate.tta
        )
        if saved.fine_tuned:
            model_features = features
    logits = model.calibrate(head_logits)  # what `transfer predict`, the pyfunc model and ONNX return
    y_true, y_pred = test.labels.numpy(), logits.argmax(1).numpy()
    calibration = calibration_report(head_logits.numpy(), y_true, model.temperature)

    metrics = classification_metrics(y_true, y_pred, classes)
    issue_count, label_items, issue_files = label_issues_section()
    diagnostics, diagnostic_files = diagnose(
        saved, params, test, dataset, logits, model_features, metrics, calibration, label_items
    )
    # Written into reports/ only once everything below, MLflow included, has succeeded (staged_outputs).
    with staged_outputs(REPORTS_DIR) as staged:
        # weight_change is already the train stage's metric (reports/layer_movement.json): not repeated here
        summary = {key: diagnostics[key] for key in ("fit", "health", "topk")}
        write_json(staged / "metrics.json", {**metrics, **summary, "calibration": calibration_metrics_of(calibration)})
        write_csv(staged / "confusion.csv", confusion_pairs(test.paths, y_true, y_pred, classes))
        reliability = [staged / "reliability" / f"{when}.csv" for when in ("before", "after")]
        for path, when in zip(reliability, ("before", "after")):
            write_csv(path, reliability_frame(calibration[f"diagram_{when}"]))
        print(
            f"evaluate: test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
            f"ECE {calibration['before']['ece']:.4f} -> {calibration['after']['ece']:.4f} (temperature "
            f"{calibration['temperature']:.3g}), {diagnostics['fit']['verdict']}; "
            f"report -> {DIAGNOSTICS_DIR / 'report.html'}"
        )
        with tracking.model_run(params.tracking.experiment, model_digest(MODEL_DIR)):
            tracking.log_metrics(metrics, prefix="test")
            tracking.log_key_metrics(test_acc=metrics["accuracy"], test_f1=metrics["macro_f1"])
            tracking.log_artifacts(
                [Path("params.yaml"), Path("dvc.lock"), staged / "metrics.json", staged / "confusion.csv"]
                + [REPORTS_DIR / "history.csv"]
            )
            # fit.*, topk.*: sortable in the MLflow UI (the train stage logs weight_change/<group>)
            tracking.log_metrics(summary)
            tracking.log_metrics({"calibration": calibration_metrics_of(calibration)}, prefix="test")
            tracking.log_artifacts(reliability, artifact_path="reliability")
            # A tag, not a param: an evaluate-only change (-S evaluate.tta=flip) reopens the train stage's run,
            # whose params are immutable and were logged before this value was chosen.
            tracking.log_tags({"fit_verdict": diagnostics["fit"]["verdict"], "test_tta": params.evaluate.tta})
            tracking.log_artifacts(diagnostic_files, artifact_path="diagnostics")
            # The label_issues stage runs before train, with no run to log to: its results join the model's run here.
            tracking.log_metrics({"label_issues": {"count": issue_count}})
            tracking.log_artifacts(issue_files, artifact_path="label_issues")


if __name__ == "__main__":
    run_stage("evaluate", main)

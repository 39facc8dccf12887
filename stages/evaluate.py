"""Stage evaluate: test metrics (accuracy, macro-F1, recall per class, verdict, health, top-k, ECE/NLL/Brier before
and after the temperature) in reports/metrics.json, confusion and reliability plot data and reports/diagnostics,
logged into the model's MLflow run. reports/* are replaced only once everything, MLflow included, succeeded.
"""

from pathlib import Path

from transfer import tracking
from transfer.data.datasets import load_split_dataset
from transfer.data.transforms import eval_batch_transform
from transfer.evaluate.calibration import calibration_report, calibration_summary, reliability_frame
from transfer.evaluate.metrics import classification_metrics, confusion_pairs
from transfer.evaluate.test_report import label_issues_section, test_logits, write_report
from transfer.features import load_feature_cache
from transfer.models.saved import load_model, model_digest
from transfer.pipeline import layout
from transfer.pipeline.errors import run_stage
from transfer.pipeline.files import staged_outputs, write_csv, write_json
from transfer.pipeline.params import load_params
from transfer.pipeline.runtime import resolve_device


def main() -> None:
    params = load_params()
    saved = load_model(layout.MODEL_DIR)
    test = load_feature_cache(layout.FEATURES_DIR / "test.pt")
    config = saved.data_config
    dataset = load_split_dataset(
        layout.CACHE_DIR, layout.SPLIT_DIR, "test", config, batch_transform=eval_batch_transform(config)
    )
    batch_size, device = params.finetune.batch_size * 2, resolve_device(params.device)
    head_logits, model_features = test_logits(saved, test, dataset, params.evaluate.tta, batch_size, device)
    logits = saved.model.calibrate(head_logits)  # what `transfer predict`, the pyfunc model and ONNX return
    y_true, y_pred = test.labels.numpy(), logits.argmax(1).numpy()
    calibration = calibration_report(head_logits.numpy(), y_true, saved.model.temperature)
    metrics = classification_metrics(y_true, y_pred, saved.classes)
    issue_count, label_items, issue_files = label_issues_section(layout.LABEL_ISSUES_CSV, layout.LABEL_ISSUES_DIR)
    diagnostics, diagnostic_files = write_report(
        layout.DIAGNOSTICS_DIR,
        layout.REPORTS_DIR,
        layout.SPLIT_DIR,
        saved,
        params.diagnostics,
        test,
        dataset,
        logits,
        model_features,
        metrics,
        calibration,
        label_items,
    )
    summary = {key: diagnostics[key] for key in ("fit", "health", "topk")}  # weight_change: train's metric
    with staged_outputs(layout.REPORTS_DIR) as staged:
        write_json(staged / "metrics.json", {**metrics, **summary, "calibration": calibration_summary(calibration)})
        write_csv(staged / "confusion.csv", confusion_pairs(test.paths, y_true, y_pred, saved.classes))
        reliability = [staged / "reliability" / f"{when}.csv" for when in ("before", "after")]
        for path, when in zip(reliability, ("before", "after")):
            write_csv(path, reliability_frame(calibration[f"diagram_{when}"]))
        print(
            f"evaluate: test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, ECE "
            f"{calibration['before']['ece']:.4f} -> {calibration['after']['ece']:.4f} (temperature "
            f"{calibration['temperature']:.3g}), {diagnostics['fit']['verdict']}; report -> {layout.DIAGNOSTICS_DIR}"
        )
        with tracking.model_run(params.tracking.experiment, model_digest(layout.MODEL_DIR)):
            reports = [Path("params.yaml"), Path("dvc.lock"), staged / "metrics.json", staged / "confusion.csv"]
            tracking.log_evaluation(
                metrics,
                summary,
                calibration_summary(calibration),
                reports + [layout.REPORTS_DIR / "history.csv"],
                reliability,
                diagnostic_files,
                issue_count,
                issue_files,
                tags={"test_tta": params.evaluate.tta},
            )


if __name__ == "__main__":
    run_stage("evaluate", main)

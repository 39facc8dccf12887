"""Run diagnostics: one call that writes every number, picture and the HTML report of an evaluated run.

The numbers come from `transfer.evaluate.metrics` and `transfer.evaluate.health`, the pictures from
`transfer.evaluate.plots`, the page from `transfer.evaluate.report`; this module decides what goes in the
run's diagnostics folder and in which section of the report. Nothing here imports DVC or MLflow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from transfer.evaluate.explain import ExplainError, grad_cam_batches, input_pixels
from transfer.evaluate.health import feature_health, fit_diagnosis, model_problems, selected_epoch_row, verdict_of
from transfer.evaluate.metrics import as_numpy, confusion, most_confident_mistakes, per_class_table, top_k_accuracies
from transfer.evaluate.plots import (
    grad_norm_frame,
    plot_activation_histograms,
    plot_confusion_matrix,
    plot_feature_projection,
    plot_gradcam,
    plot_layer_movement,
    plot_learning_curves,
    plot_mistakes,
    plot_reliability,
)
from transfer.evaluate.report import write_html_report
from transfer.models.groups import in_group_order
from transfer.pipeline.files import write_csv
from transfer.pipeline.runtime import single_threaded

# File names inside a run's diagnostics folder (dvc.yaml declares them).
LEARNING_CURVES_PNG = "learning_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
PER_CLASS_CSV = "per_class.csv"
MISTAKES_PNG = "mistakes.png"
LAYER_MOVEMENT_PNG = "layer_movement.png"
LAYER_MOVEMENT_CSV = "layer_movement.csv"
FEATURES_PNG = "features.png"
ACTIVATIONS_PNG = "activations.png"
RELIABILITY_PNG = "reliability.png"
GRADCAM_MISTAKES_PNG = "gradcam_mistakes.png"
GRADCAM_CORRECT_PNG = "gradcam_correct.png"
REPORT_HTML = "report.html"
FROZEN_NOTE = "Feature extraction only: no layer of the backbone was trained."


@single_threaded()  # small workloads: extra threads would only spin-wait on a busy machine
def write_run_diagnostics(
    out_dir: str | os.PathLike,
    *,
    class_names: Sequence[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    history: pd.DataFrame,
    image_paths: Sequence[str],
    load_image,
    features,
    model: torch.nn.Module,
    batch: torch.Tensor,
    weight_change: Mapping[str, float] | None = None,
    thresholds: Mapping[str, float] | None = None,
    best_epoch: int | None = None,
    summary: Mapping | None = None,
    title: str = "Run report",
    projection: str = "pca",
    max_mistakes: int = 16,
    model_features=None,
    selection: Mapping | None = None,
    train_counts: Mapping[str, int] | None = None,
    calibration: Mapping | None = None,
    model_input=None,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    gradcam_per_class: int = 0,
    extra_sections: Mapping[str, list] | None = None,
) -> tuple[dict, list[Path]]:
    """Write every diagnostic of one run under `out_dir`; return (metrics, files).

    `metrics` is nested (`fit`, `topk`, and `weight_change` when
    given) for the evaluate stage's metrics file; `files` are the
    PNGs, CSVs and the self-contained `report.html` to log to the run.
    `load_image(path)` is called only for the mistakes drawn (at most
    `max_mistakes`), so the cost does not grow with the test set.
    `summary` adds the stage's own metrics (accuracy, macro-F1) to the
    report's summary table.

    `features` are the pretrained backbone's test features (the cache);
    `model_features` the evaluated model's own (a fine-tuned backbone's;
    None for a linear probe, whose features are the cached ones). Their
    comparison detects collapsed features; with `selection` (the train
    stage's reports/train.json) and `train_counts` (training images per
    class) the verdict (`fit.verdict`) names every problem found and the
    report says what to try next (see `model_problems`); the numbers go
    to `metrics["health"]`. `calibration` (transfer.evaluate.calibration.calibration_report) adds the
    reliability diagram and the ECE, NLL and Brier score before and after temperature scaling.

    With `model_input(path)` (the model's input tensor for a test image,
    normalised with `mean`/`std`) and `gradcam_per_class` > 0, the report
    shows Grad-CAM maps over the drawn mistakes and over that many correct
    predictions per class (see `write_gradcam`). `extra_sections` (heading -> items) are
    appended to the report as given (the label_issues stage's grid).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y_true = as_numpy(y_true).astype(np.int64)
    probs = as_numpy(probs)
    y_pred = probs.argmax(axis=1)
    test_acc = float(np.mean(y_pred == y_true)) if len(y_true) else 0.0

    row = selected_epoch_row(history, best_epoch)
    fit = fit_diagnosis(row["train_acc"], row["val_acc"], test_acc, row["train_loss"], row["val_loss"], thresholds)
    own_features = features if model_features is None else model_features
    health, findings = model_problems(
        y_true,
        y_pred,
        class_names,
        fit,
        None if model_features is None else feature_health(model_features, features, y_true),
        selection,
        train_counts,
        thresholds,
    )
    fit["verdict"] = verdict_of(findings)
    topk = top_k_accuracies(y_true, probs)
    table = per_class_table(y_true, y_pred, class_names)

    plot_learning_curves(history, out / LEARNING_CURVES_PNG)
    plot_confusion_matrix(confusion(y_true, y_pred, len(class_names)), class_names, out / CONFUSION_PNG)
    write_csv(out / PER_CLASS_CSV, table)

    wrong = most_confident_mistakes(y_true, probs, max_mistakes)
    plot_mistakes(
        [load_image(image_paths[i]) for i in wrong],
        y_true[wrong],
        y_pred[wrong],
        probs[wrong, y_pred[wrong]],
        class_names,
        out / MISTAKES_PNG,
        n=max_mistakes,
    )

    gradcam_items, gradcam_files = (
        write_gradcam(
            out,
            model,
            lambda index: model_input(image_paths[index]),
            (mean, std),
            wrong,
            y_true,
            probs,
            class_names,
            gradcam_per_class,
        )
        if model_input is not None and gradcam_per_class > 0
        else ([], [])
    )
    plot_feature_projection(own_features, y_true, class_names, out / FEATURES_PNG, method=projection)
    plot_activation_histograms(model, batch, out / ACTIVATIONS_PNG)

    metrics: dict = {"fit": fit, "topk": topk, "health": health}
    files = [
        out / name
        for name in (LEARNING_CURVES_PNG, CONFUSION_PNG, PER_CLASS_CSV, MISTAKES_PNG, FEATURES_PNG, ACTIVATIONS_PNG)
    ]
    files += gradcam_files
    grads = grad_norm_frame(history).dropna(how="all")
    if weight_change is not None:
        weight_change = in_group_order(weight_change, model)
    # the head always moves; the backbone only when fine-tuned
    trained = any(value > 0 for group, value in (weight_change or {}).items() if group != "head")
    # a probe run's backbone never moves: say so rather than show an empty chart alone
    movement_items: list = [] if trained or not grads.empty else [FROZEN_NOTE]
    if weight_change or not grads.empty:
        plot_layer_movement(weight_change, grads, out / LAYER_MOVEMENT_PNG)
        movement_items.append(out / LAYER_MOVEMENT_PNG)
        files.append(out / LAYER_MOVEMENT_PNG)
    if weight_change is not None:
        metrics["weight_change"] = {group: float(value) for group, value in weight_change.items()}
        movement = pd.DataFrame(
            {"group": list(weight_change), "relative_weight_change": [float(v) for v in weight_change.values()]}
        )
        write_csv(out / LAYER_MOVEMENT_CSV, movement)
        movement_items.append(movement)
        files.append(out / LAYER_MOVEMENT_CSV)

    verdict = (
        f"Verdict: {fit['verdict']} (train-val accuracy gap {fit['train_val_gap']:.3f}, "
        f"val-test gap {fit['val_test_gap']:.3f}; epoch {int(row['epoch'])}, phase {row.get('phase', '-')})."
    )
    next_steps: list = [verdict] + (
        [pd.DataFrame(findings).rename(columns={"advice": "what to try next"})]
        if findings
        else ["No problem found: no collapsed features, every class predicted and recognised."]
    )
    sections: dict[str, list] = {
        "Summary": [{**(summary or {}), "test_accuracy": test_acc, **topk, **fit, **health}],
        "Verdict and what to try next": next_steps,
        "Learning curves": [verdict, out / LEARNING_CURVES_PNG],
        "Confusion and per-class quality": [out / CONFUSION_PNG, table],
        "Most confident mistakes": [out / MISTAKES_PNG],
        **({"Where the model looked (Grad-CAM)": gradcam_items} if gradcam_items else {}),
        "Layer movement": movement_items,
        "Features": [out / FEATURES_PNG, out / ACTIVATIONS_PNG],
        **(extra_sections or {}),
    }
    if calibration is not None:
        plot_reliability(
            calibration["diagram_before"],
            calibration["diagram_after"],
            calibration["temperature"],
            out / RELIABILITY_PNG,
        )
        files.append(out / RELIABILITY_PNG)
        sections["Calibration"] = [
            f"Temperature {calibration['temperature']:.4g}, fitted on val (evaluate.calibration: temperature; "
            "1 with none): the logits are divided by it, which changes the probabilities but never the predicted "
            "class. ECE: 15 bins of the top-1 probability.",
            pd.DataFrame(
                [
                    {"probabilities": name, **calibration[key]}
                    for name, key in (("T = 1", "before"), ("fitted T", "after"))
                ]
            ),
            out / RELIABILITY_PNG,
        ]
    files.append(write_html_report(out / REPORT_HTML, title, sections))
    return metrics, files


def correct_sample(y_true: np.ndarray, y_pred: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of up to `per_class` correct predictions of each class, a seeded sample, class by class."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(y_true):
        right = np.flatnonzero((y_true == label) & (y_pred == label))
        chosen.extend(np.sort(rng.choice(right, size=min(per_class, len(right)), replace=False)))
    return np.asarray(chosen, dtype=np.int64)


def write_gradcam(
    out: Path,
    model: torch.nn.Module,
    model_input,
    normalisation: tuple[Sequence[float], Sequence[float]],
    wrong: np.ndarray,
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    per_class: int,
) -> tuple[list, list[Path]]:
    """Grad-CAM grids of the mistakes `wrong` and of `per_class` correct predictions per class; returns the
    report section's items and the PNGs written (none, and a note saying why, for a model it cannot explain).
    `model_input(index)` is the model's input for the index-th test image, normalised with `normalisation`
    (mean, std).

    Each map is the predicted class's: on a mistake, where the model found the class it wrongly chose."""
    y_pred = probs.argmax(axis=1)
    items: list = []
    files: list[Path] = []
    for name, indices, title in (
        (GRADCAM_MISTAKES_PNG, wrong, "Grad-CAM: most confident mistakes"),
        (GRADCAM_CORRECT_PNG, correct_sample(y_true, y_pred, per_class), "Grad-CAM: correct predictions per class"),
    ):
        if len(indices) == 0:
            continue
        inputs = [model_input(int(i)) for i in indices]
        try:
            result = grad_cam_batches(model, inputs)
        except ExplainError as error:
            return [f"No Grad-CAM maps: {error}."], []
        plot_gradcam(
            [input_pixels(tensor, *normalisation) for tensor in inputs],
            result.maps,
            y_true[indices],
            y_pred[indices],
            probs[indices, y_pred[indices]],
            class_names,
            out / name,
            title,
        )
        if not items:
            items.append(
                f"The map of the predicted class over the image as the model saw it (resized and cropped), "
                f"taken at the layer group {result.group!r}; red is where activations raised that class's "
                "score most. On a mistake it shows what the model took for the class it chose."
            )
        items.append(out / name)
        files.append(out / name)
    return items, files

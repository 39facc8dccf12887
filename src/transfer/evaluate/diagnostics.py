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

from transfer.evaluate.health import feature_health, fit_diagnosis, model_problems, selected_epoch_row, verdict_of
from transfer.evaluate.metrics import as_numpy, confusion, most_confident_mistakes, per_class_table, top_k_accuracies
from transfer.evaluate.plots import (
    grad_norm_frame,
    plot_activation_histograms,
    plot_confusion_matrix,
    plot_feature_projection,
    plot_layer_movement,
    plot_learning_curves,
    plot_mistakes,
)
from transfer.evaluate.report import write_html_report
from transfer.pipeline.files import write_csv
from transfer.pipeline.runtime import single_threaded
from transfer.train.layer_stats import in_group_order

# File names inside a run's diagnostics folder (dvc.yaml declares them).
LEARNING_CURVES_PNG = "learning_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
PER_CLASS_CSV = "per_class.csv"
MISTAKES_PNG = "mistakes.png"
LAYER_MOVEMENT_PNG = "layer_movement.png"
LAYER_MOVEMENT_CSV = "layer_movement.csv"
FEATURES_PNG = "features.png"
ACTIVATIONS_PNG = "activations.png"
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
    to `metrics["health"]`. `extra_sections` (heading -> items) are
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

    plot_feature_projection(own_features, y_true, class_names, out / FEATURES_PNG, method=projection)
    plot_activation_histograms(model, batch, out / ACTIVATIONS_PNG)

    metrics: dict = {"fit": fit, "topk": topk, "health": health}
    files = [
        out / name
        for name in (LEARNING_CURVES_PNG, CONFUSION_PNG, PER_CLASS_CSV, MISTAKES_PNG, FEATURES_PNG, ACTIVATIONS_PNG)
    ]
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
        "Layer movement": movement_items,
        "Features": [out / FEATURES_PNG, out / ACTIVATIONS_PNG],
        **(extra_sections or {}),
    }
    files.append(write_html_report(out / REPORT_HTML, title, sections))
    return metrics, files

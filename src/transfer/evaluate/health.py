"""Model health: the fit verdict, feature health, and the problems the evaluate report names with advice.

Numbers only (no pictures, no files): `fit_diagnosis` compares train, val and test accuracy; `feature_health`
compares a fine-tuned model's test features with the pretrained backbone's; `model_problems` turns both,
the predictions and the train stage's selection into findings, each with what to try next. The thresholds
default to the params schema's (`diagnostics:` in params.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from transfer.evaluate.metrics import as_numpy
from transfer.pipeline.params import DiagnosticsParams

# The verdict thresholds when none are given: the schema's defaults.
DEFAULT_THRESHOLDS: dict[str, float] = DiagnosticsParams().thresholds()


def fit_diagnosis(
    train_acc: float,
    val_acc: float,
    test_acc: float,
    train_loss: float,
    val_loss: float,
    thresholds: Mapping[str, float] | None = None,
) -> dict:
    """Return the over/under-fitting verdict of a run, with its evidence.

    Numeric entries (sortable in `dvc exp show` and the MLflow UI):
    `train_val_gap` (train minus val accuracy), `val_test_gap` (val minus
    test accuracy), `val_train_loss_gap` (val minus train loss),
    `overfitting` and `underfitting` (0/1). `verdict` is a string.
    Underfitting wins when both hold: a model that has not fit its training
    set has a gap for other reasons than memorisation.
    """
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    train_val_gap = float(train_acc) - float(val_acc)
    underfitting = int(float(train_acc) < limits["underfit_acc"])
    overfitting = int(train_val_gap > limits["overfit_gap"])
    if underfitting:
        verdict = "underfitting"
    elif overfitting:
        verdict = "overfitting"
    else:
        verdict = "good fit"
    return {
        "train_val_gap": train_val_gap,
        "val_test_gap": float(val_acc) - float(test_acc),
        "val_train_loss_gap": float(val_loss) - float(train_loss),
        "overfitting": overfitting,
        "underfitting": underfitting,
        "verdict": verdict,
    }


def feature_spread(features) -> float:
    """Spread of pooled features over a set of images: the mean over feature dimensions of their std.

    Collapsed features (dead activations, every image mapped to nearly the same vector) have a spread
    far below the pretrained backbone's on the same images.
    """
    data = as_numpy(features).astype(np.float64, copy=False).reshape(len(features), -1)
    return float(data.std(axis=0).mean()) if len(data) > 1 else 0.0


def effective_rank(features) -> float:
    """Effective rank (Roy & Vetterli 2007) of centred features: exp of the entropy of the normalised
    singular values; 1 when all images lie on a line, up to min(N, D) when the spread is even."""
    data = as_numpy(features).astype(np.float64, copy=False).reshape(len(features), -1)
    if len(data) < 2:
        return 0.0
    singular = np.linalg.svd(data - data.mean(axis=0), compute_uv=False)
    total = singular.sum()
    if total <= 0:
        return 0.0
    shares = singular[singular > 0] / total
    return float(np.exp(-(shares * np.log(shares)).sum()))


def class_separation(features, labels) -> float:
    """Share of the features' variance that lies between the class means (0: the classes overlap
    completely, 1: every image sits on its class mean). Scale-free, like the effective rank."""
    data = as_numpy(features).astype(np.float64, copy=False).reshape(len(features), -1)
    labels = as_numpy(labels)
    centred = data - data.mean(axis=0)
    total = float((centred**2).sum())
    if total <= 0:
        return 0.0
    between = sum(
        float((labels == c).sum()) * float((centred[labels == c].mean(axis=0) ** 2).sum()) for c in np.unique(labels)
    )
    return between / total


def feature_health(features, pretrained_features, labels=None) -> dict[str, float]:
    """Spread, effective rank and dead share of the model's test features next to the pretrained backbone's
    (and, given the labels, the class separation of both)."""
    data = as_numpy(features)
    spread, reference = feature_spread(features), feature_spread(pretrained_features)
    rank, reference_rank = effective_rank(features), effective_rank(pretrained_features)
    separation = (
        {}
        if labels is None
        else {
            "class_separation": class_separation(features, labels),
            "class_separation_pretrained": class_separation(pretrained_features, labels),
        }
    )
    return {
        **separation,
        "spread": spread,
        "spread_pretrained": reference,
        "spread_ratio": spread / reference if reference > 0 else float("nan"),
        "effective_rank": rank,
        "effective_rank_pretrained": reference_rank,
        "effective_rank_ratio": rank / reference_rank if reference_rank > 0 else float("nan"),
        # pooled dimensions that are exactly zero for every image: channels whose activations all died
        "dead_share": float(np.mean(np.all(data == 0, axis=0))) if len(data) else 0.0,
    }


# Problems the verdict names, most severe first, with what to try next. The verdict lists every problem
# found (then over/underfitting), and is "good fit" only when there is none.
ADVICE: dict[str, str] = {
    "collapsed features": (
        "Fine-tuning destroyed the pretrained features. Lower finetune.lr and finetune.head_lr_mult, try "
        "finetune.batchnorm: train (a domain unlike ImageNet), freeze more layer groups (a larger freeze_layers), "
        "or keep the linear probe (freeze_layers: all)."
    ),
    "predicts few classes": (
        "Balance the classes (head.class_balance: loss for the probe; finetune.class_balance: sampler or loss, "
        "which has collapsed fine-tuning on imbalanced data: check the features), select the epoch by macro-F1 "
        "(finetune.monitor / head.monitor: val_macro_f1)."
    ),
    "zero-recall classes": (
        "Weight the rare classes (head.class_balance: loss; finetune.class_balance: sampler or loss), select by "
        "macro-F1 (monitor: val_macro_f1), and add images of these classes."
    ),
    "fine-tune lost to probe": (
        "The stage kept the model fine-tuning started from. Try a lower finetune.lr or finetune.head_lr_mult, "
        "finetune.batchnorm: train, more frozen groups, or freeze_layers: all (the probe: same result, "
        "seconds instead of minutes)."
    ),
    "underfitting": (
        "Train longer (head.epochs / finetune.epochs), raise the learning rate, or unfreeze more layer groups "
        "(a smaller freeze_layers)."
    ),
    "overfitting": (
        "Regularise: stronger augmentation (finetune.augment, mixup_alpha), more weight_decay, fewer unfrozen "
        "groups, or early stopping (finetune.patience)."
    ),
}


def model_problems(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    class_names: Sequence[str],
    fit: Mapping,
    features: Mapping[str, float] | None = None,
    selection: Mapping | None = None,
    train_counts: Mapping[str, int] | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> tuple[dict, list[dict]]:
    """Detect what is wrong beyond the train-val gap; returns (health metrics, findings).

    `features` is `feature_health` of the model's test features (None: the model uses the pretrained
    features, as a linear probe does); `selection` is the train stage's reports/train.json
    (`kept_start` 1: no fine-tuning epoch beat the probe it started from); `train_counts` the
    training images per class, quoted in the advice. Each finding is `{problem, evidence, advice}`,
    most severe first; the health metrics are numbers (0/1 flags and counts) for DVC and MLflow.
    """
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.unique(y_true)
    predicted = np.unique(y_pred)
    recall = {c: float(np.mean(y_pred[y_true == c] == c)) for c in present}
    zero_recall = [class_names[c] for c in present if recall[c] == 0]
    health: dict = {"predicted_classes": int(len(predicted)), "zero_recall_classes": len(zero_recall)}
    findings: list[dict] = []

    collapsed = 0
    if features is not None:
        health.update({key: float(value) for key, value in features.items()})
        collapsed = int(features["effective_rank_ratio"] < limits["collapse_ratio"])
        if collapsed:
            findings.append(
                {
                    "problem": "collapsed features",
                    "evidence": (
                        f"the effective rank of the test features is {features['effective_rank']:.3g}, "
                        f"{features['effective_rank_ratio']:.3g}x the pretrained backbone's (below "
                        f"{limits['collapse_ratio']:g}); their spread is {features['spread_ratio']:.3g}x and "
                        f"{features['dead_share']:.0%} of the feature channels are zero for every test image"
                    ),
                }
            )
    health["collapsed_features"] = collapsed

    few = int(len(predicted) < limits["few_classes_share"] * len(present))
    health["few_predicted_classes"] = few
    if few:
        shares = ", ".join(f"{class_names[c]} {np.mean(y_pred == c):.0%}" for c in predicted)
        findings.append(
            {
                "problem": "predicts few classes",
                "evidence": (f"only {len(predicted)} of the {len(present)} test classes are ever predicted ({shares})"),
            }
        )
    if zero_recall:
        counts = (
            ""
            if train_counts is None
            else " (training images: " + ", ".join(f"{name} {train_counts.get(name, 0)}" for name in zero_recall) + ")"
        )
        findings.append(
            {
                "problem": "zero-recall classes",
                "evidence": (
                    f"{len(zero_recall)} class(es) never recognised on the test set: {', '.join(zero_recall)}{counts}"
                ),
            }
        )

    lost = int(bool(selection) and selection.get("kept_start") == 1)
    health["lost_to_probe"] = lost
    if lost:
        findings.append(
            {
                "problem": "fine-tune lost to probe",
                "evidence": (
                    f"no fine-tuning epoch beat the starting model on val {selection.get('monitor', '')} "
                    f"(best fine-tuning epoch {selection.get('finetune_gain', float('nan')):+.4f} against it); "
                    "the stage kept the starting model"
                ),
            }
        )
    if fit.get("underfitting"):
        findings.append(
            {"problem": "underfitting", "evidence": (f"train accuracy is below {limits['underfit_acc']:g}")}
        )
    elif fit.get("overfitting"):
        findings.append(
            {
                "problem": "overfitting",
                "evidence": (
                    f"train accuracy exceeds val accuracy by {fit['train_val_gap']:.3f} (> {limits['overfit_gap']:g})"
                ),
            }
        )
    for finding in findings:
        finding["advice"] = ADVICE[finding["problem"]]
    return health, findings


def verdict_of(findings: Sequence[Mapping]) -> str:
    """Every problem found, most severe first ("collapsed features, zero-recall classes"), or "good fit"."""
    return ", ".join(finding["problem"] for finding in findings) or "good fit"


def selected_epoch_row(history: pd.DataFrame, best_epoch: int | None = None) -> pd.Series:
    """The history row of the model being evaluated.

    `best_epoch` when given; otherwise the best validation accuracy within
    the last phase, which is the epoch the training loop keeps (first one on
    ties, as it only replaces the best on a strict improvement).
    """
    if best_epoch is not None and "epoch" in history and (history["epoch"] == best_epoch).any():
        return history[history["epoch"] == best_epoch].iloc[-1]
    last_phase = history
    if "phase" in history:
        last_phase = history[history["phase"] == history["phase"].iloc[-1]]
    return last_phase.loc[last_phase["val_acc"].idxmax()]

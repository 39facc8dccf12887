"""Run diagnostics: the numbers and pictures that explain a trained model.

Everything here is cheap by design (PCA by default, one small batch for the
activation histograms, at most 16 mistake thumbnails) because the diagnostics
may add at most 10% to a run's time. Figures are drawn on ``Figure`` objects
with the Agg canvas, never through pyplot, so nothing global is left open, and
every file is written atomically. Nothing here imports DVC or MLflow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the pipeline runs on machines with no display

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.metrics import (
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from transfer.pipeline.files import atomic_path, write_csv
from transfer.train.layer_stats import in_group_order
from transfer.evaluate.report import write_html_report
from transfer.pipeline.runtime import single_threaded

DPI = 100
CONFUSION_CMAP = "Blues"
GRAD_NORM_PREFIX = "grad_norm/"
SMALL_TSNE = 2000  # t-SNE runs single-threaded up to this many points
DEFAULT_THRESHOLDS: dict[str, float] = {
    # train accuracy above val accuracy by more than this is overfitting
    "overfit_gap": 0.05,
    # train accuracy below this means the model has not even fit its training set
    "underfit_acc": 0.6,
    # test-feature effective rank below this fraction of the pretrained backbone's: collapsed features.
    # Not the spread: BatchNorm scales shrink it harmlessly (a fine-tuned digits model kept the probe's
    # test accuracy at 0.06x the pretrained spread; its effective rank was 0.21x)
    "collapse_ratio": 0.1,
    # predicting fewer than this share of the test set's classes: "predicts few classes"
    "few_classes_share": 0.5,
}


# --------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------


def fit_diagnosis(
    train_acc: float,
    val_acc: float,
    test_acc: float,
    train_loss: float,
    val_loss: float,
    thresholds: Mapping[str, float] | None = None,
) -> dict:
    """Return the over/under-fitting verdict of a run, with its evidence.

    Numeric entries (sortable in ``dvc exp show`` and the MLflow UI):
    ``train_val_gap`` (train minus val accuracy), ``val_test_gap`` (val minus
    test accuracy), ``val_train_loss_gap`` (val minus train loss),
    ``overfitting`` and ``underfitting`` (0/1). ``verdict`` is a string.
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
    data = _as_numpy(features).astype(np.float64, copy=False).reshape(len(features), -1)
    return float(data.std(axis=0).mean()) if len(data) > 1 else 0.0


def effective_rank(features) -> float:
    """Effective rank (Roy & Vetterli 2007) of centred features: exp of the entropy of the normalised
    singular values; 1 when all images lie on a line, up to min(N, D) when the spread is even."""
    data = _as_numpy(features).astype(np.float64, copy=False).reshape(len(features), -1)
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
    data = _as_numpy(features).astype(np.float64, copy=False).reshape(len(features), -1)
    labels = _as_numpy(labels)
    centred = data - data.mean(axis=0)
    total = float((centred ** 2).sum())
    if total <= 0:
        return 0.0
    between = sum(float((labels == c).sum()) * float((centred[labels == c].mean(axis=0) ** 2).sum())
                  for c in np.unique(labels))
    return between / total


def feature_health(features, pretrained_features, labels=None) -> dict[str, float]:
    """Spread, effective rank and dead share of the model's test features next to the pretrained backbone's
    (and, given the labels, the class separation of both)."""
    data = _as_numpy(features)
    spread, reference = feature_spread(features), feature_spread(pretrained_features)
    rank, reference_rank = effective_rank(features), effective_rank(pretrained_features)
    separation = {} if labels is None else {
        "class_separation": class_separation(features, labels),
        "class_separation_pretrained": class_separation(pretrained_features, labels)}
    return {**separation,
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
        "or keep the linear probe (freeze_layers: all)."),
    "predicts few classes": (
        "Balance the classes (head.class_balance: loss for the probe; finetune.class_balance: sampler or loss, "
        "which has collapsed fine-tuning on imbalanced data: check the features), select the epoch by macro-F1 "
        "(finetune.monitor / head.monitor: val_macro_f1)."),
    "zero-recall classes": (
        "Weight the rare classes (head.class_balance: loss; finetune.class_balance: sampler or loss), select by "
        "macro-F1 (monitor: val_macro_f1), and add images of these classes."),
    "fine-tune lost to probe": (
        "The stage kept the model fine-tuning started from. Try a lower finetune.lr or finetune.head_lr_mult, "
        "finetune.batchnorm: train, more frozen groups, or freeze_layers: all (the probe: same result, "
        "seconds instead of minutes)."),
    "underfitting": (
        "Train longer (head.epochs / finetune.epochs), raise the learning rate, or unfreeze more layer groups "
        "(a smaller freeze_layers)."),
    "overfitting": (
        "Regularise: stronger augmentation (finetune.augment, mixup_alpha), more weight_decay, fewer unfrozen "
        "groups, or early stopping (finetune.patience)."),
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

    ``features`` is ``feature_health`` of the model's test features (None: the model uses the pretrained
    features, as a linear probe does); ``selection`` is the train stage's reports/train.json
    (``kept_start`` 1: no fine-tuning epoch beat the probe it started from); ``train_counts`` the
    training images per class, quoted in the advice. Each finding is ``{problem, evidence, advice}``,
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
            findings.append({"problem": "collapsed features", "evidence": (
                f"the effective rank of the test features is {features['effective_rank']:.3g}, "
                f"{features['effective_rank_ratio']:.3g}x the pretrained backbone's (below "
                f"{limits['collapse_ratio']:g}); their spread is {features['spread_ratio']:.3g}x and "
                f"{features['dead_share']:.0%} of the feature channels are zero for every test image")})
    health["collapsed_features"] = collapsed

    few = int(len(predicted) < limits["few_classes_share"] * len(present))
    health["few_predicted_classes"] = few
    if few:
        shares = ", ".join(f"{class_names[c]} {np.mean(y_pred == c):.0%}" for c in predicted)
        findings.append({"problem": "predicts few classes", "evidence": (
            f"only {len(predicted)} of the {len(present)} test classes are ever predicted ({shares})")})
    if zero_recall:
        counts = "" if train_counts is None else " (training images: " + ", ".join(
            f"{name} {train_counts.get(name, 0)}" for name in zero_recall) + ")"
        findings.append({"problem": "zero-recall classes", "evidence": (
            f"{len(zero_recall)} class(es) never recognised on the test set: {', '.join(zero_recall)}{counts}")})

    lost = int(bool(selection) and selection.get("kept_start") == 1)
    health["lost_to_probe"] = lost
    if lost:
        findings.append({"problem": "fine-tune lost to probe", "evidence": (
            f"no fine-tuning epoch beat the starting model on val {selection.get('monitor', '')} "
            f"(best fine-tuning epoch {selection.get('finetune_gain', float('nan')):+.4f} against it); "
            "the stage kept the starting model")})
    if fit.get("underfitting"):
        findings.append({"problem": "underfitting", "evidence": (
            f"train accuracy is below {limits['underfit_acc']:g}")})
    elif fit.get("overfitting"):
        findings.append({"problem": "overfitting", "evidence": (
            f"train accuracy exceeds val accuracy by {fit['train_val_gap']:.3f} (> {limits['overfit_gap']:g})")})
    for finding in findings:
        finding["advice"] = ADVICE[finding["problem"]]
    return health, findings


def verdict_of(findings: Sequence[Mapping]) -> str:
    """Every problem found, most severe first ("collapsed features, zero-recall classes"), or "good fit"."""
    return ", ".join(finding["problem"] for finding in findings) or "good fit"


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix (rows true, columns predicted) over all ``n_classes``.

    Passing ``labels`` keeps a row and column for classes absent from this
    test set, so matrices of different runs line up.
    """
    return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes))


def per_class_table(
    y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """Per-class precision, recall, F1, support and one-vs-rest accuracy.

    ``one_vs_rest_accuracy`` is the binary accuracy of "is it this class?",
    (TP+TN)/N, high for any small class; the share of a class's own images
    classified right is its ``recall`` (the name metrics.json uses too).
    Classes never predicted or absent get 0 rather than a warning.
    """
    labels = np.arange(len(class_names))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class_cm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    correct = per_class_cm[:, 0, 0] + per_class_cm[:, 1, 1]
    accuracy = correct / max(len(y_true), 1)
    return pd.DataFrame(
        {
            "class": list(class_names),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support.astype(np.int64),
            "one_vs_rest_accuracy": accuracy,
        }
    )


def top_k_accuracies(
    y_true: np.ndarray, probs: np.ndarray, ks: Iterable[int] = (1, 3, 5)
) -> dict[str, float]:
    """Top-k accuracy as ``{"top{k}_accuracy": value}`` for each k < classes.

    k >= number of classes is skipped: it is always 1 and says nothing.
    """
    probs = np.asarray(probs)
    n_classes = probs.shape[1]
    labels = np.arange(n_classes)
    # sklearn wants the positive-class score alone for two classes
    scores = probs[:, 1] if n_classes == 2 else probs
    return {
        f"top{k}_accuracy": float(top_k_accuracy_score(y_true, scores, k=k, labels=labels))
        for k in ks
        if k < n_classes
    }


def most_confident_mistakes(y_true: np.ndarray, probs: np.ndarray, n: int = 16) -> np.ndarray:
    """Indices of up to ``n`` wrong predictions, most confident first."""
    probs = np.asarray(probs)
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != np.asarray(y_true))
    confidence = probs[wrong, y_pred[wrong]]
    # stable sort keeps test-set order among equal confidences: reproducible
    order = np.argsort(-confidence, kind="stable")
    return wrong[order][:n].astype(np.int64)


# --------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure with an Agg canvas and constrained layout."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Save ``figure`` as a PNG at ``path`` atomically; return the path.

    No ``bbox_inches="tight"``: the saved pixels then match the figure's own
    coordinates, which lets tests find a cell of a plot in the PNG.
    """
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def _log_y(ax) -> None:
    """Log-scale y axis with a few major ticks and no minor ones.

    Locating and laying out minor log ticks is most of the drawing time of a
    grid of small log plots (measured: 1.0 s of 1.4 s for the activations).
    """
    ax.set_yscale("log")
    # 1-2-5 steps keep labelled ticks on a range narrower than a decade
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=6))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _as_numpy(array) -> np.ndarray:
    """Accept a numpy array or a (possibly GPU) tensor."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _class_colours(n_classes: int) -> np.ndarray:
    """Distinct RGBA colours for up to 20 classes, cycling beyond."""
    cmap = matplotlib.colormaps["tab10" if n_classes <= 10 else "tab20"]
    return np.array([cmap(i % cmap.N) for i in range(n_classes)])


def plot_confusion_matrix(
    cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike
) -> Figure:
    """Draw a confusion matrix (rows true, columns predicted) to a PNG.

    Cells are coloured by the row-normalised rate (so small classes stay
    visible) and annotated with raw counts. Returns the figure for inspection.
    """
    cm = np.asarray(cm)
    n = len(class_names)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.55 * n + 2.5)
    figure = _new_figure(size, size)
    ax = figure.add_subplot()
    image = ax.imshow(
        rates, cmap=CONFUSION_CMAP, norm=Normalize(0.0, 1.0), interpolation="nearest"
    )
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    font = max(5, 10 - n // 4)
    for i in range(n):
        for j in range(n):
            colour = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=colour, fontsize=font)
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right", fontsize=font)
    ax.set_yticks(range(n), labels=list(class_names), fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    save_figure(figure, path)
    return figure


def _epoch_axis(history: pd.DataFrame) -> np.ndarray:
    """x values: ``epoch`` if it increases through the phases, else 1..rows."""
    epochs = history["epoch"].to_numpy() if "epoch" in history else None
    if epochs is not None and len(epochs) and np.all(np.diff(epochs) > 0):
        return epochs
    # phases that restart their epoch count are laid end to end
    return np.arange(1, len(history) + 1)


def _mark_phases(ax, history: pd.DataFrame, x: np.ndarray) -> None:
    """Draw a dashed line where the training phase changes."""
    if "phase" not in history or len(history) < 2:
        return
    phases = history["phase"].astype(str).to_numpy()
    for i in np.flatnonzero(phases[1:] != phases[:-1]) + 1:
        ax.axvline((x[i - 1] + x[i]) / 2, color="grey", linestyle="--", linewidth=1)
        ax.annotate(phases[i], (x[i], 1), xycoords=("data", "axes fraction"),
                    va="top", fontsize=8, color="grey")


def plot_learning_curves(history: pd.DataFrame, path: str | os.PathLike) -> Figure:
    """Train/val loss and accuracy per epoch (and the learning rate) to a PNG."""
    x = _epoch_axis(history)
    panels = [("loss", "train_loss", "val_loss"), ("accuracy", "train_acc", "val_acc")]
    show_lr = "lr" in history and history["lr"].notna().any()
    figure = _new_figure(4.2 * (len(panels) + show_lr), 3.6)
    axes = figure.subplots(1, len(panels) + show_lr, squeeze=False)[0]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, (label, train_col, val_col) in zip(axes, panels):
        for column, style in ((train_col, "o-"), (val_col, "s--")):
            if column in history:
                ax.plot(x, history[column].to_numpy(dtype=float), style, label=column, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize())
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        _mark_phases(ax, history, x)
    if show_lr:
        ax = axes[-1]
        ax.plot(x, history["lr"].to_numpy(dtype=float), "o-", markersize=3, color="tab:green")
        if (history["lr"] > 0).all():
            _log_y(ax)
        ax.set_xlabel("epoch")
        ax.set_title("Learning rate")
        ax.grid(alpha=0.3)
        _mark_phases(ax, history, x)
    save_figure(figure, path)
    return figure


def grad_norm_frame(history: pd.DataFrame) -> pd.DataFrame:
    """The ``grad_norm/<group>`` columns of a history, renamed to the groups."""
    columns = [c for c in history.columns if str(c).startswith(GRAD_NORM_PREFIX)]
    frame = history[columns].rename(columns=lambda c: c[len(GRAD_NORM_PREFIX):])
    frame.index = _epoch_axis(history)
    return frame


def plot_layer_movement(
    weight_change: Mapping[str, float] | None,
    grad_norms: pd.DataFrame | None,
    path: str | os.PathLike,
) -> Figure:
    """Relative weight change per group (bars) and gradient norm per epoch.

    ``grad_norms`` has one row per epoch and one column per group (the
    ``grad_norm/`` prefix of history columns is accepted and dropped).
    Zero norms (frozen groups, epochs before a group was unfrozen) are left
    off the log-scale line plot.
    """
    figure = _new_figure(11, 4)
    bars, lines = figure.subplots(1, 2)
    if weight_change:
        names = list(weight_change)
        values = np.array([weight_change[g] for g in names], dtype=float)
        drawn = bars.bar(range(len(names)), np.nan_to_num(values), color="tab:blue")
        # the head often moves 10-100x more than the backbone: the numbers keep small bars readable
        bars.bar_label(drawn, fmt="%.2g", fontsize=7)
        bars.set_xticks(range(len(names)), labels=names, rotation=45, ha="right", fontsize=8)
    else:
        bars.text(0.5, 0.5, "no weight change recorded", ha="center", va="center")
    bars.set_ylabel("||θ - θ0|| / ||θ0||")
    bars.set_title("Relative weight change per group")
    bars.grid(axis="y", alpha=0.3)

    frame = pd.DataFrame() if grad_norms is None else grad_norms.rename(
        columns=lambda c: str(c).removeprefix(GRAD_NORM_PREFIX))
    # frozen groups never get a gradient: leave them out of the lines and the legend
    frame = frame.loc[:, (frame.fillna(0) > 0).any()]
    if not frame.empty:
        colours = _class_colours(frame.shape[1])
        for colour, group in zip(colours, frame.columns):
            values = frame[group].to_numpy(dtype=float)
            values = np.where(values > 0, values, np.nan)
            lines.plot(frame.index, values, "o-", markersize=3, label=group, color=colour)
        _log_y(lines)
        lines.xaxis.set_major_locator(MaxNLocator(integer=True))
        lines.legend(fontsize=7, ncol=2)
    else:
        lines.text(0.5, 0.5, "no gradient norms recorded", ha="center", va="center")
    lines.set_xlabel("epoch")
    lines.set_ylabel("mean gradient L2 norm")
    lines.set_title("Gradient norm per group")
    lines.grid(alpha=0.3)
    save_figure(figure, path)
    return figure


def project_features(features, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Project features [N, D] to 2-D with PCA (default) or t-SNE.

    t-SNE costs seconds to minutes, so it is opt-in.
    """
    data = _as_numpy(features).astype(np.float32, copy=False)
    data = data.reshape(len(data), -1)
    n_components = min(2, data.shape[0], data.shape[1])
    if method == "pca":
        coords = PCA(n_components=n_components).fit_transform(data)
    elif method == "tsne":
        from sklearn.manifold import TSNE  # imported lazily: rarely used
        from threadpoolctl import threadpool_limits

        perplexity = float(min(30.0, max(1.0, (len(data) - 1) / 3)))
        tsne = TSNE(n_components=n_components, init="pca", perplexity=perplexity, random_state=seed)
        # on small sets OpenMP threads spend their time spin-waiting, 10x slower on a busy CPU
        threads = 1 if len(data) <= SMALL_TSNE else None
        with threadpool_limits(limits=threads, user_api="openmp"):
            coords = tsne.fit_transform(data)
    else:
        raise ValueError(f"unknown projection method {method!r}: use 'pca' or 'tsne'")
    # degenerate inputs (one sample, one dimension) still give an [N, 2] plot
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def plot_feature_projection(
    features,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    method: str = "pca",
) -> Figure:
    """Scatter a 2-D projection of the features, coloured by class, to a PNG."""
    coords = project_features(features, method)
    labels = _as_numpy(labels)
    colours = _class_colours(len(class_names))
    figure = _new_figure(7, 5.5)
    ax = figure.add_subplot()
    for index, name in enumerate(class_names):
        mask = labels == index
        if mask.any():
            ax.scatter(coords[mask, 0], coords[mask, 1], s=12, color=colours[index], label=name, alpha=0.8)
    ax.set_title(f"Test features ({method.upper()})")
    ax.set_xlabel("component 1")
    ax.set_ylabel("component 2")
    # outside the axes: loc="best" searches every point for a free spot (slow, and rarely finds one)
    ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5),
              ncol=1 + len(class_names) // 20)
    save_figure(figure, path)
    return figure


def _first_tensor(output) -> torch.Tensor | None:
    """The first tensor in a module output (tensor, tuple or list)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def image_batch(
    paths: Sequence[str], load_image, transform, size: int = 8
) -> torch.Tensor:
    """The first ``size`` images of ``paths`` as one transformed batch.

    ``load_image(path)`` returns a PIL image; ``transform`` takes a uint8 CHW
    tensor (the pipeline's eval transform). Decoding only these few images
    keeps the activation histograms cheap whatever the test set's size.
    """
    tensors = []
    for path in list(paths)[:size]:
        array = np.asarray(load_image(path).convert("RGB"), dtype=np.uint8)
        tensors.append(transform(torch.from_numpy(array.copy()).permute(2, 0, 1)))
    return torch.stack(tensors)


def collect_group_activations(
    model: torch.nn.Module, batch: torch.Tensor, max_values: int = 200_000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Flattened output values of every backbone group for one batch.

    Forward hooks record each group's output during one ``model.backbone``
    pass in eval mode (no grad); large outputs are subsampled to
    ``max_values`` with a fixed seed to keep the histograms cheap and
    reproducible. The model's train/eval mode is restored afterwards.
    """
    captured: dict[str, np.ndarray] = {}
    generator = torch.Generator().manual_seed(seed)

    def recorder(name: str):
        def hook(_module, _inputs, output) -> None:
            tensor = _first_tensor(output)
            if tensor is None:
                return
            flat = tensor.detach().float().flatten().cpu()
            if flat.numel() > max_values:
                # sampling with replacement: a full permutation of millions of values costs more
                # than the whole histogram, and the histogram's shape does not change
                flat = flat[torch.randint(flat.numel(), (max_values,), generator=generator)]
            captured[name] = flat.numpy()
        return hook

    handles = [module.register_forward_hook(recorder(name))
               for name, module in model.backbone.groups.items()]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad(), single_threaded():
            model.backbone(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: captured[name] for name in model.backbone.groups if name in captured}


def plot_activation_histograms(
    model: torch.nn.Module, batch: torch.Tensor, path: str | os.PathLike
) -> Figure:
    """One histogram per backbone group of its activations on ``batch``.

    Each title carries the mean, standard deviation and share of exact
    zeros (dead ReLUs show up there).
    """
    activations = collect_group_activations(model, batch)
    n = max(len(activations), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    figure = _new_figure(3.2 * cols, 2.6 * rows)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, values) in zip(axes, activations.items()):
        # one stairs artist instead of 60 bar patches per panel
        counts, edges = np.histogram(values, bins=60)
        ax.stairs(counts, edges, fill=True, color="tab:purple")
        _log_y(ax)
        zeros = float(np.mean(values == 0)) if values.size else 0.0
        ax.set_title(f"{name}\nmean {values.mean():.3g}  std {values.std():.3g}  zero {zeros:.0%}",
                     fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(activations):]:
        ax.axis("off")
    figure.suptitle("Activations per layer group (one fixed batch)")
    save_figure(figure, path)
    return figure


def _thumbnail(image: Image.Image, size: int = 160) -> Image.Image:
    """A small RGB copy: the grid needs no more and stays cheap to draw."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    return thumb


def plot_mistakes(
    images: Sequence[Image.Image],
    y_true: Sequence[int],
    y_pred: Sequence[int],
    confidence: Sequence[float],
    class_names: Sequence[str],
    path: str | os.PathLike,
    n: int = 16,
) -> Figure:
    """A grid of up to ``n`` misclassified images, each titled true/pred/prob.

    Pass the images already ordered (see ``most_confident_mistakes``); only
    the first ``n`` are drawn. With no mistakes the PNG says so.
    """
    count = min(n, len(images))
    cols = max(1, min(4, count))
    rows = max(1, math.ceil(count / cols))
    figure = _new_figure(2.4 * cols, 2.7 * rows + 0.4)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for index, ax in enumerate(axes):
        ax.axis("off")
        if index >= count:
            continue
        # nearest: no resampling filter to pay for, and small images stay crisp
        ax.imshow(np.asarray(_thumbnail(images[index])), interpolation="nearest")
        ax.set_title(
            f"true: {class_names[int(y_true[index])]}\n"
            f"pred: {class_names[int(y_pred[index])]} ({float(confidence[index]):.2f})",
            fontsize=8,
            color="darkred",
        )
    if count == 0:
        axes[0].text(0.5, 0.5, "no mistakes on the test set", ha="center", va="center")
    figure.suptitle("Most confident mistakes")
    save_figure(figure, path)
    return figure


# --------------------------------------------------------------------------
# One call for the evaluate stage
# --------------------------------------------------------------------------

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


def selected_epoch_row(history: pd.DataFrame, best_epoch: int | None = None) -> pd.Series:
    """The history row of the model being evaluated.

    ``best_epoch`` when given; otherwise the best validation accuracy within
    the last phase, which is the epoch the training loop keeps (first one on
    ties, as it only replaces the best on a strict improvement).
    """
    if best_epoch is not None and "epoch" in history and (history["epoch"] == best_epoch).any():
        return history[history["epoch"] == best_epoch].iloc[-1]
    last_phase = history
    if "phase" in history:
        last_phase = history[history["phase"] == history["phase"].iloc[-1]]
    return last_phase.loc[last_phase["val_acc"].idxmax()]


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
) -> tuple[dict, list[Path]]:
    """Write every diagnostic of one run under ``out_dir``; return (metrics, files).

    ``metrics`` is nested (``fit``, ``topk``, and ``weight_change`` when
    given) for the evaluate stage's metrics file; ``files`` are the
    PNGs, CSVs and the self-contained ``report.html`` to log to the run.
    ``load_image(path)`` is called only for the mistakes drawn (at most
    ``max_mistakes``), so the cost does not grow with the test set.
    ``summary`` adds the stage's own metrics (accuracy, macro-F1) to the
    report's summary table.

    ``features`` are the pretrained backbone's test features (the cache);
    ``model_features`` the evaluated model's own (a fine-tuned backbone's;
    None for a linear probe, whose features are the cached ones). Their
    comparison detects collapsed features; with ``selection`` (the train
    stage's reports/train.json) and ``train_counts`` (training images per
    class) the verdict (``fit.verdict``) names every problem found and the
    report says what to try next (see ``model_problems``); the numbers go
    to ``metrics["health"]``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y_true = _as_numpy(y_true).astype(np.int64)
    probs = _as_numpy(probs)
    y_pred = probs.argmax(axis=1)
    test_acc = float(np.mean(y_pred == y_true)) if len(y_true) else 0.0

    row = selected_epoch_row(history, best_epoch)
    fit = fit_diagnosis(row["train_acc"], row["val_acc"], test_acc, row["train_loss"], row["val_loss"],
                        thresholds)
    own_features = features if model_features is None else model_features
    health, findings = model_problems(
        y_true, y_pred, class_names, fit,
        None if model_features is None else feature_health(model_features, features, y_true),
        selection, train_counts, thresholds)
    fit["verdict"] = verdict_of(findings)
    topk = top_k_accuracies(y_true, probs)
    table = per_class_table(y_true, y_pred, class_names)

    plot_learning_curves(history, out / LEARNING_CURVES_PNG)
    plot_confusion_matrix(confusion(y_true, y_pred, len(class_names)), class_names, out / CONFUSION_PNG)
    write_csv(out / PER_CLASS_CSV, table)

    wrong = most_confident_mistakes(y_true, probs, max_mistakes)
    plot_mistakes([load_image(image_paths[i]) for i in wrong], y_true[wrong], y_pred[wrong],
                  probs[wrong, y_pred[wrong]], class_names, out / MISTAKES_PNG, n=max_mistakes)

    plot_feature_projection(own_features, y_true, class_names, out / FEATURES_PNG, method=projection)
    plot_activation_histograms(model, batch, out / ACTIVATIONS_PNG)

    metrics: dict = {"fit": fit, "topk": topk, "health": health}
    files = [out / name for name in (LEARNING_CURVES_PNG, CONFUSION_PNG, PER_CLASS_CSV, MISTAKES_PNG,
                                     FEATURES_PNG, ACTIVATIONS_PNG)]
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
        movement = pd.DataFrame({"group": list(weight_change),
                                 "relative_weight_change": [float(v) for v in weight_change.values()]})
        write_csv(out / LAYER_MOVEMENT_CSV, movement)
        movement_items.append(movement)
        files.append(out / LAYER_MOVEMENT_CSV)

    verdict = (f"Verdict: {fit['verdict']} (train-val accuracy gap {fit['train_val_gap']:.3f}, "
               f"val-test gap {fit['val_test_gap']:.3f}; epoch {int(row['epoch'])}, phase {row.get('phase', '-')}).")
    next_steps: list = [verdict] + (
        [pd.DataFrame(findings).rename(columns={"advice": "what to try next"})] if findings
        else ["No problem found: no collapsed features, every class predicted and recognised."])
    sections: dict[str, list] = {
        "Summary": [{**(summary or {}), "test_accuracy": test_acc, **topk, **fit, **health}],
        "Verdict and what to try next": next_steps,
        "Learning curves": [verdict, out / LEARNING_CURVES_PNG],
        "Confusion and per-class quality": [out / CONFUSION_PNG, table],
        "Most confident mistakes": [out / MISTAKES_PNG],
        "Layer movement": movement_items,
        "Features": [out / FEATURES_PNG, out / ACTIVATIONS_PNG],
    }
    files.append(write_html_report(out / REPORT_HTML, title, sections))
    return metrics, files

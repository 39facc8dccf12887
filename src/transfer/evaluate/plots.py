"""The pictures of a run: learning curves, confusion matrix, layer movement, feature projection, activations,
the most confident mistakes and Grad-CAM overlays.

Each `plot_*` draws on a `Figure` with the Agg canvas, never through pyplot, so nothing global is left open,
writes its PNG atomically and returns the figure. Everything is cheap by design (PCA by default, one small
batch for the activation histograms, at most 16 mistake thumbnails): the diagnostics may add at most 10% to a
run's time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
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

from transfer.evaluate.explain import overlay
from transfer.evaluate.metrics import as_numpy
from transfer.pipeline.files import atomic_path
from transfer.pipeline.runtime import single_threaded

DPI = 100
CONFUSION_CMAP = "Blues"
GRAD_NORM_PREFIX = "grad_norm/"
SMALL_TSNE = 2000  # t-SNE runs single-threaded up to this many points


def _new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure with an Agg canvas and constrained layout."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _image_grid(width: float, height: float, rows: int, cols: int):
    """(figure, axes) for a grid of titled images, laid out by fixed margins instead of constrained layout.

    Constrained layout measures every axes' title and ticks before drawing: on a grid of 16-30 images that
    took longer than drawing them (the evaluate stage's three grids: 2.1 s against 1.2 s). Each cell keeps
    room for a two-line title at font size 8, and the top 0.8 in holds the first row's and the figure's titles.
    """
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.8 / height, wspace=0.08, hspace=0.3)
    return figure, axes


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Save `figure` as a PNG at `path` atomically; return the path.

    No `bbox_inches="tight"`: the saved pixels then match the figure's own
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


def _class_colours(n_classes: int) -> np.ndarray:
    """Distinct RGBA colours for up to 20 classes, cycling beyond."""
    cmap = matplotlib.colormaps["tab10" if n_classes <= 10 else "tab20"]
    return np.array([cmap(i % cmap.N) for i in range(n_classes)])


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> Figure:
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
    image = ax.imshow(rates, cmap=CONFUSION_CMAP, norm=Normalize(0.0, 1.0), interpolation="nearest")
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
    """x values: `epoch` if it increases through the phases, else 1..rows."""
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
        ax.annotate(phases[i], (x[i], 1), xycoords=("data", "axes fraction"), va="top", fontsize=8, color="grey")


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
    """The `grad_norm/<group>` columns of a history, renamed to the groups."""
    columns = [c for c in history.columns if str(c).startswith(GRAD_NORM_PREFIX)]
    frame = history[columns].rename(columns=lambda c: c[len(GRAD_NORM_PREFIX) :])
    frame.index = _epoch_axis(history)
    return frame


def plot_layer_movement(
    weight_change: Mapping[str, float] | None,
    grad_norms: pd.DataFrame | None,
    path: str | os.PathLike,
) -> Figure:
    """Relative weight change per group (bars) and gradient norm per epoch.

    `grad_norms` has one row per epoch and one column per group (the
    `grad_norm/` prefix of history columns is accepted and dropped).
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

    frame = (
        pd.DataFrame()
        if grad_norms is None
        else grad_norms.rename(columns=lambda c: str(c).removeprefix(GRAD_NORM_PREFIX))
    )
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
    data = as_numpy(features).astype(np.float32, copy=False)
    data = data.reshape(len(data), -1)
    n_components = min(2, data.shape[0], data.shape[1])
    if method == "pca":
        # Seeded: above 500 samples or features scikit-learn picks its randomized solver, whose unseeded
        # result moved a few pixels between runs and broke dvc.lock's byte-identity.
        coords = PCA(n_components=n_components, random_state=seed).fit_transform(data)
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
    labels = as_numpy(labels)
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
    ax.legend(
        fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1 + len(class_names) // 20
    )
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


def image_batch(paths: Sequence[str], load_image, transform, size: int = 8) -> torch.Tensor:
    """The first `size` images of `paths` as one transformed batch.

    `load_image(path)` returns a PIL image; `transform` takes a uint8 CHW
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

    Forward hooks record each group's output during one `model.backbone`
    pass in eval mode (no grad); large outputs are subsampled to
    `max_values` with a fixed seed to keep the histograms cheap and
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

    handles = [module.register_forward_hook(recorder(name)) for name, module in model.backbone.groups.items()]
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


def plot_activation_histograms(model: torch.nn.Module, batch: torch.Tensor, path: str | os.PathLike) -> Figure:
    """One histogram per backbone group of its activations on `batch`.

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
        ax.set_title(f"{name}\nmean {values.mean():.3g}  std {values.std():.3g}  zero {zeros:.0%}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(activations) :]:
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
    *,
    title: str = "Most confident mistakes",
    captions: tuple[str, str] = ("true", "pred"),
    empty: str = "no mistakes on the test set",
) -> Figure:
    """A grid of up to `n` misclassified images, each titled true/pred/prob.

    Pass the images already ordered (see `most_confident_mistakes`); only
    the first `n` are drawn. With no mistakes the PNG says `empty`.
    `title` and `captions` name the grid and its two labels for other
    image lists (the label_issues stage: given/suggested label).
    """
    count = min(n, len(images))
    cols = max(1, min(4, count))
    rows = max(1, math.ceil(count / cols))
    figure, axes = _image_grid(2.4 * cols, 2.7 * rows + 0.4, rows, cols)
    for index, ax in enumerate(axes):
        ax.axis("off")
        if index >= count:
            continue
        # nearest: no resampling filter to pay for, and small images stay crisp
        ax.imshow(np.asarray(_thumbnail(images[index])), interpolation="nearest")
        ax.set_title(
            f"{captions[0]}: {class_names[int(y_true[index])]}\n"
            f"{captions[1]}: {class_names[int(y_pred[index])]} ({float(confidence[index]):.2f})",
            fontsize=8,
            color="darkred",
        )
    if count == 0:
        axes[0].text(0.5, 0.5, empty, ha="center", va="center")
    figure.suptitle(title)
    save_figure(figure, path)
    return figure


def plot_reliability(diagram_before: Sequence[Mapping], diagram_after: Sequence[Mapping], temperature: float, path):
    """Reliability diagram: accuracy per confidence bin before (T = 1) and after temperature scaling, the
    diagonal of perfect calibration, and the share of images per bin underneath (the rows of
    transfer.evaluate.calibration.reliability_diagram)."""
    figure = _new_figure(5.5, 5.5)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    total = max(1, sum(row["count"] for row in diagram_before))
    for rows, label, colour, shift in (
        (diagram_before, "before (T = 1)", "tab:red", -0.25),
        (diagram_after, f"after (T = {temperature:.3g})", "tab:blue", 0.25),
    ):
        full = [row for row in rows if row["count"]]
        top.plot(
            [row["confidence"] for row in full], [row["accuracy"] for row in full], "o-", color=colour, label=label
        )
        width = (rows[0]["upper"] - rows[0]["lower"]) / 2
        centres = [(row["lower"] + row["upper"]) / 2 + shift * width for row in rows]
        bottom.bar(centres, [row["count"] / total for row in rows], width=width, color=colour, alpha=0.7)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="Reliability diagram (test)")
    top.legend(fontsize=8, loc="upper left")
    bottom.set(xlabel="confidence (top-1 probability)", ylabel="share of images")
    save_figure(figure, path)
    return figure


def plot_gradcam(
    pixels: Sequence[np.ndarray],
    maps: Sequence,
    y_true: Sequence[int],
    y_pred: Sequence[int],
    confidence: Sequence[float],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str,
) -> Figure:
    """A grid of images (uint8 [H, W, 3], as the model saw them) with the Grad-CAM map of the predicted class
    over each (transfer.evaluate.explain), titled true/pred/prob; wrong predictions' titles in red."""
    count = len(pixels)
    cols = max(1, min(6, count))
    rows = max(1, math.ceil(count / cols))
    figure, axes = _image_grid(2.1 * cols, 2.4 * rows + 0.4, rows, cols)
    for index, ax in enumerate(axes):
        ax.axis("off")
        if index >= count:
            continue
        ax.imshow(overlay(pixels[index], maps[index]), interpolation="nearest")
        right = int(y_true[index]) == int(y_pred[index])
        ax.set_title(
            f"true: {class_names[int(y_true[index])]}\n"
            f"pred: {class_names[int(y_pred[index])]} ({float(confidence[index]):.2f})",
            fontsize=8,
            color="black" if right else "darkred",
        )
    if count == 0:
        axes[0].text(0.5, 0.5, "no image to show", ha="center", va="center")
    figure.suptitle(title)
    save_figure(figure, path)
    return figure

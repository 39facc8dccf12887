"""Diagnostics produce the right numbers and real, decodable, non-blank PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diagnostics_helpers import CLASSES, TinyModel, decode_png, history_frame, make_predictions, write_image_files
from matplotlib import colormaps
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix

from transfer.evaluate import diagnostics as diag
from transfer.evaluate import health, plots
from transfer.evaluate import metrics as evaluate_metrics
from transfer.models import groups as layer_stats
from transfer.pipeline.runtime import single_threaded


@pytest.fixture(scope="module")
def predictions() -> tuple[np.ndarray, np.ndarray]:
    return make_predictions()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    return write_image_files(tmp_path_factory.mktemp("images"))


# ---------------------------------------------------------------- numbers


def test_fit_diagnosis_verdicts() -> None:
    thresholds = {"overfit_gap": 0.05, "underfit_acc": 0.6}
    over = health.fit_diagnosis(0.99, 0.80, 0.78, 0.05, 0.7, thresholds)
    assert over["verdict"] == "overfitting" and over["overfitting"] == 1 and over["underfitting"] == 0
    assert over["train_val_gap"] == pytest.approx(0.19)
    assert over["val_test_gap"] == pytest.approx(0.02)
    assert over["val_train_loss_gap"] == pytest.approx(0.65)

    under = health.fit_diagnosis(0.40, 0.38, 0.37, 1.6, 1.7, thresholds)
    assert (under["verdict"], under["underfitting"], under["overfitting"]) == ("underfitting", 1, 0)

    good = health.fit_diagnosis(0.90, 0.88, 0.87, 0.3, 0.35, thresholds)
    assert (good["verdict"], good["overfitting"], good["underfitting"]) == ("good fit", 0, 0)
    # everything but the verdict is a plain number, so it sorts in dvc exp show
    assert all(isinstance(v, (int, float)) for k, v in good.items() if k != "verdict")
    # a stricter gap threshold flips the same numbers to overfitting
    assert health.fit_diagnosis(0.90, 0.88, 0.87, 0.3, 0.35, {"overfit_gap": 0.01})["verdict"] == "overfitting"


def test_per_class_table_matches_definitions(predictions) -> None:
    y_true, probs = predictions
    y_pred = probs.argmax(axis=1)
    table = evaluate_metrics.per_class_table(y_true, y_pred, CLASSES)
    assert list(table.columns) == ["class", "precision", "recall", "f1", "support", "one_vs_rest_accuracy"]
    assert list(table["class"]) == CLASSES
    cm = confusion_matrix(y_true, y_pred, labels=range(len(CLASSES)))
    for index, row in table.iterrows():
        tp = cm[index, index]
        assert row["support"] == cm[index].sum()
        assert row["recall"] == pytest.approx(tp / cm[index].sum())
        assert row["precision"] == pytest.approx(tp / cm[:, index].sum())
        tn = cm.sum() - cm[index].sum() - cm[:, index].sum() + tp
        assert row["one_vs_rest_accuracy"] == pytest.approx((tp + tn) / cm.sum())
    # a class absent from the test set still has its row, with zeros
    absent = evaluate_metrics.per_class_table(np.array([0, 1, 1]), np.array([0, 1, 0]), ["a", "b", "c"])
    assert absent.loc[2, ["precision", "recall", "f1", "support"]].tolist() == [0, 0, 0, 0]


def test_top_k_accuracies(predictions) -> None:
    y_true, probs = predictions
    result = evaluate_metrics.top_k_accuracies(y_true, probs)
    assert set(result) == {"top1_accuracy", "top3_accuracy", "top5_accuracy"}
    assert result["top1_accuracy"] == pytest.approx(accuracy_score(y_true, probs.argmax(1)))
    top3 = np.argsort(-probs, axis=1)[:, :3]
    assert result["top3_accuracy"] == pytest.approx(np.mean([t in row for t, row in zip(y_true, top3)]))
    assert result["top1_accuracy"] <= result["top3_accuracy"] <= result["top5_accuracy"] < 1.0
    # k must be below the number of classes: 3 classes keep only top-1
    assert set(evaluate_metrics.top_k_accuracies(y_true % 3, probs[:, :3])) == {"top1_accuracy"}
    binary = evaluate_metrics.top_k_accuracies(np.array([0, 1, 1]), np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]))
    assert binary == {"top1_accuracy": pytest.approx(2 / 3)}


def test_most_confident_mistakes() -> None:
    y_true = np.array([0, 1, 2, 0, 1])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],  # right
            [0.6, 0.3, 0.1],  # wrong, 0.6
            [0.05, 0.9, 0.05],  # wrong, 0.9
            [0.2, 0.7, 0.1],  # wrong, 0.7
            [0.1, 0.8, 0.1],
        ],  # right
    )
    assert evaluate_metrics.most_confident_mistakes(y_true, probs, n=16).tolist() == [2, 3, 1]
    assert evaluate_metrics.most_confident_mistakes(y_true, probs, n=2).tolist() == [2, 3]
    assert evaluate_metrics.most_confident_mistakes(y_true[:1], probs[:1], n=4).tolist() == []


def test_relative_weight_change_and_grad_norms() -> None:
    torch.manual_seed(0)
    model = TinyModel()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert layer_stats.relative_weight_change(initial, model) == {
        "stem": 0.0,
        "stage1": 0.0,
        "stage2": 0.0,
        "head": 0.0,
    }

    # freeze the stem, take a real optimisation step
    for param in model.backbone.groups["stem"].parameters():
        param.requires_grad_(False)
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, 32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    norms = layer_stats.group_grad_norms(model)
    assert list(norms) == ["stem", "stage1", "stage2", "head"]
    assert norms["stem"] == 0.0 and norms["stage1"] > 0 and norms["head"] > 0
    expected = torch.sqrt(sum((p.grad**2).sum() for p in model.head.parameters()))
    assert norms["head"] == pytest.approx(float(expected), rel=1e-5)
    optimiser.step()

    change = layer_stats.relative_weight_change(initial, model)
    assert change["stem"] == 0.0 and change["stage2"] > 0
    # theta0 of the backbone alone (the pretrained weights): the head is left out
    backbone_only = {k: v for k, v in initial.items() if k.startswith("backbone.")}
    assert list(layer_stats.relative_weight_change(backbone_only, model)) == ["stem", "stage1", "stage2"]
    weight, bias = model.head.weight.detach(), model.head.bias.detach()
    w0, b0 = initial["head.weight"], initial["head.bias"]
    manual = torch.sqrt(((weight - w0) ** 2).sum() + ((bias - b0) ** 2).sum()) / torch.sqrt(
        (w0**2).sum() + (b0**2).sum()
    )
    assert change["head"] == pytest.approx(float(manual), rel=1e-5)


# ---------------------------------------------------------------- pictures


def test_confusion_plot_draws_sklearn_matrix(tmp_path, predictions) -> None:
    y_true, probs = predictions
    y_pred = probs.argmax(axis=1)
    cm = evaluate_metrics.confusion(y_true, y_pred, len(CLASSES))
    np.testing.assert_array_equal(cm, confusion_matrix(y_true, y_pred))
    path = tmp_path / "confusion.png"
    figure = plots.plot_confusion_matrix(cm, CLASSES, path)
    pixels = decode_png(path)

    # each cell's colour in the decoded PNG is the colormap of its row rate
    ax = figure.axes[0]
    height = pixels.shape[0]
    rates = cm / cm.sum(axis=1, keepdims=True)
    cmap = colormaps[plots.CONFUSION_CMAP]
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            # a point in the cell's corner, clear of the count text
            x, y = ax.transData.transform((j - 0.38, i - 0.38))
            drawn = pixels[int(round(height - y)), int(round(x))]
            expected = np.array(cmap(rates[i, j])[:3]) * 255
            assert np.abs(drawn - expected).max() <= 3, (i, j, drawn, expected)


def test_learning_curves_png(tmp_path) -> None:
    path = tmp_path / "learning_curves.png"
    figure = plots.plot_learning_curves(history_frame(), path)
    decode_png(path)
    loss_ax = figure.axes[0]
    assert [line.get_label() for line in loss_ax.get_lines()][:2] == ["train_loss", "val_loss"]
    np.testing.assert_allclose(loss_ax.get_lines()[0].get_ydata(), history_frame()["train_loss"])
    assert len(figure.axes) == 3  # loss, accuracy, learning rate


def test_layer_movement_png(tmp_path) -> None:
    history = history_frame()
    grads = plots.grad_norm_frame(history)
    assert list(grads.columns) == ["stem", "stage1", "head"]
    path = tmp_path / "layer_movement.png"
    figure = plots.plot_layer_movement({"stem": 0.001, "stage1": 0.01, "head": 0.5}, grads, path)
    decode_png(path)
    bars = figure.axes[0].patches
    assert [b.get_height() for b in bars] == pytest.approx([0.001, 0.01, 0.5])
    legend = [text.get_text() for text in figure.axes[1].get_legend().get_texts()]
    assert legend == ["stem", "stage1", "head"]
    # a group frozen throughout has no line
    frozen = plots.plot_layer_movement({"stem": 0.0}, grads.assign(stage2=0.0), tmp_path / "frozen.png")
    assert "stage2" not in [t.get_text() for t in frozen.axes[1].get_legend().get_texts()]
    # feature-extraction runs have no movement to show, the picture says so
    empty = tmp_path / "empty_movement.png"
    plots.plot_layer_movement(None, None, empty)
    decode_png(empty)


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_feature_projection_png(tmp_path, predictions, method) -> None:
    y_true, _ = predictions
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=5, size=(len(CLASSES), 32))
    features = torch.tensor(centres[y_true] + rng.normal(size=(len(y_true), 32)), dtype=torch.float32)
    coords = plots.project_features(features, method)
    assert coords.shape == (len(y_true), 2)
    path = tmp_path / f"features_{method}.png"
    figure = plots.plot_feature_projection(features, y_true, CLASSES, path, method=method)
    decode_png(path)
    assert len(figure.axes[0].collections) == len(np.unique(y_true))


def test_activation_histograms_png(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyModel().train()
    batch = torch.randn(4, 3, 32, 32)
    activations = plots.collect_group_activations(model, batch)
    assert list(activations) == ["stem", "stage1", "stage2"]
    assert activations["stem"].size == 4 * 8 * 16 * 16
    assert (activations["stem"] >= 0).all()  # after the ReLU
    assert model.training  # mode restored
    assert not any(module._forward_hooks for module in model.modules())  # hooks removed
    path = tmp_path / "activations.png"
    figure = plots.plot_activation_histograms(model, batch, path)
    decode_png(path)
    titled = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title().split("\n")[0] for ax in titled] == ["stem", "stage1", "stage2"]


def test_mistakes_grid_png(tmp_path, image_files, predictions) -> None:
    y_true, probs = predictions
    y_true, probs = y_true[: len(image_files)], probs[: len(image_files)]
    order = evaluate_metrics.most_confident_mistakes(y_true, probs, n=16)
    assert 0 < len(order) <= 16
    images = [Image.open(image_files[i]).convert("RGB") for i in order]
    y_pred = probs.argmax(axis=1)
    path = tmp_path / "mistakes.png"
    figure = plots.plot_mistakes(images, y_true[order], y_pred[order], probs[order, y_pred[order]], CLASSES, path)
    decode_png(path)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert len(titles) == len(order)
    first = order[0]
    assert titles[0] == (
        f"true: {CLASSES[y_true[first]]}\npred: {CLASSES[y_pred[first]]} ({probs[first, y_pred[first]]:.2f})"
    )
    none = tmp_path / "no_mistakes.png"
    plots.plot_mistakes([], [], [], [], CLASSES, none)
    decode_png(none)


# ---------------------------------------------------------------- the evaluate stage's call


def test_selected_epoch_row() -> None:
    history = history_frame()
    history.loc[1, "val_acc"] = 0.99  # best overall, but in the probe phase
    assert health.selected_epoch_row(history)["epoch"] == 6  # best of the last phase
    assert health.selected_epoch_row(history, best_epoch=2)["epoch"] == 2


def test_write_run_diagnostics(tmp_path, image_files, predictions) -> None:
    from html.parser import HTMLParser

    y_true, probs = predictions
    y_true, probs = y_true[: len(image_files)], probs[: len(image_files)]
    torch.manual_seed(0)
    model = TinyModel()
    loaded: list[str] = []

    def load_image(path: str) -> Image.Image:
        loaded.append(path)
        return Image.open(path).convert("RGB")

    out = tmp_path / "diagnostics"
    metrics, files = diag.write_run_diagnostics(
        out,
        class_names=CLASSES,
        y_true=y_true,
        probs=probs,
        history=history_frame(),
        image_paths=[str(p) for p in image_files],
        load_image=load_image,
        features=torch.randn(len(y_true), 16),
        model=model,
        batch=torch.randn(4, 3, 32, 32),
        weight_change={"stem": 0.0, "stage1": 0.02, "stage2": 0.05, "head": 0.4},
        thresholds={"overfit_gap": 0.05, "underfit_acc": 0.6},
        summary={"macro_f1": 0.5},
    )
    test_acc = float(np.mean(probs.argmax(1) == y_true))
    assert metrics["fit"] == health.fit_diagnosis(0.92, 0.81, test_acc, 2 / 6, 2.2 / 6 + 0.05)
    assert metrics["fit"]["verdict"] == "overfitting"
    assert metrics["health"]["predicted_classes"] == len(CLASSES) and metrics["health"]["collapsed_features"] == 0
    assert set(metrics["topk"]) == {"top1_accuracy", "top3_accuracy", "top5_accuracy"}
    assert metrics["weight_change"]["head"] == 0.4
    # only the mistakes drawn were decoded
    assert len(loaded) == len(evaluate_metrics.most_confident_mistakes(y_true, probs, 16))

    names = sorted(p.name for p in files)
    assert names == sorted(
        [
            diag.LEARNING_CURVES_PNG,
            diag.CONFUSION_PNG,
            diag.PER_CLASS_CSV,
            diag.MISTAKES_PNG,
            diag.FEATURES_PNG,
            diag.ACTIVATIONS_PNG,
            diag.LAYER_MOVEMENT_PNG,
            diag.LAYER_MOVEMENT_CSV,
            diag.REPORT_HTML,
        ]
    )
    for path in files:
        if path.suffix == ".png":
            decode_png(path)
    per_class = pd.read_csv(out / diag.PER_CLASS_CSV)
    assert list(per_class["class"]) == CLASSES and per_class["support"].sum() == len(y_true)
    movement = pd.read_csv(out / diag.LAYER_MOVEMENT_CSV)
    assert movement["group"].tolist() == ["stem", "stage1", "stage2", "head"]

    class ImgCounter(HTMLParser):
        sources: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.sources.append(dict(attrs)["src"])

    counter = ImgCounter()
    counter.feed((out / diag.REPORT_HTML).read_text(encoding="utf-8"))
    assert len(counter.sources) == 6 and all(s.startswith("data:image/png;base64,") for s in counter.sources)


def test_feature_extraction_run_has_no_layer_movement(tmp_path, image_files, predictions) -> None:
    y_true, probs = predictions
    y_true, probs = y_true[: len(image_files)], probs[: len(image_files)]
    metrics, files = diag.write_run_diagnostics(
        tmp_path,
        class_names=CLASSES,
        y_true=y_true,
        probs=probs,
        history=history_frame(fine_tune=False),
        image_paths=[str(p) for p in image_files],
        load_image=lambda p: Image.open(p).convert("RGB"),
        features=torch.randn(len(y_true), 16),
        model=TinyModel(),
        batch=torch.randn(2, 3, 32, 32),
    )
    assert "weight_change" not in metrics
    assert not {diag.LAYER_MOVEMENT_PNG, diag.LAYER_MOVEMENT_CSV} & {p.name for p in files}
    assert "no layer of the backbone was trained" in (tmp_path / diag.REPORT_HTML).read_text()


def test_probe_run_reports_frozen_backbone(tmp_path, image_files, predictions) -> None:
    y_true, probs = predictions
    y_true, probs = y_true[: len(image_files)], probs[: len(image_files)]
    zeros = {"head": 0.7, "stage1": 0.0, "stage2": 0.0, "stem": 0.0}  # sorted, as in JSON; head trained
    metrics, files = diag.write_run_diagnostics(
        tmp_path,
        class_names=CLASSES,
        y_true=y_true,
        probs=probs,
        history=history_frame(fine_tune=False),
        image_paths=[str(p) for p in image_files],
        load_image=lambda p: Image.open(p).convert("RGB"),
        features=torch.randn(len(y_true), 16),
        model=TinyModel(),
        batch=torch.randn(2, 3, 32, 32),
        weight_change=zeros,
    )
    # the metric columns exist for every run, so dvc exp show lines probe and fine-tune runs up
    assert metrics["weight_change"] == zeros
    movement = pd.read_csv(tmp_path / diag.LAYER_MOVEMENT_CSV)
    assert movement["group"].tolist() == ["stem", "stage1", "stage2", "head"]
    assert movement["relative_weight_change"].tolist() == [0, 0, 0, 0.7]
    assert diag.FROZEN_NOTE in (tmp_path / diag.REPORT_HTML).read_text()
    decode_png(tmp_path / diag.LAYER_MOVEMENT_PNG)


def test_image_batch(image_files) -> None:
    from torchvision.transforms import v2

    transform = v2.Compose([v2.Resize((32, 32), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    batch = plots.image_batch([str(p) for p in image_files], lambda p: Image.open(p), transform, size=5)
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.float32
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0 and float(batch.std()) > 0


def test_single_threaded_restores_thread_count() -> None:
    before = torch.get_num_threads()
    with single_threaded():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_in_group_order() -> None:
    sorted_keys = {"head": 0.4, "stage1": 0.1, "stage2": 0.2, "stem": 0.0, "extra": 1.0}
    ordered = layer_stats.in_group_order(sorted_keys, TinyModel())
    assert list(ordered) == ["stem", "stage1", "stage2", "head", "extra"] and ordered["head"] == 0.4

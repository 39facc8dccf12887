"""Issue 13 on real training: fine-tuning never ships worse than its start (epoch 0 takes part in model
selection), class-balanced losses that do not collapse, the verdict's detectors (collapsed features, few
predicted classes, zero recall, fine-tune lost to probe) and the data report's imbalance warning."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from finetune_helpers import params, tiny_classifier, tiny_dataset
from PIL import Image

from transfer.data.datasets import DeviceLoader
from transfer.data.report import class_balance, imbalance_message
from transfer.data.sources import materialise
from transfer.evaluate import diagnostics as diag
from transfer.evaluate.health import feature_health, model_problems, verdict_of
from transfer.evaluate.metrics import macro_f1_from_confusion
from transfer.features import FeatureCache, extract_features
from transfer.pipeline.params import HeadParams
from transfer.train.finetune import fine_tune
from transfer.train.losses import class_weights, classification_loss, clip_gradients
from transfer.train.probe import train_linear_probe
from transfer.train.result import model_selection, selection_message

CPU = torch.device("cpu")


def states_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a)


def cache(model, dataset) -> FeatureCache:
    # a copy: extraction runs under inference_mode, which would make the model's own weights inference tensors
    backbone = copy.deepcopy(model.backbone)
    return FeatureCache(extract_features(backbone, dataset, 16, CPU), torch.tensor(dataset.labels), [])


def probed(train, val):
    """A tiny network with a linear probe trained on its features: what fine-tuning starts from."""
    model = tiny_classifier()
    probe = train_linear_probe(cache(model, train), cache(model, val), 3, HeadParams(epochs=40, lr=0.05), 0)
    model.head.load_state_dict(probe.model.state_dict())
    return model, probe.history[probe.best_epoch - 1]


# ---------------------------------------------------------------- never ship worse than the start


def test_a_fine_tune_that_wrecks_the_model_keeps_the_start_model_epoch_0():
    """An absurd learning rate destroys the network; the start (epoch 0) wins and is returned unchanged."""
    train, val = tiny_dataset(), tiny_dataset(seed=1)
    start_model, probe_row = probed(train, val)
    assert probe_row["val_acc"] > 0.9
    start = copy.deepcopy(start_model.state_dict())
    rows = []
    result = fine_tune(
        start_model,
        0,
        train,
        val,
        params(epochs=2, lr=10.0, head_lr_mult=100.0),
        0,
        CPU,
        first_epoch=7,
        on_epoch=rows.append,
        start_train={"train_acc": 0.9, "train_loss": 0.3},
    )
    assert rows[0]["phase"] == "start" and rows[0]["epoch"] == 6 and rows[0]["train_acc"] == 0.9
    assert [row["epoch"] for row in rows] == [6, 7, 8]
    assert rows[0]["val_acc"] == pytest.approx(probe_row["val_acc"])  # images through the net = cached features
    assert rows[0]["val_acc"] > max(row["val_acc"] for row in rows[1:])
    assert result.kept_start and result.best_epoch == 6
    assert states_equal(start, result.model.state_dict())

    # train.json and the stage's message say which model won
    history = [
        {"epoch": e, "phase": "probe", "val_acc": 0.5, "val_loss": 1.0, "val_macro_f1": 0.4, "train_acc": 0.6}
        for e in range(1, 6)
    ] + result.history
    selection = model_selection(history, result.best_epoch, "val_acc")
    assert selection["selected"] == "start" and selection["kept_start"] == 1 and selection["finetune_gain"] < 0
    assert selection["val_acc"] == rows[0]["val_acc"] and selection["train_acc"] == 0.9
    message = selection_message(result.history, "val_acc", result.kept_start, "the linear probe")
    assert (
        message.startswith("train: no fine-tuning epoch beat the linear probe")
        and "keeping the linear probe" in message
    )


def test_a_fine_tune_that_helps_is_kept_and_its_gain_recorded():
    train, val = tiny_dataset(), tiny_dataset(seed=1)
    # from a random head (the start is chance), AdamW learns the brightness classes
    result = fine_tune(
        tiny_classifier(batch_norm=False),
        0,
        train,
        val,
        params(epochs=3, lr=0.01, head_lr_mult=10.0, optimizer="adamw", monitor="val_macro_f1"),
        0,
        CPU,
    )
    assert not result.kept_start and result.best_epoch >= 1
    selection = model_selection(result.history, result.best_epoch, "val_macro_f1")
    assert selection["selected"] == "finetune" and selection["kept_start"] == 0 and selection["finetune_gain"] > 0
    assert all("val_macro_f1" in row for row in result.history)
    assert (
        model_selection(
            [{"epoch": 1, "phase": "probe", "val_acc": 0.7, "val_loss": 0.9, "val_macro_f1": 0.6, "train_acc": 0.8}],
            1,
            "val_acc",
        )["selected"]
        == "probe"
    )


def test_val_macro_f1_matches_scikit_learn():
    from sklearn.metrics import confusion_matrix, f1_score

    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, 200), rng.integers(0, 3, 200)  # class 3 never predicted
    matrix = confusion_matrix(y_true, y_pred, labels=range(4))
    expected = f1_score(y_true, y_pred, labels=range(4), average="macro", zero_division=0)
    assert macro_f1_from_confusion(matrix) == pytest.approx(expected)


# ---------------------------------------------------------------- class balance


def test_weighted_loss_does_not_pull_predictions_toward_rare_classes():
    """Optimal logits for one majority-class image under heavy class weights and label smoothing: the fixed
    loss still predicts the true class; torch's weighted smoothing pushed it to the rare class."""
    weights = torch.tensor([0.1, 5.0])  # class 1 is rare
    target = torch.tensor([0])

    def optimum(loss_fn) -> torch.Tensor:
        logits = torch.zeros(1, 2, requires_grad=True)
        optimizer = torch.optim.SGD([logits], lr=0.5)
        for _ in range(300):
            optimizer.zero_grad()
            loss_fn(logits, target).backward()
            optimizer.step()
        return logits.detach().softmax(1)[0]

    fixed = optimum(classification_loss(0.3, weights))
    legacy = optimum(
        lambda logits, y: torch.nn.functional.cross_entropy(logits, y, weight=weights, label_smoothing=0.3)
    )
    assert fixed[0] == pytest.approx(1 - 0.3 / 2, abs=0.01)  # exactly the smoothed target
    assert legacy[0] < 0.5  # the old loss preferred the rare class for a majority-class image
    # per-sample weights: the class weights average 1 over the training samples
    labels = [0] * 18 + [1] * 2
    assert class_weights(labels, 2)[torch.tensor(labels)].mean() == pytest.approx(1.0)


def test_probe_class_balance_recovers_a_rare_class():
    """Overlapping classes at 20:1: the unweighted probe never predicts the rare one; the weighted one does."""
    generator = torch.Generator().manual_seed(0)

    def features(n_major: int, n_minor: int) -> FeatureCache:
        major = torch.randn(n_major, 8, generator=generator)
        minor = torch.randn(n_minor, 8, generator=generator) + 0.5
        return FeatureCache(torch.cat([major, minor]), torch.tensor([0] * n_major + [1] * n_minor), [])

    train, val = features(400, 20), features(200, 10)
    plain = train_linear_probe(train, val, 2, HeadParams(epochs=30), 0)
    balanced = train_linear_probe(train, val, 2, HeadParams(epochs=30, class_balance="loss", monitor="val_macro_f1"), 0)
    with torch.no_grad():
        recall = [
            float((model(val.features).argmax(1)[val.labels == 1] == 1).float().mean())
            for model in (plain.model, balanced.model)
        ]
    assert recall[0] < 0.2 and recall[1] > 0.5
    assert balanced.history[balanced.best_epoch - 1]["val_macro_f1"] == max(r["val_macro_f1"] for r in balanced.history)


# ---------------------------------------------------------------- the verdict's detectors


@torch.no_grad()
def pooled_features(model, dataset) -> torch.Tensor:
    model.eval()
    return torch.cat([model.backbone(images) for images, _ in DeviceLoader(dataset, CPU, batch_size=16)])


def collapse(model) -> None:
    """What a wrecked fine-tune leaves: the last group's BatchNorm shifts every channel below zero, so the
    ReLU kills them for every image (the issue's run had 99% of them dead)."""
    bn = model.backbone.groups["block2"][1]
    with torch.no_grad():
        bn.bias[:] = -1e4


def test_collapse_and_zero_recall_detectors_fire_on_a_collapsed_model_and_not_on_a_healthy_one():
    train, val, test = tiny_dataset(), tiny_dataset(seed=1), tiny_dataset(per_class=10, seed=2)
    pretrained_features = pooled_features(tiny_classifier(), test)
    healthy, _ = probed(train, val)
    labels = np.asarray(test.labels)

    def verdict(model):
        features = pooled_features(model, test)
        predictions = model.head(features).argmax(1).numpy()
        health, findings = model_problems(
            labels,
            predictions,
            ["dark", "mid", "bright"],
            {"underfitting": 0, "overfitting": 0},
            feature_health(features, pretrained_features, labels),
            None,
            {"dark": 8, "mid": 8, "bright": 8},
        )
        return health, findings

    health, findings = verdict(healthy)
    assert health["collapsed_features"] == 0 and health["zero_recall_classes"] == 0
    assert health["few_predicted_classes"] == 0 and verdict_of(findings) == "good fit"

    collapsed = copy.deepcopy(healthy)
    collapse(collapsed)
    health, findings = verdict(collapsed)
    assert health["effective_rank"] < 1 and health["dead_share"] == 1
    assert health["collapsed_features"] == 1 and health["few_predicted_classes"] == 1
    assert health["zero_recall_classes"] >= 2
    problems = [finding["problem"] for finding in findings]
    assert problems[:3] == ["collapsed features", "predicts few classes", "zero-recall classes"]
    assert verdict_of(findings).startswith("collapsed features, predicts few classes")
    assert all(finding["advice"] for finding in findings)
    assert "training images: " in findings[2]["evidence"]


def test_lost_to_probe_and_the_report_says_what_to_try_next(tmp_path):
    rng = np.random.default_rng(0)
    y_true = np.repeat(np.arange(3), 10)
    y_pred = np.where(y_true == 2, 0, y_true)  # class 2 never recognised
    probs = np.eye(3)[y_pred] * 0.8 + 0.2 / 3
    history = __import__("pandas").DataFrame(
        [
            {"epoch": 1, "phase": "probe", "train_acc": 0.7, "train_loss": 0.8, "val_acc": 0.68, "val_loss": 0.9},
            {"epoch": 2, "phase": "start", "train_acc": 0.7, "train_loss": 0.8, "val_acc": 0.68, "val_loss": 0.9},
            {"epoch": 3, "phase": "finetune", "train_acc": 0.5, "train_loss": 1.2, "val_acc": 0.4, "val_loss": 1.5},
        ]
    )
    model = tiny_classifier()
    image = tmp_path / "a.png"
    write_image_folder(tmp_path / "img", {"a": 1})
    image = next((tmp_path / "img").rglob("*.png"))

    metrics, files = diag.write_run_diagnostics(
        tmp_path / "out",
        class_names=["a", "b", "c"],
        y_true=y_true,
        probs=probs,
        history=history,
        image_paths=[str(image)] * 30,
        load_image=lambda p: Image.open(p).convert("RGB"),
        features=torch.tensor(rng.normal(size=(30, 16)), dtype=torch.float32),
        model=model,
        batch=torch.rand(2, 3, 16, 16),
        best_epoch=2,
        selection={"kept_start": 1, "monitor": "val_acc", "finetune_gain": -0.28},
        train_counts={"a": 50, "b": 50, "c": 3},
    )
    assert metrics["health"]["lost_to_probe"] == 1 and metrics["health"]["zero_recall_classes"] == 1
    assert metrics["fit"]["verdict"] == "zero-recall classes, fine-tune lost to probe"
    page = (tmp_path / "out" / diag.REPORT_HTML).read_text()
    assert "What to try next" in page or "what to try next" in page
    assert "head.class_balance: loss" in page and "c 3" in page
    per_class = __import__("pandas").read_csv(tmp_path / "out" / diag.PER_CLASS_CSV)
    assert per_class.loc[2, "recall"] == 0 and per_class.loc[2, "one_vs_rest_accuracy"] > 0.6


# ---------------------------------------------------------------- the data report's imbalance warning


def test_class_balance_and_warning_threshold():
    balance = class_balance({"cat": 140, "dog": 10, "fox": 70}, warn_above=3)
    assert balance["imbalance_ratio"] == 14 and balance["smallest_class"] == "dog" and balance["imbalance_warning"]
    assert "14.0:1" in imbalance_message(balance, 3)
    balanced = class_balance({"cat": 10, "dog": 12}, warn_above=3)
    assert not balanced["imbalance_warning"] and imbalance_message(balanced) is None


def test_download_reports_class_counts_and_warns_on_imbalance(tmp_path: Path, caplog):
    images = write_image_folder(tmp_path / "images", {"common": 28, "rare": 2}, size=8)
    raw = tmp_path / "repo" / "data" / "raw"
    materialise({"source": "folder", "path": str(images), "imbalance_warning": 5.0}, raw, tmp_path / "repo")
    report = json.loads((raw / "data_report.json").read_text())
    assert report["class_counts"] == {"common": 28, "rare": 2} and report["imbalance_ratio"] == 14
    assert report["imbalance_warning"] is True
    assert "warning: classes are imbalanced, 14.0:1" in caplog.text and "class_balance: loss" in caplog.text
    caplog.clear()
    materialise({"source": "folder", "path": str(images), "imbalance_warning": 20.0}, raw, tmp_path / "repo")
    assert "imbalanced" not in caplog.text


def test_adaptive_clipping_bounds_each_backbone_unit_and_leaves_the_head_alone():
    """grad_clip_agc: no output unit of the backbone gets a gradient above `factor` x its weight norm (timm's
    adaptive_clip_grad), smaller gradients pass unchanged, and the head is never clipped."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.backbone = torch.nn.Conv2d(3, 8, 3)
    model.head = torch.nn.Linear(8, 2)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 100
    model.backbone.weight.grad[0] = model.backbone.weight[0].detach() * 1e-4  # one unit already small
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    clip_gradients(model, None, 0.01)
    weight, grad = model.backbone.weight.detach(), model.backbone.weight.grad
    unit_limit = 0.01 * weight.flatten(1).norm(dim=1).clamp_min(1e-3)
    assert torch.all(grad.flatten(1).norm(dim=1) <= unit_limit * (1 + 1e-5))
    assert torch.equal(grad[0], before["backbone.weight"][0])  # under its limit: untouched
    assert model.backbone.bias.grad.norm() <= 0.01 * model.backbone.bias.detach().norm().clamp_min(1e-3) * (1 + 1e-5)
    assert torch.equal(model.head.weight.grad, before["head.weight"])
    assert torch.equal(model.head.bias.grad, before["head.bias"])
    clip_gradients(model, 1.0, None)  # then the global norm, over every trainable parameter
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm() <= 1.0 + 1e-5

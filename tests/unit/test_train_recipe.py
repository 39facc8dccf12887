"""transfer.train.recipe.train_model in-process: the train stage's recipe on a tiny random-init backbone and
in-memory images (no subprocess, no files, no pretrained weights)."""

from __future__ import annotations

import pytest
import torch
from finetune_helpers import params, tiny_backbone, tiny_dataset

from transfer.data.config import DataConfig
from transfer.data.transforms import eval_batch_transform
from transfer.features import FeatureCache
from transfer.models.backbones import LoadedBackbone
from transfer.models.groups import LayerGroupError
from transfer.pipeline.params import HeadParams
from transfer.train.recipe import TrainingInputs, train_model

CONFIG = DataConfig(16, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
CLASSES = ["dark", "grey", "light"]
CPU = torch.device("cpu")


def features_of(backbone, images) -> FeatureCache:
    """What the features stage caches: the pooled backbone output of the evaluation transform."""
    backbone.eval()
    with torch.no_grad():
        features = backbone(eval_batch_transform(CONFIG)(images.transformed(list(range(len(images))))))
    return FeatureCache(features, torch.tensor(images.labels), [f"{i}.png" for i in range(len(images))])


def inputs_and_backbone() -> tuple[TrainingInputs, LoadedBackbone]:
    train, val = tiny_dataset(per_class=8), tiny_dataset(per_class=4, seed=1)
    backbone = tiny_backbone()
    inputs = TrainingInputs(
        root=None,
        classes=CLASSES,
        train_features=features_of(backbone, train),
        val_features=features_of(backbone, val),
        data_hash="tiny",
        split_images={"train": train, "val": val},  # as decoded from the image cache
    )
    return inputs, LoadedBackbone(backbone, CONFIG, imagenet_classifier=None)


HEAD = HeadParams(epochs=4, batch_size=8, lr=0.05, monitor="val_loss")


def test_head_only_trains_the_probe_on_features_and_puts_it_in_the_model():
    inputs, loaded = inputs_and_backbone()
    rows, lines = [], []
    trained = train_model(
        inputs,
        loaded,
        HEAD,
        params(),
        freeze_layers=None,
        seed=0,
        pretrained=False,
        device=CPU,
        on_epoch=rows.append,
        report=lines.append,
    )
    assert rows == trained.history and [row["phase"] for row in rows] == ["probe"] * 4
    assert trained.selection()["selected"] == "probe" and not trained.fine_tuned
    assert trained.feature_head is None and any(line.startswith("train: linear probe") for line in lines)
    # the model's head is the probe's best epoch: its accuracy on the val features is the row's
    with torch.no_grad():
        predictions = trained.model.head(inputs.val_features.features).argmax(1)
    accuracy = (predictions == inputs.val_features.labels).float().mean().item()
    assert accuracy == pytest.approx(trained.history[trained.best_epoch - 1]["val_acc"])
    assert set(trained.movement()) == {"stem", "block1", "block2", "head"}
    assert trained.movement()["stem"] == 0.0 and trained.movement()["head"] > 0


def test_fine_tuning_starts_from_the_probe_keeps_frozen_groups_and_never_ends_below_the_start():
    inputs, loaded = inputs_and_backbone()
    rows, lines = [], []
    trained = train_model(
        inputs,
        loaded,
        HEAD,
        params(epochs=2, lr=0.01, monitor="val_acc"),
        freeze_layers=1,
        seed=0,
        pretrained=False,
        device=CPU,
        on_epoch=rows.append,
        report=lines.append,
    )
    phases = [row["phase"] for row in trained.history]
    assert rows == trained.history and phases == ["probe"] * 4 + ["start", "finetune", "finetune"]
    probe_best = min(trained.history[:4], key=lambda row: row["val_loss"])  # head.monitor val_loss
    start = trained.history[4]
    assert start["epoch"] == 5 and start["frozen_groups"] == 1
    # images through the network are the cached features: the start model scores as the probe did
    assert start["val_acc"] == pytest.approx(probe_best["val_acc"])
    assert start["train_acc"] == probe_best["train_acc"]  # the probe's train scores carried over
    selection = trained.selection()
    assert selection["selected"] in ("start", "finetune") and selection["finetune_gain"] is not None
    assert selection["val_acc"] >= start["val_acc"]  # selection by val_acc never ends below the start
    movement = trained.movement()
    assert movement["stem"] == 0.0  # the first group stayed frozen
    assert (movement["block1"] > 0) == (selection["selected"] == "finetune")  # a kept start did not move
    assert all(row.get("grad_norm/stem", 0.0) == 0.0 for row in trained.history)  # nor had a gradient
    assert trained.model.frozen_groups == 1 and trained.fine_tuned
    assert any(line.startswith("train: linear probe") for line in lines)
    assert any(line.startswith(("train: fine-tuned", "train: no fine-tuning epoch")) for line in lines)


def test_xavier_head_init_starts_fine_tuning_without_a_probe():
    inputs, loaded = inputs_and_backbone()
    trained = train_model(
        inputs,
        loaded,
        HEAD,
        params(epochs=1, head_init="xavier"),
        freeze_layers=0,
        seed=0,
        pretrained=False,
        device=CPU,
    )
    assert [row["phase"] for row in trained.history] == ["start", "finetune"]
    assert trained.history[0]["epoch"] == 1  # no probe rows before the start model


def test_a_freeze_layers_beyond_the_backbone_fails_before_any_training():
    inputs, loaded = inputs_and_backbone()
    rows = []
    with pytest.raises(LayerGroupError, match=r"freeze_layers=4 is outside 0..3.*stem"):
        train_model(
            inputs,
            loaded,
            HEAD,
            params(),
            freeze_layers=4,
            seed=0,
            pretrained=False,
            device=CPU,
            on_epoch=rows.append,
        )
    assert rows == []


def test_a_scikit_learn_head_only_is_kept_as_the_models_head_and_folded_into_the_torch_head():
    inputs, loaded = inputs_and_backbone()
    trained = train_model(
        inputs,
        loaded,
        HeadParams(kind="logreg"),
        params(),
        freeze_layers=None,
        seed=0,
        pretrained=False,
        device=CPU,
    )
    assert trained.feature_head is not None and trained.feature_head.kind == "logreg"
    assert all(row["phase"] == "logreg" for row in trained.history)
    assert "head" not in {key.split(".")[0] for key in trained.initial_state}  # no initial weights to move from
    # the folded torch head predicts as the scikit-learn head does
    features = inputs.val_features.features
    with torch.no_grad():
        torch_predictions = trained.model.head(features).argmax(1).numpy()
    assert (torch_predictions == trained.feature_head.estimator.predict(features.numpy())).all()


def test_the_train_package_reaches_tracking_only_through_callbacks():
    """Imports run downward: transfer.train imports neither MLflow nor transfer.tracking (nor the commands)."""
    import ast
    from pathlib import Path

    import transfer.train

    imported = {}
    for path in Path(transfer.train.__path__[0]).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported[path.name] = imported.get(path.name, set()) | {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = {f"{node.module}.{alias.name}" for alias in node.names}
                imported[path.name] = imported.get(path.name, set()) | {node.module} | names
    upward = {
        name: sorted(
            m
            for m in modules
            if m.split(".")[0] == "mlflow" or m.startswith(("transfer.tracking", "transfer.commands", "transfer.cli"))
        )
        for name, modules in imported.items()
    }
    assert "recipe.py" in imported and "tune.py" in imported and "lr_find.py" in imported
    assert {name: modules for name, modules in upward.items() if modules} == {}

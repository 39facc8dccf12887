"""The fine-tuning recipe on tiny real models: optimiser groups, schedule, unfreezing, early stopping,
resume after a crash, heads, augmentation, class balance (real torch, no mocks)."""

from __future__ import annotations

import pytest
import torch
from finetune_helpers import params, tiny_classifier, tiny_dataset

from transfer.data.config import DataConfig
from transfer.data.transforms import batch_mixer, eval_batch_transform, train_transforms
from transfer.models.groups import freeze_first_groups, group_names, layer_groups
from transfer.models.heads import imagenet_overlap_head, match_imagenet_classes
from transfer.train.checkpoint import Checkpointer
from transfer.train.finetune import EarlyStopping, class_weights, fine_tune, frozen_at, unfreeze_down_to
from transfer.train.optim import WarmupCosine, build_optimizer, group_lrs, optimizer_kwargs, parameter_groups

CPU = torch.device("cpu")


def finetune_rows(result) -> list[dict]:
    """The fine-tuning epochs (the history starts with the start model's row, epoch 0)."""
    assert result.history[0]["phase"] == "start"
    return [row for row in result.history if row["phase"] == "finetune"]


def test_parameter_groups_discriminative_lr_layer_decay_and_no_decay_on_norms_and_biases():
    model = tiny_classifier()
    freeze_first_groups(model, 1)
    lrs = group_lrs(group_names(model), lr=0.1, head_lr_mult=10, layer_decay=0.5)
    groups = {g["name"]: g for g in parameter_groups(layer_groups(model), lrs, weight_decay=1e-4)}
    assert set(groups) == {"block1", "block1/no_decay", "block2", "block2/no_decay", "head", "head/no_decay"}
    assert groups["head"]["lr"] == pytest.approx(1.0)  # 10 x the base LR
    assert groups["block2"]["lr"] == pytest.approx(0.1) and groups["block1"]["lr"] == pytest.approx(0.05)
    assert all(g["weight_decay"] == 0 for name, g in groups.items() if name.endswith("no_decay"))
    assert all(p.ndim <= 1 for name, g in groups.items() if name.endswith("no_decay") for p in g["params"])
    frozen = {id(p) for p in model.backbone.groups["stem"].parameters()}
    assert not frozen & {id(p) for g in groups.values() for p in g["params"]}


def test_optimiser_groups_in_order_with_their_lrs_and_decay_and_unfrozen_groups_appended_top_down():
    """The order is what a checkpoint's optimizer state is matched by: resuming an older run depends on it."""
    model = tiny_classifier()
    freeze_first_groups(model, 2)
    finetune = params(lr=0.1, head_lr_mult=10, layer_decay=0.5, weight_decay=1e-3)
    optimizer = build_optimizer(layer_groups(model), **optimizer_kwargs(finetune))
    assert group_names(model) == ["stem", "block1", "block2", "head"]
    expected = [
        ("block2", 0.1, 1e-3),
        ("block2/no_decay", 0.1, 0.0),
        ("head", 1.0, 1e-3),
        ("head/no_decay", 1.0, 0.0),
    ]
    actual = [(g["name"], g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert actual == [(name, pytest.approx(lr), decay) for name, lr, decay in expected]
    lrs = group_lrs(group_names(model), finetune.lr, finetune.head_lr_mult, finetune.layer_decay)
    unfreeze_down_to(model, optimizer, 0, lrs, finetune.weight_decay, scale=0.5)
    expected += [
        ("block1", 0.05, 1e-3),
        ("block1/no_decay", 0.05, 0.0),
        ("stem", 0.025, 1e-3),
        ("stem/no_decay", 0.025, 0.0),
    ]
    actual = [(g["name"], g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert actual == [(name, pytest.approx(lr), decay) for name, lr, decay in expected]
    assert [g["lr"] for g in optimizer.param_groups[4:]] == pytest.approx([0.025, 0.025, 0.0125, 0.0125])
    owned = [[id(p) for p in module.parameters()] for _, module in layer_groups(model)]
    in_optimiser = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(in_optimiser) == sorted(i for ids in owned for i in ids)  # every parameter once


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_registry(name, kind):
    optimizer = build_optimizer(layer_groups(tiny_classifier()), **optimizer_kwargs(params(optimizer=name)))
    assert isinstance(optimizer, kind)
    if name == "sgd":
        assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9


def test_warmup_then_cosine_to_the_floor_and_groups_added_later_follow_it():
    model = tiny_classifier()
    optimizer = build_optimizer(layer_groups(model), **optimizer_kwargs(params(lr=1.0, head_lr_mult=1.0)))
    schedule = WarmupCosine(optimizer, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        schedule.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)  # linear warmup up to the base LR
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # then monotone cosine decay
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # ends at min_lr_ratio
    optimizer.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(1))], lr=5.0, initial_lr=5.0))
    schedule.load_state_dict(schedule.state_dict())
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.5)


def test_gradual_unfreezing_adds_one_group_per_period_to_the_optimiser():
    assert [frozen_at(3, 2, epoch) for epoch in range(8)] == [3, 3, 2, 2, 1, 1, 0, 0]
    assert [frozen_at(2, 0, epoch) for epoch in range(3)] == [2, 2, 2]
    model = tiny_classifier()
    stem_before = model.backbone.groups["stem"][0].weight.detach().clone()
    block1_before = model.backbone.groups["block1"][0].weight.detach().clone()
    result = fine_tune(model, 2, tiny_dataset(), tiny_dataset(seed=1), params(epochs=3, unfreeze_every=1), 0, CPU)
    tuned = finetune_rows(result)
    assert [row["frozen_groups"] for row in tuned] == [2, 1, 0]
    assert [row["grad_norm/stem"] == 0 for row in tuned] == [True, True, False]
    assert [row["grad_norm/block1"] == 0 for row in tuned] == [True, False, False]
    assert all(row["grad_norm/head"] > 0 and row["grad_norm/block2"] > 0 for row in tuned)
    assert model.frozen_groups == 0
    # Best epoch's weights are returned; whichever it is, a group frozen throughout epoch 1 moved only later.
    if result.best_epoch == 1:
        assert torch.equal(model.backbone.groups["block1"][0].weight, block1_before)
    assert set(tuned[0]) >= {"epoch", "lr", "lr_head", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1"}
    del stem_before


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    stopper = EarlyStopping("val_loss", patience=2)
    assert stopper.update(1.0, 1) and not stopper.update(1.0, 2) and not stopper.should_stop
    assert not stopper.update(1.2, 3) and stopper.should_stop and stopper.best_epoch == 1
    # A learning rate too small to change anything: val accuracy never improves on the start (epoch 0).
    result = fine_tune(
        tiny_classifier(), 0, tiny_dataset(), tiny_dataset(seed=1), params(epochs=6, lr=1e-12, patience=2), 0, CPU
    )
    assert result.stopped_early and len(finetune_rows(result)) == 2 and result.best_epoch == 0


class Crash(RuntimeError):
    pass


def test_a_crashed_run_resumes_where_it_stopped_and_ends_identical(tmp_path):
    """Kill (an exception) after epoch 2 of 4, restart: same weights and history as an uninterrupted run."""
    recipe = params(epochs=4, unfreeze_every=2, mixup_alpha=0.4)
    train, val = tiny_dataset(), tiny_dataset(seed=1)
    straight = fine_tune(tiny_classifier(), 1, train, val, recipe, 0, CPU)

    def crash_on_third(row):
        if row["epoch"] == 3:
            raise Crash("killed")

    checkpointer = Checkpointer(tmp_path / "ckpt", "fingerprint-a")
    with pytest.raises(Crash):
        fine_tune(tiny_classifier(), 1, train, val, recipe, 0, CPU, on_epoch=crash_on_third, checkpointer=checkpointer)
    assert torch.load(tmp_path / "ckpt/last.pt", weights_only=False)["done"] == 2
    seen = []
    resumed = fine_tune(
        tiny_classifier(seed=5),
        1,
        train,
        val,
        recipe,
        0,
        CPU,
        on_epoch=seen.append,
        checkpointer=Checkpointer(tmp_path / "ckpt", "fingerprint-a"),
    )
    assert [row["epoch"] for row in seen] == [3, 4]  # only the missing epochs run (and are logged)
    assert resumed.history == straight.history
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(value, resumed.model.state_dict()[key]), key
    # Another configuration never resumes from this checkpoint.
    other = Checkpointer(tmp_path / "ckpt", "fingerprint-b")
    assert other.load_last() is None


def test_imagenet_overlap_head_copies_matching_rows_only():
    classes = ["T-shirt_top", "Sandal", "Bag"]
    descriptions = ["tench, Tinca tinca", "jersey, T-shirt, tee shirt", "sandal", "cowboy boot"]
    assert match_imagenet_classes(classes, descriptions) == {0: 1, 1: 2}
    classifier = torch.nn.Linear(6, 4)
    head = torch.nn.Linear(6, 3)
    matches = imagenet_overlap_head(head, classes, classifier, seed=0, descriptions=descriptions)
    assert matches == {"T-shirt_top": "jersey, T-shirt, tee shirt", "Sandal": "sandal"}
    assert torch.equal(head.weight[0], classifier.weight[1]) and torch.equal(head.bias[1], classifier.bias[2])
    assert head.bias[2] == 0 and not torch.equal(head.weight[2], torch.zeros(6))
    with pytest.raises(ValueError, match="backbone.weights: imagenet"):
        imagenet_overlap_head(head, classes, None, seed=0)


def test_real_imagenet_names_match_fashion_mnist_classes():
    from transfer.models.heads import imagenet_descriptions

    names = ["Ankle_boot", "Bag", "Coat", "Dress", "Pullover", "Sandal", "Shirt", "Sneaker", "T-shirt_top", "Trouser"]
    matched = {names[t]: s for t, s in match_imagenet_classes(names, imagenet_descriptions()).items()}
    assert {"Sandal", "T-shirt_top"} <= set(matched)


CONFIG = DataConfig(image_size=24, resize_size=28, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), interpolation="bilinear")


@pytest.mark.parametrize("augment", ["none", "trivialaugment", "randaugment", "autoaugment"])
def test_train_transforms_crop_to_the_backbone_size_and_normalise_with_its_stats(augment):
    batch = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    per_sample, on_device = train_transforms(CONFIG, augment, crop_min_scale=0.8, hflip=0.5)
    # The policies run per image in the workers (uint8 out); crop and flip alone run on the whole batch.
    assert (per_sample is None) == (augment == "none")
    if per_sample is not None:
        batch = torch.stack([per_sample(image) for image in batch])
        assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 24, 24)
    out = on_device(batch)
    assert out.shape == (4, 3, 24, 24) and out.dtype == torch.float32
    flat = torch.full((2, 3, 28, 28), 255, dtype=torch.uint8)
    evaluated = eval_batch_transform(CONFIG)(flat)
    assert evaluated.shape == (2, 3, 24, 24)
    assert torch.allclose(evaluated[0, :, 0, 0], (1 - torch.tensor(CONFIG.mean)) / torch.tensor(CONFIG.std))
    with pytest.raises(ValueError, match="finetune.augment"):
        train_transforms(CONFIG, "everything", 0.8, 0.5)


def test_mixup_and_cutmix_give_soft_targets():
    assert batch_mixer(0, 0, 3) is None
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    mixed, targets = batch_mixer(0.4, 1.0, 3)(images, labels)
    assert mixed.shape == images.shape and targets.shape == (4, 3)
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_class_balance_weights_and_balanced_sampler_train():
    weights = class_weights([0, 0, 0, 1], 3)
    assert weights[1] == pytest.approx(3 * weights[0]) and weights[2] == 0
    full = tiny_dataset(per_class=8)
    skewed = full.subset([i for i, label in enumerate(full.labels) if label != 2 or i % 4 == 0])
    for balance in ("loss", "sampler"):
        result = fine_tune(
            tiny_classifier(), 1, skewed, tiny_dataset(seed=1), params(epochs=1, class_balance=balance), 0, CPU
        )
        assert len(finetune_rows(result)) == 1 and finetune_rows(result)[0]["train_loss"] > 0


def test_gradient_clipping_and_adamw_run():
    result = fine_tune(
        tiny_classifier(),
        1,
        tiny_dataset(),
        tiny_dataset(seed=1),
        params(epochs=1, optimizer="adamw", lr=1e-3, grad_clip_norm=0.5, label_smoothing=0.2),
        0,
        CPU,
    )
    assert finetune_rows(result)[0]["train_loss"] > 0


@pytest.mark.parametrize(
    "mode, pretrained, stats_move",
    [("auto", True, False), ("auto", False, True), ("frozen", False, False), ("train", True, True)],
)
def test_batchnorm_statistics_follow_the_batchnorm_param(mode, pretrained, stats_move):
    model = tiny_classifier()
    bn = model.backbone.groups["block2"][1]
    before, scale_before = bn.running_mean.clone(), bn.weight.detach().clone()
    trained = {}  # the state after the epoch (the returned model may be the start, if the epoch lost to it)

    def snapshot(row):
        if row["phase"] == "finetune":
            trained.update(mean=bn.running_mean.clone(), scale=bn.weight.detach().clone())

    fine_tune(
        model,
        0,
        tiny_dataset(),
        tiny_dataset(seed=1),
        params(epochs=1, batchnorm=mode, lr=0.01),
        0,
        CPU,
        pretrained=pretrained,
        on_epoch=snapshot,
    )
    assert (not torch.equal(trained["mean"], before)) == stats_move
    assert not torch.equal(trained["scale"], scale_before)  # the affine scale trains either way

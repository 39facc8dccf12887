"""The learning-rate finder (fastai's `lr_find`, Lightning's LR finder) for the recipe in params.yaml.

One short run of the chosen recipe in which the learning rate grows exponentially from `min_lr` to
`max_lr`, one step per batch, recording the training loss; it stops early once the loss has diverged.
The loss is smoothed (a bias-corrected moving average) and the suggestion is the LR of the steepest
descent of the smoothed loss against log LR, before its minimum (Lightning's rule); the LR at the
minimum / 10 (fastai's older rule) is reported too. The model is thrown away: nothing but the plot and
the numbers are kept.

Recipes: `probe` sweeps head.lr of the linear probe on the cached features (AdamW, as train_linear_probe);
`finetune` sweeps finetune.lr (the base LR of the unfrozen groups; the head and layer-decayed groups keep
their ratios to it) from the model the train stage would start fine-tuning from, with its optimiser,
loss, augmentation and frozen groups.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from transfer.pipeline.errors import UserError
from transfer.pipeline.params import Params
from transfer.pipeline.runtime import seed_everything

LR_FIND_DIR = Path("data/lr_find")  # data/lr_find/<recipe>.png and .json
SMOOTHING = 0.98  # the moving average's beta (fastai's)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum (fastai's)
SKIP_START = 10  # steps ignored by the suggestion: the moving average is still settling (Lightning's skip_begin)


class LRFindError(UserError, ValueError):
    """An LR sweep that cannot run as asked (range, recipe, missing features)."""


@dataclass
class LRSweep:
    lrs: list[float]  # the LR of each step taken
    losses: list[float]  # raw training loss of each step
    smoothed: list[float]
    suggested_lr: float | None  # steepest descent before the minimum
    min_loss_lr: float | None  # LR at the smoothed minimum (suggest / 10 of it: fastai's lr_min)
    diverged: bool  # stopped early: the loss blew up

    @property
    def min_over_10(self) -> float | None:
        return None if self.min_loss_lr is None else self.min_loss_lr / 10


def exponential_lrs(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """`steps` LRs from min_lr to max_lr, equally spaced on a log scale."""
    if not 0 < min_lr < max_lr:
        raise LRFindError(f"need 0 < min_lr < max_lr (got {min_lr}, {max_lr})")
    if steps < SKIP_START + 2:
        raise LRFindError(f"steps must be at least {SKIP_START + 2} (got {steps})")
    return [float(lr) for lr in np.geomspace(min_lr, max_lr, steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (fastai's), so early values are not pulled toward 0."""
    average, out = 0.0, []
    for step, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**step))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float | None, float | None]:
    """(steepest-descent LR before the minimum, LR at the minimum) of a smoothed loss curve."""
    values = np.asarray(smoothed, dtype=float)
    finite = np.isfinite(values)
    if finite.sum() < SKIP_START + 2:
        return None, None
    lowest = int(np.nanargmin(np.where(finite, values, np.nan)))
    window = values[SKIP_START : lowest + 1]
    if len(window) < 2:
        return None, lrs[lowest]
    # Equal steps in log LR: the gradient against the index is the slope against log LR, up to a constant.
    steepest = SKIP_START + int(np.argmin(np.gradient(window)))
    return lrs[steepest], lrs[lowest]


def sweep(step: Callable[[float], float], lrs: list[float], progress: bool = True) -> LRSweep:
    """Call `step(lr)` (one training step at that LR, returning its loss) for each LR until the loss diverges."""
    losses: list[float] = []
    diverged, best, average = False, math.inf, 0.0
    for lr in tqdm(lrs, desc="lr-find", unit="step", disable=not progress):
        losses.append(step(lr))
        average = SMOOTHING * average + (1 - SMOOTHING) * losses[-1]
        current = average / (1 - SMOOTHING ** len(losses))  # = smooth(losses)[-1]
        best = min(best, current)
        if not math.isfinite(current) or (len(losses) > SKIP_START and current > DIVERGED * best):
            diverged = True
            break
    smoothed = smooth(losses)
    suggested, at_min = suggest(lrs[: len(losses)], smoothed)
    return LRSweep(lrs[: len(losses)], losses, smoothed, suggested, at_min, diverged)


def _cycle(loader: DataLoader):
    return itertools.chain.from_iterable(itertools.repeat(loader))


# --- Recipes: one training step at a given LR -------------------------------------------------------


def probe_step(
    train_features, num_classes: int, batch_size: int, weight_decay: float, seed: int
) -> Callable[[float], float]:
    """A step of the linear probe (AdamW on the cached features, as train_linear_probe) at a given head LR."""
    seed_everything(seed)
    head = nn.Linear(train_features.features.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1.0, weight_decay=weight_decay)
    batches = _cycle(
        DataLoader(
            TensorDataset(train_features.features, train_features.labels),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
    )

    def step(lr: float) -> float:
        features, labels = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def finetune_step(params: Params, inputs) -> Callable[[float], float]:
    """A fine-tuning step at base LR `lr`: the train stage's starting model, optimiser groups, loss and data."""
    from torch.utils.data import BatchSampler, RandomSampler

    from transfer.data.datasets import DeviceLoader
    from transfer.data.transforms import batch_mixer, train_transforms
    from transfer.models.groups import freeze_batchnorm_stats, freeze_first_groups, layer_groups
    from transfer.pipeline.runtime import resolve_device
    from transfer.train.finetune import CLASS_BALANCE, batchnorm_frozen, make_loss, runtime_for
    from transfer.train.losses import clip_gradients, grad_clip_norm
    from transfer.train.optim import build_optimizer, optimizer_kwargs
    from transfer.train.recipe import initial_model, pretrained

    finetune = params.finetune
    device = resolve_device(params.device)
    runtime = runtime_for(device, finetune.amp, finetune.channels_last)
    loaded = inputs.backbone(params)
    # The train stage's own starting model (transfer.train.recipe), frozen as fine_tune freezes it.
    model = initial_model(inputs, loaded, params.head, finetune.head_init, params.seed, fine_tuning=True).model
    freeze_first_groups(model, params.freeze_layers)
    model.to(device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    sample_transform, batch_transform = train_transforms(
        loaded.data_config, finetune.augment, finetune.crop_min_scale, finetune.hflip
    )
    data = inputs.images("train", loaded.data_config, batch_transform, sample_transform)
    num_classes = len(inputs.classes)
    loss_weights, _ = CLASS_BALANCE[finetune.class_balance](data.labels, num_classes)
    loss_fn, mixer = (
        make_loss(finetune, loss_weights),
        batch_mixer(finetune.mixup_alpha, finetune.cutmix_alpha, num_classes),
    )
    seed_everything(params.seed)
    optimizer = build_optimizer(layer_groups(model), **optimizer_kwargs(finetune))
    ratios = [group["initial_lr"] / finetune.lr for group in optimizer.param_groups]  # head and layer-decay ratios
    order = RandomSampler(range(len(data)), generator=torch.Generator().manual_seed(params.seed))
    batches = _cycle(DeviceLoader(data, device, batch_sampler=BatchSampler(order, finetune.batch_size, drop_last=True)))
    bn_frozen = batchnorm_frozen(finetune, pretrained(params))

    def step(lr: float) -> float:
        model.train()
        if bn_frozen:
            freeze_batchnorm_stats(model)
        images, labels = next(batches)
        images, labels = runtime.prepare(images), labels.to(device)
        targets = labels
        if mixer is not None:
            images, targets = mixer(images, labels)
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        with runtime.autocast():
            logits = model(images)
        loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model, grad_clip_norm(finetune.grad_clip_norm, finetune.class_balance), finetune.grad_clip_agc)
        optimizer.step()
        return loss.item()

    return step


# --- Output ---------------------------------------------------------------------------------------


def plot_sweep(result: LRSweep, path: Path, title: str, current_lr: float | None = None) -> None:
    """Loss (raw and smoothed) against LR on a log axis, the suggestions and the current value marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from transfer.pipeline.files import atomic_path

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(result.lrs, result.losses, color="0.75", linewidth=0.8, label="loss")
    axes.plot(result.lrs, result.smoothed, color="C0", linewidth=1.8, label="smoothed loss")
    marks = [
        (result.suggested_lr, "C3", "suggested (steepest descent)"),
        (result.min_over_10, "C2", "minimum / 10"),
        (current_lr, "0.3", "params.yaml"),
    ]
    for lr, colour, label in marks:
        if lr is not None:
            axes.axvline(lr, color=colour, linestyle="--", linewidth=1, label=f"{label}: {lr:.2g}")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    if finite:  # the divergence at the end would squash the interesting part
        low, start = min(finite), finite[0]
        axes.set_ylim(low - 0.1 * (start - low + 1e-8), start + 0.5 * (start - low + 1e-8))
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, metadata={"Software": None})

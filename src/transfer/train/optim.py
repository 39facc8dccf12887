"""Optimiser and learning-rate schedule of fine-tuning.

Parameter groups follow the model's layer groups in order (transfer.models.groups.layer_groups), so that
  * the head learns at `head_lr_mult` x the base LR (a new head needs larger steps than pretrained layers),
  * with `layer_decay` < 1 each group toward the input learns at `layer_decay` x the next one
    (early, generic features move least),
  * BatchNorm weights and every bias get no weight decay (decaying them only hurts calibration),
  * gradual unfreezing adds a layer group to the optimiser at its own LR (`add_layer_group`).

The schedule is a linear warmup then a cosine decay, applied per step by `WarmupCosine`, which scales each
group's `initial_lr`; unlike torch's LambdaLR it accepts groups added mid-training.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from transfer.models.groups import HEAD
from transfer.pipeline.params import FinetuneParams


def optimizer_kwargs(params: FinetuneParams) -> dict[str, Any]:
    """`build_optimizer`'s keyword values from the finetune params (as timm's `optimizer_kwargs(cfg)`)."""
    return dict(
        optimizer=params.optimizer,
        lr=params.lr,
        head_lr_mult=params.head_lr_mult,
        layer_decay=params.layer_decay,
        weight_decay=params.weight_decay,
        momentum=params.momentum,
        nesterov=params.nesterov,
    )


def group_lrs(names: Sequence[str], lr: float, head_lr_mult: float = 1.0, layer_decay: float = 1.0) -> dict[str, float]:
    """The LR of each layer group (`names` in order, input to head): the head's lr x head_lr_mult, a backbone
    group's lr x layer_decay^(its distance to the head)."""
    backbone = [name for name in names if name != HEAD]
    lrs = {name: lr * layer_decay ** (len(backbone) - 1 - index) for index, name in enumerate(backbone)}
    if HEAD in names:
        lrs[HEAD] = lr * head_lr_mult
    return lrs


def _decay_split(module: nn.Module, lr: float, weight_decay: float, name: str) -> list[dict]:
    """Optimiser groups for one module's trainable parameters, with and without weight decay (timm's split:
    biases and normalisation scales/shifts, every parameter with ndim <= 1, get none), at one LR.

    timm's `param_groups_layer_decay` is not used for the LRs: it numbers layers through a timm
    `group_matcher`, while the layer groups here are transfer.models.groups' (torchvision models too), and
    gradual unfreezing adds them to the optimiser one at a time.
    """
    groups = sorted(param_groups_weight_decay(module, weight_decay), key=lambda group: not group["weight_decay"])
    for group in groups:  # decayed group first, as the checkpoints of earlier versions hold them
        group.update(lr=lr, initial_lr=lr, name=name if group["weight_decay"] else f"{name}/no_decay")
    return groups


def parameter_groups(
    groups: Sequence[tuple[str, nn.Module]], lrs: Mapping[str, float], weight_decay: float
) -> list[dict]:
    """Optimiser groups of every trainable parameter of the layer `groups` (transfer.models.groups.layer_groups:
    the backbone's from the input, then the head), in their order, each at its LR in `lrs`."""
    return [
        param_group for name, module in groups for param_group in _decay_split(module, lrs[name], weight_decay, name)
    ]


def _sgd(groups: list[dict], lr: float, momentum: float, nesterov: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def _adamw(groups: list[dict], lr: float, momentum: float, nesterov: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))


# finetune.optimizer -> builder(param groups, lr, momentum, nesterov). `momentum` doubles as AdamW's beta1
# (the same role: gradient averaging); AdamW has no Nesterov variant here.
OPTIMIZERS: dict[str, Callable[[list[dict], float, float, bool], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
}


def build_optimizer(
    groups: Sequence[tuple[str, nn.Module]],
    *,
    optimizer: str,
    lr: float,
    momentum: float,
    nesterov: bool,
    head_lr_mult: float = 1.0,
    layer_decay: float = 1.0,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The optimiser over the currently trainable parameters of the layer `groups` (in order, input to head),
    at discriminative LRs (`group_lrs`). From params: `build_optimizer(groups, **optimizer_kwargs(finetune))`."""
    lrs = group_lrs([name for name, _ in groups], lr, head_lr_mult, layer_decay)
    return OPTIMIZERS[optimizer](parameter_groups(groups, lrs, weight_decay), lr, momentum, nesterov)


def add_layer_group(
    optimizer: torch.optim.Optimizer, name: str, module: nn.Module, lr: float, weight_decay: float, scale: float
) -> None:
    """Gradual unfreezing: give the optimiser layer group `name` at its own `lr` (x the schedule's `scale`)."""
    for group in _decay_split(module, lr, weight_decay, name):
        group["lr"] = group["initial_lr"] * scale
        optimizer.add_param_group(group)


class WarmupCosine:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio` x each group's initial LR."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
    ):
        self.optimizer, self.total_steps = optimizer, max(1, total_steps)
        self.warmup_steps, self.min_lr_ratio = min(warmup_steps, self.total_steps), min_lr_ratio
        self.step_count = 0
        self._apply()

    def factor(self, step: int | None = None) -> float:
        step = self.step_count if step is None else step
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        scale = self.factor()
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * scale

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()

"""Optimiser and learning-rate schedule of fine-tuning.

Parameter groups follow the backbone's layer groups, so that
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
from typing import Callable

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from transfer.models.backbones import Classifier
from transfer.pipeline.params import FinetuneParams


def group_lr(params: FinetuneParams, index: int, num_groups: int) -> float:
    """LR of backbone layer group `index` (0 = input side): base LR x layer_decay^(distance to the head)."""
    return params.lr * params.layer_decay ** (num_groups - 1 - index)


def _decay_split(module: nn.Module, lr: float, weight_decay: float, name: str) -> list[dict]:
    """Optimiser groups for one module's trainable parameters, with and without weight decay (timm's split:
    biases and normalisation scales/shifts, every parameter with ndim <= 1, get none), at one LR.

    timm's `param_groups_layer_decay` is not used for the LRs: it numbers layers through a timm
    `group_matcher`, while the layer groups here are the backbone registry's (torchvision models too), and
    gradual unfreezing adds them to the optimiser one at a time.
    """
    groups = sorted(param_groups_weight_decay(module, weight_decay), key=lambda group: not group["weight_decay"])
    for group in groups:  # decayed group first, as the checkpoints of earlier versions hold them
        group.update(lr=lr, initial_lr=lr, name=name if group["weight_decay"] else f"{name}/no_decay")
    return groups


def layer_group_param_groups(model: Classifier, params: FinetuneParams, index: int) -> list[dict]:
    """The optimiser groups of backbone layer group `index`."""
    names = model.backbone.group_names
    module = model.backbone.groups[names[index]]
    return _decay_split(module, group_lr(params, index, len(names)), params.weight_decay, names[index])


def parameter_groups(model: Classifier, params: FinetuneParams) -> list[dict]:
    """Optimiser groups of every trainable parameter: unfrozen layer groups in order, then the head."""
    groups = []
    for index in range(len(model.backbone.group_names)):
        groups += layer_group_param_groups(model, params, index)
    groups += _decay_split(model.head, params.lr * params.head_lr_mult, params.weight_decay, "head")
    return groups


def _sgd(groups: list[dict], params: FinetuneParams) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups, lr=params.lr, momentum=params.momentum, nesterov=params.nesterov and params.momentum > 0
    )


def _adamw(groups: list[dict], params: FinetuneParams) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=params.lr, betas=(params.momentum, 0.999))


# finetune.optimizer -> builder. `momentum` doubles as AdamW's beta1 (the same role: gradient averaging).
OPTIMIZERS: dict[str, Callable[[list[dict], FinetuneParams], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
}


def build_optimizer(model: Classifier, params: FinetuneParams) -> torch.optim.Optimizer:
    """The optimiser over the model's currently trainable parameters."""
    return OPTIMIZERS[params.optimizer](parameter_groups(model, params), params)


def add_layer_group(
    optimizer: torch.optim.Optimizer, model: Classifier, params: FinetuneParams, index: int, scale: float
) -> None:
    """Gradual unfreezing: give the optimiser layer group `index` at its own LR (x the schedule's `scale`)."""
    for group in layer_group_param_groups(model, params, index):
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

"""What a training run returns: the model, its per-epoch history and the epoch kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

EpochCallback = Callable[[dict], None]


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0
    initial_state: dict[str, torch.Tensor] | None = None  # the weights training started from
    stopped_early: bool = False

"""What a training run returns: the model, its per-epoch history and the epoch kept; which model won."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from transfer.train.losses import MONITOR_DIRECTION

EpochCallback = Callable[[dict], None]


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0
    initial_state: dict[str, torch.Tensor] | None = None  # the weights training started from
    stopped_early: bool = False
    kept_start: bool = False  # fine-tuning: no epoch beat the model it started from, which is returned


SELECTION_METRICS = ("best_epoch", "kept_start", "finetune_gain")


def model_selection(history: list[dict], best_epoch: int, monitor: str) -> dict:
    """reports/train.json: the epoch kept and its val scores, which model won and by how much.

    `selected` is "probe", "start" (fine-tuning ran, none of its epochs beat the model it started from,
    which was kept) or "finetune"; `kept_start` is 1 for "start"; `finetune_gain` is the best fine-tuning
    epoch's monitored value minus the start's, signed so that positive means fine-tuning helped.
    """
    best = next(row for row in history if row["epoch"] == best_epoch)
    phases = {row["phase"] for row in history}
    selected = ("finetune" if best["phase"] == "finetune" else "start") if "finetune" in phases else "probe"
    summary = {
        "best_epoch": best_epoch,
        "selected": selected,
        "monitor": monitor,
        **{key: best.get(key) for key in ("val_acc", "val_macro_f1", "val_loss", "train_acc")},
    }
    if selected != "probe":
        start = next(row for row in history if row["phase"] == "start")
        tuned = [row[monitor] for row in history if row["phase"] == "finetune"]
        direction = MONITOR_DIRECTION[monitor]
        summary["kept_start"] = int(selected == "start")
        summary["finetune_gain"] = direction * (max(direction * v for v in tuned) - direction * start[monitor])
    return {key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in summary.items()}


def selection_message(finetune_history: list[dict], monitor: str, kept_start: bool, start_name: str) -> str:
    """One plain line: which model the stage keeps, and why."""
    start = finetune_history[0]
    tuned = [row for row in finetune_history if row["phase"] == "finetune"]
    best = (max if MONITOR_DIRECTION[monitor] > 0 else min)(tuned, key=lambda row: row[monitor])
    if kept_start:
        return (
            f"train: no fine-tuning epoch beat {start_name} on val ({monitor} {start[monitor]:.4f}; best "
            f"fine-tuning epoch {best['epoch']}: {best[monitor]:.4f}): keeping {start_name}"
        )
    return (
        f"train: fine-tuned, best {monitor} {best[monitor]:.4f} at epoch {best['epoch']} "
        f"(val accuracy {best['val_acc']:.4f}, macro-F1 {best['val_macro_f1']:.4f}; "
        f"{start_name} {start[monitor]:.4f})"
    )

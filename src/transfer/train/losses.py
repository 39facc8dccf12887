"""Training objectives and model-selection monitors, shared by the linear probe and fine-tuning.

Class balancing weights each *sample* by the inverse frequency of its class (`class_weights`, mean 1 over
the training set) and divides by the batch size. torch's `cross_entropy(weight=..., label_smoothing=...)`
does two other things: its smoothing term is weighted by every class's weight, so for each image it pulls
the prediction toward the rare classes (the smoothing optimum is p_c proportional to w_c, whatever the
label), and its mean divides by the batch's sum of weights, so a batch without a rare image weighs as much
as one with several.

Why `class_balance: loss` collapsed fine-tuning anyway (measured on 14:1 Fashion-MNIST look-alikes, 64 px):
the size of its first steps, not the form of the loss. The weights multiply the gradients of the rarest,
worst-classified images, so from the fitted probe the global gradient norm was about 120 (30 unweighted),
and SGD with momentum drove 94% of the pooled ReLU6 channels to zero within the first epoch (val accuracy
0.91 -> 0.13 at step 8); the head then predicted from its bias. A class-balanced probe start, the head's
bias shifted by log w, sqrt weights, a 10x lower head LR or rescaling the weighted loss to the unweighted
one's size did not stop it; clipping the global norm at 1-2 did (98% of the channels alive, val 0.85-0.86).
`finetune.grad_clip_norm: auto` clips the weighted loss at 2 (`grad_clip_norm`); an unweighted loss is
not norm-clipped (on small sets clipping at 2 cost accuracy, digits 0.978 -> 0.911).

Long runs collapsed without any weights: full Fashion-MNIST at 32 px (1,594 steps an epoch) fell to one
class in its first epoch. Adaptive gradient clipping (`finetune.grad_clip_agc`, default 0.1; timm's
`adaptive_clip_grad`) bounds each output unit's gradient by a fraction of that unit's weight norm, so no
step can move a pretrained filter far, whatever the loss: it reached 0.873 there (probe 0.805) and was as
good as unclipped or better on the small sets (`clip_gradients`). README, "The recipe across domains".
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from timm.utils.agc import adaptive_clip_grad

# finetune.grad_clip_norm: auto clips at this norm when the loss is class-weighted (see the module doc).
BALANCED_LOSS_CLIP_NORM = 2.0

# Model selection and early stopping: monitored metric -> +1 when larger is better, -1 when smaller is.
MONITOR_DIRECTION: dict[str, int] = {"val_acc": 1, "val_macro_f1": 1, "val_loss": -1}


def improves(monitor: str, value: float, best: float | None) -> bool:
    """True when `value` of `monitor` is strictly better than `best` (None: nothing to beat yet)."""
    return best is None or MONITOR_DIRECTION[monitor] * (value - best) > 0


def class_weights(labels: list[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so the mean weight over the training samples is 1.

    w_c = N / (C * n_c): sum_i w[y_i] = N. A class with no training image gets weight 0.
    """
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).double()
    present = int((counts > 0).sum())
    weights = torch.where(counts > 0, counts.sum() / (max(present, 1) * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def classification_loss(label_smoothing: float = 0.0, weights: torch.Tensor | None = None) -> Callable:
    """Cross-entropy with label smoothing; `weights` (per class) weight each sample by its class.

    Accepts hard labels [B] or soft targets [B, C] (mixup/cutmix; a soft target's weight is the
    target-weighted mean of the class weights). Smoothing is applied per sample, unweighted, so it only
    softens each sample's own target and never favours a class.
    """

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")
        if weights is None:
            return per_sample.mean()
        class_weight = weights.to(logits.device, logits.dtype)
        sample_weight = class_weight[targets] if targets.ndim == 1 else targets @ class_weight
        return (per_sample * sample_weight).mean()

    return loss


def clip_gradients(model: torch.nn.Module, max_norm: float | None, agc_factor: float | None) -> None:
    """Clip the trainable parameters' gradients in place: adaptively (`agc_factor`), then by global norm.

    Adaptive gradient clipping (timm's `adaptive_clip_grad`, Brock et al. 2021) limits each output unit's
    gradient to `agc_factor` times that unit's weight norm, so a step can never move a pretrained filter by
    more than a fixed fraction of itself. Like timm's training script it leaves the head (`model.head`)
    out: a probe-initialised head is small and has to move. `max_norm` then clips the global L2 norm.
    Neither reads a value back to the host.
    """
    if agc_factor:
        head = {id(p) for p in model.head.parameters()} if hasattr(model, "head") else set()
        adaptive_clip_grad([p for p in model.parameters() if p.requires_grad and id(p) not in head], agc_factor)
    if max_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)


def grad_clip_norm(setting: float | str | None, class_balance: str) -> float | None:
    """The global gradient norm fine-tuning clips at (None: no clipping) for finetune.grad_clip_norm `setting`.

    `auto` clips only a class-weighted loss: unweighted fine-tuning did better unclipped (module doc).
    """
    if setting == "auto":
        return BALANCED_LOSS_CLIP_NORM if class_balance == "loss" else None
    return setting

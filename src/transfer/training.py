"""Training: a linear probe on cached features, then (optionally) fine-tuning with frozen layer groups.

`freeze_layers: all` stops after the probe. An integer k continues on images: the first k layer groups
stay frozen (backbones.freeze_first_groups), the head starts from the probe's weights (linear probe,
then fine-tune, which keeps the pretrained features from being wrecked by a random head's gradients),
and the best epoch by validation accuracy is kept.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from .backbones import Classifier, freeze_first_groups
from .data import ImageDataset
from .features import FeatureCache
from .params import FinetuneParams, HeadParams

EpochCallback = Callable[[dict], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda in params.yaml, but torch sees no CUDA device; use device: auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0


def _loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


# --- Linear probe --------------------------------------------------------------------------------

def train_linear_probe(train: FeatureCache, val: FeatureCache, num_classes: int, params: HeadParams, seed: int,
                       on_epoch: EpochCallback | None = None) -> TrainResult:
    """Fit a linear classifier on cached features with AdamW; keep the epoch with the best val accuracy."""
    seed_everything(seed)
    head = nn.Linear(train.features.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
    loader = DataLoader(TensorDataset(train.features, train.labels), batch_size=params.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    result, best_acc, best_state = TrainResult(head), -1.0, None
    for epoch in range(1, params.epochs + 1):
        head.train()
        lr = optimizer.param_groups[0]["lr"]
        for features, labels in loader:
            loss = F.cross_entropy(head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        head.eval()
        with torch.no_grad():
            train_loss, train_acc = _loss_and_accuracy(head(train.features), train.labels)
            val_loss, val_acc = _loss_and_accuracy(head(val.features), val.labels)
        row = dict(epoch=epoch, phase="probe", lr=lr, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val_loss, val_acc=val_acc)
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
        if val_acc > best_acc:
            best_acc, best_state, result.best_epoch = val_acc, copy.deepcopy(head.state_dict()), epoch
    head.load_state_dict(best_state)
    return result


# --- Fine-tuning ---------------------------------------------------------------------------------

def parameter_groups(model: Classifier, params: FinetuneParams) -> list[dict]:
    """Trainable parameters: backbone at lr, head at lr x head_lr_mult; no weight decay on norms and biases."""
    groups = []
    for name, module, lr in (("backbone", model.backbone, params.lr), ("head", model.head,
                                                                       params.lr * params.head_lr_mult)):
        decay, no_decay = [], []
        for parameter in module.parameters():
            if parameter.requires_grad:
                (no_decay if parameter.ndim <= 1 else decay).append(parameter)
        groups += [dict(params=decay, lr=lr, weight_decay=params.weight_decay, name=f"{name}"),
                   dict(params=no_decay, lr=lr, weight_decay=0.0, name=f"{name}_no_decay")]
    return [group for group in groups if group["params"]]


def _run_epoch(model: Classifier, loader: DataLoader, device: torch.device, optimizer=None, scheduler=None,
               desc: str = "") -> tuple[float, float]:
    """One pass over `loader`; trains when an optimizer is given. Returns (mean loss, accuracy)."""
    training = optimizer is not None
    model.train(training)
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for images, labels in tqdm(loader, desc=desc, unit="batch", leave=False):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    return total_loss / seen, correct / seen


def fine_tune(model: Classifier, freeze_layers: int, train_data: ImageDataset, val_data: ImageDataset,
              params: FinetuneParams, seed: int, device: torch.device, first_epoch: int = 1,
              on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train the unfrozen groups and the head with SGD (Nesterov momentum) and a cosine schedule."""
    seed_everything(seed)
    freeze_first_groups(model, freeze_layers)
    model.to(device)
    train_loader = DataLoader(train_data, batch_size=params.batch_size, shuffle=True, drop_last=False,
                              num_workers=params.num_workers, generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val_data, batch_size=params.batch_size * 2, num_workers=params.num_workers)
    optimizer = torch.optim.SGD(parameter_groups(model, params), momentum=params.momentum, nesterov=True)
    total_steps = params.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step /
                                                                                                total_steps)))
    result, best_acc, best_state = TrainResult(model), -1.0, None
    for offset in range(params.epochs):
        epoch = first_epoch + offset
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = _run_epoch(model, train_loader, device, optimizer, scheduler,
                                           desc=f"fine-tune epoch {offset + 1}/{params.epochs}")
        val_loss, val_acc = _run_epoch(model, val_loader, device, desc="validate")
        row = dict(epoch=epoch, phase="finetune", lr=lr, train_loss=train_loss, train_acc=train_acc,
                   val_loss=val_loss, val_acc=val_acc)
        result.history.append(row)
        if on_epoch:
            on_epoch(row)
        if val_acc > best_acc:
            best_acc, result.best_epoch = val_acc, epoch
            best_state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    model.load_state_dict(best_state)
    return result

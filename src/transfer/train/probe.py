"""The linear probe: a linear head trained on cached backbone features."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer.features import FeatureCache
from transfer.pipeline.params import HeadParams
from transfer.pipeline.runtime import seed_everything, single_threaded
from transfer.train.result import EpochCallback, TrainResult


def _loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


# --- Linear probe --------------------------------------------------------------------------------

@single_threaded()  # [batch, ~1000] x [~1000, classes] matmuls: threads cost more than they give
def train_linear_probe(train: FeatureCache, val: FeatureCache, num_classes: int, params: HeadParams, seed: int,
                       on_epoch: EpochCallback | None = None) -> TrainResult:
    """Fit a linear classifier on cached features with AdamW; keep the epoch with the best val accuracy."""
    seed_everything(seed)
    head = nn.Linear(train.features.shape[1], num_classes)
    initial_state = copy.deepcopy(head.state_dict())
    optimizer = torch.optim.AdamW(head.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs)
    loader = DataLoader(TensorDataset(train.features, train.labels), batch_size=params.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    result, best_acc, best_state = TrainResult(head, initial_state=initial_state), -1.0, None
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

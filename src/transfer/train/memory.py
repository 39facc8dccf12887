"""How many images a fine-tuning step runs through the network at once on the CPU.

A training step keeps every activation the backward pass needs: they grow with the batch and with the
square of the image size (EfficientNet-Lite0, the first 3 groups frozen, at 224 px keeps about 37 MB per
image, so a batch of 32 held about 1.2 GB). On the CPU a step is therefore run in micro-batches whose
activations fit in `finetune.max_memory_mb`, and their gradients are summed into the step of the whole
batch (gradient accumulation): each micro-batch's mean loss is weighted by its share of the batch, so
the step is that of the whole batch whenever no layer mixes the images of a batch. BatchNorm in train
mode does (`finetune.batchnorm: train`): its statistics then come from each micro-batch. With frozen
BatchNorm, the default for pretrained weights, only the order of floating-point sums changes.
Validation batches are sized from the same budget. CUDA keeps the configured batches.

The memory is measured, not tabulated: one forward and backward pass of two real images through a copy of
the model as the run will train it (its frozen groups, its BatchNorm mode), with every tensor the ops
allocate counted while it is alive (`transfer.features.LiveTensorBytes`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from transfer.features import LiveTensorBytes, activation_bytes_per_image
from transfer.models.groups import freeze_batchnorm_stats, freeze_first_groups


@dataclass(frozen=True)
class StepBatches:
    """Images per forward pass: of a training step (`micro`, of `batch` images) and of validation."""

    batch: int  # this process's share of finetune.batch_size
    micro: int
    val: int


def training_bytes_per_image(model: torch.nn.Module, example: torch.Tensor, batchnorm_frozen: bool) -> int:
    """Peak bytes alive per image over one training forward and backward pass of `example`.

    Run on a copy (BatchNorm's running statistics and the gradients of `model` stay untouched) and with
    the RNG restored afterwards (dropout draws nothing from the run's stream), so measuring changes no
    result. Parameter gradients are counted too: a small overestimate, on the safe side.
    """
    return _training_bytes(copy.deepcopy(model), example, batchnorm_frozen)


def _training_bytes(probe: torch.nn.Module, example: torch.Tensor, batchnorm_frozen: bool) -> int:
    """`training_bytes_per_image` on a model of the caller's own, which the measurement leaves trained."""
    probe.train()
    if batchnorm_frozen:
        freeze_batchnorm_stats(probe)
    with torch.random.fork_rng(devices=[]), LiveTensorBytes() as live:
        probe(example).float().sum().backward()
    return -(-live.peak // len(example))


def fitting(count: int, bytes_per_image: int, max_memory_mb: int) -> int:
    """The largest number of images, at most `count` and at least 1, whose bytes fit in `max_memory_mb`."""
    return max(1, min(count, max_memory_mb * 2**20 // max(bytes_per_image, 1)))


def step_batches(
    model: torch.nn.Module,
    example: torch.Tensor,
    batch: int,
    val_batch: int,
    least_frozen: int,
    batchnorm_frozen: bool,
    device: torch.device,
    max_memory_mb: int,
) -> StepBatches:
    """The micro-batch of a training step and the validation batch for `device`.

    `example`: two images as the network receives them (after the device transform, in the run's memory
    format); `least_frozen`: the fewest groups the run will have frozen (gradual unfreezing keeps more
    activations as it goes), so the micro-batch fits every epoch.
    """
    if device.type == "cuda":
        return StepBatches(batch, batch, val_batch)
    probe = copy.deepcopy(model)
    freeze_first_groups(probe, least_frozen)
    per_training_image = _training_bytes(probe, example, batchnorm_frozen)  # measured on the copy made above
    per_val_image = activation_bytes_per_image(probe, example.shape[-1])
    return StepBatches(
        batch,
        fitting(batch, per_training_image, max_memory_mb),
        fitting(val_batch, per_val_image, max_memory_mb),
    )

"""Data-parallel fine-tuning with torch.distributed: one process per device, started by torchrun.

`finetune.nproc: N` > 1 makes the train stage re-launch itself under `torchrun --standalone` (so dvc.yaml's
command stays the same); each process then reads its rank from the environment torchrun sets. gloo on CPU,
nccl on CUDA. Every rank sees the same global batches as a single process would (`EpochBatchSampler`
draws one seeded order per epoch and gives each rank its slice of every batch), DDP averages the
gradients, and metrics are summed across ranks, so N processes compute what one process computes with
the same global batch, up to per-rank BatchNorm statistics and floating-point reduction order.
Only rank 0 logs to MLflow and writes outputs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank among world_size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_with_torchrun(script: str | Path, nproc: int, stage: str = "train") -> int:
    """Run `script` as `nproc` processes under torchrun (single node); returns torchrun's exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script)]
    log.info("%s: starting %d data-parallel processes: %s", stage, nproc, " ".join(command[1:]))
    return subprocess.run(command, check=False).returncode


def init_from_env(device_name: str = "auto") -> DistContext:
    """Join the process group torchrun describes (or stay single-process outside torchrun)."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE
    cuda = torch.cuda.is_available() and device_name != "cpu"
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def device_for(context: DistContext, device: torch.device) -> torch.device:
    """Each rank owns one GPU (its local rank); CPU ranks share the CPU."""
    if device.type == "cuda" and context.enabled:
        return torch.device("cuda", context.local_rank)
    return device


def all_reduce_tensor(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Sum a tensor of accumulated figures across ranks; returns it (unchanged in a single process).

    Called once per epoch: on CUDA (nccl) the sum stays on the device, on the CPU gloo sums it in place.
    """
    if context.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class EpochBatchSampler(Sampler[list[int]]):
    """Global batches from one seeded order per epoch; each rank yields its slice of every global batch.

    With `weights` (a balanced sampler for class imbalance) the order is a weighted draw with replacement
    instead of a permutation. A final global batch smaller than the number of ranks is dropped, since a
    rank without data would leave the others waiting for its gradients.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, context: DistContext = SINGLE, weights: torch.Tensor | None = None
    ):
        if batch_size < context.world_size:
            raise ValueError(
                f"finetune.batch_size ({batch_size}) is the global batch and must be at least "
                f"finetune.nproc ({context.world_size})"
            )
        self.size, self.batch_size, self.seed, self.context, self.weights = size, batch_size, seed, context, weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self):
        order = self.order()
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.context.world_size:
                break
            yield batch[self.context.rank :: self.context.world_size].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest >= self.context.world_size else 0)


def shard_indices(size: int, context: DistContext) -> list[int]:
    """This rank's share of an evaluation set: every world_size-th item, no padding (exact sums)."""
    return list(range(context.rank, size, context.world_size))

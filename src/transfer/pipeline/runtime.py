"""Where computation runs: the device, how many CPU threads small workloads use, and the seeds."""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch and the BLAS/OpenMP pools on one thread, then restore them.

    For tiny workloads (a linear probe on cached features, one diagnostic batch, a PCA of a few hundred
    rows) extra threads only spin-wait for each other, badly so on a busy machine: one forward pass of 8
    images through EfficientNet-Lite0 took 1.75 s on two threads and 0.05 s on one while other jobs ran.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


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

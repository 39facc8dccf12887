"""Per-epoch checkpoints, so that a killed training run continues where it stopped.

The train stage keeps `data/checkpoints/` (a DVC output with `persist: true`, so `dvc repro` does not
delete it before re-running the stage):
    last.pt      model, optimiser, schedule, epoch, history, early-stopping state, RNG states, the MLflow
                 run id and the linear probe's history: everything needed to continue
    initial.pt   the weights fine-tuning started from (for the per-group relative weight change)
Every file carries a fingerprint of the training params and the data hash; a checkpoint with another
fingerprint (other params, other data) is ignored, never resumed. A finished run clears the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer.pipeline.files import UnreadableFileError, load_torch, save_torch, write_json

log = logging.getLogger(__name__)

# Runtime-only knobs: changing them must not discard a checkpoint.
RUNTIME_KEYS = ("num_workers", "resume")


def fingerprint(train_params: dict[str, Any], data_hash: str) -> str:
    """sha256 of the params that shape training plus the data hash."""
    payload = json.dumps({"params": train_params, "data": data_hash}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values, so a checkpoint loads with weights_only=True."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


class Checkpointer:
    """Reads and (on the writing rank) writes the checkpoint folder of one training configuration."""

    def __init__(self, directory: str | Path, fingerprint: str, writer: bool = True):
        self.directory, self.fingerprint, self.writer = Path(directory), fingerprint, writer
        self.extra: dict[str, Any] = {}  # stage-level state saved with every checkpoint (run id, probe)

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.pt"

    def _load(self, name: str) -> dict[str, Any] | None:
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            payload = load_torch(path, "checkpoint", "it is ignored and training starts over")
        except UnreadableFileError as exc:  # damaged, from an older version, or tampered with
            log.warning(f"checkpoint: {exc}")
            return None
        if not isinstance(payload, dict) or payload.get("fingerprint") != self.fingerprint:
            log.warning(f"checkpoint: {path} belongs to other params or data; starting over")
            return None
        return payload

    def _save(self, name: str, payload: dict[str, Any]) -> None:
        if self.writer:
            save_torch(self._path(name), {**payload, "fingerprint": self.fingerprint})

    def load_last(self) -> dict[str, Any] | None:
        """The last epoch's state, or None when there is none for this configuration."""
        return self._load("last")

    def save_last(self, payload: dict[str, Any]) -> None:
        self._save("last", {**payload, "extra": self.extra})

    def save_initial(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._save("initial", {"state_dict": state_dict})

    def load_initial(self) -> dict[str, torch.Tensor] | None:
        payload = self._load("initial")
        return None if payload is None else payload["state_dict"]

    def finish(self) -> None:
        """The run completed: drop the checkpoints (a re-run starts afresh) and leave a marker for DVC."""
        if not self.writer:
            return
        for name in ("last", "initial"):
            self._path(name).unlink(missing_ok=True)
        write_json(self.directory / "status.json", {"complete": True, "fingerprint": self.fingerprint})


def training_fingerprint(params, data_hash: str) -> str:
    """Fingerprint of a train-stage configuration (transfer.pipeline.params.Params) on data with `data_hash`."""
    finetune = {key: value for key, value in params.finetune.model_dump().items() if key not in RUNTIME_KEYS}
    backbones = params.backbone if isinstance(params.backbone, list) else [params.backbone]
    shaping = {
        "backbone": [b.model_dump() for b in backbones],
        "layers": params.features.layers,
        "freeze_layers": params.freeze_layers,
        "head": params.head.model_dump(),
        "finetune": finetune,
        "seed": params.seed,
    }
    return fingerprint(shaping, data_hash)

"""Hostile files: real torch zip files whose pickle runs a command if anything loads them unsafely."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class Payload:
    """Unpickling this runs `touch marker`: what a hostile model.pt or weights.pth would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_file(path: Path, marker: Path) -> Path:
    """A real torch zip file whose pickle calls os.system when loaded without weights_only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": Payload(marker), "backbone": "efficientnet_lite0"}, path)
    return path

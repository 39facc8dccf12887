"""A tiny model, classifier outputs, JPEG files and a training history for the diagnostics tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

CLASSES = ["cat", "dog", "fox", "owl", "yak", "emu"]


class TinyBackbone(torch.nn.Module):
    """The lead's backbone contract in miniature: ordered groups, pooled output."""

    def __init__(self) -> None:
        super().__init__()
        self.groups = torch.nn.ModuleDict(
            {
                "stem": torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU()),
                "stage1": torch.nn.Sequential(
                    torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
                ),
                "stage2": torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU()),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for group in self.groups.values():
            x = group(x)
        return x.mean(dim=(2, 3))


class TinyModel(torch.nn.Module):
    def __init__(self, n_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.backbone = TinyBackbone()
        self.head = torch.nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def make_predictions() -> tuple[np.ndarray, np.ndarray]:
    """A reproducible mostly-right classifier output over 6 classes."""
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, len(CLASSES), size=120).astype(np.int64)
    logits = rng.normal(size=(120, len(CLASSES))).astype(np.float32)
    logits[np.arange(120), y_true] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probs.astype(np.float32)


def write_image_files(folder: Path) -> list[Path]:
    """Real JPEG files on disk, each a coloured shape on a background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for index in range(20):
        image = Image.new("RGB", (96, 80), tuple(int(v) for v in rng.integers(0, 255, 3)))
        ImageDraw.Draw(image).ellipse((10, 10, 70, 60), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = folder / f"img_{index:02d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def decode_png(path: Path) -> np.ndarray:
    """Decode a PNG with PIL and check it is a real, non-blank picture."""
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.var() > 0, "blank image"
    return pixels


def history_frame(fine_tune: bool = True) -> pd.DataFrame:
    """A two-phase history as the training loop writes it."""
    rows = []
    for epoch in range(1, 7):
        phase = "head" if epoch <= 3 else "finetune"
        row = {
            "epoch": epoch,
            "phase": phase,
            "train_loss": 2.0 / epoch,
            "train_acc": 0.5 + 0.07 * epoch,
            "val_loss": 2.2 / epoch + 0.05,
            "val_acc": 0.45 + 0.06 * epoch,
            "lr": 1e-3 if phase == "head" else 1e-4,
        }
        if fine_tune:
            row["grad_norm/stem"] = 0.0 if phase == "head" else 0.1 / epoch
            row["grad_norm/stage1"] = 0.0 if phase == "head" else 0.3 / epoch
            row["grad_norm/head"] = 1.0 / epoch
        rows.append(row)
    return pd.DataFrame(rows)

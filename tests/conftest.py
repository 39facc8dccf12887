"""Shared fixtures (small real image folders written as PNG files) and the tier markers.

A test's tier is its folder: tests/unit (in-process, `make test-fast`), tests/integration (real
subprocesses, servers, torchrun, Chromium, signals, pretrained weights), tests/e2e (the real DVC pipeline).
`slow` keeps meaning "not a unit test", so `-m "not slow"` still selects the fast tier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# The e2e tier's session fixtures: the stage server and the pipeline built once (tests/e2e_pipeline.py).
pytest_plugins = ["e2e_pipeline"]


def write_image_folder(root: Path, classes: dict[str, int], size: int = 28, seed: int = 0) -> Path:
    """ImageFolder tree: root/<class>/<i>.png with class-dependent brightness so classes are learnable."""
    rng = np.random.default_rng(seed)
    for class_index, (name, count) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = 40 + 60 * class_index
            pixels = np.clip(rng.normal(base, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def index_of(folder: Path, repo_root: Path) -> pd.DataFrame:
    """The download stage's index (path relative to repo_root, label, subset) of an ImageFolder tree."""

    rows = [(p.relative_to(repo_root).as_posix(), p.parent.name, "") for p in sorted(folder.rglob("*.png"))]
    return pd.DataFrame(rows, columns=["path", "label", "subset"])


def png(path: Path, seed: int, mode: str = "RGB", size: tuple[int, int] = (12, 10)) -> Path:
    """A small image with distinct bytes per seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    image.save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return path


def good_images(folder: Path, n: int, seed: int) -> None:
    for i in range(n):
        png(folder / f"{i:03d}.png", seed * 1000 + i)


TIERS = ("unit", "integration", "e2e")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers set here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with the tier of its folder (and `slow` outside tests/unit)."""
    for item in items:
        parts = item.path.relative_to(REPO_ROOT / "tests").parts
        tier = parts[0] if len(parts) > 1 and parts[0] in TIERS else None
        if tier is None:
            raise pytest.UsageError(f"{item.nodeid}: a test belongs in tests/unit, tests/integration or tests/e2e")
        item.add_marker(tier)
        if tier != "unit":
            item.add_marker("slow")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images", {"cat": 20, "dog": 20, "fox": 20})

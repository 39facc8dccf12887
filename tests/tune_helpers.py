"""Tiny project folders for the tuning and LR-finder tests: what the split and features stages leave behind.

Head-only studies train on synthetic feature blobs (no backbone needed); fine-tuning studies use real PNG
images and the real features of a randomly initialised resnet18 at 32 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO_ROOT, write_image_folder
from mlflow import MlflowClient

from transfer import tracking
from transfer.features import FeatureCache, save_feature_cache

CLASSES = ["cat", "dog", "fox"]


def blobs(n_per_class: int, seed: int, dim: int = 16, spread: float = 1.5) -> FeatureCache:
    """Gaussian blobs around one centre per class: separable, but not so easily that every LR scores 1.0."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(len(CLASSES), dim) * 3.0
    labels = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return FeatureCache(features, labels, [f"{i}.png" for i in range(len(labels))])


def write_params(root: Path, **overrides) -> None:
    """The repository's params.yaml with dotted-key overrides (`head.epochs`, `tune.space`...)."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for key, value in overrides.items():
        *sections, name = key.split(".")
        target = params
        for section in sections:
            target = target[section]
        target[name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def write_split_files(root: Path, manifests: dict[str, pd.DataFrame] | None = None) -> None:
    split = root / "data/split"
    split.mkdir(parents=True, exist_ok=True)
    (split / "classes.json").write_text(json.dumps(CLASSES))
    (split / "summary.json").write_text(json.dumps({"data_hash": "test-data"}))
    for name, frame in (manifests or {}).items():
        frame.to_csv(split / f"{name}.csv", index=False)


def head_project(root: Path, **overrides) -> Path:
    """Cached train/val features (blobs) and a params.yaml for a head-only study; no test split at all."""
    root.mkdir(parents=True, exist_ok=True)
    write_split_files(root)
    save_feature_cache(root / "data/features/train.pt", blobs(30, seed=0))
    save_feature_cache(root / "data/features/val.pt", blobs(15, seed=1))
    write_params(root, **{"head.epochs": 8, "head.batch_size": 16, "tune.n_trials": 6, **overrides})
    return root


def image_project(root: Path, **overrides) -> Path:
    """Real PNGs (3 classes x 12), train/val manifests and resnet18 (random init, 32 px) features."""
    from transfer.data.cache import cache_geometry, manifest_hash, write_split_cache
    from transfer.data.datasets import load_split_dataset
    from transfer.data.transforms import eval_batch_transform
    from transfer.features import extract_features
    from transfer.models.backbones import load_backbone
    from transfer.pipeline.files import write_json

    root.mkdir(parents=True, exist_ok=True)
    write_image_folder(root / "images", {name: 12 for name in CLASSES})
    rows = {"train": [], "val": []}
    for label in CLASSES:
        for index, path in enumerate(sorted((root / "images" / label).glob("*.png"))):
            rows["train" if index < 8 else "val"].append((path.relative_to(root).as_posix(), label))
    write_split_files(root, {name: pd.DataFrame(r, columns=["path", "label"]) for name, r in rows.items()})
    loaded = load_backbone("resnet18", "none", 32)
    geometry = cache_geometry(loaded.data_config)  # the image cache stage's output, for train and val
    for split, split_rows in rows.items():
        paths = [path for path, _ in split_rows]
        write_split_cache(root / f"data/cache/{split}.npy", [root / path for path in paths], geometry)
    write_json(
        root / "data/cache/meta.json",
        {
            "side": geometry.side,
            "interpolation": geometry.interpolation,
            "splits": {
                split: {"count": len(r), "manifest_sha256": manifest_hash([path for path, _ in r])}
                for split, r in rows.items()
            },
        },
    )
    for split in ("train", "val"):
        data = load_split_dataset(
            root / "data/cache",
            root / "data/split",
            split,
            loaded.data_config,
            batch_transform=eval_batch_transform(loaded.data_config),
        )
        features = extract_features(loaded.backbone, data, 16, torch.device("cpu"), desc=split)
        save_feature_cache(
            root / f"data/features/{split}.pt", FeatureCache(features, torch.tensor(data.labels), list(data.paths))
        )
    write_params(
        root,
        **{
            "backbone.name": "resnet18",
            "backbone.weights": "none",
            "backbone.image_size": 32,
            "head.epochs": 5,
            "freeze_layers": 3,
            "finetune.epochs": 2,
            "finetune.batch_size": 8,
            "finetune.warmup_epochs": 0.0,
            "device": "cpu",
            **overrides,
        },
    )
    return root


@pytest.fixture(autouse=True)
def own_mlflow_store(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which tracking.tracking_uri prefers over a root:
    without this, the runs of every test after the first would go to the first test's store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def trial_runs(root: Path, study: str):
    """(parent runs, child runs) of a study in the project's own MLflow store."""
    client = MlflowClient(tracking_uri=tracking.tracking_uri(root))
    experiment = client.get_experiment_by_name("transfer")
    runs = client.search_runs([experiment.experiment_id], f"tags.`tune.study` = '{study}'", max_results=1000)
    parents = [r for r in runs if r.data.tags["tune.role"] == "study"]
    return parents, [r for r in runs if r.data.tags["tune.role"] == "trial"], client

"""Each head kind (head.kind) on the same cached features: test accuracy and fit time.

Two sources of features:
    --features DIR   the pipeline's cache (data/features/{train,val,test}.pt), e.g. after `dvc repro` of the
                     embedded default (Fashion-MNIST mini, EfficientNet-Lite0 at 112 px)
    --idx DIR        an IDX dataset (default source: Debian's full Fashion-MNIST); its features are extracted
                     here with --backbone at --image-size (cached in bench/results/, so a second run only fits),
                     10% of the official train split (stratified, seed 0) is val

    PYTHONPATH=src python bench/heads.py --features data/features
    PYTHONPATH=src nice -n 10 python bench/heads.py --idx /usr/share/datasets/fashion-mnist --image-size 64

Fit time is the wall time of the whole fit: the grid on val and the refit (linear: every epoch). It is a
measurement, not a test; prefix with `nice` on a shared machine and say which machine gave the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from transfer.features import FeatureCache, extract_features, load_feature_cache
from transfer.models.heads import FEATURE_HEADS, HEAD_KINDS, head_logits
from transfer.pipeline.params import HeadParams
from transfer.train.probe import fit_feature_head, train_linear_probe

RESULTS = Path(__file__).resolve().parent / "results"


def idx_features(
    folder: Path, backbone: str, image_size: int, limit: int | None, batch_size: int
) -> tuple[FeatureCache, FeatureCache, FeatureCache]:
    """Features of the IDX train and test images (cached); train split 90/10 into train and val."""
    from PIL import Image
    from sklearn.model_selection import train_test_split

    from transfer.data.cache import cache_geometry, to_cache_form
    from transfer.data.datasets import ImageDataset
    from transfer.data.sources import read_idx
    from transfer.data.transforms import eval_batch_transform
    from transfer.models.backbones import load_backbone

    cache = RESULTS / f"features-{folder.name}-{backbone}-{image_size}-{limit or 'all'}.pt"
    if not cache.is_file():
        loaded = load_backbone(backbone, "imagenet", image_size)
        parts = {}
        for part, prefix in (("train", "train"), ("test", "t10k")):
            images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")[:limit]
            labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")[:limit].astype(np.int64)
            # As the pipeline sees them: grayscale -> RGB, the image cache's form, evaluation's batch transform.
            geometry = cache_geometry(loaded.data_config)
            pixels = torch.stack(
                [
                    torch.from_numpy(to_cache_form(Image.fromarray(image).convert("RGB"), geometry)).permute(2, 0, 1)
                    for image in images
                ]
            )
            dataset = ImageDataset(pixels, labels.tolist(), batch_transform=eval_batch_transform(loaded.data_config))
            started = time.perf_counter()
            features = extract_features(loaded.backbone, dataset, batch_size, torch.device("cpu"), desc=part)
            print(f"{part}: {tuple(features.shape)} in {time.perf_counter() - started:.0f} s")
            parts[part] = (features, torch.from_numpy(labels))
        RESULTS.mkdir(parents=True, exist_ok=True)
        torch.save(parts, cache)
    parts = torch.load(cache, weights_only=True)
    features, labels = parts["train"]
    train_index, val_index = train_test_split(
        np.arange(len(labels)), test_size=0.1, stratify=labels.numpy(), random_state=0
    )
    train_index, val_index = torch.from_numpy(np.sort(train_index)), torch.from_numpy(np.sort(val_index))
    return (
        FeatureCache(features[train_index], labels[train_index], []),
        FeatureCache(features[val_index], labels[val_index], []),
        FeatureCache(parts["test"][0], parts["test"][1], []),
    )


def measure(kind: str, train: FeatureCache, val: FeatureCache, test: FeatureCache, seed: int) -> dict:
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    started = time.perf_counter()
    if kind == "linear":
        probe = train_linear_probe(train, val, num_classes, HeadParams(), seed)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            predicted = probe.model(test.features).argmax(1).numpy()
        chosen = f"epoch {probe.best_epoch}"
    else:
        fitted = fit_feature_head(kind, train, val, seed)
        seconds = time.perf_counter() - started
        predicted = head_logits(fitted.estimator, test.features.numpy(), kind).argmax(1)
        chosen = f"{FEATURE_HEADS[kind].hyperparameter}={fitted.chosen}"
    accuracy = float((predicted == test.labels.numpy()).mean())
    print(f"{kind:>7}: test accuracy {accuracy:.4f}, fit {seconds:7.1f} s ({chosen})", flush=True)
    return {"kind": kind, "test_accuracy": accuracy, "fit_seconds": round(seconds, 2), "chosen": chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", type=Path, help="folder with train.pt, val.pt, test.pt")
    source.add_argument("--idx", type=Path, help="folder with the IDX files of Fashion-MNIST (or MNIST)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="first N images of each official split")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--kinds", nargs="+", default=list(HEAD_KINDS), choices=HEAD_KINDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    if args.features:
        train, val, test = (load_feature_cache(args.features / f"{split}.pt") for split in ("train", "val", "test"))
    else:
        train, val, test = idx_features(args.idx, args.backbone, args.image_size, args.limit, args.batch_size)
    print(f"features: train {tuple(train.features.shape)}, val {len(val.labels)}, test {len(test.labels)}")
    results = [measure(kind, train, val, test, args.seed) for kind in args.kinds]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "train": len(train.labels),
                    "val": len(val.labels),
                    "test": len(test.labels),
                    "width": train.features.shape[1],
                    "heads": results,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()

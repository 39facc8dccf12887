"""How well the label_issues stage finds wrong labels: plant flips in real training labels, rank, count the hits.

Takes the pipeline's cached training features (after `dvc repro features`: EfficientNet-Lite0 ImageNet features
of the embedded Fashion-MNIST mini at 112 px by default), moves `--share` of the labels to another class at
random (per seed), runs the stage's method (`transfer.data.label_issues`: out-of-fold logistic regression, then
cleanlab's confident learning) and reports, for the top `--share` of the ranking, the share that were planted
(precision) and the share of the planted that it holds (recall; equal to precision when k = the planted count),
plus how many images confident learning flags and the wall and CPU time (one thread; the CPU time is the
figure to compare on a shared machine).

    PYTHONPATH=src nice -n 10 python bench/label_issues.py --features data/features/train.pt

The data set's own labels are not all right either (Fashion-MNIST's shirts, pullovers and coats overlap): an
unplanted image in the top k may be a real label issue, so precision here is a lower bound.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from transfer.data.label_issues import find_training_label_issues, flip_labels, precision_recall_at
from transfer.features import load_feature_cache
from transfer.pipeline.runtime import single_threaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, default=Path("data/features/train.pt"))
    parser.add_argument("--share", type=float, default=0.05, help="share of the labels flipped")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one planting per seed")
    args = parser.parse_args()

    cache = load_feature_cache(args.features)
    features, labels = cache.features.numpy(), cache.labels.numpy()
    n_classes = int(labels.max()) + 1
    print(f"{args.features}: {features.shape[0]} images, {features.shape[1]} features, {n_classes} classes")
    results = []
    with single_threaded():
        for seed in args.seeds:
            noisy, planted = flip_labels(labels, args.share, n_classes, seed)
            start, cpu = time.perf_counter(), time.process_time()
            ranking = find_training_label_issues(features, noisy, args.folds, seed=0)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            precision, recall = precision_recall_at(ranking, planted, len(planted))
            flagged = set(ranking.issues.tolist())
            flagged_recall = len(flagged & set(planted.tolist())) / len(planted)
            results.append((precision, recall))
            print(
                f"seed {seed}: {len(planted)} flipped; top {len(planted)}: precision {precision:.3f}, "
                f"recall {recall:.3f}; flagged {len(flagged)} (recall {flagged_recall:.3f}); "
                f"{seconds:.1f} s ({cpu:.1f} s CPU)"
            )
    mean = np.mean(results, axis=0)
    print(f"mean over {len(args.seeds)} plantings: precision {mean[0]:.3f}, recall {mean[1]:.3f}")


if __name__ == "__main__":
    main()

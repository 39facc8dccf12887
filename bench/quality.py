"""Quality bar of the fine-tuning recipe, through the real pipeline (dvc repro / dvc exp run).

On the embedded default (Fashion-MNIST mini, EfficientNet-Lite0 at 112 px) it measures test accuracy of
    probe        freeze_layers: all (linear probe on cached ImageNet features; the default pipeline)
    finetune     freeze_layers: K (default 5) with the default `finetune:` recipe
    scratch      the same architecture from random init (backbone.weights: none), every group trained
                 (freeze_layers: 0, finetune.head_init: xavier), with the same fine-tuning recipe and epochs
and prints them (bench/results/quality.json keeps them). The project is copied to a fresh git repository
under bench/results/ first, so the working tree, its dvc.lock and its MLflow store are left alone.

    PYTHONPATH=src python bench/quality.py                    # all three, K=5
    PYTHONPATH=src python bench/quality.py --freeze-layers 5 -S finetune.epochs=8
    PYTHONPATH=src python bench/quality.py --variants probe finetune

The full Fashion-MNIST (Debian's dataset-fashion-mnist; 54k train / 6k val / 10k test) uses the same script
with the source overridden. `++` sets a key params.yaml may lack (and replaces it once an earlier variant has
written it). The README's full-data figures (test accuracy 0.9403, 0.9413 with flip TTA):

    PYTHONPATH=src python bench/quality.py --variants probe finetune --freeze-layers 2 \
        -S data.source=idx -S ++data.path=/usr/share/datasets/fashion-mnist -S backbone.image_size=80 \
        -S split.val_fraction=0.1 -S finetune.epochs=14 -S finetune.batch_size=64 -S finetune.lr=0.01 \
        -S finetune.batchnorm=train --out bench/results/quality-full.json

(about 4 min per fine-tuning epoch on 2 quiet CPU cores, an hour in all; add `-S device=cuda` on a GPU
machine). `-S evaluate.tta=flip` scores each test image together with its mirror; `backbone.image_size=64`
with `finetune.epochs=24` is the README's other row.

Speed is reported (seconds per variant) but this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from project_copy import (  # bench/project_copy.py (bench/ is on sys.path when run as a script)
    bench_environment,
    copy_project,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def variants(freeze_layers: int) -> dict[str, list[str]]:
    """Variant name -> `dvc exp run -S` overrides (on top of params.yaml and the user's -S)."""
    return {
        "probe": ["freeze_layers=all"],
        "finetune": [f"freeze_layers={freeze_layers}"],
        "scratch": ["backbone.weights=none", "freeze_layers=0", "finetune.head_init=xavier"],
    }


def run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, env=bench_environment(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return done.stdout + done.stderr


def fresh_repository(destination: Path) -> Path:
    """A fresh git repository with the project's tracked and new (not ignored) files, no results."""
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    copy_project(destination, REPO)
    for args in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        run(args, destination)
    return destination


def measure(work: Path, name: str, overrides: list[str]) -> dict:
    """One variant as a DVC experiment; returns its test metrics, best val epoch and wall time."""
    sets = [arg for override in overrides for arg in ("-S", override)]
    started = time.time()
    run([sys.executable, "-m", "dvc", "exp", "run", "-n", f"bench-{name}", *sets], work)
    seconds = time.time() - started
    metrics = json.loads((work / "reports/metrics.json").read_text())
    train = json.loads((work / "reports/train.json").read_text())
    return {
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "best_val_acc": train["val_acc"],
        "best_epoch": train["best_epoch"],
        "seconds": round(seconds, 1),
        "overrides": overrides,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--freeze-layers", type=int, default=5, help="K of the fine-tuning variant")
    parser.add_argument("--variants", nargs="+", default=["probe", "finetune", "scratch"])
    parser.add_argument("-S", "--set", action="append", default=[], help="extra override for every variant")
    parser.add_argument("--work", type=Path, default=RESULTS / "quality-work")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args()

    work = fresh_repository(args.work)
    table = variants(args.freeze_layers)
    results = {}
    for name in args.variants:
        results[name] = measure(work, name, table[name] + args.set)
        print(
            f"{name:9s} test accuracy {results[name]['test_accuracy']:.4f}  "
            f"(best val {results[name]['best_val_acc']:.4f} at epoch {results[name]['best_epoch']}, "
            f"{results[name]['seconds']:.0f} s)",
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if {"probe", "finetune", "scratch"} <= set(results):
        ordered = (
            results["finetune"]["test_accuracy"]
            > results["probe"]["test_accuracy"]
            > results["scratch"]["test_accuracy"]
        )
        print(f"fine-tune > probe > scratch: {ordered}")


if __name__ == "__main__":
    main()

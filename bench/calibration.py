"""Temperature scaling through the real pipeline: test ECE, NLL and Brier before (T = 1) and after, per data set.

    embedded     the committed Fashion-MNIST subset (params.yaml as it is: `dvc repro`)
    digits       scikit-learn's bundled 8x8 digits (1,797 images) as PNGs, `data.source: folder`
    imbalanced   the same digits with class c kept at 0.75^c of its images (178 zeros, 13 nines: 13:1)
    fashion      the full Fashion-MNIST (70,000 images) from Debian's dataset-fashion-mnist, `data.source: idx`

Each runs the default linear probe (evaluate.calibration: temperature) in a copy of the project under
bench/results/calibration/ (the working tree, its dvc.lock and MLflow store are left alone) and reads
reports/metrics.json's `calibration`. The digits sets run at 64 px (8x8 images gain nothing from 112), the
full Fashion-MNIST too (28x28 images; features of 70,000 images in minutes on a CPU).

    PYTHONPATH=src nice -n 10 python bench/calibration.py            # all three (about 10 min on 2 cores)
    PYTHONPATH=src nice -n 10 python bench/calibration.py --datasets digits
    PYTHONPATH=src nice -n 10 python bench/calibration.py --datasets fashion    # apt install dataset-fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from project_copy import bench_environment, copy_project

from transfer.data.sources import DEBIAN_FASHION_MNIST

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "calibration"
DIGITS_SIZE = ["-S", "backbone.image_size=64"]


def write_digits(folder: Path, keep: float = 1.0, seed: int = 0) -> Path:
    """scikit-learn's digits as grayscale PNGs, folder/<digit>/<n>.png; class c keeps keep^c of its images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        rows = np.flatnonzero(digits.target == label)
        rows = np.sort(rng.choice(rows, max(1, round(len(rows) * keep**label)), replace=False))
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        for n in rows:
            pixels = np.round(digits.images[n] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / str(label) / f"{n:04d}.png")
    return folder


def run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=bench_environment(TRANSFER_STAGE_SERVER="off"), capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["embedded", "digits", "imbalanced"])
    args = parser.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    repo = OUT / "project"
    repo.mkdir(parents=True)
    copy_project(repo)
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(command, repo)
    dvc = [sys.executable, "-m", "dvc"]
    overrides = {
        "embedded": [],
        "digits": ["-S", "data.source=folder", "-S", f"++data.path={write_digits(OUT / 'digits')}", *DIGITS_SIZE],
        "imbalanced": [
            "-S",
            "data.source=folder",
            "-S",
            f"++data.path={write_digits(OUT / 'digits-imbalanced', keep=0.75)}",
            *DIGITS_SIZE,
        ],
        "fashion": ["-S", "data.source=idx", "-S", f"++data.path={DEBIAN_FASHION_MNIST}", *DIGITS_SIZE],
    }
    results = {}
    for name in args.datasets:
        run(dvc + ["exp", "run", *overrides[name]], repo)
        metrics = json.loads((repo / "reports" / "metrics.json").read_text())
        split = json.loads((repo / "data" / "split" / "summary.json").read_text())
        results[name] = {
            "accuracy": metrics["accuracy"],
            "test_images": sum(split["per_class"]["test"].values()),
            **metrics["calibration"],
        }
        print(json.dumps({name: results[name]}), flush=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

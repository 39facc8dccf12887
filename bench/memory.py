"""Peak memory and wall time of every stage on N synthetic 12-megapixel JPEG photos.

    python bench/memory.py                    # N = 200 and N = 2000 (minutes; disk: about 1 MB per photo)
    python bench/memory.py --n 50 --side 2000 # a quick look
    python bench/memory.py --image-size 224   # backbone.image_size=224 (default: params.yaml's)

Generates N camera-sized JPEGs (4000 x 3000 by default, 2 classes) in a temporary folder, copies the
project into a fresh git repository whose params.yaml points `data: folder` at them (fine-tuning with
`freeze_layers: 3` for one epoch, so the train stage reads images too), and runs each stage on its own
with `dvc repro -s <stage>` under `/usr/bin/time -v`. For each stage it reports the OS's peak resident
set size (`Maximum resident set size`: the largest single process among dvc, the stage and its workers)
and, sampled every 0.1 s, the peak of the whole process tree's summed RSS, and the wall time.

Encoding 12-megapixel JPEGs is slow, so a few base photos per class are encoded once and every file is
one of them with its own JPEG comment (different bytes, so the download stage keeps each as a distinct
image; decoding cost is that of a real photo). Results go to bench/results/memory.json. Nothing is
asserted: tests check the property (a dataset holds one batch), this measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from project_copy import (  # bench/project_copy.py (bench/ is on sys.path when run as a script)
    bench_environment,
    copy_project,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ["download", "split", "cache", "features", "label_issues", "train", "evaluate"]


def base_photos(width: int, height: int, per_class: int, seed: int = 0) -> dict[str, list[bytes]]:
    """A few encoded JPEGs per class: smooth colour fields with texture (compress like photos, ~1 MB)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    photos: dict[str, list[bytes]] = {}
    for class_index, name in enumerate(["warm", "cool"]):
        photos[name] = []
        for variant in range(per_class):
            phase = rng.uniform(0, 2 * np.pi, 3)
            base = np.array([200, 120, 60] if class_index == 0 else [60, 120, 200], np.float32)
            waves = [np.sin(x / (300 + 50 * variant) + phase[c]) * np.cos(y / 400 + phase[c]) for c in range(3)]
            pixels = base + 50 * np.stack(waves, axis=-1) + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            path = Path(tempfile.mkstemp(suffix=".jpg")[1])
            image.save(path, quality=85)
            photos[name].append(path.read_bytes())
            path.unlink()
    return photos


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: other bytes, same pixels."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def write_photos(folder: Path, count: int, photos: dict[str, list[bytes]]) -> None:
    for index in range(count):
        name = list(photos)[index % len(photos)]
        variants = photos[name]
        target = folder / name / f"{index:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(with_comment(variants[(index // len(photos)) % len(variants)], f"photo {index}"))


def tree_rss(pid: int) -> int:
    """Summed RSS (bytes) of a process and all its descendants, 0 once it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_stage(stage: str, repo: Path, env: dict) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "dvc", "repro", "-s", stage]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss(process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if process.returncode:
        sys.exit(f"{stage} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    max_rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    return {
        "peak_rss_mb": round(max_rss_kb / 1024),
        "tree_peak_rss_mb": round(peak[0] / 2**20),
        "wall_s": round(seconds, 1),
    }


def measure(count: int, photos_root: Path, env: dict, params_overrides: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="transfer-memory-") as tmp:
        repo = Path(tmp) / "repo"
        copy_project(repo)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["data"] = {"source": "folder", "path": str(photos_root / str(count))}
        for key, value in params_overrides.items():
            section, _, name = key.partition(".")
            if name:
                params[section][name] = value
            else:
                params[section] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
            subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
        results = {}
        stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
        for stage in [name for name in ("params", *STAGES) if name in stages]:  # params: validates params.yaml
            results[stage] = run_stage(stage, repo, env)
            print(f"N={count} {stage:9s} {results[stage]}", flush=True)
        results["test_accuracy"] = json.loads((repo / "reports/metrics.json").read_text())["accuracy"]
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[200, 2000], help="numbers of photos")
    parser.add_argument("--side", type=int, default=4000, help="photo width (height is 3/4 of it)")
    parser.add_argument("--variants", type=int, default=3, help="encoded base photos per class")
    parser.add_argument("--image-size", type=int, default=None, help="backbone.image_size (default: params.yaml's)")
    args = parser.parse_args()

    env = bench_environment(TRANSFER_STAGE_SERVER="off")
    overrides = {"freeze_layers": 3, "finetune.epochs": 1}
    if args.image_size:
        overrides["backbone.image_size"] = args.image_size
    results: dict = {"photo": f"{args.side}x{args.side * 3 // 4} JPEG", "params": overrides}
    with tempfile.TemporaryDirectory(prefix="transfer-photos-") as tmp:
        started = time.perf_counter()
        photos = base_photos(args.side, args.side * 3 // 4, args.variants)
        for count in args.n:
            write_photos(Path(tmp) / str(count), count, photos)
        sizes = [len(b) for variants in photos.values() for b in variants]
        results["photo_bytes_mean"] = int(np.mean(sizes))
        print(f"photos written in {time.perf_counter() - started:.0f} s ({np.mean(sizes) / 1e6:.1f} MB each)")
        for count in args.n:
            results[f"N={count}"] = measure(count, Path(tmp), env, overrides)
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    out = REPO_ROOT / "bench" / "results" / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Feature-extraction throughput on the CPU by batch size, beside each batch's measured activation memory.

    PYTHONPATH=src python bench/feature_batch.py                        # efficientnet_lite0, 224 px
    PYTHONPATH=src python bench/feature_batch.py --backbone resnet18 --image-size 112

For each batch size, the backbone runs as `extract_features` runs it on CPU (eval, channels_last,
inference mode, the free heap released after every batch) over the same number of random images
(`--images`), after one warm-up batch. Rounds visit every batch size in turn, so a change in the load
from other jobs falls on all of them, and the best round is kept. Beside images per wall-clock second,
images per CPU-second of this process (`time.process_time`), which other jobs on a shared CPU disturb less.
Random-init weights (`none`): the speed is the architecture's. The activation column is
`activation_bytes_per_image` times the batch, what `features.max_memory_mb` is compared with. This is
the measurement behind `transfer.features.CPU_BATCH_LIMIT`. Results are printed and written to
bench/results/feature_batch.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from transfer.features import activation_bytes_per_image
from transfer.models.backbones import load_backbone
from transfer.pipeline.heap import release_free_heap

RESULTS = Path(__file__).resolve().parent / "results"


@torch.inference_mode()
def images_per_second(model: torch.nn.Module, image_size: int, batch_size: int, images: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of this process)."""
    batch = torch.rand(batch_size, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    model(batch)  # warm-up: oneDNN picks and caches its kernels for this shape
    batches = max(1, round(images / batch_size))
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        model(batch)
        release_free_heap()
    count = batches * batch_size
    return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128])
    parser.add_argument("--images", type=int, default=128, help="images timed per batch size")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    model = load_backbone(args.backbone, "none", args.image_size).backbone
    per_image = activation_bytes_per_image(model, args.image_size)  # also puts it in eval and channels_last
    best = {batch_size: (0.0, 0.0) for batch_size in args.batch_sizes}
    for round_index in range(args.rounds):
        for batch_size in args.batch_sizes:
            wall, cpu = images_per_second(model, args.image_size, batch_size, args.images)
            best[batch_size] = (max(best[batch_size][0], wall), max(best[batch_size][1], cpu))
            print(f"round {round_index + 1}: batch {batch_size}: {wall:.2f} img/s, {cpu:.2f} img/CPU-s", flush=True)
    rows = [
        {
            "batch_size": batch_size,
            "images_per_s": round(wall, 2),
            "images_per_cpu_s": round(cpu, 2),
            "activation_mb": round(batch_size * per_image / 2**20),
        }
        for batch_size, (wall, cpu) in best.items()
    ]
    results = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "activation_mb_per_image": round(per_image / 2**20, 2),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feature_batch.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Feature width and CPU throughput of backbones (images per second through the frozen backbone).

    PYTHONPATH=src nice -n 10 python bench/backbones.py                       # the default list, 112 px
    PYTHONPATH=src python bench/backbones.py --names convnext_tiny resnet50 --image-size 224 --threads 2

Random weights (`backbone.weights: none`): throughput does not depend on the values, and nothing is
downloaded. Channels-last, inference mode, as the features stage runs. A measurement, not a test: say which
machine (and how busy) gave the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from transfer.models.backbones import load_backbone

DEFAULT = [
    "efficientnet_lite0",
    "efficientnet_lite1",
    "resnet18",
    "resnet50",
    "resnet10t",
    "efficientnet_b0",
    "convnext_atto",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
]


@torch.inference_mode()
def throughput(name: str, image_size: int, batch_size: int, batches: int) -> dict:
    loaded = load_backbone(name, "none", image_size)
    backbone = loaded.backbone.eval().to(memory_format=torch.channels_last)
    size = loaded.data_config.image_size
    images = torch.rand(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    backbone(images)  # warm-up: oneDNN picks its kernels on the first call
    started = time.perf_counter()
    for _ in range(batches):
        backbone(images)
    seconds = time.perf_counter() - started
    result = {
        "name": name,
        "image_size": size,
        "groups": len(backbone.group_names),
        "width": backbone.num_features,
        "images_per_second": round(batch_size * batches / seconds, 1),
    }
    print(
        f"{name:>24}: {size} px, {result['groups']:>2} groups, width {result['width']:>5}, "
        f"{result['images_per_second']:>7.1f} img/s",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", nargs="+", default=DEFAULT)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [throughput(name, args.image_size, args.batch_size, args.batches) for name in args.names]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

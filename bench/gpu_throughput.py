"""Images/s of feature extraction and of one fine-tuning epoch through the stages' own functions, each
beside the model-alone ceiling measured in the same process.

    python bench/gpu_throughput.py                       # GPU if present: ResNet-50 and EfficientNet-Lite0, 224 px
    python bench/gpu_throughput.py --compile             # features.compile / finetune.compile
    python bench/gpu_throughput.py --n 64 --batch-size 32  # the CPU defaults: a small table in a minute or two

Rows:
- `features`: `transfer.features.extract_features` over an image cache file ([N, S, S, 3] uint8, S the
  backbone's eval resize size, random pixels), i.e. cache reads, host-to-device copies, centre crop and
  normalisation on the device, bf16 autocast on CUDA, the features copied back. Ceiling: the backbone
  alone on one batch already on the device, in the same precision (bf16 on CUDA, fp32 on CPU), eval mode.
- `fine-tune`: one epoch of `transfer.train.finetune.fine_tune` (freeze_layers 0, SGD, per-sample random
  crops and flips on the device, the per-group gradient norms), validation on one batch. Ceiling: forward,
  backward and optimiser step of the same model on one device batch, bf16 autocast on CUDA.

The ratio is pipeline / ceiling. Weights are random (throughput does not depend on them). The card (or
CPU) is named in the output; results go to bench/results/gpu_throughput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transfer.data.cache import CachedImages  # noqa: E402
from transfer.data.datasets import ImageDataset  # noqa: E402
from transfer.data.transforms import eval_batch_transform, train_transforms  # noqa: E402
from transfer.features import extract_features  # noqa: E402
from transfer.models.backbones import Classifier, load_backbone  # noqa: E402
from transfer.pipeline.params import FinetuneParams  # noqa: E402
from transfer.train.finetune import fine_tune  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def write_cache(path: Path, count: int, side: int, seed: int = 0) -> None:
    """A cache file of random pixels, written in chunks (the format the cache stage writes)."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "|u1", "fortran_order": False, "shape": (count, side, side, 3)}
        )
        for start in range(0, count, 256):
            rows = min(256, count - start)
            handle.write(rng.integers(0, 256, (rows, side, side, 3), dtype=np.uint8).tobytes())


def timed(function, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def forward_ceiling(backbone, batch: torch.Tensor, device: torch.device, steps: int, compile: bool) -> float:
    model = backbone.eval().to(device, memory_format=torch.channels_last)
    model = torch.compile(model) if compile else model
    with torch.inference_mode(), autocast(device):
        model(batch)  # warm-up (cuDNN autotuning, compilation)
        seconds = timed(lambda: [model(batch) for _ in range(steps)], device)
    return steps * len(batch) / seconds


def step_ceiling(
    model: Classifier, batch: torch.Tensor, labels: torch.Tensor, device: torch.device, steps: int, compile: bool
) -> float:
    model = model.train().to(device, memory_format=torch.channels_last)
    engine = torch.compile(model) if compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    def step() -> None:
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(engine(batch).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    seconds = timed(lambda: [step() for _ in range(steps)], device)
    return steps * len(batch) / seconds


def bench_model(name: str, args, device: torch.device, workdir: Path) -> dict:
    loaded = load_backbone(name, "none", args.image_size)
    config = loaded.data_config
    cache = workdir / f"{name}.npy"
    write_cache(cache, args.n, config.resize_size)
    images = CachedImages(cache)
    labels = [i % 10 for i in range(args.n)]
    eval_data = ImageDataset(images, labels, batch_transform=eval_batch_transform(config))
    batch = torch.randn(args.batch_size, 3, config.image_size, config.image_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    row: dict = {
        "model": name,
        "image_size": config.image_size,
        "cache_side": config.resize_size,
        "n": args.n,
        "batch_size": args.batch_size,
    }

    # Features: warm up on one batch (autotuning, compilation), then the whole cache.
    def features() -> None:
        extract_features(
            loaded.backbone,
            eval_data,
            args.batch_size,
            device,
            amp=True,
            compile=args.compile,
            num_workers=args.workers,
        )

    extract_features(
        loaded.backbone, eval_data.subset(range(args.batch_size)), args.batch_size, device, compile=args.compile
    )
    row["features_img_s"] = args.n / timed(features, device)
    row["features_ceiling_img_s"] = forward_ceiling(loaded.backbone, batch, device, args.steps, args.compile)

    # Fine-tuning: one epoch over the cache, validation on one batch.
    recipe = FinetuneParams(
        epochs=1, batch_size=args.batch_size, num_workers=args.workers, compile=args.compile, warmup_epochs=0.0, lr=1e-3
    )
    sample_transform, batch_transform = train_transforms(config, "none", recipe.crop_min_scale, recipe.hflip)
    train_data = ImageDataset(images, labels, batch_transform=batch_transform, sample_transform=sample_transform)
    val_data = eval_data.subset(range(args.batch_size))
    model = Classifier(load_backbone(name, "none", args.image_size).backbone, 10)
    fine_tune(model, 0, train_data.subset(range(2 * args.batch_size)), val_data, recipe, 0, device)  # warm-up
    seconds = timed(lambda: fine_tune(model, 0, train_data, val_data, recipe, 0, device), device)
    row["finetune_img_s"] = (args.n // args.batch_size) * args.batch_size / seconds
    labels_batch = torch.randint(0, 10, (args.batch_size,), device=device)
    row["finetune_ceiling_img_s"] = step_ceiling(
        Classifier(load_backbone(name, "none", args.image_size).backbone, 10),
        batch,
        labels_batch,
        device,
        args.steps,
        args.compile,
    )
    row["features_share"] = row["features_img_s"] / row["features_ceiling_img_s"]
    row["finetune_share"] = row["finetune_img_s"] / row["finetune_ceiling_img_s"]
    cache.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_lite0"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n", type=int, default=16384 if cuda else 64, help="images in the cache")
    parser.add_argument("--batch-size", type=int, default=256 if cuda else 32)
    parser.add_argument("--steps", type=int, default=20 if cuda else 2, help="batches timed for each ceiling")
    parser.add_argument("--workers", type=int, default=4 if cuda else 0, help="DataLoader workers")
    parser.add_argument("--compile", action="store_true", help="torch.compile (features.compile, finetune.compile)")
    args = parser.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    card = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    precision = "bf16 autocast" if cuda else "fp32"
    rows = []
    with tempfile.TemporaryDirectory(prefix="transfer-throughput-") as tmp:
        for name in args.models:
            rows.append(bench_model(name, args, device, Path(tmp)))
            print(f"{name}: done", flush=True)
    print(
        f"\n{card}, {precision}, {args.image_size} px, batch {args.batch_size}, {args.n} images"
        f"{', torch.compile' if args.compile else ''}\n"
    )
    print("| what | the project (img/s) | the model alone (img/s) | share |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| features, {row['model']} | {row['features_img_s']:,.0f} | {row['features_ceiling_img_s']:,.0f} "
            f"forward | {row['features_share']:.0%} |"
        )
        print(
            f"| fine-tune 1 epoch, {row['model']} | {row['finetune_img_s']:,.0f} | "
            f"{row['finetune_ceiling_img_s']:,.0f} forward+backward+step | {row['finetune_share']:.0%} |"
        )
    out = REPO_ROOT / "bench" / "results" / "gpu_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"device": card, "precision": precision, "compile": args.compile, "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()

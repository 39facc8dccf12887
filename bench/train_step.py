"""Fine-tuning throughput of one training step, in images per second, for the runtime options.

    PYTHONPATH=src python bench/train_step.py                              # CPU, 64 px, k=2, batch 64
    PYTHONPATH=src python bench/train_step.py --image-size 112 --freeze-layers 3
    PYTHONPATH=src python bench/train_step.py --device cuda --image-size 224 --batch-size 256

Each variant builds the model the train stage builds (`load_backbone`, `Classifier`, `freeze_first_groups`,
the recipe's optimiser and loss, `runtime_for`) and times forward + backward + optimiser step on one
fixed random batch, so the figure is the model's compute alone: image decoding and augmentation are not
in it. Variants:
    plain          fp32, contiguous (NCHW) memory
    channels_last  finetune.channels_last (the default)
    bf16           + bf16 autocast (finetune.amp; the train stage uses it on CUDA only)
    compile        + torch.compile (finetune.compile; the first steps include compilation)
Results are printed and written to bench/results/train_step.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from transfer.models.backbones import Classifier, load_backbone
from transfer.models.groups import freeze_first_groups, layer_groups
from transfer.pipeline.params import FinetuneParams
from transfer.train.finetune import make_loss, runtime_for
from transfer.train.optim import build_optimizer, optimizer_kwargs

RESULTS = Path(__file__).resolve().parent / "results"

VARIANTS = {
    "plain": dict(channels_last=False, amp=False, compile=False),
    "channels_last": dict(channels_last=True, amp=False, compile=False),
    "bf16": dict(channels_last=True, amp=True, compile=False),
    "compile": dict(channels_last=True, amp=False, compile=True),
}


def images_per_second(variant: str, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    params = FinetuneParams(**VARIANTS[variant])
    device = torch.device(args.device)
    runtime = runtime_for(device, params.amp, params.channels_last)
    if variant == "bf16" and not runtime.amp:
        # runtime_for keeps bf16 to CUDA; measuring it on CPU shows why.
        runtime = type(runtime)(device, amp=True, channels_last=True, pin_memory=False)
    loaded = load_backbone(args.backbone, "imagenet", args.image_size)
    model = Classifier(loaded.backbone, args.num_classes)
    freeze_first_groups(model, args.freeze_layers)
    model.to(device).train()
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    engine = torch.compile(model) if params.compile else model
    optimizer = build_optimizer(layer_groups(model), **optimizer_kwargs(params))
    loss_fn = make_loss(params, None)
    images = runtime.prepare(torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=runtime.device))
    labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def step() -> None:
        with runtime.autocast():
            logits = engine(images)
        loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--freeze-layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["plain", "channels_last", "bf16"])
    args = parser.parse_args()

    figures = {}
    for variant in args.variants:
        figures[variant] = round(images_per_second(variant, args), 1)
        print(f"{variant:>14}: {figures[variant]:8.1f} images/s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = dict(
        vars(args),
        images_per_second=figures,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
    )
    (RESULTS / "train_step.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

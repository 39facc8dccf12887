"""Peak memory and time of CPU fine-tuning by `finetune.max_memory_mb` (the micro-batch it chooses).

    PYTHONPATH=src python bench/finetune_memory.py                           # Lite0, 224 px, 1500/600/400/300 MB
    PYTHONPATH=src python bench/finetune_memory.py --budgets 400 --image-size 384

Each budget runs in a process of its own (peak RSS is per process): `fine_tune` for one epoch of
`--images` random uint8 images (256 px, cropped to the image size) with the first `--freeze` groups frozen,
batch 32, frozen BatchNorm, as the train stage runs it on CPU. It reports the micro-batch the budget gave
(`transfer.train.memory`), the process's peak RSS before and after training, and the wall time of the
fine-tuning call (its steps and two validation passes). Random-init weights (`none`): memory and speed are
the architecture's. Results are printed and written to bench/results/finetune_memory.json. Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_memory.json"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_budget(args: argparse.Namespace) -> dict:
    """Fine-tune once under args.budget (this process only)."""
    import torch

    from transfer.data.datasets import ImageDataset
    from transfer.data.transforms import eval_batch_transform, train_transforms
    from transfer.models.backbones import Classifier, load_backbone
    from transfer.models.groups import freeze_first_groups
    from transfer.pipeline.params import FinetuneParams
    from transfer.train.finetune import fine_tune
    from transfer.train.memory import step_batches

    loaded = load_backbone(args.backbone, "none", args.image_size)
    model = Classifier(loaded.backbone, 2)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (args.images + 32, 3, 256, 256), dtype=torch.uint8, generator=generator)
    labels = [i % 2 for i in range(len(images))]
    sample_transform, batch_transform = train_transforms(loaded.data_config, "none", 0.8, 0.5)
    train = ImageDataset(images[: args.images], labels[: args.images], None, batch_transform, sample_transform)
    val = ImageDataset(images[args.images :], labels[args.images :], None, eval_batch_transform(loaded.data_config))
    params = FinetuneParams(epochs=1, batch_size=32, max_memory_mb=args.budget)
    example = val.transformed([0, 1]).contiguous(memory_format=torch.channels_last)
    probe = Classifier(load_backbone(args.backbone, "none", args.image_size).backbone, 2)
    freeze_first_groups(probe, args.freeze)
    planned = step_batches(
        probe.to(memory_format=torch.channels_last),
        example,
        32,
        64,
        args.freeze,
        True,
        torch.device("cpu"),
        args.budget,
    )
    before = peak_rss_mb()
    start = time.perf_counter()
    fine_tune(model, args.freeze, train, val, params, 0, torch.device("cpu"), pretrained=True)
    return {
        "budget_mb": args.budget,
        "micro_batch": planned.micro,
        "val_batch": planned.val,
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_before_mb": round(before),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--freeze", type=int, default=3, help="groups frozen (freeze_layers)")
    parser.add_argument("--images", type=int, default=128, help="training images (4 steps of 32 by default)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1500, 600, 400, 300])
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)  # one budget, in a child process
    args = parser.parse_args()
    if args.budget is not None:
        print(json.dumps(one_budget(args)))
        return
    rows = []
    for budget in args.budgets:
        command = [sys.executable, __file__, *sys.argv[1:], "--budget", str(budget)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    setup = {key: getattr(args, key) for key in ("backbone", "image_size", "freeze", "images")}
    RESULTS.write_text(
        json.dumps({"machine": platform.processor() or platform.machine(), **setup, "runs": rows}, indent=2)
    )


if __name__ == "__main__":
    main()

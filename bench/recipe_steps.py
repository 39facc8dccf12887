"""Step by step through the first fine-tuning epoch: what kills the features (README, "The recipe across domains").

On one of bench/recipe.py's data sets (default: the 14:1 imbalanced Fashion-MNIST look-alikes) it fits the
linear probe and fine-tunes one epoch from it with the library's pieces (optimiser, schedule, loss, frozen
BatchNorm statistics), printing every N steps the loss, the global gradient norm before clipping, val
accuracy, the predicted classes and the dead share (pooled channels that are zero for every val image).
Each variant is a JSON object of `finetune:` overrides plus these study-only keys:

    "start": "probe_balanced"   start from a probe fitted with head.class_balance: loss
    "bias_shift": true          add log(class weight) to the head's bias (the weighted optimum's prior shift)
    "sqrt_weights": true        sqrt inverse-frequency class weights (mean 1 over the training samples)
    "rescale": true             the weighted loss rescaled to the unweighted loss's value every step

    nice -n 10 PYTHONPATH=src python bench/recipe_steps.py --image-size 64 '{"grad_clip_agc": null}' \\
        '{"class_balance": "loss", "grad_clip_norm": null, "grad_clip_agc": null}' '{"class_balance": "loss"}'
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe  # noqa: E402  (bench/recipe.py: the data sets)

from transfer.data.datasets import DeviceLoader, ImageDataset  # noqa: E402
from transfer.data.transforms import eval_batch_transform, train_transforms  # noqa: E402
from transfer.features import FeatureCache, extract_features  # noqa: E402
from transfer.models.backbones import Classifier, load_backbone  # noqa: E402
from transfer.models.groups import freeze_batchnorm_stats, freeze_first_groups, layer_groups  # noqa: E402
from transfer.pipeline.distributed import EpochBatchSampler  # noqa: E402
from transfer.pipeline.params import FinetuneParams, HeadParams  # noqa: E402
from transfer.train import finetune  # noqa: E402
from transfer.train.losses import class_weights, classification_loss, clip_gradients, grad_clip_norm  # noqa: E402
from transfer.train.optim import WarmupCosine, build_optimizer, optimizer_kwargs  # noqa: E402
from transfer.train.probe import train_linear_probe  # noqa: E402

CPU = torch.device("cpu")
STUDY_KEYS = ("start", "bias_shift", "sqrt_weights", "rescale")


def rescaled(loss_fn, plain_fn):
    """The weighted loss with the unweighted loss's value (the weights choose the direction, not the size)."""

    def loss(logits, targets):
        weighted, plain = loss_fn(logits, targets), plain_fn(logits, targets)
        return weighted * (plain.detach() / weighted.detach().clamp_min(1e-12))

    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="JSON objects of finetune overrides (and study keys)")
    parser.add_argument("--dataset", default="imbalanced", choices=["embedded", "digits", "imbalanced", "fmnist"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--freeze-layers", type=int, default=4)
    parser.add_argument("--every", type=int, default=8, help="print every N steps")
    parser.add_argument("--fmnist-train-per-class", type=int, default=400)
    parser.add_argument("--fmnist-test-per-class", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = recipe.load_dataset(args.dataset, args)
    labels, num_classes = data["train"][1], len(data["classes"])
    loaded = load_backbone("efficientnet_lite0", "imagenet", args.image_size)
    evaluate = eval_batch_transform(loaded.data_config)
    pixels = recipe.cached_pixels(data, loaded.data_config)
    sets = {split: ImageDataset(pixels[split], data[split][1], batch_transform=evaluate) for split in ("train", "val")}
    caches = {
        split: FeatureCache(
            extract_features(loaded.backbone, sets[split], 128, CPU, desc=split),
            torch.as_tensor(sets[split].labels),
            [],
        )
        for split in sets
    }
    probes = {
        "probe": train_linear_probe(caches["train"], caches["val"], num_classes, HeadParams(), 0),
        "probe_balanced": train_linear_probe(
            caches["train"], caches["val"], num_classes, HeadParams(class_balance="loss", monitor="val_macro_f1"), 0
        ),
    }
    val_images = sets["val"].transformed(list(range(len(sets["val"]))))
    val_labels = torch.tensor(sets["val"].labels)
    for text in args.variants:
        variant = json.loads(text)
        params = FinetuneParams(**{"epochs": 1, **{k: v for k, v in variant.items() if k not in STUDY_KEYS}})
        torch.manual_seed(0)
        model = Classifier(copy.deepcopy(loaded.backbone), num_classes)
        model.head.load_state_dict(probes[variant.get("start", "probe")].model.state_dict())
        freeze_first_groups(model, args.freeze_layers)
        loss_weights, sample_weights = finetune.CLASS_BALANCE[params.class_balance](labels, num_classes)
        if variant.get("sqrt_weights") and loss_weights is not None:
            loss_weights = loss_weights.sqrt() / loss_weights.sqrt()[torch.as_tensor(labels)].mean()
        if variant.get("bias_shift"):
            with torch.no_grad():
                model.head.bias += torch.log(class_weights(labels, num_classes))
        loss_fn = classification_loss(params.label_smoothing, loss_weights)
        if variant.get("rescale"):
            loss_fn = rescaled(loss_fn, classification_loss(params.label_smoothing))
        sample_transform, batch_transform = train_transforms(
            loaded.data_config, params.augment, params.crop_min_scale, params.hflip
        )
        train = ImageDataset(
            pixels["train"], data["train"][1], batch_transform=batch_transform, sample_transform=sample_transform
        )
        loader = DeviceLoader(
            train, CPU, batch_sampler=EpochBatchSampler(len(train), params.batch_size, 0, weights=sample_weights)
        )
        optimizer = build_optimizer(layer_groups(model), **optimizer_kwargs(params))
        schedule = WarmupCosine(optimizer, len(loader), round(params.warmup_epochs * len(loader)), params.min_lr_ratio)
        clip = grad_clip_norm(params.grad_clip_norm, params.class_balance)
        print(
            f"== {variant} (weights {None if loss_weights is None else loss_weights.tolist()}, clip {clip}, "
            f"adaptive {params.grad_clip_agc})"
        )
        for step, (images, targets) in enumerate(loader):
            model.train()
            freeze_batchnorm_stats(model)
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            trainable = [p for p in model.parameters() if p.requires_grad]
            norm = float(torch.nn.utils.clip_grad_norm_(trainable, float("inf")))  # measured before clipping
            clip_gradients(model, clip, params.grad_clip_agc)
            optimizer.step()
            schedule.step()
            if step % args.every == 0 or step == len(loader) - 1:
                model.eval()
                with torch.no_grad():
                    features = model.backbone(val_images)
                    predicted = model.head(features).argmax(1)
                print(
                    f"step {step:3d}  loss {loss.item():.3f}  grad norm {norm:6.1f}  "
                    f"val acc {float((predicted == val_labels).float().mean()):.3f}  "
                    f"predicted {torch.bincount(predicted, minlength=num_classes).tolist()}  "
                    f"dead {float((features.amax(0) <= 0).float().mean()):.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

"""The fine-tuning recipe across data sets: linear probe vs fine-tuning variants, with feature health.

For each data set it decodes the images once, extracts the pretrained EfficientNet-Lite0 features, fits the
linear probe (the `head:` defaults) and then fine-tunes from that probe with each variant of the `finetune:`
recipe (the schema's defaults plus the variant's overrides), calling the library directly (no DVC: one
feature extraction per data set instead of one per variant). Per variant it reports test accuracy and
macro-F1 of

    shipped     the model the train stage keeps (the start model, epoch 0, takes part in the selection)
    tuned       the best fine-tuning epoch alone (what the stage shipped before epoch-0 selection)

and the health of the tuned model's test features next to the pretrained backbone's (spread ratio,
effective rank, dead share), the classes it predicts and those with zero recall.

Data sets (all offline):
    embedded    the committed Fashion-MNIST subset (1,500 images, 10 classes), data.source: archive, 112 px
    fmnist      Fashion-MNIST from Debian's IDX files (what data.source: idx reads): N per class of the official
                train (15% carved for val), M per class of the official test; 6000 and 1000 = the full set
    digits      scikit-learn's bundled digits (8x8 grayscale, 1,797 images), written as PNGs under
                data/sklearn-digits/ and read with data.source: folder
    imbalanced  4 look-alike Fashion-MNIST classes (T-shirt, Pullover, Coat, Shirt) at 1400:500:250:100
                (14:1) from the official train, split 70/15/15 stratified

    nice -n 10 PYTHONPATH=src python bench/recipe.py --datasets digits --image-size 64 --variants default clip_2
    nice -n 10 PYTHONPATH=src python bench/recipe.py --datasets imbalanced --image-size 64 \
        --variants default default_balance_loss no_clip_balance_loss

(the README's "The recipe across domains" has every command of its table).
Results go to bench/results/recipe-<dataset>.json (one entry per variant, appended as they finish).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from transfer.data.cache import cache_geometry, to_cache_form  # noqa: E402
from transfer.data.datasets import ImageDataset  # noqa: E402
from transfer.data.images import load_rgb  # noqa: E402
from transfer.data.sources import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, materialise, read_idx  # noqa: E402
from transfer.data.split import stratified_split  # noqa: E402
from transfer.data.transforms import eval_batch_transform, train_transforms  # noqa: E402
from transfer.evaluate.health import feature_health  # noqa: E402
from transfer.features import FeatureCache, extract_features  # noqa: E402
from transfer.models.backbones import Classifier, load_backbone  # noqa: E402
from transfer.pipeline.params import FinetuneParams, HeadParams  # noqa: E402
from transfer.train import finetune as finetune_module  # noqa: E402
from transfer.train.finetune import fine_tune  # noqa: E402
from transfer.train.losses import improves  # noqa: E402
from transfer.train.probe import train_linear_probe  # noqa: E402

RESULTS = REPO / "bench" / "results"
FASHION = Path(DEBIAN_FASHION_MNIST)
CPU = torch.device("cpu")

# Variant name -> FinetuneParams overrides (on the schema's defaults). The first study ran on the recipe before
# issue 13 (OLD: label smoothing 0.1, head at 10x the LR, no clipping), so those variants start from it;
# PREVIOUS is the default before the class_balance fix (no gradient clipping). Variants named after a global-norm
# clip (no_clip, clip_N) switch adaptive clipping off; agc_F is adaptive clipping alone; default_* is today's
# default (adaptive clipping at 0.1, and the global norm clipped at 2 with class_balance: loss).
NO_CLIP = {"grad_clip_norm": None, "grad_clip_agc": None}
OLD = {"label_smoothing": 0.1, "head_lr_mult": 10.0, **NO_CLIP}
PREVIOUS = {"label_smoothing": 0.0, "head_lr_mult": 1.0, **NO_CLIP}


def _norm_clip(norm: float | None, **more) -> dict:
    return {"grad_clip_norm": norm, "grad_clip_agc": None, **more}


def _adaptive_clip(factor: float, **more) -> dict:
    return {"grad_clip_norm": None, "grad_clip_agc": factor, **more}


VARIANTS: dict[str, dict] = {
    "default": {},
    "old_default": OLD,
    "bn_train": {**OLD, "batchnorm": "train"},
    "head_lr_1": {**OLD, "head_lr_mult": 1.0},
    "no_smoothing": {**OLD, "label_smoothing": 0.0},
    "low_lr": {**OLD, "lr": 0.0005},
    "adamw": {**OLD, "optimizer": "adamw", "lr": 1e-4},
    "bn_train_head_lr_1": {**OLD, "batchnorm": "train", "head_lr_mult": 1.0},
    "balance_loss": {**OLD, "class_balance": "loss"},
    "balance_loss_f1": {**OLD, "class_balance": "loss", "monitor": "val_macro_f1"},
    "legacy_balance_loss": {**OLD, "class_balance": "loss"},  # torch's weighted CE, as before the fix
    "sampler": {**OLD, "class_balance": "sampler"},
    "ls0_head_lr_1": PREVIOUS,
    "no_smoothing_balance_loss": {**OLD, "label_smoothing": 0.0, "class_balance": "loss"},
    "ls0_head_lr_1_balance_loss": {**PREVIOUS, "class_balance": "loss"},
    # fine-tuning starts from the probe fitted with the same class-weighted loss (probe_balanced)
    "balanced_start_ls0_head_lr_1_balance_loss": {**PREVIOUS, "class_balance": "loss"},
    # global-norm clipping alone (the class_balance fix: clip_2_balance_loss was the default before agc)
    "no_clip": _norm_clip(None),
    "clip_1": _norm_clip(1.0),
    "clip_2": _norm_clip(2.0),
    "clip_5": _norm_clip(5.0),
    "clip_10": _norm_clip(10.0),
    "no_clip_balance_loss": _norm_clip(None, class_balance="loss"),
    "clip_2_balance_loss": _norm_clip(2.0, class_balance="loss"),
    "clip_5_balance_loss": _norm_clip(5.0, class_balance="loss"),
    "clip_10_balance_loss": _norm_clip(10.0, class_balance="loss"),
    "clip_2_balance_loss_f1": _norm_clip(2.0, class_balance="loss", monitor="val_macro_f1"),
    "no_clip_sampler": _norm_clip(None, class_balance="sampler"),
    "clip_2_sampler": _norm_clip(2.0, class_balance="sampler"),
    # adaptive clipping alone
    "agc_0.005": _adaptive_clip(0.005),
    "agc_0.01": _adaptive_clip(0.01),
    "agc_0.02": _adaptive_clip(0.02),
    "agc_0.05": _adaptive_clip(0.05),
    "agc_0.1": _adaptive_clip(0.1),
    "agc_0.2": _adaptive_clip(0.2),
    "agc_0.3": _adaptive_clip(0.3),
    "agc_0.01_balance_loss": _adaptive_clip(0.01, class_balance="loss"),
    "agc_0.1_balance_loss": _adaptive_clip(0.1, class_balance="loss"),
    # today's default with one change
    "default_balance_loss": {"class_balance": "loss"},
    "default_balance_loss_f1": {"class_balance": "loss", "monitor": "val_macro_f1"},
    "default_sampler": {"class_balance": "sampler"},
    "default_bn_train": {"batchnorm": "train"},
    "default_freeze_2": {"freeze_layers": 2},
}


def _gray_to_rgb(array: np.ndarray) -> Image.Image:
    """[H, W] uint8 -> an RGB PIL image (what load_rgb makes of a grayscale image)."""
    return Image.fromarray(np.ascontiguousarray(array), mode="L").convert("RGB")


def _per_class(labels: np.ndarray, counts: dict[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in counts.items()])


def _carve(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rest, carved = train_test_split(indices, test_size=fraction, stratify=labels[indices], random_state=seed)
    return np.sort(rest), np.sort(carved)


def _from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    splits: dict[str, np.ndarray],
    classes: list[str],
    relabel: dict[int, int] | None = None,
) -> dict:
    relabel = relabel or {c: c for c in range(len(classes))}
    return {
        "classes": classes,
        **{
            split: ([_gray_to_rgb(images[i]) for i in idx], [relabel[int(labels[i])] for i in idx])
            for split, idx in splits.items()
        },
    }


def load_fmnist(train_per_class: int, test_per_class: int, seed: int = 0) -> dict:
    images, labels = read_idx(FASHION / "train-images-idx3-ubyte.gz"), read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    test_images, test_labels = (
        read_idx(FASHION / "t10k-images-idx3-ubyte.gz"),
        read_idx(FASHION / "t10k-labels-idx1-ubyte.gz"),
    )
    pool = _per_class(labels, {c: train_per_class for c in range(10)}, seed)
    train, val = _carve(pool, labels, 0.15, seed)
    test = np.sort(_per_class(test_labels, {c: test_per_class for c in range(10)}, seed))
    data = _from_arrays(images, labels, {"train": train, "val": val}, FASHION_MNIST_CLASSES)
    data["test"] = _from_arrays(test_images, test_labels, {"test": test}, FASHION_MNIST_CLASSES)["test"]
    return data


def load_imbalanced(seed: int = 0) -> dict:
    """T-shirt, Pullover, Coat, Shirt (look-alikes) at 1400:500:250:100, stratified 70/15/15."""
    images, labels = read_idx(FASHION / "train-images-idx3-ubyte.gz"), read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    counts = {0: 1400, 2: 500, 4: 250, 6: 100}
    pool = _per_class(labels, counts, seed)
    rest, test = _carve(pool, labels, 0.15, seed)
    train, val = _carve(rest, labels, 0.15 / 0.85, seed)
    relabel = {old: new for new, old in enumerate(counts)}
    return _from_arrays(
        images, labels, {"train": train, "val": val, "test": test}, [FASHION_MNIST_CLASSES[c] for c in counts], relabel
    )


def write_digits(folder: Path) -> Path:
    """scikit-learn's digits as 8x8 grayscale PNGs, folder/<digit>/<n>.png (values 0-16 scaled to 0-255)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == len(digits.target):
        return folder
    for n, (image, label) in enumerate(zip(digits.images, digits.target)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L").save(
            folder / str(label) / f"{n:04d}.png"
        )
    return folder


def load_through_pipeline(data_params: dict, name: str) -> dict:
    """The download stage's source (materialise) and the split stage's stratified split, then decode."""
    work = RESULTS / "recipe-work" / name
    index, _ = materialise(data_params, work / "raw", REPO)
    manifests = stratified_split(index, 0.15, 0.15, 0)
    classes = sorted(index["label"].unique())
    data = {"classes": classes}
    for split, frame in manifests.items():
        data[split] = (
            [load_rgb(REPO / path) for path in frame["path"]],
            [classes.index(label) for label in frame["label"]],
        )
    return data


def load_dataset(name: str, args) -> dict:
    if name == "embedded":
        return load_through_pipeline(
            {
                "source": "archive",
                "url": "assets/fashion-mnist-mini.tar.gz",
                "sha256": "18135061f3d4d9979a7d907c4d73b8ebed240ffc01e8a5d8669eeb132e0661d4",
            },
            name,
        )
    if name == "digits":
        folder = write_digits(REPO / "data" / "sklearn-digits")
        return load_through_pipeline({"source": "folder", "path": str(folder)}, name)
    if name == "fmnist":
        return load_fmnist(args.fmnist_train_per_class, args.fmnist_test_per_class)
    if name == "imbalanced":
        return load_imbalanced()
    raise SystemExit(f"unknown data set {name!r}")


@torch.inference_mode()
def test_outputs(model: Classifier, dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    features = extract_features(model.backbone, dataset, 128, CPU, desc="test features")
    return features, model.head(features)


def scores(y_true: np.ndarray, logits: torch.Tensor, classes: list[str]) -> dict:
    y_pred = logits.argmax(1).numpy()
    recall = [float(np.mean(y_pred[y_true == c] == c)) for c in range(len(classes))]
    return {
        "accuracy": float(np.mean(y_pred == y_true)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=list(range(len(classes))), average="macro", zero_division=0)),
        "predicted_classes": int(len(np.unique(y_pred))),
        "zero_recall": [classes[c] for c, r in enumerate(recall) if r == 0 and np.any(y_true == c)],
    }


def legacy_weighted_loss(params: FinetuneParams, weights):
    """The loss before the fix: torch's weighted cross-entropy (weighted smoothing, mean over sum of weights)."""

    def loss(logits, targets):
        return F.cross_entropy(
            logits,
            targets,
            weight=None if weights is None else weights.to(logits.device),
            label_smoothing=params.label_smoothing,
        )

    return loss


def cached_pixels(data: dict, config) -> dict[str, torch.Tensor]:
    """Each split's images as the cache stage stores them (uint8 [N, 3, S, S]), for the batch transforms."""
    geometry = cache_geometry(config)
    return {
        split: torch.stack(
            [torch.from_numpy(to_cache_form(image, geometry)).permute(2, 0, 1) for image in data[split][0]]
        )
        for split in ("train", "val", "test")
        if split in data
    }


def run_dataset(name: str, args) -> dict:
    out = args.out_dir / f"recipe-{name}.json"
    results = json.loads(out.read_text()) if out.is_file() and args.append else {}
    started = time.time()
    data = load_dataset(name, args)
    classes = data["classes"]
    loaded = load_backbone("efficientnet_lite0", "imagenet", args.image_size)
    pixels = cached_pixels(data, loaded.data_config)
    evaluate_tf = eval_batch_transform(loaded.data_config)
    sets = {
        split: ImageDataset(pixels[split], data[split][1], batch_transform=evaluate_tf)
        for split in ("train", "val", "test")
    }
    caches = {
        split: FeatureCache(
            extract_features(loaded.backbone, sets[split], 128, CPU, desc=f"features {split}"),
            torch.as_tensor(sets[split].labels),
            [],
        )
        for split in sets
    }
    counts = np.bincount(data["train"][1], minlength=len(classes))
    info = {
        "classes": len(classes),
        "train": len(sets["train"]),
        "val": len(sets["val"]),
        "test": len(sets["test"]),
        "train_counts": counts.tolist(),
        "imbalance": float(counts.max() / max(counts.min(), 1)),
        "image_size": args.image_size,
        "freeze_layers": args.freeze_layers,
        "epochs": args.epochs,
    }
    print(f"[{name}] {info} (data + features {time.time() - started:.0f} s)", flush=True)
    y_test = caches["test"].labels.numpy()
    pretrained = caches["test"].features
    heads: dict = {}
    for probe_name, head_overrides in (
        ("probe", {}),
        ("probe_balanced", {"class_balance": "loss", "monitor": "val_macro_f1"}),
    ):
        if probe_name not in args.probes:
            continue
        probe = train_linear_probe(caches["train"], caches["val"], len(classes), HeadParams(**head_overrides), 0)
        row = probe.history[probe.best_epoch - 1]
        with torch.inference_mode():
            results[probe_name] = {
                **scores(y_test, probe.model(pretrained), classes),
                "best_val_acc": row["val_acc"],
                "best_val_macro_f1": row["val_macro_f1"],
                "head": head_overrides,
            }
        print(f"[{name}] {probe_name}: {results[probe_name]}", flush=True)
        heads[probe_name] = (
            copy.deepcopy(probe.model.state_dict()),
            {k: v for k, v in row.items() if k.startswith("train_")},
        )
    results["info"] = info
    for variant in args.variants:
        overrides = {**VARIANTS[variant], "epochs": args.epochs}
        freeze_layers = overrides.pop("freeze_layers", args.freeze_layers)
        params = FinetuneParams(**overrides)
        model = Classifier(copy.deepcopy(loaded.backbone), len(classes))
        start_probe = "probe_balanced" if variant.startswith("balanced_start") else "probe"
        probe_head, probe_train = heads[start_probe]
        model.head.load_state_dict(probe_head)
        sample_tf, batch_tf = train_transforms(loaded.data_config, params.augment, params.crop_min_scale, params.hflip)
        train_set = ImageDataset(
            pixels["train"], data["train"][1], batch_transform=batch_tf, sample_transform=sample_tf
        )
        best: dict = {}

        def keep_best_tuned(row, model=model, best=best, monitor=params.monitor):
            if row["phase"] == "finetune" and improves(monitor, row[monitor], best.get("value")):
                best.update(value=row[monitor], epoch=row["epoch"], state=copy.deepcopy(model.state_dict()))

        original = finetune_module.make_loss
        if variant.startswith("legacy_"):
            finetune_module.make_loss = legacy_weighted_loss
        began = time.time()
        try:
            result = fine_tune(
                model,
                freeze_layers,
                train_set,
                sets["val"],
                params,
                0,
                CPU,
                on_epoch=keep_best_tuned,
                start_train=probe_train,
            )
        finally:
            finetune_module.make_loss = original
        seconds = time.time() - began
        model.load_state_dict(best["state"])
        features, logits = test_outputs(model.eval(), sets["test"])
        tuned = {**scores(y_test, logits, classes), **feature_health(features, pretrained, y_test)}
        shipped = results[start_probe] if result.kept_start else tuned
        results[variant] = {
            "overrides": VARIANTS[variant],
            "kept_start": result.kept_start,
            "shipped_accuracy": shipped["accuracy"],
            "shipped_macro_f1": shipped["macro_f1"],
            "tuned": tuned,
            "tuned_epoch": best["epoch"],
            "val": [
                {k: round(r[k], 4) for k in ("val_acc", "val_macro_f1", "val_loss")} | {"epoch": r["epoch"]}
                for r in result.history
            ],
            "seconds": round(seconds, 1),
        }
        print(
            f"[{name}] {variant}: kept_start={result.kept_start} shipped acc {shipped['accuracy']:.4f} "
            f"f1 {shipped['macro_f1']:.4f} | tuned acc {tuned['accuracy']:.4f} f1 {tuned['macro_f1']:.4f} "
            f"spread x{tuned['spread_ratio']:.3f} rank x{tuned['effective_rank_ratio']:.3f} "
            f"dead {tuned['dead_share']:.2f} predicted {tuned['predicted_classes']} zero-recall "
            f"{tuned['zero_recall']} | val {[r['val_acc'] for r in results[variant]['val']]} ({seconds:.0f} s)",
            flush=True,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    out.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["embedded", "fmnist", "digits", "imbalanced"])
    parser.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--probes", nargs="+", default=["probe"], choices=["probe", "probe_balanced"])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--freeze-layers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--fmnist-train-per-class", type=int, default=400)
    parser.add_argument("--fmnist-test-per-class", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--append", action="store_true", help="keep earlier variants in the results file")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.datasets:
        run_dataset(name, args)


if __name__ == "__main__":
    main()

"""Stage features: pooled features of the frozen pretrained backbone, one cached tensor file per split.

Reads images only from the image cache (data/cache). Depends only on what changes features (the cache,
`backbone:`, `features.layers`, `features.amp`), so head and training params never re-run it. On CPU the
batch is the largest whose activations fit in `features.max_memory_mb` (at most `features.batch_size` and
32). With several backbones the cached features are theirs concatenated. `features.nproc` > 1 re-launches
this script under torchrun: each process extracts its shard of every split and rank 0 writes the gathered features.
"""

import sys

import torch

from transfer.data.datasets import load_split_dataset
from transfer.data.split import SPLITS
from transfer.data.transforms import eval_batch_transform
from transfer.features import FeatureCache, choose_feature_batch, extract_features, save_feature_cache
from transfer.models.backbones import load_backbones
from transfer.pipeline.distributed import (
    DistContext,
    device_for,
    init_from_env,
    relaunch_with_torchrun,
    shutdown,
    under_torchrun,
)
from transfer.pipeline.errors import run_stage
from transfer.pipeline.layout import CACHE_DIR, FEATURES_DIR, SPLIT_DIR
from transfer.pipeline.params import Params, backbone_specs, load_params
from transfer.pipeline.runtime import resolve_device


def extract_all(params: Params, context: DistContext) -> None:
    loaded = load_backbones(backbone_specs(params.backbone), params.features.layers)
    device = device_for(context, resolve_device(params.device))
    batch_size = choose_feature_batch(
        loaded.backbone,
        loaded.data_config.image_size,
        params.features.batch_size,
        device,
        params.features.max_memory_mb,
    )
    if context.is_main:
        print(f"features: batch {batch_size} on {device.type} (features.batch_size {params.features.batch_size})")
    for split in SPLITS:
        dataset = load_split_dataset(
            CACHE_DIR, SPLIT_DIR, split, loaded.data_config, batch_transform=eval_batch_transform(loaded.data_config)
        )
        features = extract_features(
            loaded.backbone,
            dataset,
            batch_size,
            device,
            desc=f"features {split}",
            amp=params.features.amp,
            compile=params.features.compile,
            num_workers=params.features.num_workers,
            context=context,
        )
        if context.is_main:
            labels = torch.tensor(dataset.labels, dtype=torch.int64)
            save_feature_cache(FEATURES_DIR / f"{split}.pt", FeatureCache(features, labels, dataset.paths))
            print(f"features: {split} {tuple(features.shape)} -> {FEATURES_DIR / (split + '.pt')}")


def main() -> None:
    params = load_params()
    if params.features.nproc > 1 and not under_torchrun():
        sys.exit(relaunch_with_torchrun(__file__, params.features.nproc, stage="features"))
    context = init_from_env(params.device)
    try:
        extract_all(params, context)
    finally:
        shutdown(context)


if __name__ == "__main__":
    run_stage("features", main)

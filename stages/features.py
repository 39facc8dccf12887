"""Stage features: pooled features of the frozen pretrained backbone, one cached tensor file per split.

Depends only on what changes features (the split, `backbone:` and `features.layers`), so head and training
params never re-run it. With several backbones the cached features are theirs concatenated.
"""

from pathlib import Path

import torch

from transfer.models.backbones import load_backbones
from transfer.data.split import SPLITS
from transfer.data.datasets import load_split_dataset
from transfer.pipeline.errors import run_stage
from transfer.features import FeatureCache, extract_features, save_feature_cache
from transfer.pipeline.layout import FEATURES_DIR, SPLIT_DIR
from transfer.pipeline.params import backbone_specs, load_params
from transfer.pipeline.runtime import resolve_device
from transfer.data.transforms import eval_transform


def main() -> None:
    params = load_params()
    loaded = load_backbones(backbone_specs(params.backbone), params.features.layers)
    device = resolve_device(params.device)
    for split in SPLITS:
        dataset = load_split_dataset(SPLIT_DIR, split, Path.cwd(), eval_transform(loaded.data_config))
        features = extract_features(loaded.backbone, dataset, params.features.batch_size, device,
                                    desc=f"features {split}")
        labels = torch.tensor(dataset.labels, dtype=torch.int64)
        save_feature_cache(FEATURES_DIR / f"{split}.pt", FeatureCache(features, labels, dataset.paths))
        print(f"features: {split} {tuple(features.shape)} -> {FEATURES_DIR / (split + '.pt')}")


if __name__ == "__main__":
    run_stage("features", main)

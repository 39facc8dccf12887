"""One rank of the data-parallel feature test (torchrun, from tests/integration/test_features_pretrained.py)."""

import sys
from pathlib import Path

import torch

from transfer.data.cache import CachedImages
from transfer.data.datasets import ImageDataset
from transfer.data.transforms import eval_batch_transform
from transfer.features import extract_features
from transfer.models.backbones import load_backbone
from transfer.pipeline.distributed import init_from_env, shutdown


class RecordingImages(CachedImages):
    """The real cache reader, remembering which rows this process read."""

    rows: list[int] = []

    def read(self, indices):
        self.rows.extend(int(i) for i in indices)
        return super().read(indices)


if __name__ == "__main__":
    torch.set_num_threads(1)
    context = init_from_env("cpu")
    loaded = load_backbone("efficientnet_lite0", "imagenet", image_size=64)
    images = RecordingImages(Path(sys.argv[1]))
    dataset = ImageDataset(images, [0] * len(images), batch_transform=eval_batch_transform(loaded.data_config))
    features = extract_features(loaded.backbone, dataset, batch_size=4, device=torch.device("cpu"), context=context)
    rows_read = [None] * context.world_size
    torch.distributed.all_gather_object(rows_read, images.rows)
    if context.is_main:
        torch.save({"features": features, "world_size": context.world_size, "rows_read": rows_read}, sys.argv[2])
    shutdown(context)

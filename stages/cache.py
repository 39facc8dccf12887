"""Stage cache: every image of every split decoded once, resized for the backbone, stored as uint8 pixels.

Writes data/cache/{train,val,test}.npy ([N, S, S, 3], S = the backbone's eval resize size) and meta.json.
Depends only on what changes the pixels (the split, backbone.name and backbone.image_size): head, training
and feature-extraction params never re-run it. features, train and evaluate read images only from here.
"""

from pathlib import Path

from transfer.data.cache import build_image_cache, cache_geometry
from transfer.models.backbones import load_backbones
from transfer.pipeline.errors import run_stage
from transfer.pipeline.layout import CACHE_DIR, SPLIT_DIR
from transfer.pipeline.params import backbone_specs, load_params


def main() -> None:
    params = load_params()
    # Random weights: only the architectures' data config (resize size, interpolation) is needed here.
    specs = [(name, "none", image_size) for name, _, image_size in backbone_specs(params.backbone)]
    config = load_backbones(specs).data_config
    geometry = cache_geometry(config)
    counts = build_image_cache(CACHE_DIR, SPLIT_DIR, Path.cwd(), geometry)
    print(
        f"cache: {sum(counts.values())} images at {geometry.side}x{geometry.side} px ({geometry.interpolation}) "
        f"-> {CACHE_DIR} ({', '.join(f'{split} {n}' for split, n in counts.items())})"
    )


if __name__ == "__main__":
    run_stage("cache", main)

"""The data: sources into data/raw, images, the data report, stratified splits, the image cache, datasets and
transforms.

The public API below is exported lazily (PEP 562): `from transfer.data import DataConfig` works, while
importing one module of the package imports only that module, so each DVC stage depends on exactly the
code it runs (tests/test_dvc_deps.py) and a light stage never pays for the heavy modules beside it.
"""

import importlib

# name -> the module of this package that defines it
_EXPORTS = {
    "DataConfig": "config",
    "DataReport": "report",
    "ImageDataset": "datasets",
    "ImageError": "images",
    "build_image_cache": "cache",
    "cache_geometry": "cache",
    "decode_to_cache_form": "cache",
    "eval_batch_transform": "transforms",
    "load_rgb": "images",
    "load_split_dataset": "datasets",
    "materialise": "sources",
    "open_split": "cache",
    "read_classes": "split",
    "read_manifest": "split",
    "stratified_split": "split",
    "train_transforms": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

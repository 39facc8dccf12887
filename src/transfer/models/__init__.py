"""The models: backbones (any timm or torchvision model), layer groups, heads, the saved model folder and its ONNX
export.

The public API below is exported lazily (PEP 562): `from transfer.models import load_backbone` works, while
importing one module of the package imports only that module, so each DVC stage depends on exactly the
code it runs (tests/test_dvc_deps.py) and a light stage never pays for the heavy modules beside it.
"""

import importlib

# name -> the module of this package that defines it
_EXPORTS = {
    "Classifier": "backbones",
    "FeatureHead": "heads",
    "SavedModel": "saved",
    "describe": "backbones",
    "export_onnx": "export",
    "freeze_first_groups": "groups",
    "group_names": "groups",
    "head_logits": "heads",
    "layer_groups": "groups",
    "load_backbone": "backbones",
    "load_backbones": "backbones",
    "load_model": "saved",
    "model_digest": "saved",
    "relative_weight_change": "groups",
    "save_model": "saved",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

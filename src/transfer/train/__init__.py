"""Training: the linear probe and the scikit-learn heads, fine-tuning, the one recipe the train stage, the tuner and
the LR finder share, and their optimiser, losses, checkpoints and model selection.

The public API below is exported lazily (PEP 562): `from transfer.train import train_model` works, while
importing one module of the package imports only that module, so each DVC stage depends on exactly the
code it runs (tests/test_dvc_deps.py) and a light stage never pays for the heavy modules beside it.
"""

import importlib

# name -> the module of this package that defines it
_EXPORTS = {
    "Checkpointer": "checkpoint",
    "TrainedModel": "recipe",
    "build_optimizer": "optim",
    "calibrate": "recipe",
    "fine_tune": "finetune",
    "fit_feature_head": "probe",
    "initial_model": "recipe",
    "load_training_inputs": "recipe",
    "model_selection": "result",
    "sweep": "lr_find",
    "train_head": "recipe",
    "train_linear_probe": "probe",
    "train_model": "recipe",
    "tune": "tune",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

"""Evaluation: metrics, calibration, the fit verdict and feature health, plots, the run report and inference.

The public API below is exported lazily (PEP 562): `from transfer.evaluate import predict_paths` works, while
importing one module of the package imports only that module, so each DVC stage depends on exactly the
code it runs (tests/test_dvc_deps.py) and a light stage never pays for the heavy modules beside it.
"""

import importlib

# name -> the module of this package that defines it
_EXPORTS = {
    "ServingLimits": "inference",
    "build_report": "pr_report",
    "calibration_report": "calibration",
    "check_onnx": "export_check",
    "classification_metrics": "metrics",
    "comparison_table": "compare",
    "expected_calibration_error": "calibration",
    "fit_diagnosis": "health",
    "fit_temperature": "calibration",
    "model_input": "inference",
    "predict_frame": "inference",
    "predict_images": "inference",
    "predict_logits": "metrics",
    "predict_paths": "inference",
    "write_html_report": "report",
    "write_run_diagnostics": "diagnostics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__

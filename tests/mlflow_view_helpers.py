"""Runs recorded as the train and evaluate stages record them (the MLflow runs-view tests)."""

from __future__ import annotations

import os

from transfer import tracking

PARAMS = {
    "backbone.name": "efficientnet_lite0",
    "freeze_layers": "all",
    "head.lr": 0.01,
    "finetune.lr": 0.002,
    "finetune.epochs": 5,
    "head.epochs": 40,
}


def record_runs(experiment: str = "transfer") -> None:
    """Two runs as the train and evaluate stages record them (a plain repro and a DVC experiment)."""
    for exp_name, lr, accuracy in ((None, 0.01, 0.8267), ("bushy-tile", 0.03, 0.8433)):
        os.environ.pop("DVC_EXP_NAME", None)
        if exp_name:
            os.environ["DVC_EXP_NAME"] = exp_name
        try:
            with tracking.training_run(experiment, {**PARAMS, "head.lr": lr}, {"backbone": "efficientnet_lite0"}):
                with tracking.EpochLog() as log_epoch:
                    log_epoch({"epoch": 1, "phase": "probe", "val_acc": accuracy - 0.02})
                tracking.log_key_metrics(test_acc=accuracy, test_f1=accuracy - 0.01)
                tracking.log_tags({"fit_verdict": "good"})
        finally:
            os.environ.pop("DVC_EXP_NAME", None)

"""The LR finder's sweep as a run of its own."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from transfer.tracking.runs import (
    log_metric_batches,
)
from transfer.tracking.store import (
    use_experiment,
)
from transfer.tracking.tuning import _log_params

log = logging.getLogger(__name__)


def log_lr_find(
    experiment: str,
    recipe: str,
    params: dict[str, Any],
    curve: list[tuple[float, float]],
    metrics: dict[str, float],
    artifacts: list[Path],
    tags: dict[str, str],
    root: Path | None = None,
) -> str:
    """One run for an LR sweep: the training params, loss per step (lr as its own metric), suggestions, plot."""
    experiment_id = use_experiment(experiment, root)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=f"lr-find {recipe}", tags={**tags, "lr_find.recipe": recipe})
    run_id = run.info.run_id
    _log_params(client, run_id, params)
    timestamp = int(time.time() * 1000)
    series = [
        Metric(name, float(value), timestamp, step)
        for step, (lr, loss) in enumerate(curve)
        for name, value in (("lr_find.lr", lr), ("lr_find.loss", loss))
        if not math.isnan(value)
    ]
    series += [Metric(k, float(v), timestamp, 0) for k, v in metrics.items()]
    log_metric_batches(client, run_id, series)
    for path in artifacts:
        if Path(path).exists():
            client.log_artifact(run_id, str(path), artifact_path="lr_find")
    client.set_terminated(run_id, "FINISHED")
    return run_id

"""`transfer promote`: point a registry alias (e.g. `champion`) at the best model of an experiment.

The train stage registers every model it trains as a new version of the MLflow registered model named by
`tracking.registered_model`. Promotion picks, among the versions whose run belongs to the experiment, the one
whose run is best by a metric (`test.accuracy` by default, as the evaluate stage logs it) and moves the alias
there, so `models:/<name>@champion` always means the best model so far:

    transfer promote --metric test.macro_f1
    transfer predict photos/ --model models:/transfer-classifier@champion

The MLflow calls are in transfer.tracking (`promote_best`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_METRIC = "test.accuracy"


def _defaults() -> tuple[str, str | None]:
    """The experiment and registered model of params.yaml (the schema's defaults without one)."""
    from transfer.pipeline.params import TrackingParams, load_params

    if Path("params.yaml").is_file():
        tracking = load_params().tracking
    else:
        tracking = TrackingParams()
    return tracking.experiment, tracking.registered_model


def run(args: argparse.Namespace) -> int:
    from transfer import tracking

    experiment, registered_model = _defaults()
    experiment = args.experiment or experiment
    registered_model = args.name or registered_model
    if not registered_model:
        raise tracking.TrackingError(
            "no registered model name: pass --name, or set tracking.registered_model in params.yaml"
        )
    result = tracking.promote_best(
        experiment, registered_model, args.metric, args.alias, higher_is_better=not args.lowest
    )
    print(
        f"promote: models:/{result['registered_model']}@{result['alias']} -> version {result['version']} "
        f"(run {result['run_id']}, {result['metric']} = {result['value']:.4f}, best of {result['candidates']} "
        f"run(s) in experiment {experiment!r})",
        file=sys.stderr,
    )
    return 0


# The `transfer promote` command (transfer.cli builds its parser from these and `add_arguments`).
COMMAND = "promote"
COMMAND_HELP = "move a registry alias (champion) to the best run of an experiment"
COMMAND_DESCRIPTION = "Set an alias of the registered model to the version whose run is best by a metric."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metric", default=DEFAULT_METRIC, help=f"MLflow metric of the runs to compare (default {DEFAULT_METRIC})"
    )
    parser.add_argument("--lowest", action="store_true", help="lower is better (e.g. a loss)")
    parser.add_argument("--alias", default="champion", help="the alias to move (default champion)")
    parser.add_argument(
        "--experiment", default=None, help="MLflow experiment (default: tracking.experiment of params.yaml)"
    )
    parser.add_argument(
        "--name", default=None, help="registered model (default: tracking.registered_model of params.yaml)"
    )

"""`transfer tune`: the command around transfer.train.tune's study (MLflow through transfer.tracking)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from transfer.pipeline.params import backbone_list
from transfer.train.tune import (
    TUNE_DIR,
    TuneError,
    exp_run_command,
    format_override,
    record_study,
    train_params,
    tune,
    with_overrides,
)

# --- The command --------------------------------------------------------------------------------

# The `transfer tune` command (transfer.cli builds its parser from these and `add_arguments`).
COMMAND = "tune"
COMMAND_HELP = "search hyper-parameters with Optuna (params.yaml tune:)"
COMMAND_DESCRIPTION = (
    "An Optuna study over tune.space, scored on the validation split. Run it again, or on "
    "other machines, with the same tune.storage and study_name to add workers to the study."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("--n-trials", type=int, help="the study's trial budget (overrides tune.n_trials)")
    parser.add_argument("--timeout-min", type=float, help="start no trial after this many minutes")
    parser.add_argument("--storage", help="overrides tune.storage: a journal file path or a database URL")
    parser.add_argument("--study-name", help="overrides tune.study_name")
    parser.add_argument(
        "--worker",
        type=int,
        default=0,
        help="this worker's index (0, 1, ...): offsets the sampler seed, so that workers sharing "
        "a study propose different trials",
    )
    parser.add_argument(
        "--apply", action="store_true", help="then run the best params through the pipeline (dvc exp run -S ...)"
    )


def run(args: argparse.Namespace) -> int:
    from transfer import tracking
    from transfer.pipeline.params import load_params
    from transfer.train.recipe import load_training_inputs

    root = Path.cwd()
    params = load_params(args.params)
    overrides = {k: v for k, v in (("storage", args.storage), ("study_name", args.study_name)) if v is not None}
    if overrides:
        params = with_overrides(params, {f"tune.{k}": v for k, v in overrides.items()})
    if args.n_trials is not None and args.n_trials < 1:
        raise TuneError(f"--n-trials must be at least 1 (got {args.n_trials})")
    try:
        inputs = load_training_inputs(root)
    except FileNotFoundError as exc:
        raise TuneError(f"{exc}; tuning trains on the cached features: run `dvc repro features` first") from None
    tracker = tracking.StudyTracker(params.tracking.experiment, params.tune.study_name)
    tags = tracking.run_tags("+".join(b.name for b in backbone_list(params.backbone)), inputs.data_hash)
    summary = tune(
        params,
        inputs,
        root,
        tracker,
        n_trials=args.n_trials,
        timeout_min=args.timeout_min,
        worker=args.worker,
        tags=tags,
    )
    # With --params other.yaml, the pipeline (params.yaml) also needs the fixed values that differ.
    pipeline = train_params(load_params()) if Path(args.params).resolve() != Path("params.yaml").resolve() else {}
    overrides = {
        key: value for key, value in train_params(params).items() if key in pipeline and pipeline[key] != value
    }
    overrides.update(summary.best_params)
    summary.command = exp_run_command(overrides) if summary.best_trial is not None else None
    out_dir = root / TUNE_DIR / params.tune.study_name
    record_study(summary, params.tune, out_dir, tracker)
    print(
        f"tune: {summary.ran_here} trial(s) here in {summary.wall_s:.0f} s; study {summary.study_name}: "
        f"{summary.complete} complete, {summary.pruned} pruned, {summary.failed} failed"
    )
    if summary.best_trial is None:
        print("tune: no trial completed")
        return 1
    print(
        f"tune: best {params.tune.metric} {summary.best_value:.4f} (trial {summary.best_trial}): "
        f"{json.dumps(summary.best_params)} -> {out_dir / 'best.json'}"
    )
    print(f"tune: train it through the pipeline with\n  {summary.command}")
    if args.apply:
        argv = [sys.executable, "-m", "dvc", "exp", "run"]
        for key, value in overrides.items():
            argv += ["-S", format_override(key, value)]
        return subprocess.run(argv, cwd=root).returncode
    return 0

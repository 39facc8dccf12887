"""`transfer lr-find`: the command around transfer.train.lr_find's sweep (MLflow through transfer.tracking)."""

from __future__ import annotations

import argparse
import contextlib

from transfer.pipeline.params import backbone_list

# The `transfer lr-find` command (transfer.cli builds its parser from these and `add_arguments`).
COMMAND = "lr-find"
COMMAND_HELP = "sweep the learning rate exponentially and suggest one"
COMMAND_DESCRIPTION = (
    "A short run of the recipe with an exponentially growing LR; suggests the LR of the "
    "steepest loss descent and saves the loss-vs-LR plot under data/lr_find/."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument(
        "--recipe",
        choices=("auto", "probe", "finetune"),
        default="auto",
        help="probe: head.lr on the cached features; finetune: finetune.lr; auto (default): "
        "probe for freeze_layers: all, else finetune",
    )
    parser.add_argument("--freeze-layers", type=int, help="finetune: groups frozen (default: params.yaml's)")
    parser.add_argument("--steps", type=int, default=200, help="steps of the sweep (default 200)")
    parser.add_argument("--min-lr", type=float, default=1e-6, help="first LR (default 1e-6)")
    parser.add_argument("--max-lr", type=float, default=10.0, help="last LR (default 10)")


def run(args: argparse.Namespace) -> int:
    from transfer import tracking
    from transfer.pipeline.files import write_json
    from transfer.pipeline.params import load_params
    from transfer.pipeline.runtime import single_threaded
    from transfer.train.lr_find import (  # here, not at the top: `transfer --help` imports no torch
        LR_FIND_DIR,
        LRFindError,
        exponential_lrs,
        finetune_step,
        plot_sweep,
        probe_step,
        sweep,
    )
    from transfer.train.recipe import load_training_inputs
    from transfer.train.tune import exp_run_command, train_params, with_overrides

    params = load_params(args.params)
    recipe = args.recipe
    if args.freeze_layers is not None:
        params = with_overrides(params, {"freeze_layers": args.freeze_layers})
        recipe = "finetune" if recipe == "auto" else recipe
    if recipe == "auto":
        recipe = "finetune" if params.fine_tuning else "probe"
    if recipe == "finetune" and not params.fine_tuning:
        raise LRFindError(
            "--recipe finetune needs an integer freeze_layers: pass --freeze-layers k or set it in params.yaml"
        )
    lrs = exponential_lrs(args.min_lr, args.max_lr, args.steps)
    try:
        inputs = load_training_inputs()
    except FileNotFoundError as exc:
        raise LRFindError(f"{exc}; the LR finder starts from the cached features: run `dvc repro features`") from None
    if recipe == "probe":
        key, current = "head.lr", params.head.lr
        step = probe_step(
            inputs.train_features, len(inputs.classes), params.head.batch_size, params.head.weight_decay, params.seed
        )
    else:
        key, current = "finetune.lr", params.finetune.lr
        step = finetune_step(params, inputs)
    # The probe's small matmuls run faster on one thread (see train_linear_probe).
    with single_threaded() if recipe == "probe" else contextlib.nullcontext():
        result = sweep(step, lrs)
    out = LR_FIND_DIR / recipe
    summary = {
        "recipe": recipe,
        "key": key,
        "current": current,
        "suggested_lr": result.suggested_lr,
        "min_loss_lr": result.min_loss_lr,
        "min_loss_lr_over_10": result.min_over_10,
        "steps": len(result.lrs),
        "diverged": result.diverged,
        "lrs": result.lrs,
        "losses": result.losses,
    }
    write_json(out.with_suffix(".json"), summary)
    plot_sweep(result, out.with_suffix(".png"), f"LR finder: {key} ({recipe}, {len(result.lrs)} steps)", current)
    metrics = {
        k: v
        for k, v in (("lr_find.suggested_lr", result.suggested_lr), ("lr_find.min_loss_lr", result.min_loss_lr))
        if v is not None
    }
    run_id = tracking.log_lr_find(
        params.tracking.experiment,
        recipe,
        {
            **train_params(params),
            "lr_find.steps": args.steps,
            "lr_find.min_lr": args.min_lr,
            "lr_find.max_lr": args.max_lr,
        },
        list(zip(result.lrs, result.smoothed)),
        metrics,
        [out.with_suffix(".png"), out.with_suffix(".json")],
        tracking.run_tags("+".join(b.name for b in backbone_list(params.backbone)), inputs.data_hash),
    )
    if result.suggested_lr is None:
        print(
            f"lr-find: no suggestion after {len(result.lrs)} steps (too few before the loss diverged): "
            f"lower --min-lr or raise --steps; plot: {out.with_suffix('.png')}"
        )
        return 1
    print(
        f"lr-find: {key} suggested {result.suggested_lr:.3g} (steepest descent; minimum/10: "
        f"{result.min_over_10:.3g}; params.yaml: {current:.3g}); {len(result.lrs)} steps"
        f"{', stopped at divergence' if result.diverged else ''}"
    )
    print(f"lr-find: plot {out.with_suffix('.png')}, MLflow run {run_id}")
    overrides = {key: float(f"{result.suggested_lr:.2g}")}
    if recipe == "finetune":
        overrides["freeze_layers"] = params.freeze_layers
    print(f"lr-find: try it with\n  {exp_run_command(overrides)}")
    return 0

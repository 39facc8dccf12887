"""Stage train: the head.kind head on the cached features, then fine-tuning when `freeze_layers` is an integer.

Trains with transfer.train.recipe.train_model (then fits the calibration temperature on val); writes
data/model, reports/train.json, history.csv and layer_movement.json, and the pipeline's MLflow run, tagged with
the model's digest (the evaluate stage finds the run by it). Fine-tuning checkpoints every epoch: a killed run
resumes on the next `dvc repro`, in the same MLflow run. `finetune.nproc` > 1 re-launches it under torchrun.
"""

import sys

import pandas as pd

from transfer import tracking
from transfer.data.transforms import eval_batch_transform
from transfer.models.backbones import load_backbones
from transfer.pipeline import distributed
from transfer.pipeline.errors import run_stage
from transfer.pipeline.files import staged_outputs, write_csv, write_json
from transfer.pipeline.layout import CHECKPOINT_DIR, DATA_REPORT_FILE, MODEL_DIR, REPORTS_DIR
from transfer.pipeline.params import backbone_list, backbone_specs, flatten, load_params
from transfer.pipeline.runtime import resolve_device
from transfer.train.checkpoint import Checkpointer, training_fingerprint
from transfer.train.recipe import calibrate, load_training_inputs, recipe_values, save_trained, train_model


def main() -> None:
    params = load_params()
    if params.fine_tuning and params.finetune.nproc > 1 and not distributed.under_torchrun():
        sys.exit(distributed.relaunch_with_torchrun(__file__, params.finetune.nproc))
    context = distributed.init_from_env(params.device)
    try:
        inputs = load_training_inputs()
        backbones = backbone_list(params.backbone)
        loaded = load_backbones(backbone_specs(params.backbone), params.features.layers)
        fingerprint = training_fingerprint(params, inputs.data_hash)
        checkpointer = Checkpointer(CHECKPOINT_DIR, fingerprint, writer=context.is_main)
        resumed = checkpointer.load_last() if params.fine_tuning and params.finetune.resume else None
        # One MLflow run per pipeline run, opened by rank 0 only; a resumed run reopens the run it started.
        tags = tracking.run_tags("+".join(b.name for b in backbones), inputs.data_hash)
        run_id = resumed["extra"]["run_id"] if resumed else None
        run = tracking.stage_training_run(
            params.tracking.experiment, flatten(params), tags, run_id=run_id, enabled=context.is_main
        )
        with run as (run_id, log):
            if resumed is None and context.is_main:  # what the download stage skipped or ignored, and why
                tracking.log_artifacts([DATA_REPORT_FILE], artifact_path="data")
            checkpointer.extra["run_id"] = run_id
            device = distributed.device_for(context, resolve_device(params.device))
            trained = train_model(
                inputs,
                loaded,
                **recipe_values(params),
                device=device,
                on_epoch=log,
                checkpointer=checkpointer,
                resumed=resumed,
                context=context,
                report=print,
            )
            if not context.is_main:
                return  # rank 0 writes every output
            val_data = inputs.images("val", loaded.data_config, eval_batch_transform(loaded.data_config))
            if params.evaluate.calibration == "temperature":
                temperature = calibrate(trained, inputs.val_features, val_data, params.finetune.batch_size * 2, device)
                print(f"train: calibration temperature {temperature:.4f}, fitted on val")
            save_trained(MODEL_DIR, trained, backbones, params.features.layers, params.freeze_layers)
            with staged_outputs(REPORTS_DIR) as staged:  # moved into reports/ once MLflow has them too
                write_csv(staged / "history.csv", pd.DataFrame(trained.history))
                write_json(staged / "train.json", trained.selection())
                write_json(staged / "layer_movement.json", trained.movement())
                registered = params.tracking.registered_model
                tracking.log_trained_model(MODEL_DIR, trained, val_data, inputs.val_features, registered)
            checkpointer.finish()
        print(f"train: model -> {MODEL_DIR}, MLflow run {run_id}")
    finally:
        distributed.shutdown(context)


if __name__ == "__main__":
    run_stage("train", main)

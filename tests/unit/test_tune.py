"""`transfer tune`: real Optuna studies, real MLflow (SQLite store), real worker processes.

Head-only studies run on synthetic cached features (a trial is a fraction of a second); the fine-tuning
study uses real images and a randomly initialised resnet18 at 32 px; the test split is never created,
so a study that read it would fail.
"""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT
from tune_helpers import head_project, image_project, own_mlflow_store, trial_runs  # noqa: F401 - an autouse fixture

from transfer.pipeline.params import ParamsError, flatten, load_params, parse_params
from transfer.train.recipe import load_training_inputs
from transfer.train.tune import exp_run_command, format_override, tune

# --- The search space in params.yaml -----------------------------------------------------------------


@pytest.mark.parametrize(
    "space, message",
    [
        ({"head.lrr": {"type": "uniform", "low": 0, "high": 1}}, "'head.lrr' cannot be tuned"),
        ({"backbone.name": {"type": "categorical", "choices": ["resnet18"]}}, "cannot be tuned"),
        ({"finetune.nproc": {"type": "int", "low": 1, "high": 2}}, "cannot be tuned"),
        ({"head.epochs": {"type": "uniform", "low": 1, "high": 9}}, "head.epochs is an integer"),
        ({"head.lr": {"type": "loguniform", "low": 0, "high": 1}}, "loguniform needs low > 0"),
        ({"head.lr": {"type": "uniform", "low": 0.1, "high": 0.01}}, "low must be below high"),
        ({"head.lr": {"type": "uniform", "low": 0.1, "high": 20}}, "head.lr=20"),
        ({"finetune.optimizer": {"type": "categorical", "choices": ["sgd", "adam"]}}, "finetune.optimizer='adam'"),
        ({"freeze_layers": {"type": "categorical", "choices": ["all", -1]}}, "freeze_layers: values must be"),
        ({"head.lr": {"type": "categorical"}}, "categorical takes choices"),
        ({}, "space is empty"),
    ],
)
def test_a_bad_search_space_is_a_clear_error_naming_the_key(space, message):
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["tune"]["space"] = space
    with pytest.raises(ParamsError, match="tune.space") as error:
        parse_params(raw)
    assert message in str(error.value)


def test_metric_and_direction_must_agree_and_the_study_needs_a_budget():
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["tune"].update(metric="val_loss")
    with pytest.raises(ParamsError, match="direction minimize"):
        parse_params(raw)
    raw["tune"].update(metric="val_acc", n_trials=None, timeout_min=None)
    with pytest.raises(ParamsError, match="budget"):
        parse_params(raw)


def test_best_values_round_trip_through_dvc_exp_run_set(tmp_path):
    """What `dvc exp run -S` writes into params.yaml (its Hydra override parser) loads back as the same values."""
    from dvc.utils.hydra import apply_overrides

    best = {
        "head.lr": 1e-05,
        "head.weight_decay": 0.012345678901234567,
        "freeze_layers": "all",
        "finetune.grad_clip_norm": None,
        "finetune.nesterov": False,
        "finetune.epochs": 7,
    }
    path = tmp_path / "params.yaml"
    path.write_text((REPO_ROOT / "params.yaml").read_text())
    apply_overrides(path, [format_override(key, value) for key, value in best.items()])
    loaded = flatten(load_params(path))  # PyYAML (YAML 1.1), as the stages read it
    assert {key: loaded[key] for key in best} == best
    command = exp_run_command({"head.lr": 1e-05, "freeze_layers": 3})
    assert command == "dvc exp run -S head.lr=1.0e-05 -S freeze_layers=3"


# --- Head-only studies ---------------------------------------------------------------------------------


# --- Fine-tuning studies -----------------------------------------------------------------------------


def test_freeze_layers_outside_the_backbone_is_refused_before_any_trial(tmp_path):
    root = image_project(
        tmp_path / "project", **{"tune.space": {"freeze_layers": {"type": "categorical", "choices": ["all", 3, 9]}}}
    )
    from transfer.train.tune import TuneError

    with pytest.raises(TuneError, match=r"\[9\] outside 0..5"):
        tune(load_params(root / "params.yaml"), load_training_inputs(root), root, None, progress=False)


# --- Past one machine ----------------------------------------------------------------------------------

"""`transfer tune`: real Optuna studies, real MLflow (SQLite store), real worker processes.

Head-only studies run on synthetic cached features (a trial is a fraction of a second); the fine-tuning
study uses real images and a randomly initialised resnet18 at 32 px; the test split is never created,
so a study that read it would fail.
"""

from __future__ import annotations

import json
import statistics

import optuna
import pytest
import yaml
from conftest import REPO_ROOT
from tune_helpers import head_project, image_project, own_mlflow_store, trial_runs  # noqa: F401 - an autouse fixture

from transfer import tracking
from transfer.cli import main as cli_main
from transfer.pipeline.params import ParamsError, flatten, load_params, parse_params
from transfer.train.recipe import load_training_inputs
from transfer.train.tune import exp_run_command, format_override, storage_for, tune, with_overrides

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


def test_head_study_is_seeded_starts_from_the_baseline_and_records_each_trial_in_mlflow(tmp_path):
    root = head_project(tmp_path / "project")
    params = load_params(root / "params.yaml")
    inputs = load_training_inputs(root)
    tracker = tracking.StudyTracker("transfer", "transfer", root=root)
    first = tune(params, inputs, root, tracker, progress=False)
    again = tune(params, inputs, root, None, progress=False)  # same seed, in memory: the same trials

    trials = first.study.get_trials()
    assert [t.params for t in trials] == [t.params for t in again.study.get_trials()]
    assert [t.value for t in trials] == [t.value for t in again.study.get_trials()]
    assert len(trials) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert trials[0].params == {"head.lr": params.head.lr, "head.weight_decay": params.head.weight_decay}
    assert len({t.params["head.lr"] for t in trials}) == 6  # the sampler explores
    assert first.best_value == max(t.value for t in trials) and first.ran_here == 6

    parents, children, client = trial_runs(root, "transfer")
    assert len(parents) == 1 and parents[0].info.run_id == tracker.parent_run_id
    assert sorted(int(r.data.tags["tune.trial"]) for r in children) == list(range(6))
    for run in children:
        trial = trials[int(run.data.tags["tune.trial"])]
        assert run.data.tags["mlflow.parentRunId"] == tracker.parent_run_id
        assert run.data.tags["tune.state"] == "complete" and run.info.status == "FINISHED"
        assert float(run.data.params["head.lr"]) == trial.params["head.lr"]
        assert run.data.params["head.epochs"] == "8"  # the fixed params too: comparable with pipeline runs
        assert run.data.metrics["objective"] == pytest.approx(trial.value)
        curve = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in curve] == list(range(1, 9))
        assert run.data.metrics["objective"] == pytest.approx(max(m.value for m in curve))  # the kept epoch


def test_tune_command_writes_best_params_the_dvc_command_and_plots_to_the_parent_run(tmp_path, monkeypatch, capsys):
    root = head_project(tmp_path / "project", **{"tune.metric": "val_macro_f1"})
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_ROOT", str(root))  # the MLflow store of this project, as in a DVC stage
    assert cli_main(["tune", "--n-trials", "5"]) == 0

    best = json.loads((root / "data/tune/transfer/best.json").read_text())
    assert best["metric"] == "val_macro_f1" and best["trials"] == {"complete": 5, "pruned": 0, "failed": 0}
    assert set(best["params"]) == {"head.lr", "head.weight_decay"}
    assert best["command"] == exp_run_command(best["params"])
    assert best["command"] in capsys.readouterr().out
    # Re-applying the best params reproduces the best value: what `dvc exp run -S` will train.
    from transfer.train.recipe import train_and_score

    rerun = train_and_score(with_overrides(load_params(), best["params"]), load_training_inputs(root), "val_macro_f1")
    assert rerun.value == best["best_value"]

    parents, children, client = trial_runs(root, "transfer")
    assert len(parents) == 1 and len(children) == 5
    parent = parents[0]
    assert parent.data.metrics["best_value"] == best["best_value"] and parent.data.metrics["trials_complete"] == 5
    assert float(parent.data.tags["best.head.lr"]) == best["params"]["head.lr"]
    assert parent.data.params["tune.metric"] == "val_macro_f1"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {
        "tune/best.json",
        "tune/trials.csv",
        "tune/optimization_history.png",
        "tune/param_importances.png",
    } <= artifacts
    assert (root / "data/tune/transfer/optimization_history.png").stat().st_size > 10_000


def test_a_journal_study_continues_across_runs_and_refuses_other_params(tmp_path, monkeypatch):
    root = head_project(tmp_path / "project", **{"tune.storage": "data/tune/study.journal"})
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert cli_main(["tune", "--n-trials", "3"]) == 0
    assert cli_main(["tune", "--n-trials", "5"]) == 0  # the budget is the study's: 2 more trials
    study = optuna.load_study(study_name="transfer", storage=storage_for("data/tune/study.journal", root))
    assert [t.number for t in study.trials] == list(range(5))
    parents, children, _ = trial_runs(root, "transfer")
    assert len(parents) == 1 and len(children) == 5  # one parent run for the study, however many runs

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["head"]["epochs"] = 3  # other fixed params: its trials would not be comparable
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli_main(["tune", "--n-trials", "6"]) == 2  # a UserError: message, no traceback


# --- Fine-tuning studies -----------------------------------------------------------------------------


def test_fine_tuning_trials_report_every_epoch_and_lagging_ones_are_pruned(tmp_path):
    # Trial 0 is the baseline (head LR 10 x 0.001); later trials draw head_lr_mult in [10, 100000], almost
    # surely a head LR where SGD diverges: once their val accuracy falls below the baseline's at the same
    # epoch, the median pruner stops them.
    root = image_project(
        tmp_path / "project",
        **{
            "finetune.lr": 0.001,
            "finetune.head_lr_mult": 10.0,
            "freeze_layers": 4,
            "tune.n_trials": 3,
            "tune.pruner_startup_trials": 1,
            "tune.pruner_warmup_epochs": 1,
            "tune.space": {"finetune.head_lr_mult": {"type": "uniform", "low": 10.0, "high": 100000.0}},
        },
    )
    params = load_params(root / "params.yaml")
    tracker = tracking.StudyTracker("transfer", "transfer", root=root)
    summary = tune(params, load_training_inputs(root), root, tracker, progress=False)

    trials = summary.study.get_trials()
    assert trials[0].params == {"finetune.head_lr_mult": 10.0} and trials[0].state == optuna.trial.TrialState.COMPLETE
    assert sorted(trials[0].intermediate_values) == [0, 1, 2]  # the start model (epoch 0), then each epoch
    assert trials[0].value == max(trials[0].intermediate_values.values())
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and summary.pruned == len(pruned)

    def median_of_earlier_complete(trial, step: int) -> float:
        return statistics.median(
            t.intermediate_values[step]
            for t in trials
            if t.number < trial.number and t.state == optuna.trial.TrialState.COMPLETE
        )

    for trial in pruned:  # stopped at the first epoch where it lagged the median of the trials completed before
        last = max(trial.intermediate_values)
        assert trial.intermediate_values[last] < median_of_earlier_complete(trial, last)
        assert all(trial.intermediate_values[s] >= median_of_earlier_complete(trial, s) for s in range(1, last))

    _, children, client = trial_runs(root, "transfer")
    by_number = {int(r.data.tags["tune.trial"]): r for r in children}
    assert sorted(by_number) == [t.number for t in trials]
    for trial in pruned:
        run = by_number[trial.number]
        assert run.data.tags["tune.state"] == "pruned" and run.info.status == "KILLED"
        # The probe's 5 epochs, the start model (epoch 6), then the fine-tuning epochs it got (the stage's numbering).
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == list(range(1, 6 + len(trial.intermediate_values)))
    assert by_number[0].data.tags["tune.state"] == "complete"
    assert [m.step for m in client.get_metric_history(by_number[0].info.run_id, "val_acc")] == list(range(1, 9))


def test_freeze_layers_outside_the_backbone_is_refused_before_any_trial(tmp_path):
    root = image_project(
        tmp_path / "project", **{"tune.space": {"freeze_layers": {"type": "categorical", "choices": ["all", 3, 9]}}}
    )
    from transfer.train.tune import TuneError

    with pytest.raises(TuneError, match=r"\[9\] outside 0..5"):
        tune(load_params(root / "params.yaml"), load_training_inputs(root), root, None, progress=False)


# --- Past one machine ----------------------------------------------------------------------------------


def test_an_unreachable_study_storage_is_a_clear_error(tmp_path, monkeypatch, capsys):
    root = head_project(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert cli_main(["tune", "--storage", "nosuchdb://user@localhost/optuna"]) == 2
    assert "tune.storage nosuchdb://user@localhost/optuna: cannot open study 'transfer'" in capsys.readouterr().err

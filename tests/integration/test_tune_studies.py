"""`transfer tune` studies for real: Optuna studies and the MLflow runs of their trials (SQLite store), the
command's outputs, a journal study continued across runs, fine-tuning trials pruned, an unreachable storage."""

from __future__ import annotations

import json
import statistics

import optuna
import pytest
import yaml
from tune_helpers import head_project, image_project, own_mlflow_store, trial_runs  # noqa: F401 - an autouse fixture

from transfer import tracking
from transfer.cli import main as cli_main
from transfer.pipeline.params import load_params
from transfer.train.recipe import load_training_inputs
from transfer.train.tune import exp_run_command, storage_for, tune, with_overrides

# --- The search space in params.yaml -----------------------------------------------------------------


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


# --- Past one machine ----------------------------------------------------------------------------------


def test_an_unreachable_study_storage_is_a_clear_error(tmp_path, monkeypatch, capsys):
    root = head_project(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert cli_main(["tune", "--storage", "nosuchdb://user@localhost/optuna"]) == 2
    assert "tune.storage nosuchdb://user@localhost/optuna: cannot open study 'transfer'" in capsys.readouterr().err

"""`transfer tune` with two real worker processes sharing one Optuna study: each trial once, in Optuna and in
MLflow."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
from conftest import REPO_ROOT
from project_helpers import PATIENCE_S
from tune_helpers import head_project, own_mlflow_store, trial_runs  # noqa: F401 - an autouse fixture

from transfer.train.tune import storage_for

# --- The search space in params.yaml -----------------------------------------------------------------


# --- Head-only studies ---------------------------------------------------------------------------------


# --- Fine-tuning studies -----------------------------------------------------------------------------


# --- Past one machine ----------------------------------------------------------------------------------


def test_two_worker_processes_share_one_study_each_trial_once_in_optuna_and_mlflow(tmp_path):
    root = head_project(
        tmp_path / "project", **{"head.epochs": 30, "tune.n_trials": 24, "tune.storage": "data/tune/shared.journal"}
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PYTHONPATH=str(REPO_ROOT / "src"), DVC_ROOT=str(root), OMP_NUM_THREADS="1")
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "transfer.cli", "tune", "--worker", str(index)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [worker.communicate(timeout=PATIENCE_S)[0] for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    study = optuna.load_study(study_name="transfer", storage=storage_for("data/tune/shared.journal", root))
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))) and 24 <= len(numbers) <= 25  # budget: at most W-1 over
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    parents, children, _ = trial_runs(root, "transfer")
    assert len(parents) == 1
    assert sorted(int(r.data.tags["tune.trial"]) for r in children) == numbers  # each trial once: none lost or doubled
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert len({r.data.tags["tune.worker"] for r in children}) == 2  # both workers ran trials
    for run in children:
        assert float(run.data.params["head.lr"]) == study.trials[int(run.data.tags["tune.trial"])].params["head.lr"]

"""The team workflow end to end: a tracking server, shared DVC storage, experiments that travel.

One copy of the session's built project (tests/e2e_pipeline.py: a git repository after `dvc repro`, as a
clone would be) re-runs the pipeline after a params edit against a real `mlflow server` on loopback
(MLFLOW_TRACKING_URI), pushes its outputs to a local DVC remote and its commits to a bare git repository;
a fresh clone pulls them and has nothing to re-run; two queued experiments run on two workers, log to the
server under their names, and travel with `dvc exp push/pull`. The stages run in the session's stage server.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from project_helpers import DVC, git_env, run, stages_run, wait_for_queue
from team_helpers import mlflow_server


@dataclass
class Team:
    repo: Path  # the first teammate's repository
    origin: Path  # the shared git repository (bare)
    remote: Path  # the shared DVC storage
    clone: Path  # a second teammate's clone
    env: dict
    server: str  # the MLflow tracking server's URL


def server_runs(team: Team):
    client = MlflowClient(team.server)
    experiment = client.get_experiment_by_name("transfer")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@pytest.fixture(scope="module")
def team(tmp_path_factory, built_pipeline, stage_server) -> Team:
    base = tmp_path_factory.mktemp("team")
    repo = base / "repo"
    shutil.copytree(built_pipeline.snapshot, repo, symlinks=True)
    shutil.rmtree(repo / "mlruns")  # this teammate's runs go to the server, never to a store of their own
    # A teammate's change to the recipe (a shorter probe): params, train and evaluate re-run.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["head"]["epochs"] = 10
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = git_env({"TRANSFER_SERVER_DIR": str(stage_server)})
    with mlflow_server(base / "mlflow") as url:
        yield Team(
            repo, base / "origin.git", base / "dvc-remote", base / "clone", {**env, "MLFLOW_TRACKING_URI": url}, url
        )


def test_pipeline_logs_to_the_tracking_server(team):
    output = run(DVC + ["repro"], team.repo, team.env)
    assert stages_run(output) == ["params", "train", "evaluate"]
    runs = server_runs(team)
    assert len(runs) == 1
    logged = runs[0]
    assert logged.info.run_name == "efficientnet_lite0 probe lr=0.01"  # plain repro: named from its params
    accuracy = json.loads((team.repo / "reports/metrics.json").read_text())["accuracy"]
    assert logged.data.metrics["test_acc"] == pytest.approx(accuracy)
    assert logged.data.params["head.lr"] == "0.01"
    # Artifacts went through the server into its artifact store, not into the repository.
    assert logged.info.artifact_uri.startswith("mlflow-artifacts:")
    names = {artifact.path for artifact in MlflowClient(team.server).list_artifacts(logged.info.run_id)}
    assert {"params.yaml", "dvc.lock", "diagnostics"} <= names
    assert not (team.repo / "mlruns" / "artifacts").exists()
    run(["git", "add", "-A"], team.repo, team.env)
    run(["git", "commit", "-qm", "baseline results"], team.repo, team.env)


def test_fresh_clone_pulls_every_output_and_reruns_nothing(team):
    env = team.env
    run(DVC + ["remote", "add", "-d", "shared", str(team.remote)], team.repo, env)
    run(["git", "commit", "-qam", "shared DVC storage"], team.repo, env)
    run(DVC + ["push"], team.repo, env)
    run(["git", "init", "-q", "--bare", "-b", "main", str(team.origin)], team.repo, env)
    run(["git", "remote", "add", "origin", str(team.origin)], team.repo, env)
    run(["git", "push", "-q", "origin", "main"], team.repo, env)

    run(["git", "clone", "-q", str(team.origin), str(team.clone)], team.repo, env)
    run(DVC + ["pull"], team.clone, env)
    status = run(DVC + ["status"], team.clone, env)
    assert "up to date" in status, status
    assert stages_run(run(DVC + ["repro"], team.clone, env)) == []
    for output in ("data/model/model.safetensors", "reports/diagnostics/report.html", "data/features/test.pt"):
        assert (team.clone / output).read_bytes() == (team.repo / output).read_bytes(), output


def test_queue_on_two_workers_logs_to_the_server_and_experiments_travel(team):
    env = team.env
    for name, lr in (("lr-high", "0.05"), ("lr-low", "0.003")):
        run(DVC + ["exp", "run", "--queue", "-n", name, "-S", f"head.lr={lr}"], team.repo, env)
    run(DVC + ["queue", "start", "-j", "2"], team.repo, env)
    status = wait_for_queue(team.repo, env)
    assert status.count("Success") == 2, status

    named = {logged.info.run_name: logged for logged in server_runs(team)}
    assert {"lr-high", "lr-low"} <= set(named)
    assert named["lr-high"].data.params["head.lr"] == "0.05" and "test_acc" in named["lr-high"].data.metrics
    assert named["lr-low"].data.tags["dvc_exp_name"] == "lr-low"

    table = run([sys.executable, "-m", "transfer.cli", "compare"], team.repo, env)
    print(table)  # the README's example
    assert re.search(r"^lr-high\s+success\s+0\.05\s+0\.\d+", table, re.MULTILINE), table

    # The experiments travel: git refs to the shared repository, outputs to the DVC remote.
    shown = json.loads(run(DVC + ["exp", "show", "--json"], team.repo, env))
    metrics = {
        revision["name"]: revision["data"]["metrics"]["reports/metrics.json"]["data"]
        for experiment in shown[1]["experiments"]
        for revision in experiment["revs"]
    }
    run(DVC + ["exp", "push", "origin", "lr-high", "lr-low"], team.repo, env)
    run(DVC + ["exp", "pull", "origin", "lr-high"], team.clone, env)
    assert "lr-high" in run(DVC + ["exp", "list", "--name-only"], team.clone, env)
    run(DVC + ["exp", "apply", "lr-high"], team.clone, env)
    assert json.loads((team.clone / "reports/metrics.json").read_text()) == metrics["lr-high"]
    assert yaml.safe_load((team.clone / "params.yaml").read_text())["head"]["lr"] == 0.05
    assert "up to date" in run(DVC + ["status"], team.clone, env)

"""The e2e tier's shared fixtures (a pytest plugin, loaded by tests/conftest.py): one stage server for the
session, and the project's pipeline built once and handed to each test as a fresh copy.

Building the pipeline (`dvc repro` of every stage on the embedded data) is most of an e2e test's time, and
most e2e tests only need it built: each gets the built repository (git, DVC cache, dvc.lock, outputs and the
MLflow store) restored from a snapshot, at the same path. The same path because the MLflow SQLite store
records absolute artifact locations (a copy elsewhere would log into the original's artifacts) and DVC keys
its site cache by the repository's path. A worker runs its tests one at a time (`make test` runs one
pytest-xdist worker per core, each with a session of its own), so one path per worker serves them all.
The same pipeline built again at 32 px (`small_pipeline`, a snapshot of its own at the same path) serves the
tests whose subject is not the backbone (heads, calibration).

Every e2e test's stages run in the session's stage server (TRANSFER_SERVER_DIR is set for the test), so no
stage pays its imports; results are identical either way (tests/e2e/test_pipeline.py repeats the served build
with cold stages and compares the files byte for byte).
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from project_helpers import DVC, REPO_ROOT, copy_project, git_env, run

STAGE_SERVER = [sys.executable, "-m", "transfer.pipeline.stage_server"]


@pytest.fixture(scope="session")
def stage_server(tmp_path_factory) -> Path:
    """A stage server for the whole session (its folder), stopped at the end."""
    folder = tmp_path_factory.mktemp("stage-server")
    # Started as dvc.yaml starts stages (PYTHONPATH=src): the launcher code the stages' fingerprint covers.
    env = git_env({"TRANSFER_SERVER_DIR": str(folder), "PYTHONPATH": str(REPO_ROOT / "src")})
    run(STAGE_SERVER + ["start", "--idle", "3600"], REPO_ROOT, env)
    yield folder
    run(STAGE_SERVER + ["stop"], REPO_ROOT, env)


@pytest.fixture(autouse=True)
def served_stages(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """e2e tests: the stages they start run in the session's stage server (an explicit env overrides it)."""
    if request.node.get_closest_marker("e2e") is not None:
        monkeypatch.setenv("TRANSFER_SERVER_DIR", str(request.getfixturevalue("stage_server")))


def served_runs(env: dict) -> int:
    """The stage runs the server in env's TRANSFER_SERVER_DIR has served so far (its `status`)."""
    status = run(STAGE_SERVER + ["status"], REPO_ROOT, {**env, "PYTHONPATH": str(REPO_ROOT / "src")})
    return sum(int(count) for count in re.findall(r"(\d+) run\(s\) served", status))


@dataclass
class BuiltPipeline:
    repo: Path  # where each test gets its copy
    snapshot: Path  # the built repository as `dvc repro` left it
    env: dict  # git, DVC and the project's commands without the test process's MLflow/DVC variables
    output: str  # what the building `dvc repro` printed
    served: int  # how many of its stage runs the session's stage server served


@pytest.fixture(scope="session")
def built_pipeline(tmp_path_factory, stage_server) -> BuiltPipeline:
    """The project as a fresh clone has it, in a git repository, after one `dvc repro` (served stages)."""
    base = tmp_path_factory.mktemp("pipeline")
    repo = copy_project(base / "repo")
    env = git_env({"TRANSFER_SERVER_DIR": str(stage_server)}, importable=False)
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "project"], repo, env)
    before = served_runs(env)
    output = run(DVC + ["repro"], repo, env)
    served = served_runs(env) - before
    snapshot = base / "snapshot"
    shutil.copytree(repo, snapshot, symlinks=True)
    return BuiltPipeline(repo, snapshot, env, output, served)


def restore(built: BuiltPipeline, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """(repository, env): the snapshot copied back to the repository's path, whatever earlier tests did there."""
    # This process's MLflow keeps one engine per store URI, and a pooled SQLite connection would go on reading
    # the previous copy's (deleted) database: a connection per use reads the file now at that path.
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    shutil.rmtree(built.repo, ignore_errors=True)
    shutil.copytree(built.snapshot, built.repo, symlinks=True)
    return built.repo, dict(built.env)


@pytest.fixture
def pipeline(built_pipeline, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """(repository, env): a fresh copy of the built pipeline."""
    return restore(built_pipeline, monkeypatch)


@pytest.fixture(scope="session")
def built_small_pipeline(built_pipeline) -> BuiltPipeline:
    """The built pipeline after `backbone.image_size: 32` (committed) and `dvc repro`: for the e2e tests whose
    subject is not the backbone (heads, calibration). Built at the same path, with a snapshot of its own."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        repo, env = restore(built_pipeline, monkeypatch)
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["backbone"]["image_size"] = 32
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(["git", "commit", "-qam", "32 px"], repo, env)
        before = served_runs(env)
        output = run(DVC + ["repro"], repo, env)
        served = served_runs(env) - before
        snapshot = built_pipeline.snapshot.with_name("snapshot-32px")
        shutil.copytree(repo, snapshot, symlinks=True)
    return BuiltPipeline(repo, snapshot, env, output, served)


@pytest.fixture
def small_pipeline(built_small_pipeline, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """(repository, env): a fresh copy of the pipeline built at 32 px."""
    return restore(built_small_pipeline, monkeypatch)

"""Where runs are recorded: the store (SQLite under mlruns/, or a tracking server), the experiment and its runs view."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from transfer.pipeline.errors import UserError

log = logging.getLogger(__name__)


# Seconds a writer waits for SQLite's lock before giving up; queue workers only hold it for milliseconds.
SQLITE_BUSY_TIMEOUT = 120

# What the runs view shows first. The evaluate stage logs the key metrics under these short names
# (the full set is there too: test.*, fit.*, topk.*); the view sorts by the first one.
KEY_METRICS = ("test_acc", "test_f1")
KEY_PARAMS = ("backbone.name", "freeze_layers", "head.lr", "finetune.lr")
KEY_TAGS = ("fit_verdict",)  # off screen on a laptop, one scroll away
# MLflow 3 UIs show an experiment as classical training, not GenAI (traces), by this tag. The 3.17 UI
# decides by its GenAI / Model training switch instead, which `?workflowType=machine_learning` sets
# (`runs_view_url`).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A view of the runs table stored on the experiment, as the UI's "share view" stores one; opened by
# `?viewStateShareKey=<key>`.
RUNS_VIEW_KEY = "key-columns"


def repository_root() -> Path:
    """The real repository root: DVC_ROOT inside DVC stages (also in temporary copies), else the git top."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(top.stdout.strip())
    except (subprocess.CalledProcessError, FileNotFoundError):
        return Path.cwd()


def store_dir(root: Path | None = None) -> Path:
    return (root or repository_root()) / "mlruns"


# mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; the repository store set that way is not the
# user's choice and must not stick to the next repository used in the same process.
_exported_store_uri: str | None = None


def _user_tracking_uri() -> str | None:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri and uri != _exported_store_uri else None


def tracking_uri(root: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI wins (a team server); otherwise the repository's SQLite store."""
    return _user_tracking_uri() or f"sqlite:///{store_dir(root) / 'mlflow.db'}?timeout={SQLITE_BUSY_TIMEOUT}"


def _is_server(uri: str) -> bool:
    return urlparse(uri).scheme not in ("sqlite", "file", "")


@contextlib.contextmanager
def _store_lock(root: Path | None) -> Iterator[None]:
    directory = store_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the runs table's column ids


def experiment_tags() -> dict[str, str]:
    """Tags that make the experiment open on comparable runs: its kind and the key-columns view."""
    view = {
        "selectedColumns": [_column("metrics", key) for key in KEY_METRICS]
        + [_column("params", key) for key in KEY_PARAMS]
        + [_column("tags", key) for key in KEY_TAGS],
        "orderByKey": _column("metrics", KEY_METRICS[0]),
        "orderByAsc": False,
    }
    return {**EXPERIMENT_KIND, f"mlflow.sharedViewState.{RUNS_VIEW_KEY}": json.dumps(view)}


def runs_view_url(server_url: str, experiment_id: str) -> str:
    """The experiment's runs table with the key columns, on a UI or server at `server_url`."""
    return (
        f"{server_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
        f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_KEY}"
    )


def _get_or_create_experiment(client: MlflowClient, name: str, root: Path | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # The repository store keeps artifacts beside its database; a server decides for itself.
        server = _is_server(mlflow.get_tracking_uri())
        artifacts = None if server else (store_dir(root) / "artifacts").resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifacts, tags=experiment_tags())
        except MlflowException:
            # Another queue worker created it first (on a server the file lock below does not reach).
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    for key, value in experiment_tags().items():  # experiments created before these tags existed
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def point_at_store(root: Path | None = None) -> str:
    """mlflow.set_tracking_uri to the user's URI or the repository store; returns the URI.

    mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI to child processes. The repository store is not the
    user's choice: it is taken back out of the environment, so a child working for another repository (a
    stage, a queue worker, a test's project) finds its own store.
    """
    global _exported_store_uri
    user_uri = _user_tracking_uri()
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    if user_uri is None:
        _exported_store_uri = uri
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return uri


def use_experiment(name: str, root: Path | None = None) -> str:
    """Point MLflow at the repository store (or MLFLOW_TRACKING_URI) and make sure the experiment exists;
    returns its id."""
    point_at_store(root)
    # Creating the schema (first use) and the experiment must not race between queue workers.
    with _store_lock(root):
        experiment_id = _get_or_create_experiment(MlflowClient(), name, root)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


class TrackingError(UserError, RuntimeError):
    """An MLflow reference (run, registered model, alias, metric) that does not resolve."""


def find_runs(experiment: str, root: Path | None = None):
    """All runs of an experiment as a pandas DataFrame (for tests and notebooks)."""
    use_experiment(experiment, root)
    return mlflow.search_runs(experiment_names=[experiment])


def main(argv: list[str] | None = None) -> int:
    """`python -m transfer.tracking url [EXPERIMENT]`: the runs view of the configured store's experiment."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m transfer.tracking", description=main.__doc__)
    parser.add_argument("command", choices=["url"])
    parser.add_argument("experiment", nargs="?", default="transfer")
    parser.add_argument("--ui", default="http://127.0.0.1:5000", help="the UI's address when the store is a file")
    args = parser.parse_args(argv)
    uri = tracking_uri()
    server = uri if _is_server(uri) else args.ui
    print(runs_view_url(server, use_experiment(args.experiment)))
    return 0

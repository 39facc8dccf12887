"""Everything MLflow: the one module that imports it.

The store is a SQLite database plus an artifact folder under `mlruns/` at the repository root. DVC runs
queued and `--temp` experiments in a temporary copy of the repository and sets `DVC_ROOT` to the real
one, so the root is taken from `DVC_ROOT` first: every run lands in the same store, whichever copy ran
it. Several queue workers write to that SQLite file at once; a file lock serialises the one-time schema
creation and a generous SQLite busy timeout makes concurrent writers wait instead of failing.

A pipeline run is one MLflow run: the train stage opens it (params, tags, per-epoch metrics, model) and
records its id next to the model; the evaluate stage reopens that run to add the test metrics.
The model is logged as a pyfunc that takes images (ImageClassifierModel, registered in the model
registry) and as the raw PyTorch module; `promote_best` moves a registry alias to the best run.

MLFLOW_TRACKING_URI=http://... sends everything to a team server (`make server-mlflow`) instead; the server
then chooses where artifacts go. Every run has a name (the DVC experiment's, or one read from its params),
and the experiment carries a shared view of the runs table (`runs_view_url`) that opens on the key params
and metrics rather than on MLflow's 100-odd columns.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from transfer.pipeline.errors import UserError
from transfer.pipeline.params import flatten_dict
from transfer.pipeline.runtime import single_threaded

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


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def run_tags(backbone: str, data_hash: str) -> dict[str, str]:
    tags = {"git_commit": git_commit(), "backbone": backbone, "data_hash": data_hash}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def readable_run_name(params: dict[str, Any]) -> str:
    """A name for a run outside `dvc exp run` (plain `dvc repro`), from its flattened params:
    `efficientnet_lite0 probe lr=0.01`, `resnet18 k=3 lr=0.002 5ep`."""
    backbone = params.get("backbone.name", "model")
    if str(params.get("freeze_layers", "all")) == "all":
        return f"{backbone} probe lr={params.get('head.lr')}"
    return f"{backbone} k={params['freeze_layers']} lr={params.get('finetune.lr')} {params.get('finetune.epochs')}ep"


def run_name(params: dict[str, Any]) -> str:
    """The DVC experiment's name inside `dvc exp run` (queued ones too), else one read from the params."""
    return os.environ.get("DVC_EXP_NAME") or readable_run_name(params)


@contextlib.contextmanager
def training_run(
    experiment: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None
) -> Iterator[str]:
    """Open (or, given run_id, reopen) the pipeline's MLflow run; yields its id."""
    use_experiment(experiment)
    with (
        mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name(params), tags=tags) as run,
        _killed_on_interrupt(run.info.run_id),
    ):
        if run_id is None:
            mlflow.log_params(params)
        yield run.info.run_id


@contextlib.contextmanager
def _killed_on_interrupt(run_id: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM (KeyboardInterrupt) ends the run as KILLED, other errors as FAILED (MLflow's own);
    the interruption carries a note saying so, which the stage prints."""
    try:
        yield
    except KeyboardInterrupt as exc:
        mlflow.end_run("KILLED")
        exc.add_note(f"MLflow run {run_id} is marked KILLED")
        raise
    except Exception as exc:
        exc.add_note(f"MLflow run {run_id} is marked FAILED")
        raise


@contextlib.contextmanager
def reopen_run(run_id: str, experiment: str) -> Iterator[str]:
    use_experiment(experiment)
    with mlflow.start_run(run_id=run_id) as run, _killed_on_interrupt(run.info.run_id):
        yield run.info.run_id


MODEL_DIGEST_TAG = "model_digest"


@contextlib.contextmanager
def model_run(experiment: str, digest: str) -> Iterator[str]:
    """The newest run tagged with this model digest, reopened; a new run when none has it.

    There is none when the model came from elsewhere (`dvc pull` from a teammate's remote while logging to
    another store): the evaluation is then recorded in a run of its own, tagged with the same digest.
    """
    experiment_id = use_experiment(experiment)
    found = MlflowClient().search_runs(
        [experiment_id], f"tags.{MODEL_DIGEST_TAG} = '{digest}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if found:
        with reopen_run(found[0].info.run_id, experiment) as run_id:
            yield run_id
        return
    log.info(f"mlflow: no run of experiment {experiment!r} trained this model; recording the evaluation in a new run")
    with (
        mlflow.start_run(experiment_id=experiment_id, tags={MODEL_DIGEST_TAG: digest}) as run,
        _killed_on_interrupt(run.info.run_id),
    ):
        yield run.info.run_id


def epoch_metrics(row: dict[str, Any]) -> list[Metric]:
    """One history row as MLflow metrics at step `epoch` (numbers only: `phase` and the like are not metrics)."""
    timestamp, step = int(time.time() * 1000), int(row["epoch"])
    return [
        Metric(key, float(value), timestamp, step)
        for key, value in row.items()
        if key not in ("epoch", "phase") and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]


def log_metric_batches(client: MlflowClient, run_id: str, metrics: list[Metric], tags: list[RunTag] = ()) -> None:
    for start in range(0, max(len(metrics), 1), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000], tags=tags if start == 0 else ())


class EpochLog:
    """Per-epoch metrics into a run (`run_id`, or the active run) with the epoch as step, so the MLflow UI
    draws curves.

    Call it with each history row. Linear-probe epochs (fractions of a second each; a write per epoch cost
    0.2 s of every head-only run) are written in one batch, with the first row of another phase, on `flush`
    or on leaving the `with` block; every other row (a fine-tuning epoch, a fitted head) is written as it
    arrives.
    """

    def __init__(self, run_id: str | None = None, client: MlflowClient | None = None):
        self.run_id, self.client = run_id, client
        self.pending: list[Metric] = []

    def __call__(self, row: dict[str, Any]) -> None:
        self.pending += epoch_metrics(row)
        if row.get("phase") != "probe":
            self.flush()

    def flush(self, tags: list[RunTag] = ()) -> None:
        """Write what is pending, with `tags` in the same request."""
        if self.pending or tags:
            run_id = self.run_id or mlflow.active_run().info.run_id
            log_metric_batches(self.client or MlflowClient(), run_id, self.pending, tags)
            self.pending = []

    def __enter__(self) -> "EpochLog":
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()  # after a failure too: the epochs before it belong to the run


def log_metrics(metrics: dict[str, Any], prefix: str = "") -> None:
    """Log a (possibly nested) metrics dict under dotted keys; non-numbers are skipped."""
    flat = {
        key: float(value)
        for key, value in flatten_dict(metrics, prefix).items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    # MLflow metric keys allow only alphanumerics and _-. /; class names may have others.
    mlflow.log_metrics({"".join(c if c.isalnum() or c in "_-./ " else "_" for c in k): v for k, v in flat.items()})


def log_key_metrics(test_acc: float, test_f1: float) -> None:
    """The metrics the runs view shows first, under short names (KEY_METRICS)."""
    mlflow.log_metrics({"test_acc": float(test_acc), "test_f1": float(test_f1)})


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    for path in paths:
        if Path(path).exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_tags(tags: dict[str, str]) -> None:
    """String facts about the run (e.g. the fit verdict), searchable and shown as columns in the UI."""
    mlflow.set_tags(tags)


class TrackingError(UserError, RuntimeError):
    """An MLflow reference (run, registered model, alias, metric) that does not resolve."""


# The folder, inside the logged pyfunc model's artifacts, holding model.json + model.safetensors.
CLASSIFIER_ARTIFACT = "classifier"
PYFUNC_MODEL_NAME = "model"  # runs:/<id>/model: takes images, returns class names and probabilities
PYTORCH_MODEL_NAME = "pytorch_model"  # runs:/<id>/pytorch_model: the raw torch module (mlflow.pytorch)

# Models from code: MLflow runs this file to build the pyfunc model, so nothing of ours is pickled.
_PYFUNC_CODE = """\"\"\"The transfer image classifier as an MLflow pyfunc model (see transfer.tracking).\"\"\"
import mlflow

from transfer.tracking import ImageClassifierModel

mlflow.models.set_model(ImageClassifierModel())
"""


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc: a DataFrame with an `image` column (encoded bytes, or their base64 text; never a file path) in;
    `class`, `probability`, `probabilities` ({class: p}) and `error` out, a row for each row. The weights, class
    names and preprocessing are the `classifier` artifact (the safe model folder of transfer.models.saved); the
    request limits are the model config (transfer.evaluate.inference.ServingLimits)."""

    def load_context(self, context) -> None:
        import torch

        from transfer.evaluate.inference import ServingLimits
        from transfer.models.saved import load_model

        self.saved = load_model(context.artifacts[CLASSIFIER_ARTIFACT])
        self.limits = ServingLimits.from_config(context.model_config)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    # A DataFrame type hint: MLflow then checks the input against the logged signature (image: string).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        from transfer.evaluate.inference import predict_frame

        # The scoring server answers any other exception with its stack trace (server paths, code): a reply
        # carries our message only, and the server's log the traceback.
        try:
            return predict_frame(self.saved, model_input, device=self.device, limits=self.limits)
        except UserError as error:
            raise MlflowException(str(error), INVALID_PARAMETER_VALUE) from None
        except Exception:
            log.exception("the image classifier failed on a request")
            raise MlflowException(
                "the model failed on this request (the server's log has the details)", INTERNAL_ERROR
            ) from None


def _pyfunc_signature(example_image: bytes):
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import ColSpec, Map, Schema

    # `image` is a string column, not binary: MLflow decodes a binary column's JSON base64 for the whole
    # request and refuses all of it for one bad row; as text, each row is decoded (and refused) by itself.
    # In-process callers and parquet may still pass the encoded bytes.
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "image")]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "class"),
                ColSpec(DataType.double, "probability"),
                ColSpec(Map(DataType.double), "probabilities"),
                ColSpec(DataType.string, "error"),
            ]
        ),
    )
    return signature, pd.DataFrame({"image": [base64.b64encode(example_image).decode("ascii")]})


def _requirements() -> list[str]:
    import timm
    import torch
    import torchvision

    # Explicit requirements: MLflow's own inference would import the model in a subprocess (seconds).
    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"timm=={timm.__version__}",
        f"safetensors=={version('safetensors')}",
        f"pillow=={version('pillow')}",
        f"pandas=={version('pandas')}",
    ]


def log_model(
    model_dir: Path, model, example_image: bytes, example_input: np.ndarray, registered_model: str | None = None
) -> str:
    """Log the trained classifier twice into the active run, and register the first; returns its model URI.

    `model` (runs:/<id>/model) is a pyfunc that takes images (see ImageClassifierModel), built from the safe
    model folder `model_dir` (model.json + model.safetensors, also logged as run artifacts: the class names
    and preprocessing are readable without loading anything). `pytorch_model` is the raw torch module for
    mlflow.pytorch.load_model. With `registered_model`, the pyfunc model becomes a new version of it.
    """
    import tempfile
    from dataclasses import asdict

    from transfer.evaluate.inference import ServingLimits
    from transfer.models.saved import DESCRIPTION_NAME, WEIGHTS_NAME

    package_dir = Path(__file__).resolve().parent
    model_dir = Path(model_dir)
    description = json.loads((model_dir / DESCRIPTION_NAME).read_text(encoding="utf-8"))
    signature, input_example = _pyfunc_signature(example_image)
    mlflow.log_artifact(str(model_dir / DESCRIPTION_NAME))
    # MLflow runs the model once on each input example to check that it serves: one image, not worth threads.
    with tempfile.TemporaryDirectory() as tmp, single_threaded():
        classifier = Path(tmp) / CLASSIFIER_ARTIFACT
        classifier.mkdir()
        for name in (DESCRIPTION_NAME, WEIGHTS_NAME):
            shutil.copy2(model_dir / name, classifier / name)
        code = Path(tmp) / "transfer_pyfunc.py"
        code.write_text(_PYFUNC_CODE, encoding="utf-8")
        info = mlflow.pyfunc.log_model(
            name=PYFUNC_MODEL_NAME,
            python_model=str(code),
            artifacts={CLASSIFIER_ARTIFACT: str(classifier)},
            code_paths=[str(package_dir)],
            signature=signature,
            input_example=input_example,
            pip_requirements=_requirements(),
            model_config=asdict(ServingLimits()),
            metadata={
                "classes": description["classes"],
                "preprocessing": description["preprocessing"],
                "backbone": description["backbone"]["name"],
            },
        )
        # Pickle, with this package shipped as code, rather than torch.export's pt2: exporting takes seconds
        # on every run and pins the batch size to that of the example.
        mlflow.pytorch.log_model(
            model.cpu().eval(),
            name=PYTORCH_MODEL_NAME,
            input_example=example_input,
            pip_requirements=_requirements(),
            code_paths=[str(package_dir)],
            serialization_format="pickle",
        )
    if registered_model:
        register_model(info.model_uri, registered_model)
    return info.model_uri


def register_model(model_uri: str, name: str) -> str:
    """A new version of the registered model `name` pointing at `model_uri`; returns the version."""
    # Queue workers may create the registered model at the same moment: serialise like the experiment.
    with _store_lock(None):
        client = MlflowClient()
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            if not client.search_registered_models(f"name = '{name}'"):
                client.create_registered_model(name)
    # mlflow.register_model, not client.create_model_version: a tracking server accepts a logged model's
    # `models:/m-...` URI as a version's source only with its model id, which register_model passes.
    return mlflow.register_model(model_uri, name, await_registration_for=0).version


def download_classifier(reference: str, destination: Path) -> Path:
    """The classifier folder (model.json + model.safetensors) of an MLflow model, downloaded under destination.

    `reference`: runs:/<run_id> (its `model`), runs:/<run_id>/<name>, models:/<name>@<alias>, models:/<name>/<v>.
    Only two things are fetched: the MLmodel file (is it a model at all?), then the classifier folder, so a
    reference to anything else (`file:///etc`) fails before a whole tree is copied.
    """
    point_at_store()
    uri = reference.rstrip("/")
    if uri.startswith("runs:/") and uri.count("/") == 1:
        uri = f"{uri}/{PYFUNC_MODEL_NAME}"

    def fetch(path: str, what: str) -> Path:
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{path}", dst_path=str(destination)))
        except Exception as exc:  # MlflowException, OSError: the reference does not resolve in this store
            raise TrackingError(
                f"--model {reference}: cannot load {what} from the MLflow store {tracking_uri()} "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). Use runs:/<run_id>, "
                "models:/<name>@<alias> or a model folder such as data/model"
            ) from None

    fetch("MLmodel", "it (it is not an MLflow model: no MLmodel file)")
    classifier = fetch(f"artifacts/{CLASSIFIER_ARTIFACT}", f"its {CLASSIFIER_ARTIFACT} folder")
    if not classifier.is_dir():
        raise TrackingError(
            f"--model {reference}: that MLflow model has no {CLASSIFIER_ARTIFACT} folder (it was "
            "not logged by this version of transfer's train stage)"
        )
    return classifier


def _model_versions(client: MlflowClient, name: str) -> list:
    """The versions of the registered model `name`; a name MLflow refuses, or no such model, is a TrackingError.

    The name is looked up first by itself (no query text); only then is it quoted into a search filter, with a
    quote character it does not contain."""
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        raise TrackingError(
            f"--name {name!r}: no such registered model in {tracking_uri()} "
            f"({exc.message.splitlines()[0] if exc.message else exc.error_code}); "
            "the train stage registers models under tracking.registered_model (params.yaml)"
        ) from None
    quote = next((q for q in ("'", '"') if q not in name), None)
    if quote is None:
        raise TrackingError(f"--name {name!r}: a registered model name with both quote characters cannot be searched")
    try:
        return client.search_model_versions(f"name = {quote}{name}{quote}")
    except MlflowException as exc:
        raise TrackingError(f"--name {name!r}: MLflow refused the search ({exc.message.splitlines()[0]})") from None


def promote_best(
    experiment: str, registered_model: str, metric: str, alias: str = "champion", higher_is_better: bool = True
) -> dict[str, Any]:
    """Point `alias` of `registered_model` at the version whose run (in `experiment`) is best by `metric`."""
    import math

    point_at_store()
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise TrackingError(f"no MLflow experiment {experiment!r} in {tracking_uri()}")
    versions = _model_versions(client, registered_model)
    if not versions:
        raise TrackingError(
            f"no versions of registered model {registered_model!r}: the train stage registers "
            "each model it trains under tracking.registered_model (params.yaml)"
        )
    candidates, metrics_seen = [], set()
    for model_version in versions:
        if not model_version.run_id:
            continue
        try:
            run = client.get_run(model_version.run_id)
        except mlflow.exceptions.MlflowException:
            continue  # the run was deleted for good
        if run.info.experiment_id != found.experiment_id or run.info.lifecycle_stage != "active":
            continue
        metrics_seen.update(run.data.metrics)
        value = run.data.metrics.get(metric)
        if value is not None and not math.isnan(value):
            candidates.append((value, int(model_version.version), run.info.run_id))
    if not candidates:
        raise TrackingError(
            f"no run of experiment {experiment!r} with a version of {registered_model!r} has the "
            f"metric {metric!r}; metrics there: {sorted(metrics_seen)[:30]}"
        )
    # Best value first; among equals, the newest version.
    value, best_version, run_id = max(candidates, key=lambda c: (c[0] if higher_is_better else -c[0], c[1]))
    try:
        client.set_registered_model_alias(registered_model, alias, str(best_version))
    except MlflowException as exc:  # an alias MLflow refuses (its characters, a reserved name)
        raise TrackingError(f"--alias {alias!r}: MLflow refused it ({exc.message.splitlines()[0]})") from None
    return {
        "registered_model": registered_model,
        "alias": alias,
        "version": best_version,
        "run_id": run_id,
        "metric": metric,
        "value": value,
        "candidates": len(candidates),
    }


def log_feature_head(estimator, input_example: np.ndarray, trusted_types: list[str]) -> None:
    """A scikit-learn head (head.kind), predicting classes from cached features: sklearn flavour, stored with
    skops (no pickle); load it with mlflow.sklearn.load_model(uri) (the trusted types are recorded)."""
    import sklearn

    with single_threaded():
        mlflow.sklearn.log_model(
            estimator,
            name="model",
            input_example=input_example,
            serialization_format="skops",
            skops_trusted_types=trusted_types,
            pip_requirements=[f"scikit-learn=={sklearn.__version__}", "skops"],
        )


def find_runs(experiment: str, root: Path | None = None):
    """All runs of an experiment as a pandas DataFrame (for tests and notebooks)."""
    use_experiment(experiment, root)
    return mlflow.search_runs(experiment_names=[experiment])


# --- Tuning: one parent run per Optuna study, one child run per trial ----------------------------

TRIAL_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


class StudyTracker:
    """The MLflow side of `transfer tune`: a parent run per study, a child run per trial.

    Runs are addressed by id through MlflowClient (no active-run state), so several worker processes,
    possibly on several machines, add child runs to the one parent run of their shared study.
    """

    def __init__(self, experiment: str, study_name: str, root: Path | None = None):
        self.experiment_id = use_experiment(experiment, root)
        self.client = MlflowClient()
        self.study_name = study_name
        self.parent_run_id: str | None = None
        self._epoch_logs: dict[str, EpochLog] = {}  # by trial run id

    def create_parent(self, settings: dict[str, Any], tags: dict[str, str]) -> str:
        """The study's parent run: the tune settings as params; returns its id."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"tune {self.study_name}",
            tags={**tags, "tune.study": self.study_name, "tune.role": "study"},
        )
        _log_params(self.client, run.info.run_id, settings)
        self.parent_run_id = run.info.run_id
        return run.info.run_id

    def start_trial(self, number: int, params: dict[str, Any], tags: dict[str, str]) -> str:
        """A child run for trial `number`, holding the trial's training params; returns its id."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.study_name} trial {number}",
            tags={
                **tags,
                "mlflow.parentRunId": self.parent_run_id,
                "tune.study": self.study_name,
                "tune.role": "trial",
                "tune.trial": str(number),
            },
        )
        _log_params(self.client, run.info.run_id, params)
        return run.info.run_id

    def log_trial_epoch(self, run_id: str, row: dict[str, Any]) -> None:
        """One history row as metrics at step `epoch`; probe epochs (fractions of a second) are sent in one batch."""
        self._epoch_log(run_id)(row)

    def _epoch_log(self, run_id: str) -> EpochLog:
        return self._epoch_logs.setdefault(run_id, EpochLog(run_id, self.client))

    def end_trial(self, run_id: str, state: str, value: float | None) -> None:
        """Close a trial's run: tag tune.state (complete, pruned, failed), metric `objective`, status."""
        log = self._epoch_log(run_id)
        if value is not None and not math.isnan(value):
            log.pending.append(Metric("objective", float(value), int(time.time() * 1000), 0))
        log.flush(tags=[RunTag("tune.state", state)])
        del self._epoch_logs[run_id]
        self.client.set_terminated(run_id, TRIAL_STATUS[state])

    def log_study(self, metrics: dict[str, float], best: dict[str, Any], artifacts: list[Path]) -> None:
        """The study's summary on the parent run (each worker's last word: the whole study so far)."""
        run_id = self.parent_run_id
        timestamp = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), timestamp, 0) for k, v in metrics.items()],
            tags=[RunTag(f"best.{k}", _param_text(v)) for k, v in best.items()],
        )
        for path in artifacts:
            if Path(path).exists():
                self.client.log_artifact(run_id, str(path), artifact_path="tune")
        self.client.set_terminated(run_id, "FINISHED")


def _param_text(value: Any) -> str:
    return "null" if value is None else str(value)


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(key, _param_text(value)) for key, value in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])


def find_study_runs(experiment: str, study_name: str, root: Path | None = None):
    """The parent and trial runs of a study as a pandas DataFrame (for tests and notebooks)."""
    use_experiment(experiment, root)
    return mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.`tune.study` = '{study_name}'")


def log_lr_find(
    experiment: str,
    recipe: str,
    params: dict[str, Any],
    curve: list[tuple[float, float]],
    metrics: dict[str, float],
    artifacts: list[Path],
    tags: dict[str, str],
    root: Path | None = None,
) -> str:
    """One run for an LR sweep: the training params, loss per step (lr as its own metric), suggestions, plot."""
    experiment_id = use_experiment(experiment, root)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=f"lr-find {recipe}", tags={**tags, "lr_find.recipe": recipe})
    run_id = run.info.run_id
    _log_params(client, run_id, params)
    timestamp = int(time.time() * 1000)
    series = [
        Metric(name, float(value), timestamp, step)
        for step, (lr, loss) in enumerate(curve)
        for name, value in (("lr_find.lr", lr), ("lr_find.loss", loss))
        if not math.isnan(value)
    ]
    series += [Metric(k, float(v), timestamp, 0) for k, v in metrics.items()]
    log_metric_batches(client, run_id, series)
    for path in artifacts:
        if Path(path).exists():
            client.log_artifact(run_id, str(path), artifact_path="lr_find")
    client.set_terminated(run_id, "FINISHED")
    return run_id


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


if __name__ == "__main__":
    raise SystemExit(main())


# --- The train stage's outcome ------------------------------------------------------------------------


def log_trained_model(model_dir: Path, trained, val_data, val_features, registered_model: str | None = None) -> None:
    """Into the active run: which model the train stage kept (`trained.selection_metrics()`, tag
    selected_model), each group's weight change, the model, and its digest (MODEL_DIGEST_TAG, by which the
    evaluate stage finds the run). The model is the pyfunc + torch classifier (`log_model`; the first val
    image as the example), or a scikit-learn head alone, predicting from features (`val_features`: the
    example). `trained` is a transfer.train.recipe.TrainedModel, saved in `model_dir`; `val_data` the val
    images (an ImageDataset)."""
    from transfer.models.heads import FEATURE_HEADS, TRUSTED_TYPES
    from transfer.models.saved import model_digest

    log_metrics(trained.selection_metrics())
    log_tags({"selected_model": trained.selection()["selected"]})
    movement = trained.movement()
    log_metrics({f"weight_change/{group}": value for group, value in movement.items() if value is not None})
    head = trained.feature_head
    if head is None:
        example = val_data.transformed([0]).numpy().astype(np.float32)
        image = (Path.cwd() / val_data.paths[0]).read_bytes()
        log_model(model_dir, trained.model, image, example, registered_model=registered_model)
    else:  # the scikit-learn head alone, predicting from features (skops, not pickle)
        log_feature_head(head.estimator, val_features.features[:2].numpy(), TRUSTED_TYPES)
        log_metrics({"head_fit_seconds": head.fit_seconds})
        log_tags({f"head_{FEATURE_HEADS[head.kind].hyperparameter}": str(head.chosen)})
    log_tags({MODEL_DIGEST_TAG: model_digest(model_dir)})


@contextlib.contextmanager
def stage_training_run(
    experiment: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None, enabled: bool = True
) -> Iterator[tuple[str | None, EpochLog | None]]:
    """The train stage's run (`training_run`) and an `EpochLog` into it: yields (run id, log). Not `enabled`
    (a torchrun rank other than 0: one rank logs), it opens nothing and yields (None, None)."""
    if not enabled:
        yield None, None
        return
    with training_run(experiment, params, tags, run_id=run_id) as opened, EpochLog() as log:
        yield opened, log

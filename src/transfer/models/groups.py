"""Layer groups: what `freeze_layers` and `features.layers` count, and what the optimiser's per-group LRs
and the per-group statistics (transfer.train.optim; the statistics below) are per.

A network's layer groups are derived from the model, not written by hand (`derive_layer_groups`): timm's
coarse `group_matcher` (stem, stages or blocks, then the final conv/norm as a group of its own) where the
model has one, else the top-level modules in order. Each group then owns the smallest set of whole modules
(plus loose tensors, e.g. a ViT's cls_token) holding exactly its parameters (`owned_groups`, `LayerGroup`);
the backbone keeps them in an ordered `groups` ModuleDict (transfer.models.backbones).

A model's groups in order are its backbone's, from the input, then its classifier head, named `head`
(`layer_groups`): everything that works per group iterates them instead of matching parameter names.
`freeze_first_groups` freezes the first k backbone groups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Iterable, Sequence

import torch
from torch import nn

from transfer.pipeline.errors import UserError

HEAD = "head"  # the classifier head's group name; a derived backbone group is never called that
LAST_LAYER = -1  # features.layers: the network's own pooled pre-logits features


class LayerGroupError(UserError, ValueError):
    """freeze_layers or features.layers names no layer group of the backbone."""


def _listing(names: Sequence[str]) -> str:
    return ", ".join(f"{i + 1}={name}" for i, name in enumerate(names))


def _matcher_ordinals(network: nn.Module) -> dict[str, tuple] | None:
    """Parameter name -> timm's coarse group ordinal, or None when the model has no group_matcher.

    Unlike timm's own grouping, parts timm folds into the previous group (the final conv or norm, marked
    MATCH_PREV_GROUP) are a group of their own, and unmatched parameters (a neck) a last group.
    """
    if not hasattr(network, "group_matcher"):
        return None
    matcher = network.group_matcher(coarse=True)
    if callable(matcher):
        return {
            name: tuple(v if isinstance(v, Iterable) else (v,))
            for name, _ in network.named_parameters()
            for v in [matcher(name)]
        }
    compiled = []
    for ordinal, (_, spec) in enumerate(matcher.items()):
        if spec is None:
            continue
        for pattern, suffix in spec if isinstance(spec, (list, tuple)) else [(spec, None)]:
            compiled.append((re.compile(pattern), ordinal, suffix))

    def ordinal_of(name: str) -> tuple:
        for pattern, ordinal, suffix in compiled:
            found = pattern.match(name)
            if found:
                captured = tuple(float(g) for g in found.groups() if g is not None)
                return (float(ordinal), *captured, *(float(s) for s in suffix or ()))
        return (math.inf,)

    return {name: ordinal_of(name) for name, _ in network.named_parameters()}


def _top_level_ordinals(network: nn.Module) -> dict[str, tuple]:
    """The fallback: one group per top-level module holding parameters, in order (descending into a lone
    container, e.g. torchvision's `features`); leading single layers (conv, norm) and parameters of the
    network itself form the first group, the stem."""

    def holds_parameters(module: nn.Module) -> bool:
        return any(True for _ in module.parameters())

    prefix, module = "", network
    while True:
        holders = [(name, child) for name, child in module.named_children() if holds_parameters(child)]
        loose = any(True for _ in module.parameters(recurse=False))
        if len(holders) == 1 and not loose and any(True for _ in holders[0][1].children()):
            prefix, module = prefix + holders[0][0] + ".", holders[0][1]
        else:
            break
    child_ordinal: dict[str, int] = {}
    ordinal, in_stem = 0, True
    for name, child in holders:
        single_layer = not any(True for _ in child.children())
        if in_stem and single_layer:
            child_ordinal[name] = 0
            continue
        ordinal = (1 if child_ordinal else 0) if in_stem else ordinal + 1
        in_stem = False
        child_ordinal[name] = ordinal
    ordinals = {}
    for name, _ in network.named_parameters():
        rest = name[len(prefix) :]
        ordinals[name] = (float(child_ordinal[rest.split(".")[0]]) if "." in rest else 0.0,)
    return ordinals


def _group_label(names: Sequence[str], others: Sequence[str]) -> str:
    """The shortest module path that holds these parameters and no other group's (e.g. `layer1`, `blocks.3`);
    without one (a group of several top-level modules), their names joined."""
    parts = [name.split(".")[:-1] for name in names]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
        prefix = ".".join(common) + "."
        if not any(other.startswith(prefix) for other in others):
            return ".".join(common)
    return "_".join(dict.fromkeys(name.split(".")[0] for name in names))


def derive_layer_groups(network: nn.Module) -> list[tuple[str, list[str]]]:
    """Ordered (group name, parameter names): timm's coarse group_matcher, else top-level modules."""
    ordinals = _matcher_ordinals(network) or _top_level_ordinals(network)
    grouped: dict[tuple, list[str]] = {}
    for name, _ in network.named_parameters():
        grouped.setdefault(ordinals[name], []).append(name)
    groups, used = [], set()
    for index, ordinal in enumerate(sorted(grouped)):
        names = grouped[ordinal]
        others = [name for key, params in grouped.items() if key != ordinal for name in params]
        label = "stem" if index == 0 else _group_label(names, others).replace(".", "_")
        label = "neck" if label == HEAD else label
        while label in used:
            label += "_"
        used.add(label)
        groups.append((label, names))
    return groups


def _sanitise(name: str) -> str:
    return name.replace(".", "_") or "network"


class LayerGroup(nn.Module):
    """The modules and loose tensors (e.g. a ViT's cls_token) of one layer group, which owns them.

    They run inside their network's forward, never through this module; a forward hook on a group is
    placed on its last module, whose output is the group's output.
    """

    def __init__(self, network: nn.Module, modules: list[str], loose: list[str]):
        super().__init__()
        for name in modules:
            self.add_module(_sanitise(name), network.get_submodule(name))
        self._loose: list[tuple[nn.Module, str, str]] = []  # (owner, attribute, name here)
        for name in loose:
            owner_name, _, attribute = name.rpartition(".")
            owner = network.get_submodule(owner_name)
            local = _sanitise(name)
            if attribute in owner._parameters:
                self.register_parameter(local, owner._parameters[attribute])
            else:
                self.register_buffer(local, owner._buffers[attribute])
            self._loose.append((owner, attribute, local))
        self.output_module = _sanitise(modules[-1]) if modules else None

    def forward(self, *args):
        raise RuntimeError("a layer group runs inside its network's forward, not on its own")

    def register_forward_hook(self, hook, **kwargs):
        if self.output_module is None:
            raise RuntimeError("this layer group has no module whose output could be observed")
        return getattr(self, self.output_module).register_forward_hook(hook, **kwargs)

    def relink(self) -> None:
        """After .to()/.float(): the network's own references follow the tensors owned here."""
        for owner, attribute, local in self._loose:
            if attribute in owner._parameters:
                owner._parameters[attribute] = self._parameters[local]
            else:
                owner._buffers[attribute] = self._buffers[local]


def owned_groups(network: nn.Module, groups: list[tuple[str, list[str]]]) -> list[tuple[str, nn.Module]]:
    """Each group as the smallest set of whole modules (plus loose tensors) holding exactly its parameters."""
    group_of = {param: index for index, (_, params) in enumerate(groups) for param in params}
    under: dict[str, set[int]] = {}  # module name -> groups of the parameters below it
    for param, index in group_of.items():
        parts = param.split(".")[:-1]
        for depth in range(len(parts) + 1):
            under.setdefault(".".join(parts[:depth]), set()).add(index)
    module_order = {name: i for i, (name, _) in enumerate(network.named_modules())}
    modules: list[list[str]] = [[] for _ in groups]
    loose: list[list[str]] = [[] for _ in groups]
    for param, index in group_of.items():
        parts = param.split(".")[:-1]
        owner = next(
            (
                ".".join(parts[:depth])
                for depth in range(1, len(parts) + 1)
                if under[".".join(parts[:depth])] == {index}
            ),
            None,
        )
        if owner is None:
            loose[index].append(param)
        elif owner not in modules[index]:
            modules[index].append(owner)
    # Buffers outside every owned module (rare: a parameter-free module's) join the group before them.
    covered = {name for names in modules for name in names}
    current = 0
    for key in network.state_dict(keep_vars=True):
        if key in group_of:
            current = group_of[key]
        elif not any(key.startswith(name + ".") for name in covered) and key not in group_of:
            loose[current].append(key)
    owned = []
    for index, (label, _) in enumerate(groups):
        members = sorted(modules[index], key=module_order.__getitem__)
        if len(members) == 1 and not loose[index]:
            owned.append((label, network.get_submodule(members[0])))
        else:
            owned.append((label, LayerGroup(network, members, loose[index])))
    return owned


def resolve_layers(layers: Sequence[int | str] | None, group_names: list[str]) -> list[str] | None:
    """features.layers (group names, 1-based positions, or negative positions from the end) -> names."""
    if not layers or list(layers) == [LAST_LAYER]:
        return None
    names = []
    for layer in layers:
        if isinstance(layer, int) and 1 <= abs(layer) <= len(group_names):
            names.append(group_names[layer - 1 if layer > 0 else layer])
        elif isinstance(layer, str) and layer in group_names:
            names.append(layer)
        else:
            raise LayerGroupError(
                f"features.layers: {layer!r} is not a layer group of this backbone; its groups, "
                f"in order: {_listing(group_names)} (a name, a position 1..{len(group_names)}, or -1 for the last)"
            )
    if len(set(names)) != len(names):
        raise LayerGroupError(f"features.layers names a group twice: {list(layers)}")
    return names


# --- A model's groups ------------------------------------------------------------------------------


def layer_groups(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each layer group of `model`, in order: its backbone's groups from the input, then its
    head (`HEAD`) when it has one. Each parameter of the model is in at most one group."""
    groups = list(model.backbone.groups.items())
    head = getattr(model, HEAD, None)
    if isinstance(head, nn.Module):
        groups.append((HEAD, head))
    return groups


def group_names(model: nn.Module) -> list[str]:
    """The names of `model`'s layer groups in order, input to head."""
    return [name for name, _ in layer_groups(model)]


def check_freeze_range(k: int, group_names: list[str]) -> None:
    """freeze_layers=k freezes 0..all of these backbone groups; else a LayerGroupError listing them."""
    if not 0 <= k <= len(group_names):
        raise LayerGroupError(
            f"freeze_layers={k} is outside 0..{len(group_names)}; this backbone's layer groups, "
            f"in order: {_listing(group_names)} (freeze_layers: all trains only the head on cached features)"
        )


def check_freeze_layers(backbone: nn.Module, k: int) -> None:
    """freeze_layers=k fits this backbone: one fine-tunable backbone with at least k layer groups. The one
    check of k against a built backbone (LayerGroupError listing its groups); `freeze_first_groups` runs it."""
    if not getattr(backbone, "fine_tunable", True):
        raise LayerGroupError(
            "fine-tuning takes one backbone: with several backbones (a list under backbone:) "
            "use freeze_layers: all (heads on the concatenated cached features)"
        )
    check_freeze_range(k, list(backbone.groups))


def freeze_first_groups(model: nn.Module, k: int) -> None:
    """Freeze the first k backbone groups of a Classifier (no gradients, normalisation in eval); k in 0..their
    number. The model's `train` keeps its first `frozen_groups` groups in eval mode."""
    check_freeze_layers(model.backbone, k)
    for index, group in enumerate(model.backbone.groups.values()):
        for parameter in group.parameters():
            parameter.requires_grad_(index >= k)
    model.frozen_groups = k
    model.train(model.training)


# --- What training did to each layer group: relative weight change and gradient norms --------------
# Measured by the training loop (every step, every run) and drawn by the diagnostics.


def in_group_order(values: Mapping[str, float], model: torch.nn.Module) -> dict[str, float]:
    """``values`` re-keyed in the model's layer-group order (input to head), others after.

    JSON files written with sorted keys lose that order, and a layer-movement
    chart reads from the input to the head.
    """
    order = {group: index for index, group in enumerate(group_names(model))}
    return dict(sorted(values.items(), key=lambda item: order.get(item[0], len(order))))


def relative_weight_change(initial_state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    """``||theta - theta0|| / ||theta0||`` per layer group, in group order.

    ``initial_state`` is keyed like ``model.state_dict()``. Buffers such as
    BatchNorm running statistics are not weights and are left out. Groups with
    no parameter in ``initial_state`` are left out of the result (e.g. the head
    when theta0 is the pretrained backbone alone); a group whose initial norm
    is zero gets NaN rather than a division error.
    """
    state_key = {id(param): name for name, param in model.named_parameters()}
    change = {}
    with torch.no_grad():
        for group, module in layer_groups(model):
            diff_sq = init_sq = 0.0
            seen = False
            for param in module.parameters():
                name = state_key[id(param)]
                if name not in initial_state:
                    continue
                seen = True
                # float64: changes of 1e-4 relative on millions of weights matter
                start = initial_state[name].detach().to(param.device, torch.float64)
                now = param.detach().to(torch.float64)
                diff_sq += float(torch.sum((now - start) ** 2))
                init_sq += float(torch.sum(start**2))
            if seen:
                change[group] = math.sqrt(diff_sq) / math.sqrt(init_sq) if init_sq > 0 else float("nan")
    return change


def group_grad_norm_tensor(model: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """(group names, float64 tensor of each group's gradient L2 norm) on the gradients' device (call after backward).

    No host-device synchronisation: the training loop sums these tensors over an epoch and reads them
    once. Frozen groups (no gradient) get 0.0, so every step has the same groups.
    """
    groups = layer_groups(model)
    device = next(model.parameters()).device
    norms = []
    for _, module in groups:
        grads = [param.grad.detach() for param in module.parameters() if param.grad is not None]
        if grads:
            # float64 like the per-parameter sums they replace: the logged figures do not change.
            per_param = torch._foreach_norm(grads, 2, dtype=torch.float64)
            norms.append(torch.linalg.vector_norm(torch.stack(per_param)))
        else:
            norms.append(torch.zeros((), dtype=torch.float64, device=device))
    return [name for name, _ in groups], torch.stack(norms)


def group_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the current gradient of each layer group (call after backward; reads them to the host).

    Frozen groups (no gradient) report 0.0 so every step has the same keys.
    """
    groups, norms = group_grad_norm_tensor(model)
    return dict(zip(groups, norms.tolist()))


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """BatchNorm in eval mode (pretrained running stats) while its scale and shift still train.

    On small data the batch statistics of a new domain differ from the pretrained running statistics, so
    in train mode the features the probe head was fitted on shift at once and take epochs to recover.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()

"""What training did to each layer group: relative weight change and gradient norms.

Measured by the training loop (every step, every run) and drawn by diagnostics; kept apart from the
plotting code so that training imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

GROUP_PREFIX = "backbone.groups."


def _group_of(parameter_name: str, group_names: Iterable[str]) -> str | None:
    """Return the layer group owning ``parameter_name``, or None."""
    if parameter_name.startswith("head."):
        return "head"
    for group in group_names:
        if parameter_name.startswith(f"{GROUP_PREFIX}{group}."):
            return group
    return None


def in_group_order(values: Mapping[str, float], model: torch.nn.Module) -> dict[str, float]:
    """``values`` re-keyed in the model's layer-group order (input to head), others after.

    JSON files written with sorted keys lose that order, and a layer-movement
    chart reads from the input to the head.
    """
    order = {group: index for index, group in enumerate(_group_names(model))}
    return dict(sorted(values.items(), key=lambda item: order.get(item[0], len(order))))


def _group_names(model: torch.nn.Module) -> list[str]:
    """Ordered layer-group names: the backbone groups, then ``head`` if any."""
    names = list(model.backbone.groups.keys())
    if isinstance(getattr(model, "head", None), torch.nn.Module):
        names.append("head")
    return names


def relative_weight_change(initial_state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    """``||theta - theta0|| / ||theta0||`` per layer group, in group order.

    A group's parameters are those named ``backbone.groups.<group>.*`` (and
    ``head.*`` for the classifier head). Buffers such as BatchNorm running
    statistics are not weights and are left out. Groups with no parameter in
    ``initial_state`` are left out of the result (e.g. the head when theta0
    is the pretrained backbone alone); a group whose initial norm is zero
    gets NaN rather than a division error.
    """
    groups = _group_names(model)
    diff_sq = dict.fromkeys(groups, 0.0)
    init_sq = dict.fromkeys(groups, 0.0)
    seen: set[str] = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            group = _group_of(name, groups)
            if group is None or name not in initial_state:
                continue
            seen.add(group)
            # float64: changes of 1e-4 relative on millions of weights matter
            start = initial_state[name].detach().to(param.device, torch.float64)
            now = param.detach().to(torch.float64)
            diff_sq[group] += float(torch.sum((now - start) ** 2))
            init_sq[group] += float(torch.sum(start**2))
    return {
        group: math.sqrt(diff_sq[group]) / math.sqrt(init_sq[group]) if init_sq[group] > 0 else float("nan")
        for group in groups
        if group in seen
    }


def group_grad_norm_tensor(model: torch.nn.Module) -> tuple[list[str], torch.Tensor]:
    """(group names, float64 tensor of each group's gradient L2 norm) on the gradients' device (call after backward).

    No host-device synchronisation: the training loop sums these tensors over an epoch and reads them
    once. Frozen groups (no gradient) get 0.0, so every step has the same groups.
    """
    groups = _group_names(model)
    grads: dict[str, list[torch.Tensor]] = {group: [] for group in groups}
    device = None
    for name, param in model.named_parameters():
        device = device or param.device
        group = _group_of(name, groups)
        if group is not None and param.grad is not None:
            grads[group].append(param.grad.detach())
    norms = []
    for group in groups:
        if grads[group]:
            # float64 like the per-parameter sums they replace: the logged figures do not change.
            per_param = torch._foreach_norm(grads[group], 2, dtype=torch.float64)
            norms.append(torch.linalg.vector_norm(torch.stack(per_param)))
        else:
            norms.append(torch.zeros((), dtype=torch.float64, device=device))
    return groups, torch.stack(norms)


def group_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the current gradient of each layer group (call after backward; reads them to the host).

    Frozen groups (no gradient) report 0.0 so every step has the same keys.
    """
    groups, norms = group_grad_norm_tensor(model)
    return dict(zip(groups, norms.tolist()))

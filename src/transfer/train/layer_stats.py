"""What training did to each layer group: relative weight change and gradient norms.

Measured by the training loop (every step, every run) and drawn by diagnostics; kept apart from the
plotting code so that training imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from transfer.models.groups import group_names, layer_groups


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

"""The params stage's check of what the schema cannot know: backbone names and layer-group ranges.

`backbone.name` must name a model timm or torchvision knows, and `freeze_layers` / `features.layers` must fall
inside that backbone's layer groups. Those are facts of the libraries, not of the schema, and checked only at
cache/train they failed after DVC had already run the earlier stages. The params stage checks them first,
from the model list and the groups of the network built on torch's meta device (no weights, no download:
transfer.models.backbones.layer_group_names).

Importing timm costs seconds, and the params stage runs on every edit of params.yaml: the values checked are
recorded in data/params.checked.json (a `persist` output, which DVC keeps across runs), and the check is
skipped while they and the installed timm/torchvision are the same.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from transfer.pipeline.files import write_json
from transfer.pipeline.params import BackboneParams, backbone_list


def _installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def checked_values(
    backbone: BackboneParams | list[BackboneParams], freeze_layers: int | str, layers: Sequence[int | str]
) -> dict[str, Any]:
    """What a successful check vouches for: the values and the library versions that resolve them."""
    return {
        "backbone": [b.model_dump() for b in backbone_list(backbone)],
        "freeze_layers": freeze_layers,
        "features.layers": list(layers),
        "timm": _installed("timm"),
        "torchvision": _installed("torchvision"),
    }


def check_layer_groups(
    backbone: BackboneParams | list[BackboneParams],
    freeze_layers: int | str,
    layers: Sequence[int | str],
    record: Path,
) -> bool:
    """Raise BackboneError / LayerGroupError (naming the key and what is allowed) unless every backbone exists
    and the layer choices fit its groups; record the values checked. False when `record` already vouched."""
    values = checked_values(backbone, freeze_layers, layers)
    try:
        if json.loads(record.read_text(encoding="utf-8")) == values:
            return False
    except (OSError, ValueError):
        pass  # no record yet, or an unreadable one: check
    # Imported here: the skip above is what keeps an ordinary params edit free of timm's import time.
    from transfer.models.backbones import layer_group_names
    from transfer.models.groups import check_freeze_range, resolve_layers

    for entry in backbone_list(backbone):
        names = layer_group_names(entry.name, entry.image_size)
        resolve_layers(layers, names)
        if isinstance(freeze_layers, int):
            check_freeze_range(freeze_layers, names)
    write_json(record, values)
    return True

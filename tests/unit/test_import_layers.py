"""The package's imports run one way: from the commands down to the pipeline plumbing, never back up.

Layers, bottom to top (a module may import its own layer and those below it, and no import cycle exists):

    pipeline    plumbing: params schema, layout, files, errors, runtime, heap, distributed, stage launcher/server
    data        sources, images, report, split, config, cache, datasets, transforms
    models      backbones, groups, heads, saved, export; `transfer.features` (a frozen backbone's cached features)
    evaluate    metrics, plots, health, diagnostics, report, inference, calibration, explain, compare
    train       probe, finetune, optim, losses, checkpoint, result, recipe, tune, lr_find
    tracking    everything MLflow
    commands    the `transfer` command and its subcommands (transfer.cli, transfer.commands)

Every import counts, module-level and inside functions: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
LAYERS = ["pipeline", "data", "models", "evaluate", "train", "tracking", "commands"]
PLACED = {"transfer": "pipeline", "transfer.features": "models", "transfer.cli": "commands"}


def layer_of(module: str) -> str:
    if module in PLACED:
        return PLACED[module]
    package = module.split(".")[1]
    assert package in LAYERS, f"{module}: place it in a layer (tests/test_import_layers.py)"
    return package


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "transfer").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules `path` imports (`from transfer import tracking` is transfer.tracking)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in candidates:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                names.add(name)
                break
    return names


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def test_no_import_points_up_a_layer():
    upward = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in import_graph().items()
        for target in sorted(targets)
        if target != "transfer" and LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module))
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_holds_modules(layer):
    assert any(layer_of(module) == layer for module in modules()), f"no module in layer {layer}"


@pytest.mark.parametrize("package", ["data", "models", "evaluate", "train", "tracking"])
def test_each_package_exports_its_public_api(package):
    """`from transfer.<package> import name` works for every name the package lists in __all__."""
    import importlib

    module = importlib.import_module(f"transfer.{package}")
    assert module.__all__, f"transfer.{package} exports nothing"
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert not missing, f"transfer.{package}.__all__ names what it cannot give: {missing}"

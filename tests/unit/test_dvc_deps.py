"""dvc.yaml is exact: each stage lists the code it runs and the params it reads, no more, no less.

Derived from the code, not from a list kept by hand:
* code: the import closure of the stage script within src/transfer (module-level and function-level imports,
  followed transitively). Empty package `__init__.py` files carry no code and are left out. The launcher in
  the command (transfer.pipeline.stage and its server) is left out too: its contract is that a stage's
  result does not depend on it (tests/integration/test_stage_server.py).
* params: every `params.<key>[.<key>]` the script reads, following the params object into the package
  functions it is passed to. `flatten(params)` (every value, logged as the MLflow run's record) is not an
  input of the computation and is not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from transfer.pipeline.params import Params

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
NOT_INPUTS = {"flatten"}  # functions that take the whole params object only to record it


def module_file(name: str) -> Path | None:
    if name != "transfer" and not name.startswith("transfer."):
        return None
    base = SRC.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                package = module_name(path).split(".")
                package = package[: len(package) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from transfer import tracking`
    return names


def has_code(path: Path) -> bool:
    """False for a docstring and constants (`__version__ = "0.1.0"`): nothing a stage's result depends on."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, (ast.Expr, ast.Assign)) and isinstance(node.value, ast.Constant)) for node in body)


def import_closure(script: Path) -> set[Path]:
    found: set[Path] = set()
    todo = [script]
    while todo:
        current = todo.pop()
        for name in imported_modules(current):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, a/b/c
                file = module_file(".".join(parts[:depth]))
                if file is not None and file not in found:
                    found.add(file)
                    todo.append(file)
    return {file for file in found if file.name != "__init__.py" or has_code(file)}


# --- params read -------------------------------------------------------------------------------------


def _chain(node: ast.AST, root: str) -> list[str] | None:
    """['backbone', 'name'] for `root.backbone.name`; None when `node` is not rooted at `root`."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return parts[::-1] if isinstance(node, ast.Name) and node.id == root and parts else None


def _key(chain: list[str]) -> str:
    section = Params.model_fields[chain[0]].annotation
    if (
        len(chain) > 1
        and isinstance(section, type)
        and issubclass(section, BaseModel)
        and chain[1] in section.model_fields
    ):
        return f"{chain[0]}.{chain[1]}"
    return chain[0]


def _imported_functions(tree: ast.Module, path: Path) -> dict[str, Path]:
    """Local name -> module file, for `from transfer.x import f` and `from transfer import x` (x.f)."""
    table: dict[str, Path] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                module = module_file(f"{node.module}.{alias.name}")
                table[alias.asname or alias.name] = module or module_file(node.module) or path
    return table


def params_read(path: Path, root: str = "params", function: str | None = None, seen=None) -> set[str]:
    """Keys read through the variable `root` in `path` (in `function` only, when given)."""
    seen = seen if seen is not None else set()
    if (path, function, root) in seen:
        return set()
    seen.add((path, function, root))
    tree = ast.parse(path.read_text())
    scope: ast.AST = tree
    if function is not None:
        scope = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function)
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    imported = _imported_functions(tree, path)
    keys: set[str] = set()
    inner = {id(node.value) for node in ast.walk(scope) if isinstance(node, ast.Attribute)}
    for node in ast.walk(scope):
        chain = _chain(node, root) if isinstance(node, ast.Attribute) and id(node) not in inner else None
        if chain and chain[0] in Params.model_fields and not isinstance(getattr(node, "ctx", None), ast.Store):
            keys.add(_key(chain))
        if isinstance(node, ast.Call):  # the whole params object handed to a function
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if callee in NOT_INPUTS or callee is None:
                continue
            passed = [(i, None) for i, arg in enumerate(node.args) if isinstance(arg, ast.Name) and arg.id == root]
            passed += [(None, kw.arg) for kw in node.keywords if isinstance(kw.value, ast.Name) and kw.value.id == root]
            if not passed:
                continue
            if callee in functions:
                target_path, definition = path, functions[callee]
            else:
                owner = (
                    node.func.value.id
                    if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                    else callee
                )
                target_path = imported.get(owner)
                assert target_path is not None, f"{path.name}: params passed to {callee}, which is not in the package"
                definition = next(
                    n
                    for n in ast.walk(ast.parse(target_path.read_text()))
                    if isinstance(n, ast.FunctionDef) and n.name == callee
                )
            arguments = [a.arg for a in definition.args.args]
            for position, name in passed:
                parameter = name if name is not None else arguments[position]
                keys |= params_read(target_path, parameter, definition.name, seen)
    return keys


def listed_params(stage: str) -> set[str]:
    listed: set[str] = set()
    for entry in STAGES[stage].get("params", []):
        listed.update(entry if isinstance(entry, dict) else [entry])
    return listed


def script_of(stage: str) -> Path:
    return ROOT / STAGES[stage]["cmd"].split()[-1]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_are_exactly_the_code_it_imports(stage):
    script = script_of(stage)
    expected = {script.relative_to(ROOT).as_posix()} | {p.relative_to(ROOT).as_posix() for p in import_closure(script)}
    listed = {dep for dep in STAGES[stage]["deps"] if dep.endswith(".py")}
    assert listed == expected, (
        f"{stage}: add {sorted(expected - listed)} to its deps in dvc.yaml; remove {sorted(listed - expected)}"
    )


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_params_are_exactly_the_keys_it_reads(stage):
    read = params_read(script_of(stage))
    listed = listed_params(stage)
    uncovered = {key for key in read if key not in listed and key.split(".")[0] not in listed}
    assert not uncovered, f"{stage} reads {sorted(uncovered)}, which its params in dvc.yaml do not list"
    unread = {entry for entry in listed if not any(key == entry or key.startswith(entry + ".") for key in read)}
    assert not unread, f"{stage} lists {sorted(unread)} in dvc.yaml but never reads them"


def test_the_analysis_sees_what_the_train_stage_reads():
    """The derivation itself: keys read directly, through a function in the script and through the package."""
    read = params_read(ROOT / "stages/train.py")
    assert {"device", "seed", "freeze_layers", "backbone", "tracking.experiment"} <= read
    assert {"head", "finetune"} <= read  # read whole by training_fingerprint (train/checkpoint.py)
    assert "evaluate.calibration" in read  # the temperature is fitted on val and stored in the model
    assert not any(key.startswith(("data", "split", "evaluate")) for key in read - {"evaluate.calibration"})
    assert SRC / "transfer/data/images.py" in import_closure(ROOT / "stages/features.py")

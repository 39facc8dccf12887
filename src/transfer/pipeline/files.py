"""Atomic writes and the small file formats stages exchange (JSON, CSV, torch tensors).

Every output goes to a temporary file next to its destination and is renamed into place, so an
interrupted stage never leaves a half-written file that DVC or the next stage would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from transfer.pipeline.errors import UserError

if TYPE_CHECKING:
    import pandas as pd


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it onto `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should read like any other file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_outputs(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden folder inside `folder` to write outputs into; on success move them all into `folder`.

    For outputs DVC does not cache (reports/*.json, *.csv: `persist: true` keeps DVC from deleting them
    before a run): a stage that fails anywhere in the block, even in its last MLflow call, leaves the
    previous run's files as they were instead of a mix of new and old, and never an empty folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staged.", dir=folder))
    try:
        yield staging
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):  # subfolders merge into folder's
            target = folder / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: str | os.PathLike, frame: "pd.DataFrame") -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_torch(path: str | os.PathLike, payload: Any) -> None:
    """torch.save, atomically and byte-stably.

    torch.save names every record of its zip after the file (`model/data.pkl`), so saving to a randomly
    named temporary file would change the bytes, hence DVC's hash, on every run. The payload goes to a
    file of the destination's own name inside a temporary folder next to it, then is renamed into place.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp = folder / path.name
        torch.save(payload, tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class UnreadableFileError(UserError, ValueError):
    """A tensor file that is damaged, not ours, or holds more than tensors and plain values."""


def load_torch(path: str | os.PathLike, what: str, fix: str) -> Any:
    """torch.load with weights_only=True: tensors, numbers, strings, lists, dicts; never arbitrary objects.

    Files under data/ may come from `dvc pull` or a colleague: a pickle there must not run code. Anything
    torch refuses (a pickled object, a damaged zip, not a torch file at all) is an UnreadableFileError that
    names the file, says what it should be (`what`) and what to do (`fix`).
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError, ...: all "unusable"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreadableFileError(
            f"{path} is not a usable {what}: torch refused to load it with weights_only=True "
            f"({first_line[:200]}). Files are never unpickled, as that could run code "
            f"hidden in them; {fix}"
        ) from None

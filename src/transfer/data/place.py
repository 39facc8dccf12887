"""Placing a source's images under the raw dir: the checks before it is wiped, hard links or copies, PNGs.

Files already under the raw dir (an unpacked archive) stay where they are; files elsewhere (a local folder,
a labels CSV's images) are hard-linked, or copied when linking is impossible; array datasets (IDX,
torchvision) are written as PNG files. The index lists every placed file relative to the repository root.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from transfer.data.scan import SourceError, display_path, real_path, resolve_path
from transfer.pipeline.layout import INDEX_COLUMNS


def check_raw_dir(raw_dir: Path, repo_root: Path, source_inputs: Mapping[str, str | None]) -> None:
    """raw_dir is wiped: refuse a location that would delete the repository or the source itself.

    `source_inputs` are the data params naming where the source reads (`{"path": ..., "root": ...}`).
    """
    raw, repo = raw_dir.resolve(), repo_root.resolve()
    if raw == repo or not raw.is_relative_to(repo):
        raise SourceError(f"raw dir {raw_dir} must be a folder inside the repository {repo_root}")
    for key, value in source_inputs.items():
        if not value or len(urllib.parse.urlsplit(str(value)).scheme) > 1:  # http(s)/file URLs are not local
            continue
        if resolve_path(repo_root, value).resolve().is_relative_to(raw):
            raise SourceError(
                f"data.{key} ({value}) lies inside the raw dir {raw_dir}, which is rebuilt on "
                "every run; move the source data outside it"
            )


def reset_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (cheap, same bytes); copy when linking is impossible. Never overwrites."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(os.path.realpath(src), dst)
    except FileExistsError:
        raise
    except OSError:
        with open(src, "rb") as source, open(dst, "xb") as target:  # "x": fail rather than overwrite
            shutil.copyfileobj(source, target)


def place_files(frame: pd.DataFrame, raw_dir: Path, repo_root: Path) -> pd.DataFrame:
    """Copy files that live outside raw_dir into it; return the sorted index."""
    paths = []
    for file, dest in tqdm(
        zip(frame["file"], frame["dest"]),
        total=len(frame),
        desc="copy",
        unit="file",
        leave=False,
        disable=not (frame["dest"] != "").any(),
    ):
        target = Path(os.path.abspath(file if not dest else raw_dir / dest))
        # The sources keep every path inside its root; this is the last guard before anything is written.
        if not target.is_relative_to(raw_dir) or (
            not dest and not real_path(target).is_relative_to(real_path(raw_dir))
        ):
            raise SourceError(f"{file} would be indexed or written as {target}, outside {raw_dir}; refusing")
        if dest:
            link_or_copy(Path(file), target)
        paths.append(target.relative_to(repo_root).as_posix())
    index = pd.DataFrame({"path": paths, "label": list(frame["label"]), "subset": list(frame["subset"])})
    return index.sort_values(["subset", "label", "path"]).reset_index(drop=True)[INDEX_COLUMNS]


def index_in_place(frame: pd.DataFrame, repo_root: Path) -> pd.DataFrame:
    """Index rows pointing at the files where they are (used for the report when failing)."""
    paths = [display_path(Path(f), repo_root) for f in frame["file"]]
    return pd.DataFrame({"path": paths, "label": list(frame["label"]), "subset": list(frame["subset"])})


def _safe_folder_name(label: str) -> str:
    """A class name usable as one path component (labels themselves are kept verbatim)."""
    cleaned = label.replace("/", "_").replace("\\", "_").replace("\0", "_").strip()
    return cleaned if cleaned not in ("", ".", "..") else f"class_{abs(hash(label)) % 10**8}"


def _write_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=False)


def write_arrays(
    images: Any, labels: list[str], subset: str, out_dir: Path, desc: str
) -> list[tuple[str, str, str, str]]:
    """Write images (arrays or PIL images) as out_dir/<subset>/<class>/<n>.png; candidate rows."""
    rows = []
    for n, (image, label) in enumerate(tqdm(zip(images, labels), total=len(labels), desc=desc, unit="img")):
        path = out_dir / subset / _safe_folder_name(label) / f"{n:05d}.png"
        if isinstance(image, Image.Image):
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        else:
            _write_png(np.asarray(image), path)
        rows.append((str(path), "", label, subset))
    return rows

"""Data sources: turn whatever the user has into ``data/raw/`` plus ``data/raw/index.csv``.

Every source ends the same way, so split/features/train never know where the
images came from: the files live under the raw dir (DVC tracks what was used)
and ``index.csv`` lists them as ``path,label,subset`` with paths relative to
the repository root and subset ``""`` (unsplit) or ``train``/``val``/``test``
(an official split, kept by the split stage).

Sources (``data.source`` in params.yaml), a table in :data:`SOURCES`:

* ``archive``     - zip / tar.gz by path or http(s)/file URL with a sha256 (the
                    embedded default, d2l's hotdog.zip, ...), unpacked, then read
                    as an ImageFolder (or as a labels CSV when ``labels_csv`` is set);
* ``folder``      - a local ImageFolder: ``<class>/`` folders, or ``train/``,
                    optional ``val/``, ``test/`` each holding ``<class>/`` folders;
* ``csv``         - a labels CSV plus an image folder (Kaggle dog-breed layout by default);
* ``torchvision`` - a torchvision dataset by name, written out as PNG files;
* ``idx``         - IDX files (the full Fashion-MNIST from Debian's
                    ``/usr/share/datasets/fashion-mnist`` by default), written out as PNGs.

:func:`materialise` runs a source, validates every image (full decode through
:mod:`transfer.images`, sha256 of its bytes), resolves duplicates and leakage,
applies the :class:`~transfer.data_report.Policy`, and writes ``index.csv`` and
``data_report.json`` atomically. The module needs neither DVC nor MLflow.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import string
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from transfer.data.report import IMBALANCE_WARNING, DataError, DataReport, Policy, class_balance, imbalance_message
from transfer.pipeline.errors import UserError
from transfer.data.fetch import ArchiveLimits, default_cache_dir, fetch_archive
from transfer.pipeline.files import write_csv, write_json
from transfer.data.images import ImageError, is_image_file, probe_image

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["path", "label", "subset"]
INDEX_FILE = "index.csv"
REPORT_FILE = "data_report.json"

# Folder names recognised as official splits, and the subset each one becomes.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}
# When one image sits in several official splits, the copy in the most held-out split is kept.
SUBSET_PRIORITY = {"test": 0, "val": 1, "train": 2, "": 3}

FASHION_MNIST_CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

# torchvision datasets supported by name: how to ask each for its train and test parts.
TORCHVISION_SPLITS: dict[str, tuple[str, Any, Any]] = {
    "MNIST": ("train", True, False),
    "FashionMNIST": ("train", True, False),
    "KMNIST": ("train", True, False),
    "QMNIST": ("train", True, False),
    "CIFAR10": ("train", True, False),
    "CIFAR100": ("train", True, False),
    "USPS": ("train", True, False),
    "SVHN": ("split", "train", "test"),
    "STL10": ("split", "train", "test"),
}

# Candidate frame: where each file is now, where it goes under the raw dir ("" = it is
# already there), its label and subset. Sources return one; materialise validates it.
CANDIDATE_COLUMNS = ["file", "dest", "label", "subset"]


class SourceError(UserError, ValueError):
    """The source params point at something that cannot be used as it is."""


# --- Small helpers -------------------------------------------------------------------------------

def _as_dict(params: Any) -> dict[str, Any]:
    """Accept a plain mapping or the pydantic DataParams model."""
    return dict(params.model_dump()) if hasattr(params, "model_dump") else dict(params)


def _resolve(repo_root: Path, value: str | os.PathLike) -> Path:
    """A params path: absolute as given, relative to the repository root otherwise."""
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else repo_root / path


def display_path(path: Path, repo_root: Path) -> str:
    """Repository-relative POSIX path when inside the repository, else absolute."""
    try:
        return Path(os.path.abspath(path)).relative_to(repo_root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _hidden(name: str) -> bool:
    """Dot files and macOS zip debris are not data."""
    return name.startswith(".") or name == "__MACOSX" or name == "Thumbs.db"


def _candidates(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS, dtype=object)


def _safe_folder_name(label: str) -> str:
    """A class name usable as one path component (labels themselves are kept verbatim)."""
    cleaned = label.replace("/", "_").replace("\\", "_").replace("\0", "_").strip()
    return cleaned if cleaned not in ("", ".", "..") else f"class_{abs(hash(label)) % 10**8}"


# --- ImageFolder scanning --------------------------------------------------------------------------

def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(path))


def _link_problem(link: Path, source_root: Path, walking: Path | None = None) -> str | None:
    """Why the symlink `link` must not be followed (None when it may): it leaves the source root, or it
    points at a folder being walked (`bird/up -> ..` would list every class again under bird)."""
    target = _real(link)
    if not target.is_relative_to(_real(source_root)):
        return f"is a link to {target}, outside the source folder {source_root}; copy the file in instead"
    if walking is not None and _real(walking).is_relative_to(target):
        return f"is a link to {target}, a folder that contains it (a loop); delete the link"
    return None


def _walk_files(folder: Path, source_root: Path, report: DataReport, repo_root: Path, label: str) -> list[Path]:
    """Every non-hidden file under `folder`. Folder links are followed only inside `source_root`, never
    into a folder being walked and never twice; links that leave the source are reported, not read."""
    found: list[Path] = []
    seen: set[Path] = set()
    for current, dirs, files in os.walk(folder, followlinks=True):
        real = _real(current)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        kept = []
        for name in sorted(d for d in dirs if not _hidden(d)):
            link = Path(current, name)
            problem = _link_problem(link, source_root, Path(current)) if link.is_symlink() else None
            if problem:
                shown = display_path(link, repo_root)
                report.add("unsafe_link", shown, f"{shown} {problem}", label)
            else:
                kept.append(name)
        dirs[:] = kept
        for name in sorted(f for f in files if not _hidden(f)):
            file = Path(current, name)
            problem = _link_problem(file, source_root) if file.is_symlink() else None
            if problem:
                shown = display_path(file, repo_root)
                report.add("unsafe_link", shown, f"{shown} {problem}", label)
            else:
                found.append(file)
    return found


def scan_class_folders(root: Path, subset: str, report: DataReport, repo_root: Path,
                       dest_prefix: PurePosixPath | None, source_root: Path | None = None
                       ) -> list[tuple[str, str, str, str]]:
    """Rows for `root/<class>/**/<image>`; stray files, non-images and empty classes go to the report.

    `dest_prefix` is where the files will live under the raw dir (None: they already do); no file outside
    `source_root` (default `root`) is read.
    """
    source_root = source_root or root
    rows: list[tuple[str, str, str, str]] = []
    for entry in sorted(root.iterdir()):
        if _hidden(entry.name):
            continue
        if entry.is_symlink() and (problem := _link_problem(entry, source_root, root)):
            report.add("unsafe_link", display_path(entry, repo_root), f"{display_path(entry, repo_root)} {problem}")
            continue
        if not entry.is_dir():
            if is_image_file(entry):
                report.add("unlabelled_file", display_path(entry, repo_root),
                           f"{display_path(entry, repo_root)} is not inside a class folder, so it has no label; "
                           "move it into <class>/ or delete it")
            else:
                report.add("non_image", display_path(entry, repo_root), f"{display_path(entry, repo_root)} ignored")
            continue
        label, n_images = entry.name, 0
        for file in _walk_files(entry, source_root, report, repo_root, label):
            shown = display_path(file, repo_root)
            if not is_image_file(file):
                report.add("non_image", shown, f"{shown} is not an image (by extension); ignored", label)
                continue
            dest = "" if dest_prefix is None else str(dest_prefix / file.relative_to(root).as_posix())
            rows.append((str(file), dest, label, subset))
            n_images += 1
        if n_images == 0:
            report.add("empty_class", display_path(entry, repo_root),
                       f"class folder {display_path(entry, repo_root)} has no image; add images or delete the "
                       "folder", label)
    return rows


def detect_layout(root: Path) -> str:
    """'split' when the top-level folders are train/val/test, 'flat' when they are classes."""
    dirs = {entry.name.lower() for entry in root.iterdir() if entry.is_dir() and not _hidden(entry.name)}
    split_dirs = dirs & set(SPLIT_FOLDERS)
    if not split_dirs:
        return "flat"
    if dirs - set(SPLIT_FOLDERS):
        raise SourceError(
            f"{root} mixes split folders {sorted(split_dirs)} with other folders {sorted(dirs - set(SPLIT_FOLDERS))}; "
            "set data.layout to 'flat' (all are classes) or 'split', or tidy the folder")
    if not any(SPLIT_FOLDERS[d] == "train" for d in split_dirs):
        raise SourceError(f"{root} has split folders {sorted(split_dirs)} but no train/; add train/<class>/ folders")
    return "split"


def scan_image_folder(root: Path, layout: str, report: DataReport, repo_root: Path,
                      dest_prefix: PurePosixPath | None) -> pd.DataFrame:
    """Candidates of a flat or pre-split ImageFolder rooted at `root`."""
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist or is not a folder; check data.path in params.yaml")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "flat":
        return _candidates(scan_class_folders(root, "", report, repo_root, dest_prefix))
    if layout != "split":
        raise SourceError(f"data.layout must be 'auto', 'flat' or 'split' (given {layout!r})")
    rows: list[tuple[str, str, str, str]] = []
    for entry in sorted(root.iterdir()):
        if _hidden(entry.name):
            continue
        if entry.is_symlink() and (problem := _link_problem(entry, root, root)):
            report.add("unsafe_link", display_path(entry, repo_root), f"{display_path(entry, repo_root)} {problem}")
            continue
        subset = SPLIT_FOLDERS.get(entry.name.lower())
        if subset is None or not entry.is_dir():
            report.add("non_image", display_path(entry, repo_root),
                       f"{display_path(entry, repo_root)} is not a train/val/test folder; ignored")
            continue
        prefix = None if dest_prefix is None else dest_prefix / entry.name
        rows += scan_class_folders(entry, subset, report, repo_root, prefix, source_root=root)
    if not rows:
        raise SourceError(f"no image found under {root} (layout {layout}); check data.path and data.layout")
    return _candidates(rows)


def dataset_root(path: Path) -> Path:
    """Descend through single wrapper folders (hotdog/, fashion-mnist-mini/) of an unpacked archive."""
    while True:
        entries = [e for e in path.iterdir() if not _hidden(e.name)]
        dirs = [e for e in entries if e.is_dir()]
        if len(dirs) != 1 or any(is_image_file(e) for e in entries) or dirs[0].name.lower() in SPLIT_FOLDERS:
            return path
        path = dirs[0]


# --- Labels CSV ---------------------------------------------------------------------------------

def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _relative_image_path(path: str, where: str, ident: str, shown_root: str) -> PurePosixPath:
    """The image path an id names, as a path that stays under the image folder; refuse anything else."""
    posix = PurePosixPath(path.replace("\\", "/"))
    if "\0" in path or posix.is_absolute() or ".." in posix.parts or not posix.parts or posix.parts == (".",):
        raise SourceError(f"{where}: id {ident!r} names the image {path!r}, which is not a file inside the image "
                          f"folder {shown_root}; ids (with data.image_template) must name files under data.path. "
                          "Fix or delete the row")
    return posix


def scan_labels_csv(root: Path, params: Mapping[str, Any], report: DataReport, repo_root: Path,
                    dest_prefix: PurePosixPath | None) -> pd.DataFrame:
    """Candidates from a labels CSV (read with pandas) whose ids name files under `root`."""
    csv_path = root / (params.get("labels_csv") or "labels.csv")  # an absolute labels_csv stays absolute
    id_col, label_col = params.get("id_column") or "id", params.get("label_column") or "breed"
    template, subset_col = params.get("image_template") or "train/{id}.jpg", params.get("subset_column")
    if not csv_path.is_file():
        raise SourceError(f"labels CSV {csv_path} not found; set data.labels_csv (relative to data.path)")
    if _template_fields(template) != {"id"}:
        raise SourceError(f"data.image_template must contain exactly the field {{id}}, e.g. 'train/{{id}}.jpg' "
                          f"(given {template!r})")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise SourceError(f"cannot read labels CSV {csv_path}: {exc}") from exc
    wanted = [c for c in (id_col, label_col, subset_col) if c]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise SourceError(f"labels CSV {csv_path} has no column(s) {missing}; its columns are {list(table.columns)}. "
                          "Set data.id_column / data.label_column / data.subset_column")

    shown_csv, shown_root = display_path(csv_path, repo_root), display_path(root, repo_root)
    listed: dict[str, list[tuple[str, str, str, PurePosixPath]]] = {}  # file -> (where, label, subset, relative)
    for line, record in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        ident, label = str(record[id_col]).strip(), str(record[label_col]).strip()
        subset = SPLIT_FOLDERS.get(str(record[subset_col]).strip().lower(), None) if subset_col else ""
        where = f"{shown_csv} line {line}"
        if not ident or not label:
            report.add("missing_label", where, f"{where}: empty {id_col!r} or {label_col!r}; fill it in or "
                       "delete the row", label or None)
            continue
        if subset is None:
            raise SourceError(f"{where}: {subset_col}={record[subset_col]!r} is not one of train/val/test")
        relative = _relative_image_path(template.format(id=ident), where, ident, shown_root)
        listed.setdefault(os.path.normpath(root / relative), []).append((where, label, subset, relative))

    # One id listed more than once: like byte-identical files in the folder source, different labels are a
    # label_conflict (no row kept), the same label a duplicate (across official splits: leakage, the most
    # held-out row kept).
    rows: list[tuple[str, str, str, str]] = []
    for key, entries in listed.items():
        shown_file = display_path(Path(key), repo_root)
        if len({label for _, label, _, _ in entries}) > 1:
            rows_listed = "; ".join(f"{where}: {label!r}" for where, label, _, _ in entries)
            for where, label, _, _ in entries:
                report.add("label_conflict", where, f"{shown_file} is listed under different labels ({rows_listed}); "
                           "keep one row", label)
            continue
        ordered = sorted(entries, key=lambda entry: SUBSET_PRIORITY[entry[2]])
        where, label, subset, relative = ordered[0]
        for other_where, _, other_subset, _ in ordered[1:]:
            kind = "leakage" if other_subset != subset else "duplicate"
            report.add(kind, other_where, f"{other_where}: {shown_file} is listed again (first in {where}"
                       + (f", {subset} vs {other_subset or 'unsplit'}" if kind == "leakage" else "")
                       + "); keep one row", label)
        file = root / relative
        if not file.exists() and not file.is_symlink():
            report.add("missing_file", where, f"{where}: label {label!r} for {shown_file}, "
                       "which does not exist; add the image or delete the row", label)
            continue
        if problem := _link_problem(file, root):
            report.add("unsafe_link", where, f"{where}: {shown_file} {problem}", label)
            continue
        dest = "" if dest_prefix is None else str(dest_prefix / relative)
        rows.append((str(file), dest, label, subset))
    expected = set(listed)

    # Images next to the labelled ones but absent from the CSV have no label.
    for folder in sorted({os.path.dirname(k) for k in expected}):
        if not os.path.isdir(folder):
            continue
        for entry in sorted(Path(folder).iterdir()):
            if entry.is_file() and is_image_file(entry) and os.path.normpath(entry) not in expected:
                shown = display_path(entry, repo_root)
                report.add("unlabelled_file", shown, f"{shown} has no row in {shown_csv}; add a label or delete it")
    return _candidates(rows)


# --- Sources -------------------------------------------------------------------------------------

SourceFn = Callable[[dict[str, Any], Path, Path], tuple[pd.DataFrame, DataReport]]


def _local_source_dir(params: Mapping[str, Any], repo_root: Path) -> Path:
    if not params.get("path"):
        raise SourceError(f"data.source {params['source']!r} needs data.path (the folder holding the images)")
    return _resolve(repo_root, params["path"])


def source_folder(params: dict[str, Any], raw_dir: Path, repo_root: Path) -> tuple[pd.DataFrame, DataReport]:
    """A local ImageFolder, copied (hard-linked when possible) to raw_dir/<folder name>/."""
    report = DataReport("folder")
    root = _local_source_dir(params, repo_root)
    frame = scan_image_folder(root, params.get("layout", "auto"), report, repo_root, PurePosixPath(root.name))
    return frame, report


def source_csv(params: dict[str, Any], raw_dir: Path, repo_root: Path) -> tuple[pd.DataFrame, DataReport]:
    """A labels CSV plus an image folder, copied to raw_dir/<folder name>/."""
    report = DataReport("csv")
    root = _local_source_dir(params, repo_root)
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist; check data.path in params.yaml")
    return scan_labels_csv(root, params, report, repo_root, PurePosixPath(root.name)), report


def _archive_location(url: str, repo_root: Path) -> str:
    """Relative archive paths in params are relative to the repository root."""
    scheme = urllib.parse.urlsplit(url).scheme
    return url if len(scheme) > 1 else str(_resolve(repo_root, url))


def source_archive(params: dict[str, Any], raw_dir: Path, repo_root: Path) -> tuple[pd.DataFrame, DataReport]:
    """An archive (path or URL + sha256), unpacked into raw_dir and read in place."""
    report = DataReport("archive")
    if not params.get("url") or not params.get("sha256"):
        raise SourceError("data.source 'archive' needs data.url and data.sha256")
    limits = ArchiveLimits(**{key: params[f"archive_{key}"] for key in ("max_bytes", "max_files", "max_ratio")
                              if params.get(f"archive_{key}") is not None})
    fetch_archive(_archive_location(params["url"], repo_root), params["sha256"], raw_dir, limits=limits)
    root = dataset_root(raw_dir)
    if params.get("path"):  # a sub-folder of the archive, e.g. 'hotdog' or 'dog-breed-identification'
        root = raw_dir / params["path"]
        if not _real(root).is_relative_to(_real(raw_dir)):
            raise SourceError(f"data.path {params['path']!r} leads outside the unpacked archive; name a folder "
                              "inside it")
        if not root.is_dir():
            raise SourceError(f"data.path {params['path']!r} is not a folder inside the archive {params['url']}")
    if params.get("labels_csv"):
        return scan_labels_csv(root, params, report, repo_root, None), report
    return scan_image_folder(root, params.get("layout", "auto"), report, repo_root, None), report


def _write_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=False)


def write_arrays(images: Any, labels: list[str], subset: str, out_dir: Path, desc: str) -> list[tuple[str, str, str, str]]:
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


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), optionally gzipped, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise SourceError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SourceError(f"{path} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def source_idx(params: dict[str, Any], raw_dir: Path, repo_root: Path) -> tuple[pd.DataFrame, DataReport]:
    """IDX files (default: the full Fashion-MNIST from Debian), official train/test kept, as PNGs."""
    report = DataReport("idx")
    root = _resolve(repo_root, params.get("path") or DEBIAN_FASHION_MNIST)
    classes = list(params.get("classes") or FASHION_MNIST_CLASSES)
    rows: list[tuple[str, str, str, str]] = []
    for subset, stem in (("train", "train"), ("test", "t10k")):
        found = {kind: next((p for p in (root / f"{stem}-{kind}-ubyte.gz", root / f"{stem}-{kind}-ubyte")
                             if p.is_file()), None) for kind in ("images-idx3", "labels-idx1")}
        if None in found.values():
            hint = " (apt-get install dataset-fashion-mnist)" if str(root) == DEBIAN_FASHION_MNIST else ""
            raise SourceError(f"{root} lacks {stem}-images-idx3-ubyte[.gz] / {stem}-labels-idx1-ubyte[.gz]{hint}")
        images, labels = read_idx(found["images-idx3"]), read_idx(found["labels-idx1"])
        if len(images) != len(labels) or int(labels.max()) >= len(classes):
            raise SourceError(f"{root}: {stem} has {len(images)} images, {len(labels)} labels, label max "
                              f"{int(labels.max())}; data.classes has {len(classes)} names")
        rows += write_arrays(images, [classes[i] for i in labels], subset, raw_dir / root.name, f"write {stem}")
    return _candidates(rows), report


def _torchvision_dataset(name: str, root: Path, part: str, download: bool) -> Any:
    if name not in TORCHVISION_SPLITS:
        raise SourceError(f"torchvision dataset {name!r} is not supported; choose one of {sorted(TORCHVISION_SPLITS)}")
    import torchvision  # late import: only this source needs it
    arg, train_value, test_value = TORCHVISION_SPLITS[name]
    cls = getattr(torchvision.datasets, name)
    try:
        return cls(root=str(root), download=download, **{arg: train_value if part == "train" else test_value})
    except Exception as exc:  # noqa: BLE001 - torchvision raises RuntimeError, URLError, ... here
        raise SourceError(
            f"torchvision could not {'download or ' if download else ''}find {name} ({part}) under {root}: {exc}. "
            f"Offline? Download it once on a connected machine (torchvision.datasets.{name}(root, download=True)) "
            "and point data.root at that folder.") from exc


def source_torchvision(params: dict[str, Any], raw_dir: Path, repo_root: Path) -> tuple[pd.DataFrame, DataReport]:
    """A torchvision dataset by name (train and test parts), written out as PNG files."""
    report = DataReport("torchvision")
    name = params.get("name")
    if not name:
        raise SourceError(f"data.source 'torchvision' needs data.name, one of {sorted(TORCHVISION_SPLITS)}")
    root = _resolve(repo_root, params.get("root") or default_cache_dir().parent / "torchvision")
    rows: list[tuple[str, str, str, str]] = []
    for part in ("train", "test"):
        dataset = _torchvision_dataset(name, root, part, bool(params.get("download", True)))
        classes = list(getattr(dataset, "classes", []) or [])
        images, labels = [], []
        for image, target in tqdm(dataset, desc=f"read {name} {part}", unit="img", leave=False):
            images.append(image)
            labels.append(classes[int(target)] if classes else str(int(target)))
        rows += write_arrays(images, labels, part, raw_dir / name, f"write {name} {part}")
    return _candidates(rows), report


SOURCES: dict[str, SourceFn] = {
    "archive": source_archive,
    "folder": source_folder,
    "csv": source_csv,
    "torchvision": source_torchvision,
    "idx": source_idx,
}


# --- Validation, duplicates, placement -----------------------------------------------------------

def probe_all(files: list[str], report: DataReport, repo_root: Path, labels: list[str],
              max_pixels: int | None = None) -> list[str | None]:
    """sha256 of every file that decodes, None (and an issue) for the rest; threads overlap the I/O."""
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}

    def one(file: str) -> str | ImageError:
        try:
            return probe_image(file, **kwargs).sha256
        except ImageError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        results = list(tqdm(pool.map(one, files, chunksize=64), total=len(files), desc="validate", unit="img"))
    hashes: list[str | None] = []
    for file, label, result in zip(files, labels, results):
        if isinstance(result, ImageError):
            shown = display_path(Path(file), repo_root)
            report.add(result.reason, shown, str(result).replace(result.path, shown, 1), label)
            hashes.append(None)
        else:
            hashes.append(result)
    return hashes


def find_duplicates(frame: pd.DataFrame, hash_column: str = "sha256") -> list[pd.DataFrame]:
    """Groups of rows whose files are byte-identical (same sha256), largest first."""
    counts = frame[hash_column].value_counts()
    return [frame[frame[hash_column] == digest] for digest in counts[counts > 1].index]


def resolve_duplicates(frame: pd.DataFrame, report: DataReport, repo_root: Path) -> pd.DataFrame:
    """Drop byte-identical copies: conflicting labels -> label_conflict (all copies dropped);
    same label across official splits -> leakage (the most held-out copy kept); else duplicate (first kept)."""
    drop: set[Any] = set()
    for group in find_duplicates(frame):
        shown = [f"{display_path(Path(f), repo_root)} ({lab}{', ' + sub if sub else ''})"
                 for f, lab, sub in zip(group["file"], group["label"], group["subset"])]
        if group["label"].nunique() > 1:
            for row, label in zip(group.itertuples(), group["label"]):
                report.add("label_conflict", display_path(Path(row.file), repo_root),
                           "byte-identical images under different labels: " + " = ".join(shown), label)
            drop.update(group.index)
            continue
        ordered = group.assign(_p=group["subset"].map(SUBSET_PRIORITY)).sort_values(["_p", "file"])
        keeper = ordered.iloc[0]
        for index, row in ordered.iloc[1:].iterrows():
            kind = "leakage" if row["subset"] != keeper["subset"] else "duplicate"
            report.add(kind, display_path(Path(row["file"]), repo_root),
                       f"{display_path(Path(row['file']), repo_root)} is a byte-identical copy of "
                       f"{display_path(Path(keeper['file']), repo_root)}"
                       + (f" (in {row['subset'] or 'unsplit'} vs {keeper['subset']})" if kind == "leakage" else ""),
                       row["label"])
            drop.add(index)
    return frame.drop(index=list(drop))


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


def _check_raw_dir(raw_dir: Path, repo_root: Path, params: Mapping[str, Any]) -> None:
    """raw_dir is wiped: refuse a location that would delete the repository or the source itself."""
    raw, repo = raw_dir.resolve(), repo_root.resolve()
    if raw == repo or not raw.is_relative_to(repo):
        raise SourceError(f"raw dir {raw_dir} must be a folder inside the repository {repo_root}")
    # For the archive source data.path names a folder *inside* the archive, so it is not checked.
    keys = ("url",) if params.get("source", "archive") == "archive" else ("path", "root")
    for key in keys:
        value = params.get(key)
        if not value or len(urllib.parse.urlsplit(str(value)).scheme) > 1:  # http(s)/file URLs are not local
            continue
        if _resolve(repo_root, value).resolve().is_relative_to(raw):
            raise SourceError(f"data.{key} ({value}) lies inside the raw dir {raw_dir}, which is rebuilt on "
                              "every run; move the source data outside it")


def _reset_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def summarise(index: pd.DataFrame) -> dict[str, Any]:
    """Image counts per class and per subset, for the report and the printed summary."""
    per_class = {label: {(s or "unsplit"): int(n) for s, n in group["subset"].value_counts().sort_index().items()}
                 for label, group in index.groupby("label")}
    per_subset = {(s or "unsplit"): int(n) for s, n in index["subset"].value_counts().sort_index().items()}
    return {"images": int(len(index)), "classes": int(index["label"].nunique()),
            "per_subset": per_subset, "per_class": per_class}


def materialise(params: Any, raw_dir: str | os.PathLike, repo_root: str | os.PathLike,
                policy: Policy | Mapping[str, str] | None = None) -> tuple[pd.DataFrame, DataReport]:
    """Run the source in `params` (data section), validate, and write raw_dir/index.csv + data_report.json.

    Returns the index (path,label,subset; paths relative to `repo_root`) and the report.
    Raises SourceError for unusable params and DataError when the policy says to fail;
    in both data cases the report is written first so the files can be inspected.
    """
    params = _as_dict(params)
    repo_root, raw_dir = Path(repo_root).resolve(), Path(raw_dir).resolve()
    if policy is None:
        policy = Policy.from_mapping(params.get("policy"))
    elif not isinstance(policy, Policy):
        policy = Policy.from_mapping(policy)
    name = params.get("source", "archive")
    if name not in SOURCES:
        raise SourceError(f"unknown data.source {name!r}; choose one of {sorted(SOURCES)}")
    _check_raw_dir(raw_dir, repo_root, params)
    _reset_dir(raw_dir)

    frame, report = SOURCES[name](params, raw_dir, repo_root)
    frame = frame.reset_index(drop=True)
    frame["sha256"] = probe_all(list(frame["file"]), report, repo_root, list(frame["label"]),
                                params.get("max_pixels"))
    frame = resolve_duplicates(frame[frame["sha256"].notna()], report, repo_root)
    report_path = raw_dir / REPORT_FILE
    shown_report = display_path(report_path, repo_root)
    failing = report.failures(policy)
    # When failing, nothing is copied: the report lists the files where they are.
    index = _index_in_place(frame, repo_root) if failing else _place(frame, raw_dir, repo_root)
    warn_above = params.get("imbalance_warning") or IMBALANCE_WARNING
    balance = class_balance(index["label"].value_counts().to_dict(), warn_above)
    write_json(report_path, report.to_dict(policy, {**summarise(index), **balance}))
    report.raise_for_policy(policy, shown_report)
    if index.empty:
        raise DataError(f"source {name!r} produced no usable image; see {shown_report}")
    write_csv(raw_dir / INDEX_FILE, index)
    warning = imbalance_message(balance, warn_above)
    if warning:
        log.warning(f"data: {warning}")
    return index, report


def summary_line(index: pd.DataFrame, report: DataReport, raw_dir: str | os.PathLike,
                 repo_root: str | os.PathLike) -> str:
    """The download stage's one line: images, classes, subsets, what the report counted and where it is."""
    report_path = display_path(Path(raw_dir) / REPORT_FILE, Path(repo_root))
    per_subset = ", ".join(f"{k}={v}" for k, v in summarise(index)["per_subset"].items())
    return (f"data: {len(index)} images in {index['label'].nunique()} classes ({per_subset}); "
            f"{report.summary_line()}; report: {report_path}")


def _index_in_place(frame: pd.DataFrame, repo_root: Path) -> pd.DataFrame:
    """Index rows pointing at the files where they are (used for the report when failing)."""
    paths = [display_path(Path(f), repo_root) for f in frame["file"]]
    return pd.DataFrame({"path": paths, "label": list(frame["label"]), "subset": list(frame["subset"])})


def _place(frame: pd.DataFrame, raw_dir: Path, repo_root: Path) -> pd.DataFrame:
    """Copy files that live outside raw_dir into it; return the sorted index."""
    paths = []
    for file, dest in tqdm(zip(frame["file"], frame["dest"]), total=len(frame), desc="copy", unit="file",
                           leave=False, disable=not (frame["dest"] != "").any()):
        target = Path(os.path.abspath(file if not dest else raw_dir / dest))
        # The sources keep every path inside its root; this is the last guard before anything is written.
        if not target.is_relative_to(raw_dir) or (not dest and not _real(target).is_relative_to(_real(raw_dir))):
            raise SourceError(f"{file} would be indexed or written as {target}, outside {raw_dir}; refusing")
        if dest:
            link_or_copy(Path(file), target)
        paths.append(target.relative_to(repo_root).as_posix())
    index = pd.DataFrame({"path": paths, "label": list(frame["label"]), "subset": list(frame["subset"])})
    return index.sort_values(["subset", "label", "path"]).reset_index(drop=True)[INDEX_COLUMNS]

"""Scanning and checking what a source points at: image folders, labels CSVs, every image, duplicates.

A source (transfer.data.sources) turns its params into a candidate frame (`CANDIDATE_COLUMNS`: where each
file is now, where it goes under the raw dir, its label and subset). Scanning a folder or a labels CSV
records every file it skips in the `DataReport`; `probe_all` then decodes every image and hashes its
bytes, and `resolve_duplicates` drops byte-identical copies (label conflicts, leakage across official
splits, plain duplicates). Nothing here writes under the raw dir: that is transfer.data.place.
"""

from __future__ import annotations

import os
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from tqdm import tqdm

from transfer.data.images import ImageError, is_image_file, probe_image
from transfer.data.report import DataReport
from transfer.pipeline.errors import UserError

# Folder names recognised as official splits, and the subset each one becomes.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


# When one image sits in several official splits, the copy in the most held-out split is kept.
SUBSET_PRIORITY = {"test": 0, "val": 1, "train": 2, "": 3}

# Candidate frame: where each file is now, where it goes under the raw dir ("" = it is
# already there), its label and subset. Sources return one; materialise validates it.
CANDIDATE_COLUMNS = ["file", "dest", "label", "subset"]


class SourceError(UserError, ValueError):
    """The source params point at something that cannot be used as it is."""


# --- Paths ---------------------------------------------------------------------------------------


def resolve_path(repo_root: Path, value: str | os.PathLike) -> Path:
    """A params path: absolute as given, relative to the repository root otherwise."""
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else repo_root / path


def display_path(path: Path, repo_root: Path) -> str:
    """Repository-relative POSIX path when inside the repository, else absolute."""
    try:
        return Path(os.path.abspath(path)).relative_to(repo_root.resolve()).as_posix()
    except ValueError:
        return str(path)


def real_path(path: Path | str) -> Path:
    return Path(os.path.realpath(path))


def _hidden(name: str) -> bool:
    """Dot files and macOS zip debris are not data."""
    return name.startswith(".") or name == "__MACOSX" or name == "Thumbs.db"


def candidate_frame(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=CANDIDATE_COLUMNS, dtype=object)


# --- ImageFolder scanning --------------------------------------------------------------------------


def _link_problem(link: Path, source_root: Path, walking: Path | None = None) -> str | None:
    """Why the symlink `link` must not be followed (None when it may): it leaves the source root, or it
    points at a folder being walked (`bird/up -> ..` would list every class again under bird)."""
    target = real_path(link)
    if not target.is_relative_to(real_path(source_root)):
        return f"is a link to {target}, outside the source folder {source_root}; copy the file in instead"
    if walking is not None and real_path(walking).is_relative_to(target):
        return f"is a link to {target}, a folder that contains it (a loop); delete the link"
    return None


def _walk_files(folder: Path, source_root: Path, report: DataReport, repo_root: Path, label: str) -> list[Path]:
    """Every non-hidden file under `folder`. Folder links are followed only inside `source_root`, never
    into a folder being walked and never twice; links that leave the source are reported, not read."""
    found: list[Path] = []
    seen: set[Path] = set()
    for current, dirs, files in os.walk(folder, followlinks=True):
        real = real_path(current)
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


def scan_class_folders(
    root: Path,
    subset: str,
    report: DataReport,
    repo_root: Path,
    dest_prefix: PurePosixPath | None,
    source_root: Path | None = None,
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
                report.add(
                    "unlabelled_file",
                    display_path(entry, repo_root),
                    f"{display_path(entry, repo_root)} is not inside a class folder, so it has no label; "
                    "move it into <class>/ or delete it",
                )
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
            report.add(
                "empty_class",
                display_path(entry, repo_root),
                f"class folder {display_path(entry, repo_root)} has no image; add images or delete the folder",
                label,
            )
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
            "set data.layout to 'flat' (all are classes) or 'split', or tidy the folder"
        )
    if not any(SPLIT_FOLDERS[d] == "train" for d in split_dirs):
        raise SourceError(f"{root} has split folders {sorted(split_dirs)} but no train/; add train/<class>/ folders")
    return "split"


def scan_image_folder(
    root: Path, layout: str, report: DataReport, repo_root: Path, dest_prefix: PurePosixPath | None
) -> pd.DataFrame:
    """Candidates of a flat or pre-split ImageFolder rooted at `root`."""
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist or is not a folder; check data.path in params.yaml")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "flat":
        return candidate_frame(scan_class_folders(root, "", report, repo_root, dest_prefix))
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
            report.add(
                "non_image",
                display_path(entry, repo_root),
                f"{display_path(entry, repo_root)} is not a train/val/test folder; ignored",
            )
            continue
        prefix = None if dest_prefix is None else dest_prefix / entry.name
        rows += scan_class_folders(entry, subset, report, repo_root, prefix, source_root=root)
    if not rows:
        raise SourceError(f"no image found under {root} (layout {layout}); check data.path and data.layout")
    return candidate_frame(rows)


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
        raise SourceError(
            f"{where}: id {ident!r} names the image {path!r}, which is not a file inside the image "
            f"folder {shown_root}; ids (with data.image_template) must name files under data.path. "
            "Fix or delete the row"
        )
    return posix


def scan_labels_csv(
    root: Path,
    labels_csv: str,
    id_col: str,
    label_col: str,
    template: str,
    subset_col: str | None,
    report: DataReport,
    repo_root: Path,
    dest_prefix: PurePosixPath | None,
) -> pd.DataFrame:
    """Candidates from a labels CSV (read with pandas) whose ids (column `id_col`) name files under `root`
    through `template` (`train/{id}.jpg`); labels in `label_col`, official subsets in `subset_col` if any."""
    csv_path = root / labels_csv  # an absolute labels_csv stays absolute
    if not csv_path.is_file():
        raise SourceError(f"labels CSV {csv_path} not found; set data.labels_csv (relative to data.path)")
    if _template_fields(template) != {"id"}:
        raise SourceError(
            f"data.image_template must contain exactly the field {{id}}, e.g. 'train/{{id}}.jpg' (given {template!r})"
        )
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise SourceError(f"cannot read labels CSV {csv_path}: {exc}") from exc
    wanted = [c for c in (id_col, label_col, subset_col) if c]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise SourceError(
            f"labels CSV {csv_path} has no column(s) {missing}; its columns are {list(table.columns)}. "
            "Set data.id_column / data.label_column / data.subset_column"
        )

    shown_csv, shown_root = display_path(csv_path, repo_root), display_path(root, repo_root)
    listed: dict[str, list[tuple[str, str, str, PurePosixPath]]] = {}  # file -> (where, label, subset, relative)
    for line, record in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        ident, label = str(record[id_col]).strip(), str(record[label_col]).strip()
        subset = SPLIT_FOLDERS.get(str(record[subset_col]).strip().lower(), None) if subset_col else ""
        where = f"{shown_csv} line {line}"
        if not ident or not label:
            report.add(
                "missing_label",
                where,
                f"{where}: empty {id_col!r} or {label_col!r}; fill it in or delete the row",
                label or None,
            )
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
                report.add(
                    "label_conflict",
                    where,
                    f"{shown_file} is listed under different labels ({rows_listed}); keep one row",
                    label,
                )
            continue
        ordered = sorted(entries, key=lambda entry: SUBSET_PRIORITY[entry[2]])
        where, label, subset, relative = ordered[0]
        for other_where, _, other_subset, _ in ordered[1:]:
            kind = "leakage" if other_subset != subset else "duplicate"
            report.add(
                kind,
                other_where,
                f"{other_where}: {shown_file} is listed again (first in {where}"
                + (f", {subset} vs {other_subset or 'unsplit'}" if kind == "leakage" else "")
                + "); keep one row",
                label,
            )
        file = root / relative
        if not file.exists() and not file.is_symlink():
            report.add(
                "missing_file",
                where,
                f"{where}: label {label!r} for {shown_file}, which does not exist; add the image or delete the row",
                label,
            )
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
    return candidate_frame(rows)


# --- Checking every image, duplicates ------------------------------------------------------------


def probe_all(
    files: list[str], report: DataReport, repo_root: Path, labels: list[str], max_pixels: int | None = None
) -> list[str | None]:
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
        shown = [
            f"{display_path(Path(f), repo_root)} ({lab}{', ' + sub if sub else ''})"
            for f, lab, sub in zip(group["file"], group["label"], group["subset"])
        ]
        if group["label"].nunique() > 1:
            for row, label in zip(group.itertuples(), group["label"]):
                report.add(
                    "label_conflict",
                    display_path(Path(row.file), repo_root),
                    "byte-identical images under different labels: " + " = ".join(shown),
                    label,
                )
            drop.update(group.index)
            continue
        ordered = group.assign(_p=group["subset"].map(SUBSET_PRIORITY)).sort_values(["_p", "file"])
        keeper = ordered.iloc[0]
        for index, row in ordered.iloc[1:].iterrows():
            kind = "leakage" if row["subset"] != keeper["subset"] else "duplicate"
            report.add(
                kind,
                display_path(Path(row["file"]), repo_root),
                f"{display_path(Path(row['file']), repo_root)} is a byte-identical copy of "
                f"{display_path(Path(keeper['file']), repo_root)}"
                + (f" (in {row['subset'] or 'unsplit'} vs {keeper['subset']})" if kind == "leakage" else ""),
                row["label"],
            )
            drop.add(index)
    return frame.drop(index=list(drop))

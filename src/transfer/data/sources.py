"""Data sources: turn whatever the user has into `data/raw/` plus `data/raw/index.csv`.

Every source ends the same way, so split/features/train never know where the images came from: the files
live under the raw dir (DVC tracks what was used) and `index.csv` lists them as `path,label,subset` with
paths relative to the repository root and subset `""` (unsplit) or `train`/`val`/`test` (an official split,
kept by the split stage).

Sources (`data.source` in params.yaml), a table in `SOURCES`:

* `archive`     - zip / tar.gz by path or http(s)/file URL with a sha256 (the embedded default, d2l's
                  hotdog.zip, ...), unpacked, then read as an ImageFolder (or as a labels CSV when
                  `labels_csv` is set);
* `folder`      - a local ImageFolder: `<class>/` folders, or `train/`, optional `val/`, `test/` each
                  holding `<class>/` folders;
* `csv`         - a labels CSV plus an image folder (Kaggle dog-breed layout by default);
* `torchvision` - a torchvision dataset by name, written out as PNG files;
* `idx`         - IDX files (the full Fashion-MNIST from Debian's `/usr/share/datasets/fashion-mnist` by
                  default), written out as PNGs.

`materialise` runs a source, checks every image and resolves duplicates and leakage (transfer.data.scan),
applies `data.policy` (transfer.data.report), places the files under the raw dir (transfer.data.place) and
writes `index.csv` and `data_report.json` atomically. The module needs neither DVC nor MLflow.
"""

from __future__ import annotations

import gzip
import logging
import os
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from pydantic import ValidationError
from tqdm import tqdm

from transfer.data.fetch import ArchiveLimits, default_cache_dir, fetch_archive
from transfer.data.place import check_raw_dir, index_in_place, place_files, reset_dir, write_arrays
from transfer.data.report import DataError, DataReport, Policy, class_balance, imbalance_message
from transfer.data.scan import (
    SourceError,
    candidate_frame,
    dataset_root,
    display_path,
    probe_all,
    real_path,
    resolve_duplicates,
    resolve_path,
    scan_image_folder,
    scan_labels_csv,
)
from transfer.pipeline.files import write_csv, write_json
from transfer.pipeline.layout import DATA_REPORT_NAME, INDEX_NAME
from transfer.pipeline.params import DataParams

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
]
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


SourceFn = Callable[[DataParams, Path, Path], tuple[pd.DataFrame, DataReport]]


def _local_source_dir(params: DataParams, repo_root: Path) -> Path:
    if not params.path:
        raise SourceError(f"data.source {params.source!r} needs data.path (the folder holding the images)")
    return resolve_path(repo_root, params.path)


def _scan_labels_csv(
    root: Path, params: DataParams, report: DataReport, repo_root: Path, dest_prefix: PurePosixPath | None
) -> pd.DataFrame:
    return scan_labels_csv(
        root,
        params.labels_csv or "labels.csv",
        params.id_column,
        params.label_column,
        params.image_template,
        params.subset_column,
        report,
        repo_root,
        dest_prefix,
    )


def source_folder(params: DataParams, raw_dir: Path, repo_root: Path) -> tuple[pd.DataFrame, DataReport]:
    """A local ImageFolder, copied (hard-linked when possible) to raw_dir/<folder name>/."""
    report = DataReport("folder")
    root = _local_source_dir(params, repo_root)
    frame = scan_image_folder(root, params.layout, report, repo_root, PurePosixPath(root.name))
    return frame, report


def source_csv(params: DataParams, raw_dir: Path, repo_root: Path) -> tuple[pd.DataFrame, DataReport]:
    """A labels CSV plus an image folder, copied to raw_dir/<folder name>/."""
    report = DataReport("csv")
    root = _local_source_dir(params, repo_root)
    if not root.is_dir():
        raise SourceError(f"image folder {root} does not exist; check data.path in params.yaml")
    return _scan_labels_csv(root, params, report, repo_root, PurePosixPath(root.name)), report


def _archive_location(url: str, repo_root: Path) -> str:
    """Relative archive paths in params are relative to the repository root."""
    scheme = urllib.parse.urlsplit(url).scheme
    return url if len(scheme) > 1 else str(resolve_path(repo_root, url))


def source_archive(params: DataParams, raw_dir: Path, repo_root: Path) -> tuple[pd.DataFrame, DataReport]:
    """An archive (path or URL + sha256), unpacked into raw_dir and read in place."""
    report = DataReport("archive")
    if not params.url or not params.sha256:
        raise SourceError("data.source 'archive' needs data.url and data.sha256")
    limits = ArchiveLimits(
        max_bytes=params.archive_max_bytes, max_files=params.archive_max_files, max_ratio=params.archive_max_ratio
    )
    fetch_archive(_archive_location(params.url, repo_root), params.sha256, raw_dir, limits=limits)
    root = dataset_root(raw_dir)
    if params.path:  # a sub-folder of the archive, e.g. 'hotdog' or 'dog-breed-identification'
        root = raw_dir / params.path
        if not real_path(root).is_relative_to(real_path(raw_dir)):
            raise SourceError(f"data.path {params.path!r} leads outside the unpacked archive; name a folder inside it")
        if not root.is_dir():
            raise SourceError(f"data.path {params.path!r} is not a folder inside the archive {params.url}")
    if params.labels_csv:
        return _scan_labels_csv(root, params, report, repo_root, None), report
    return scan_image_folder(root, params.layout, report, repo_root, None), report


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), optionally gzipped, as a numpy array.

    Not torchvision's reader (`torchvision.datasets.mnist.read_image_file`): in torchvision 0.29 it opens
    the path with plain `open` (Debian's Fashion-MNIST is gzipped), checks the header with `assert`, and
    reads with `strict=False`, so a truncated file fails in a reshape instead of naming the file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise SourceError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise SourceError(f"{path} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def source_idx(params: DataParams, raw_dir: Path, repo_root: Path) -> tuple[pd.DataFrame, DataReport]:
    """IDX files (default: the full Fashion-MNIST from Debian), official train/test kept, as PNGs."""
    report = DataReport("idx")
    root = resolve_path(repo_root, params.path or DEBIAN_FASHION_MNIST)
    classes = list(params.classes or FASHION_MNIST_CLASSES)
    rows: list[tuple[str, str, str, str]] = []
    for subset, stem in (("train", "train"), ("test", "t10k")):
        found = {
            kind: next(
                (p for p in (root / f"{stem}-{kind}-ubyte.gz", root / f"{stem}-{kind}-ubyte") if p.is_file()), None
            )
            for kind in ("images-idx3", "labels-idx1")
        }
        if None in found.values():
            hint = " (apt-get install dataset-fashion-mnist)" if str(root) == DEBIAN_FASHION_MNIST else ""
            raise SourceError(f"{root} lacks {stem}-images-idx3-ubyte[.gz] / {stem}-labels-idx1-ubyte[.gz]{hint}")
        images, labels = read_idx(found["images-idx3"]), read_idx(found["labels-idx1"])
        if len(images) != len(labels) or int(labels.max()) >= len(classes):
            raise SourceError(
                f"{root}: {stem} has {len(images)} images, {len(labels)} labels, label max "
                f"{int(labels.max())}; data.classes has {len(classes)} names"
            )
        rows += write_arrays(images, [classes[i] for i in labels], subset, raw_dir / root.name, f"write {stem}")
    return candidate_frame(rows), report


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
            "and point data.root at that folder."
        ) from exc


def source_torchvision(params: DataParams, raw_dir: Path, repo_root: Path) -> tuple[pd.DataFrame, DataReport]:
    """A torchvision dataset by name (train and test parts), written out as PNG files."""
    report = DataReport("torchvision")
    name = params.name
    if not name:
        raise SourceError(f"data.source 'torchvision' needs data.name, one of {sorted(TORCHVISION_SPLITS)}")
    root = resolve_path(repo_root, params.root or default_cache_dir().parent / "torchvision")
    rows: list[tuple[str, str, str, str]] = []
    for part in ("train", "test"):
        dataset = _torchvision_dataset(name, root, part, params.download)
        classes = list(getattr(dataset, "classes", []) or [])
        images, labels = [], []
        for image, target in tqdm(dataset, desc=f"read {name} {part}", unit="img", leave=False):
            images.append(image)
            labels.append(classes[int(target)] if classes else str(int(target)))
        rows += write_arrays(images, labels, part, raw_dir / name, f"write {name} {part}")
    return candidate_frame(rows), report


SOURCES: dict[str, SourceFn] = {
    "archive": source_archive,
    "folder": source_folder,
    "csv": source_csv,
    "torchvision": source_torchvision,
    "idx": source_idx,
}


# --- The download stage: one source, checked and placed ------------------------------------------


def summarise(index: pd.DataFrame) -> dict[str, Any]:
    """Image counts per class and per subset, for the report and the printed summary."""
    per_class = {
        label: {(s or "unsplit"): int(n) for s, n in group["subset"].value_counts().sort_index().items()}
        for label, group in index.groupby("label")
    }
    per_subset = {(s or "unsplit"): int(n) for s, n in index["subset"].value_counts().sort_index().items()}
    return {
        "images": int(len(index)),
        "classes": int(index["label"].nunique()),
        "per_subset": per_subset,
        "per_class": per_class,
    }


def data_params(params: DataParams | Mapping[str, Any]) -> DataParams:
    """The data section as the schema reads it: a plain mapping is validated and given the schema's defaults."""
    if isinstance(params, DataParams):
        return params
    name = params.get("source", "archive")
    if name not in SOURCES:
        raise SourceError(f"unknown data.source {name!r}; choose one of {sorted(SOURCES)}")
    try:
        return DataParams.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(
            f"data.{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()
        )
        raise SourceError(f"data params are invalid: {problems}") from None


def materialise(
    params: DataParams | Mapping[str, Any],
    raw_dir: str | os.PathLike,
    repo_root: str | os.PathLike,
    policy: Policy | Mapping[str, str] | None = None,
) -> tuple[pd.DataFrame, DataReport]:
    """Run the source in `params` (data section), validate, and write raw_dir/index.csv + data_report.json.

    Returns the index (path,label,subset; paths relative to `repo_root`) and the report.
    Raises SourceError for unusable params and DataError when the policy says to fail;
    in both data cases the report is written first so the files can be inspected.
    """
    params = data_params(params)
    repo_root, raw_dir = Path(repo_root).resolve(), Path(raw_dir).resolve()
    policy = params.policy if policy is None else Policy.model_validate(policy)
    name = params.source
    # For the archive source data.path names a folder *inside* the archive, so only the url is checked.
    inputs = {"url": params.url} if name == "archive" else {"path": params.path, "root": params.root}
    check_raw_dir(raw_dir, repo_root, inputs)
    reset_dir(raw_dir)

    frame, report = SOURCES[name](params, raw_dir, repo_root)
    frame = frame.reset_index(drop=True)
    frame["sha256"] = probe_all(list(frame["file"]), report, repo_root, list(frame["label"]), params.max_pixels)
    frame = resolve_duplicates(frame[frame["sha256"].notna()], report, repo_root)
    report_path = raw_dir / DATA_REPORT_NAME
    shown_report = display_path(report_path, repo_root)
    failing = report.failures(policy)
    # When failing, nothing is copied: the report lists the files where they are.
    index = index_in_place(frame, repo_root) if failing else place_files(frame, raw_dir, repo_root)
    warn_above = params.imbalance_warning
    balance = class_balance(index["label"].value_counts().to_dict(), warn_above)
    write_json(report_path, report.to_dict(policy, {**summarise(index), **balance}))
    report.raise_for_policy(policy, shown_report)
    if index.empty:
        raise DataError(f"source {name!r} produced no usable image; see {shown_report}")
    write_csv(raw_dir / INDEX_NAME, index)
    warning = imbalance_message(balance, warn_above)
    if warning:
        log.warning(f"data: {warning}")
    return index, report


def summary_line(
    index: pd.DataFrame, report: DataReport, raw_dir: str | os.PathLike, repo_root: str | os.PathLike
) -> str:
    """The download stage's one line: images, classes, subsets, what the report counted and where it is."""
    report_path = display_path(Path(raw_dir) / DATA_REPORT_NAME, Path(repo_root))
    per_subset = ", ".join(f"{k}={v}" for k, v in summarise(index)["per_subset"].items())
    return (
        f"data: {len(index)} images in {index['label'].nunique()} classes ({per_subset}); "
        f"{report.summary_line()}; report: {report_path}"
    )

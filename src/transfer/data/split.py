"""Index, stratified split and manifests: the data side between raw images and features.

Data flows one way: the download stage writes an *index* (`data/raw/index.csv`: path, label, subset),
the split stage turns it into *manifests* (`data/split/{train,val,test}.csv`: path, label) and the class
list (`data/split/classes.json`), and every later stage reads only manifests. Paths in every CSV are
POSIX paths relative to the repository root.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from transfer.pipeline.errors import UserError
from transfer.pipeline.files import read_json, write_csv, write_json
from transfer.pipeline.layout import INDEX_COLUMNS

SPLITS = ("train", "val", "test")


class SplitError(UserError, ValueError):
    """The data cannot be split as params.yaml asks."""


# --- Index ---------------------------------------------------------------------------------------


def read_index(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = set(INDEX_COLUMNS) - set(frame.columns)
    if missing:
        raise SplitError(f"{path} lacks column(s) {sorted(missing)}; the download stage writes {INDEX_COLUMNS}")
    return frame[INDEX_COLUMNS]


# --- Split ---------------------------------------------------------------------------------------


def minimum_images_per_class(fractions: list[float]) -> int:
    """The smallest class for which every carved split, and train, receives at least one image."""
    return max([math.ceil(1 / fraction) for fraction in fractions] + [len(fractions) + 1])


def check_class_sizes(labels: pd.Series, minimum: int, what: str) -> None:
    counts = labels.value_counts()
    too_small = counts[counts < minimum].sort_index()
    if len(too_small):
        listing = ", ".join(f"{name!r} has {count}" for name, count in too_small.items())
        raise SplitError(
            f"{what}: {listing} image(s); each class needs at least {minimum} for the split fractions "
            f"in params.yaml. Add images to these classes, lower split.val_fraction/test_fraction, "
            f"or remove the class."
        )


def _carve(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off `fraction` of `frame`, stratified by label: (rest, carved)."""
    # Imported here: every later stage reads the manifests through this module, and scikit-learn takes
    # most of a second to import.
    from sklearn.model_selection import train_test_split

    rest, carved = train_test_split(frame, test_size=fraction, stratify=frame["label"], random_state=seed)
    return rest, carved


def stratified_split(
    index: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int, samples_per_class: int | None = None
) -> dict[str, pd.DataFrame]:
    """Train/val/test manifests from an index; pre-split subsets in the index are kept as they are.

    Rows marked `test` (an official test split) stay the test split and rows marked `val` stay the
    validation split; whatever is missing is carved, stratified, from the remaining rows. The few-shot
    cap `samples_per_class` applies to the training split only, so val and test stay comparable.
    """
    subsets = {name: index[index["subset"] == name] for name in SPLITS}
    pool = index[~index["subset"].isin(["val", "test"])]
    val_needed, test_needed = subsets["val"].empty, subsets["test"].empty
    fractions = [f for f, needed in ((val_fraction, val_needed), (test_fraction, test_needed)) if needed]
    if fractions:
        check_class_sizes(pool["label"], minimum_images_per_class(fractions), "split")

    if test_needed:
        pool, subsets["test"] = _carve(pool, test_fraction, seed)
    if val_needed:
        # Rescale so that val is val_fraction of the whole pool, not of what test left behind.
        share = val_fraction / (1 - test_fraction) if test_needed else val_fraction
        pool, subsets["val"] = _carve(pool, share, seed)
    subsets["train"] = pool
    if samples_per_class is not None:
        subsets["train"] = few_shot(subsets["train"], samples_per_class, seed)

    classes = sorted(index["label"].unique())
    for name, frame in subsets.items():
        missing = sorted(set(classes) - set(frame["label"]))
        if missing:
            raise SplitError(
                f"the {name} split has no image of class(es) {missing}; add images to them "
                f"or change the split fractions"
            )
    return {
        name: frame.sort_values("path")[["path", "label"]].reset_index(drop=True) for name, frame in subsets.items()
    }


def few_shot(train: pd.DataFrame, samples_per_class: int, seed: int) -> pd.DataFrame:
    """At most `samples_per_class` images of each class, drawn with `seed`."""
    shuffled = train.sample(frac=1.0, random_state=seed)
    return shuffled.groupby("label").head(samples_per_class)


def data_fingerprint(manifests: dict[str, pd.DataFrame], repo_root: Path) -> str:
    """sha256 over every (split, path, label, file content): equal fingerprints mean equal data."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for path, label in manifests[split][["path", "label"]].itertuples(index=False):
            digest.update(f"{split}\0{path}\0{label}\0".encode())
            digest.update(hashlib.sha256((repo_root / path).read_bytes()).digest())
    return digest.hexdigest()


def write_split(out_dir: Path, manifests: dict[str, pd.DataFrame], classes: list[str], summary: dict) -> None:
    for split, frame in manifests.items():
        write_csv(out_dir / f"{split}.csv", frame)
    write_json(out_dir / "classes.json", classes)
    write_json(out_dir / "summary.json", summary)


# --- Manifests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """One split: repository-relative image paths and integer labels into `classes`."""

    paths: list[str]
    labels: list[int]
    classes: list[str]


def read_classes(split_dir: Path) -> list[str]:
    return list(read_json(split_dir / "classes.json"))


def read_manifest(split_dir: Path, split: str) -> Manifest:
    classes = read_classes(split_dir)
    frame = pd.read_csv(split_dir / f"{split}.csv", dtype=str, keep_default_na=False)
    unknown = sorted(set(frame["label"]) - set(classes))
    if unknown:
        raise SplitError(
            f"{split_dir / (split + '.csv')} has labels {unknown} that are not in classes.json; "
            f"re-run the split stage (dvc repro split)"
        )
    lookup = {name: i for i, name in enumerate(classes)}
    return Manifest(list(frame["path"]), [lookup[label] for label in frame["label"]], classes)

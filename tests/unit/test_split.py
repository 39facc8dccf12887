"""The stratified split: proportions, determinism, pre-split subsets, few-shot and clear errors."""

from pathlib import Path

import pandas as pd
import pytest
from conftest import index_of

from transfer.data.split import SplitError, read_manifest, stratified_split, write_split


def make_index(counts: dict[str, int], subset: str = "") -> pd.DataFrame:
    rows = [(f"data/raw/{label}/{i}.png", label, subset) for label, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["path", "label", "subset"])


def test_split_is_stratified_disjoint_and_complete():
    index = make_index({"a": 100, "b": 60, "c": 40})
    splits = stratified_split(index, val_fraction=0.2, test_fraction=0.1, seed=0)
    paths = [set(frame["path"]) for frame in splits.values()]
    assert sum(len(p) for p in paths) == 200 and len(set.union(*paths)) == 200
    for label, n in {"a": 100, "b": 60, "c": 40}.items():
        assert (splits["test"]["label"] == label).sum() == pytest.approx(n * 0.1, abs=1)
        assert (splits["val"]["label"] == label).sum() == pytest.approx(n * 0.2, abs=1)


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    index = make_index({"a": 50, "b": 50})
    first = stratified_split(index, 0.2, 0.2, seed=3)
    again = stratified_split(index, 0.2, 0.2, seed=3)
    other = stratified_split(index, 0.2, 0.2, seed=4)
    assert all(first[s].equals(again[s]) for s in first)
    assert not first["test"].equals(other["test"])


def test_too_small_class_is_named_with_its_count():
    index = make_index({"big": 50, "tiny": 3})
    with pytest.raises(SplitError, match=r"'tiny' has 3"):
        stratified_split(index, 0.15, 0.15, seed=0)


def test_official_test_split_is_kept_and_val_carved_from_train():
    index = pd.concat(
        [
            make_index({"a": 40, "b": 40}, "train"),
            make_index({"a": 10, "b": 10}, "test").assign(path=lambda f: f["path"].str.replace("raw/", "raw/test/")),
        ]
    )
    splits = stratified_split(index, 0.25, 0.5, seed=0)
    assert set(splits["test"]["path"]) == set(index[index["subset"] == "test"]["path"])
    assert len(splits["val"]) == 20 and len(splits["train"]) == 60


def test_samples_per_class_caps_only_the_training_split():
    index = make_index({"a": 100, "b": 100})
    full = stratified_split(index, 0.1, 0.1, seed=0)
    few = stratified_split(index, 0.1, 0.1, seed=0, samples_per_class=5)
    assert few["train"]["label"].value_counts().to_dict() == {"a": 5, "b": 5}
    assert set(few["train"]["path"]) <= set(full["train"]["path"])
    assert few["test"].equals(full["test"]) and few["val"].equals(full["val"])


def test_manifests_round_trip_through_files(image_folder: Path, tmp_path: Path):
    index = index_of(image_folder, tmp_path)
    assert sorted(index["label"].unique()) == ["cat", "dog", "fox"] and len(index) == 60
    splits = stratified_split(index, 0.2, 0.2, seed=0)
    write_split(tmp_path / "split", splits, ["cat", "dog", "fox"], {})
    manifest = read_manifest(tmp_path / "split", "test")
    assert manifest.classes == ["cat", "dog", "fox"]
    assert manifest.paths == list(splits["test"]["path"])
    assert all((tmp_path / p).is_file() for p in manifest.paths)

"""Sources end to end on real files: folder, labels CSV, archive over HTTP, IDX, torchvision (offline)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import good_images, png
from PIL import Image
from test_fetch import ArchiveServer, digest

from transfer.data.report import DataError, Policy
from transfer.data.scan import detect_layout
from transfer.data.sources import SourceError, materialise, read_idx, summary_line


def messy_folder(root: Path) -> Path:
    """An ImageFolder with every kind of bad input the issue lists."""
    cat, dog = root / "cat", root / "dog"
    good_images(cat, 6, 1)
    good_images(dog, 6, 2)
    png(cat / "rgba.png", 11, "RGBA")
    png(cat / "cmyk.jpg", 12, "CMYK")
    png(dog / "deep16.png", 13, "I;16")
    png(dog / "chat_café_猫.png", 14)  # non-ASCII name
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, "JPEG")
    (cat / "truncated.jpg").write_bytes(full.getvalue()[:300])
    (cat / "zero.png").write_bytes(b"")
    (dog / "notes.jpg").write_text("not a jpeg at all")
    (dog / "README.txt").write_text("a non-image file")
    os.symlink(dog / "loop_b.png", dog / "loop_a.png")
    os.symlink(dog / "loop_a.png", dog / "loop_b.png")
    shutil.copyfile(cat / "000.png", dog / "same_as_cat.png")  # one photo under two labels
    (root / "bird").mkdir()  # an empty class
    return root


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    return root


def load_report(repo: Path) -> dict:
    return json.loads((repo / "data/raw/data_report.json").read_text())


def test_default_policy_fails_on_label_problems_and_names_them(repo: Path, tmp_path: Path) -> None:
    source = messy_folder(tmp_path / "incoming")
    with pytest.raises(DataError) as err:
        materialise({"source": "folder", "path": str(source)}, repo / "data/raw", repo)
    message = str(err.value)
    assert "label_conflict" in message and "same_as_cat.png" in message and "cat/000.png" in message
    assert "empty_class" in message and "bird" in message
    assert "data.policy.label_issues: skip" in message
    assert "truncated.jpg" not in message  # bad files are skipped by default, not failed on
    report = load_report(repo)  # written before failing, so the user can look
    assert report["issue_counts"]["corrupt"] == 1
    assert not (repo / "data/raw/index.csv").exists()


def test_skip_policy_indexes_good_images_and_counts_every_skip(repo: Path, tmp_path: Path) -> None:
    source = messy_folder(tmp_path / "incoming")
    index, report = materialise(
        {"source": "folder", "path": str(source), "policy": {"label_issues": "skip"}}, repo / "data/raw", repo
    )
    assert report.counts() == {
        "corrupt": 1,
        "empty": 1,
        "empty_class": 1,
        "label_conflict": 2,
        "non_image": 1,
        "not_image": 1,
        "unreadable": 2,
    }
    on_disk = pd.read_csv(repo / "data/raw/index.csv", dtype=str, keep_default_na=False)
    assert list(on_disk.columns) == ["path", "label", "subset"] and on_disk.equals(index)
    assert sorted(index["label"].value_counts().items()) == [("cat", 7), ("dog", 8)]
    assert set(index["subset"]) == {""}
    assert "data/raw/incoming/dog/chat_café_猫.png" in set(index["path"])
    for path in index["path"]:
        assert (repo / path).is_file() and not Path(path).is_absolute()
    assert not any("000.png" in p and "cat" in p for p in index["path"])  # the conflicting pair is gone
    # hard-linked, not duplicated on disk
    assert os.path.samefile(repo / "data/raw/incoming/cat/001.png", source / "cat/001.png")
    report_json = load_report(repo)
    assert report_json["images"] == 15 and report_json["classes"] == 2
    assert {i["kind"] for i in report_json["issues"] if i["action"] == "skip"} >= {"corrupt", "unreadable"}
    printed = summary_line(index, report, repo / "data/raw", repo)  # what the download stage prints
    assert "15 images in 2 classes" in printed and "corrupt=1" in printed


def test_bad_files_policy_fail_names_the_file(repo: Path, tmp_path: Path) -> None:
    source = tmp_path / "incoming"
    good_images(source / "a", 3, 1)
    good_images(source / "b", 3, 2)
    (source / "b" / "zero.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"(?s)bad files.*b/zero.png.*empty"):
        materialise({"source": "folder", "path": str(source), "policy": {"bad_files": "fail"}}, repo / "data/raw", repo)


def test_presplit_folder_keeps_official_test_and_drops_leaked_train_copy(repo: Path) -> None:
    source = repo / "incoming"  # inside the repository, outside the raw dir
    for split, seed in (("train", 1), ("test", 2)):
        for label in ("hotdog", "not-hotdog"):
            good_images(source / split / label, 4, seed * 10 + len(label))
    shutil.copyfile(source / "test/hotdog/000.png", source / "train/hotdog/leaked.png")
    shutil.copyfile(source / "train/hotdog/001.png", source / "train/hotdog/again.png")
    index, report = materialise({"source": "folder", "path": "incoming"}, repo / "data/raw", repo)
    assert report.counts() == {"duplicate": 1, "leakage": 1}
    assert sorted(index["subset"].value_counts().items()) == [("test", 8), ("train", 8)]
    assert "data/raw/incoming/test/hotdog/000.png" in set(index["path"])
    assert "data/raw/incoming/train/hotdog/leaked.png" not in set(index["path"])
    with pytest.raises(DataError, match="leakage"):
        materialise({"source": "folder", "path": "incoming", "policy": {"duplicates": "fail"}}, repo / "data/raw", repo)


def test_layout_detection(tmp_path: Path) -> None:
    (tmp_path / "flat/cat").mkdir(parents=True)
    (tmp_path / "split/train").mkdir(parents=True)
    (tmp_path / "split/valid").mkdir()
    (tmp_path / "mixed/train").mkdir(parents=True)
    (tmp_path / "mixed/cat").mkdir()
    assert detect_layout(tmp_path / "flat") == "flat" and detect_layout(tmp_path / "split") == "split"
    with pytest.raises(SourceError, match="data.layout"):
        detect_layout(tmp_path / "mixed")


def test_source_inside_raw_dir_and_missing_folder_are_refused(repo: Path) -> None:
    good_images(repo / "data/raw/mine/a", 2, 1)
    with pytest.raises(SourceError, match="inside the raw dir"):
        materialise({"source": "folder", "path": "data/raw/mine"}, repo / "data/raw", repo)
    assert (repo / "data/raw/mine/a/000.png").exists()  # nothing was deleted
    with pytest.raises(SourceError, match="does not exist"):
        materialise({"source": "folder", "path": "nowhere"}, repo / "data/raw", repo)
    with pytest.raises(SourceError, match="unknown data.source"):
        materialise({"source": "ftp"}, repo / "data/raw", repo)


def dog_breed(root: Path) -> Path:
    """Kaggle dog-breed-identification layout: labels.csv (id,breed) and train/<id>.jpg."""
    rows = [("a1", "beagle"), ("a2", "beagle"), ("a3", "beagle"), ("b1", "pug"), ("b2", "pug"), ("b3", "pug")]
    for seed, (ident, _) in enumerate(rows):
        png(root / "train" / f"{ident}.jpg", 100 + seed)
    png(root / "test" / "unlabelled.jpg", 999)  # Kaggle's test/ has no labels: never scanned
    rows.append(("ghost", "pug"))  # a label without a file
    png(root / "train" / "stray.jpg", 77)  # a file without a label
    pd.DataFrame(rows, columns=["id", "breed"]).to_csv(root / "labels.csv", index=False)
    return root


def test_csv_source_dog_breed_layout_out_of_the_box(repo: Path, tmp_path: Path) -> None:
    source = dog_breed(tmp_path / "dog-breed-identification")
    with pytest.raises(DataError) as err:
        materialise({"source": "csv", "path": str(source)}, repo / "data/raw", repo)
    assert "missing_file" in str(err.value) and "ghost" in str(err.value) and "stray.jpg" in str(err.value)
    index, report = materialise(
        {"source": "csv", "path": str(source), "policy": {"label_issues": "skip"}}, repo / "data/raw", repo
    )
    assert report.counts() == {"missing_file": 1, "unlabelled_file": 1}
    assert len(index) == 6 and set(index["label"]) == {"beagle", "pug"}
    assert "data/raw/dog-breed-identification/train/a1.jpg" in set(index["path"])


def test_csv_source_custom_columns_and_subset_column(repo: Path, tmp_path: Path) -> None:
    source = tmp_path / "imgs"
    for i in range(4):
        png(source / f"img{i}.png", i)
    pd.DataFrame(
        {
            "file": [f"img{i}.png" for i in range(4)],
            "cls": ["x", "y", "x", "y"],
            "split": ["train", "train", "test", "test"],
        }
    ).to_csv(source / "meta.csv", index=False)
    params = {
        "source": "csv",
        "path": str(source),
        "labels_csv": "meta.csv",
        "id_column": "file",
        "label_column": "cls",
        "image_template": "{id}",
        "subset_column": "split",
    }
    index, _ = materialise(params, repo / "data/raw", repo)
    assert sorted(index["subset"]) == ["test", "test", "train", "train"]
    with pytest.raises(SourceError, match=r"no column\(s\) \['breed'\].*file, cls|no column"):
        materialise({**params, "label_column": "breed"}, repo / "data/raw", repo)


def test_archive_source_over_http_hotdog_layout(repo: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split in ("train", "test"):
            for n, label in enumerate(("hotdog", "not-hotdog")):
                for i in range(3):
                    img = io.BytesIO()
                    Image.new("RGB", (8, 8), (n * 100, i * 40, 7 if split == "train" else 9)).save(img, "PNG")
                    zf.writestr(f"hotdog/{split}/{label}/{i}.png", img.getvalue())
        zf.writestr("hotdog/train/hotdog/broken.png", img.getvalue()[:-30])  # truncated PNG
    data = buf.getvalue()
    with ArchiveServer(data) as srv:
        os.environ["TRANSFER_CACHE_DIR"] = str(repo.parent / "cache")
        try:
            index, report = materialise(
                {"source": "archive", "url": srv.url, "sha256": digest(data)}, repo / "data/raw", repo
            )
        finally:
            del os.environ["TRANSFER_CACHE_DIR"]
    assert report.counts() == {"corrupt": 1}
    assert sorted(index["subset"].value_counts().items()) == [("test", 6), ("train", 6)]
    assert index["path"].str.startswith("data/raw/hotdog/").all()


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_like(folder: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", 12), ("t10k", 6)):
        images = rng.integers(0, 255, (n, 28, 28))
        labels = np.arange(n) % 3
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{stem}-{kind}-ubyte"
            payload = idx_bytes(arr)
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)


def test_idx_source_keeps_official_test_split(repo: Path, tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "fmnist", compress=True)
    index, _ = materialise(
        {"source": "idx", "path": str(tmp_path / "fmnist"), "classes": ["a", "b", "c"]}, repo / "data/raw", repo
    )
    assert sorted(index["subset"].value_counts().items()) == [("test", 6), ("train", 12)]
    assert (repo / index["path"][0]).is_file() and Image.open(repo / index["path"][0]).size == (28, 28)
    with pytest.raises(SourceError, match="data.classes has 2"):
        materialise({"source": "idx", "path": str(tmp_path / "fmnist"), "classes": ["a", "b"]}, repo / "data/raw", repo)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_debian_fashion_mnist_files_are_readable() -> None:
    labels = read_idx(Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"))
    assert labels.shape == (10_000,) and labels.max() == 9


def test_torchvision_source_reads_local_root_offline(repo: Path, tmp_path: Path) -> None:
    write_mnist_like(tmp_path / "tv" / "MNIST" / "raw", compress=False)
    index, _ = materialise(
        {"source": "torchvision", "name": "MNIST", "root": str(tmp_path / "tv"), "download": False},
        repo / "data/raw",
        repo,
    )
    assert sorted(index["subset"].value_counts().items()) == [("test", 6), ("train", 12)]
    assert set(index["label"]) == {"0 - zero", "1 - one", "2 - two"}
    with pytest.raises(SourceError, match="Offline"):
        materialise(
            {"source": "torchvision", "name": "CIFAR10", "root": str(tmp_path / "empty"), "download": False},
            repo / "data/raw",
            repo,
        )
    with pytest.raises(SourceError, match="not supported"):
        materialise({"source": "torchvision", "name": "ImageNet"}, repo / "data/raw", repo)


def test_policy_validation() -> None:
    assert Policy.model_validate({}) == Policy(bad_files="skip", label_issues="fail", duplicates="skip")
    with pytest.raises(ValueError, match="should be 'skip' or 'fail'"):
        Policy.model_validate({"bad_files": "ignore"})

"""Hostile but realistic data on real files: paths out of the source, symlink loops, zip bombs, CSV conflicts."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import good_images, png
from test_fetch import digest, make_zip

from transfer.data.fetch import ArchiveLimits, ArchiveTooLargeError, unpack_archive
from transfer.data.report import DataError
from transfer.data.sources import SourceError, materialise


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "work" / "repo"
    root.mkdir(parents=True)
    return root


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def labels_source(root: Path, rows: list[tuple[str, str]]) -> Path:
    for i in range(3):
        png(root / "train" / f"a{i}.jpg", 10 + i)
        png(root / "train" / f"b{i}.jpg", 20 + i)
    pd.DataFrame(rows, columns=["id", "breed"]).to_csv(root / "labels.csv", index=False)
    return root


GOOD_ROWS = [(f"a{i}", "beagle") for i in range(3)] + [(f"b{i}", "pug") for i in range(3)]


@pytest.mark.parametrize(
    "hostile_id, template",
    [
        ("../../../victim", "train/{id}.jpg"),  # climbs out of the image folder, out of the repository
        ("VICTIM_ABSOLUTE", "{id}"),  # an absolute id (was a SameFileError traceback)
        ("sub/../../../victim", "train/{id}.jpg"),
    ],
)
def test_csv_ids_leading_out_of_the_source_are_refused_naming_the_row(repo, tmp_path, hostile_id, template):
    victim = tmp_path / "victim.jpg"
    png(victim, 1)
    before = victim.read_bytes()
    hostile_id = str(victim) if hostile_id == "VICTIM_ABSOLUTE" else hostile_id
    source = tmp_path / "work" / "incoming"
    rows = GOOD_ROWS + [(hostile_id, "pug")]
    if template == "{id}":
        rows = [(f"train/{ident}.jpg", label) for ident, label in GOOD_ROWS] + [(hostile_id, "pug")]
    labels_source(source, rows)
    outside_before = files_under(tmp_path) - files_under(repo)
    with pytest.raises(SourceError) as err:
        materialise({"source": "csv", "path": str(source), "image_template": template}, repo / "data/raw", repo)
    message = str(err.value)
    assert "labels.csv line 8" in message and "not a file inside the image folder" in message
    assert victim.read_bytes() == before
    assert files_under(tmp_path) - files_under(repo) == outside_before  # nothing new outside the repository
    assert not (repo / "data/raw/index.csv").exists()


def test_csv_id_that_is_a_link_out_of_the_source_is_reported_not_copied(repo, tmp_path):
    secret = tmp_path / "secret.jpg"
    png(secret, 3)
    source = labels_source(tmp_path / "incoming", GOOD_ROWS + [("leak", "pug")])
    os.symlink(secret, source / "train" / "leak.jpg")
    index, report = materialise({"source": "csv", "path": str(source)}, repo / "data/raw", repo)
    assert report.counts() == {"unsafe_link": 1}
    assert len(index) == 6 and not any("leak" in p for p in index["path"])
    issue = next(i for i in json.loads((repo / "data/raw/data_report.json").read_text())["issues"])
    assert issue["kind"] == "unsafe_link" and "line 8" in issue["path"] and "outside the source" in issue["message"]


def test_csv_id_with_conflicting_labels_follows_the_policy_like_the_folder_source(repo, tmp_path):
    rows = GOOD_ROWS + [("a0", "pug"), ("b1", "pug")]  # a0: beagle and pug; b1: pug twice
    source = labels_source(tmp_path / "incoming", rows)
    with pytest.raises(DataError) as err:
        materialise({"source": "csv", "path": str(source)}, repo / "data/raw", repo)
    assert "label_conflict" in str(err.value) and "a0.jpg" in str(err.value)
    assert "line 2" in str(err.value) and "line 8" in str(err.value)

    index, report = materialise(
        {"source": "csv", "path": str(source), "policy": {"label_issues": "skip"}}, repo / "data/raw", repo
    )
    assert report.counts() == {"duplicate": 1, "label_conflict": 2}
    assert not any(p.endswith("a0.jpg") for p in index["path"])  # neither label is kept
    assert sorted(index["label"].value_counts().items()) == [("beagle", 2), ("pug", 3)]
    issues = json.loads((repo / "data/raw/data_report.json").read_text())["issues"]
    assert {(i["kind"], i["path"].rsplit(" ", 1)[-1], i["action"]) for i in issues} == {
        ("label_conflict", "2", "skip"),
        ("label_conflict", "8", "skip"),
        ("duplicate", "9", "skip"),
    }


def test_folder_symlink_to_its_parent_is_reported_and_not_followed(repo, tmp_path):
    source = tmp_path / "incoming"
    for label, seed in (("bird", 1), ("cat", 2), ("dog", 3)):
        good_images(source / label, 3, seed)
    os.symlink("..", source / "bird" / "up")  # the loop of the issue: every class again under bird/
    os.symlink(source / "cat", source / "bird" / "cats")  # inside the source: followed
    outside = tmp_path / "elsewhere"
    good_images(outside, 2, 9)
    os.symlink(outside, source / "dog" / "more")  # leaves the source
    os.symlink(outside / "000.png", source / "dog" / "one.png")
    os.symlink(outside, source / "fox")  # a whole class folder outside
    params = {"source": "folder", "path": str(source), "policy": {"label_issues": "skip"}}
    index, report = materialise(params, repo / "data/raw", repo)
    unsafe = [i for i in report.issues if i.kind == "unsafe_link"]
    assert sorted(i.path.rsplit("/", 2)[-2] + "/" + i.path.rsplit("/", 1)[-1] for i in unsafe) == [
        "bird/up",
        "dog/more",
        "dog/one.png",
        "incoming/fox",
    ]
    assert "a loop" in next(i.message for i in unsafe if i.path.endswith("bird/up"))
    # cat's images reached through bird/cats are byte-identical under two labels: that, and only
    # that, is a label conflict; dog keeps all its images.
    assert report.counts()["label_conflict"] == 6
    assert sorted(index["label"].value_counts().items()) == [("bird", 3), ("dog", 3)]
    assert not any("elsewhere" in p or "/up/" in p for p in index["path"])

    # The default policy skips the links with a report: no class vanishes. bad_files: fail names the link.
    os.unlink(source / "bird" / "cats")
    index, report = materialise({"source": "folder", "path": str(source)}, repo / "data/raw", repo)
    assert sorted(index["label"].value_counts().items()) == [("bird", 3), ("cat", 3), ("dog", 3)]
    with pytest.raises(DataError, match=r"(?s)unsafe_link.*bird/up.*a loop"):
        materialise({"source": "folder", "path": str(source), "policy": {"bad_files": "fail"}}, repo / "data/raw", repo)


def test_archive_member_escaping_via_data_path_is_refused(repo, tmp_path):
    data = make_zip({"inner/cat/a.png": b"x"})
    archive = repo / "a.zip"
    archive.write_bytes(data)
    with pytest.raises(SourceError, match="outside the unpacked archive"):
        materialise(
            {"source": "archive", "url": "a.zip", "sha256": digest(data), "path": "../../.."}, repo / "data/raw", repo
        )


def zip_bomb(size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/zeros.png", b"\0" * size)
    return buf.getvalue()


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(zip_bomb(80 * 1024**2))  # 80 MiB of zeros in about 80 kB
    dest = tmp_path / "data" / "raw"
    with pytest.raises(ArchiveTooLargeError, match=r"compression ratio above 100.*data.archive_max_ratio"):
        unpack_archive(archive, dest)
    assert not dest.exists() and [p.name for p in tmp_path.joinpath("data").iterdir()] == []
    unpack_archive(archive, dest, ArchiveLimits(max_ratio=1e6))  # a trusted archive, limit raised
    assert (dest / "cat/zeros.png").stat().st_size == 80 * 1024**2


def test_gzip_tar_bomb_size_and_count_limits(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for i in range(5):
            info = tarfile.TarInfo(f"d/{i}.png")
            info.size = 1000
            tf.addfile(info, io.BytesIO(b"\1" * 1000))
    archive = tmp_path / "many.tar.gz"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(ArchiveTooLargeError, match=r"more than 4 members.*data.archive_max_files"):
        unpack_archive(archive, tmp_path / "a", ArchiveLimits(max_files=4))
    with pytest.raises(ArchiveTooLargeError, match=r"more than 2500 bytes.*data.archive_max_bytes"):
        unpack_archive(archive, tmp_path / "b", ArchiveLimits(max_bytes=2500))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert len(list(unpack_archive(archive, tmp_path / "c").rglob("*.png"))) == 5


def test_archive_limits_come_from_params(repo, tmp_path):
    data = zip_bomb(70 * 1024**2)
    (repo / "bomb.zip").write_bytes(data)
    with pytest.raises(ArchiveTooLargeError, match="data.archive_max_ratio"):
        materialise({"source": "archive", "url": "bomb.zip", "sha256": digest(data)}, repo / "data/raw", repo)
    with pytest.raises(ArchiveTooLargeError, match="data.archive_max_bytes"):
        materialise(
            {"source": "archive", "url": "bomb.zip", "sha256": digest(data), "archive_max_bytes": 1000},
            repo / "data/raw",
            repo,
        )

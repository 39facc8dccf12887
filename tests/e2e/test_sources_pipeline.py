"""The real download and split stages (via `dvc repro split`) on a folder source with bad files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from conftest import good_images
from project_helpers import PATIENCE_S

REPO = Path(__file__).resolve().parents[2]


def stage_copy(tmp_path: Path, data: dict) -> Path:
    """A temporary copy of the repository's code and params, with `data:` replaced."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("src", "stages", "assets", "weights"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, copy / name)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["data"] = data
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return copy


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": "src", "DVC_NO_ANALYTICS": "1"}
    env.pop("DVC_ROOT", None)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=PATIENCE_S)


def test_dvc_repro_split_on_folder_source_with_bad_files(tmp_path: Path) -> None:
    source = tmp_path / "my-photos"
    for label, seed in (("cat", 1), ("dog", 2)):
        good_images(source / label, 10, seed)
    (source / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (source / "cat" / "Thumbs.txt").write_text("not an image")
    copy = stage_copy(tmp_path, {"source": "folder", "path": str(source)})
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        assert run(cmd, copy).returncode == 0
    result = run(["dvc", "repro", "split"], copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "20 images in 2 classes" in result.stdout and "corrupt=1" in result.stdout

    report = json.loads((copy / "data/raw/data_report.json").read_text())
    assert report["issue_counts"] == {"corrupt": 1, "non_image": 1}
    assert any(i["path"].endswith("dog/broken.jpg") for i in report["issues"])
    manifests = pd.concat(pd.read_csv(copy / f"data/split/{s}.csv") for s in ("train", "val", "test"))
    assert len(manifests) == 20 and manifests["path"].str.startswith("data/raw/my-photos/").all()
    assert not manifests["path"].str.contains("broken").any()


def test_download_stage_fails_on_a_label_conflict_naming_the_files(tmp_path: Path) -> None:
    source = tmp_path / "photos"
    good_images(source / "cat", 4, 1)
    good_images(source / "dog", 4, 2)
    shutil.copyfile(source / "cat/000.png", source / "dog/twin.png")
    copy = stage_copy(tmp_path, {"source": "folder", "path": str(source)})
    result = run([sys.executable, "stages/download.py"], copy)
    assert result.returncode != 0
    assert "label_conflict" in result.stderr and "dog/twin.png" in result.stderr and "cat/000.png" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (copy / "data/raw/index.csv").exists()


def test_invalid_data_params_fail_before_any_work(tmp_path: Path) -> None:
    copy = stage_copy(tmp_path, {"source": "folder"})
    result = run([sys.executable, "stages/download.py"], copy)
    assert result.returncode != 0 and "needs data.path" in result.stderr
    assert not (copy / "data").exists()

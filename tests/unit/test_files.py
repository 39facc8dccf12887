"""Outputs staged together: all of them replace the previous ones on success, none on failure."""

from __future__ import annotations

import pytest

from transfer.pipeline.files import staged_outputs, write_json


def test_staged_outputs_replace_the_folders_files_only_on_success(tmp_path):
    (tmp_path / "train.json").write_text("previous run\n")
    with pytest.raises(RuntimeError):
        with staged_outputs(tmp_path) as staged:
            write_json(staged / "train.json", {"new": 1})
            write_json(staged / "history.json", {"new": 1})
            raise RuntimeError("the stage fails after writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.json"]
    assert (tmp_path / "train.json").read_text() == "previous run\n"

    with staged_outputs(tmp_path) as staged:
        write_json(staged / "train.json", {"new": 1})
        write_json(staged / "history.json", {"new": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json", "train.json"]
    assert (tmp_path / "train.json").read_text() == '{\n  "new": 1\n}\n'

"""The params stage: a misspelt key edited into params.yaml fails `dvc repro` even when no stage's params changed,
and so does a layer group the backbone does not have, before the stages that would build it."""

from __future__ import annotations

import sys

import yaml
from test_sources_pipeline import run, stage_copy


def test_a_typo_fails_whichever_stage_runs_and_a_valid_edit_reruns_nothing_else(tmp_path):
    copy = stage_copy(tmp_path, yaml.safe_load((stage_copy.__globals__["REPO"] / "params.yaml").read_text())["data"])
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], dvc + ["init", "-q"]):
        assert run(cmd, copy).returncode == 0
    first = run(dvc + ["repro", "download"], copy)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'params'" in first.stdout and "Running stage 'download'" in first.stdout

    params = copy / "params.yaml"
    original = params.read_text()
    params.write_text(original + "seeed: 1\n")  # a new top-level key: no stage lists it
    typo = run(dvc + ["repro", "download"], copy)
    assert typo.returncode != 0
    assert "seeed: unknown key" in typo.stdout + typo.stderr
    assert "Running stage 'download'" not in typo.stdout

    params.write_text(original.replace("  lr: 0.01", "  lr: 0.02"))  # valid: re-runs params only
    valid = run(dvc + ["repro", "download"], copy)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    assert "Running stage 'params'" in valid.stdout and "Running stage 'download'" not in valid.stdout

    # Only the backbone knows it has 9 groups: checked by the params stage, not by train after cache ran.
    params.write_text(original.replace("freeze_layers: all", "freeze_layers: 99"))
    beyond = run(dvc + ["repro", "download"], copy)
    assert beyond.returncode != 0
    assert "params: freeze_layers=99 is outside 0..9" in beyond.stdout + beyond.stderr

"""Tensor files: never unpickled (a payload in a .pt/.pth does not run), clear errors, byte-stable writes."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_helpers import Payload, hostile_file

from transfer.models.backbones import BackboneError, load_backbone
from transfer.pipeline.files import UnreadableFileError, load_torch, save_torch
from transfer.train.checkpoint import Checkpointer, restore_rng_state, rng_state

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_hostile_and_foreign_files_are_clear_errors_not_code(tmp_path):
    marker = tmp_path / "pwned"
    hostile = hostile_file(tmp_path / "model.pt", marker)
    with pytest.raises(UnreadableFileError, match=r"model\.pt is not a usable model file.*weights_only=True"):
        load_torch(hostile, "model file", "rerun train")
    (tmp_path / "old.pt").write_bytes(pickle.dumps(Payload(marker)))  # legacy (non-zip) pickle format
    (tmp_path / "text.pt").write_text("not a tensor file")
    for name in ("old.pt", "text.pt"):
        with pytest.raises(UnreadableFileError, match=name):
            load_torch(tmp_path / name, "model file", "rerun train")
    assert not marker.exists()


def test_backbone_weights_that_are_not_weights_are_a_backbone_error(tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "hostile.pth": hostile_file(tmp_path / "hostile.pth", marker),
        "text.pth": tmp_path / "text.pth",
        "list.pth": tmp_path / "list.pth",
        "bad.safetensors": tmp_path / "bad.safetensors",
    }
    cases["text.pth"].write_text("hello")
    torch.save([1, 2, 3], cases["list.pth"])
    cases["bad.safetensors"].write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    for name, path in cases.items():
        with pytest.raises(BackboneError, match=re.escape(name)) as err:
            load_backbone("resnet18", str(path))
        assert "backbone.weights" in str(err.value)
    assert not marker.exists()
    # A real state_dict, as .pth and as .safetensors, loads.
    from safetensors.torch import save_file

    state = torch.nn.Linear(2, 2).state_dict()  # wrong tensors for resnet18: a clear mismatch, not a crash
    save_file(state, tmp_path / "small.safetensors")
    with pytest.raises(BackboneError, match=r"small\.safetensors"):
        load_backbone("resnet18", str(tmp_path / "small.safetensors"))


def test_tampered_checkpoint_is_ignored_with_a_message(tmp_path, caplog):
    marker = tmp_path / "pwned"
    checkpointer = Checkpointer(tmp_path / "ckpt", "fp")
    hostile_file(tmp_path / "ckpt" / "last.pt", marker)
    assert checkpointer.load_last() is None
    assert "weights_only=True" in caplog.text and not marker.exists()  # a warning of transfer.train.checkpoint


def test_checkpoint_with_rng_states_round_trips_under_weights_only(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", "fp")
    np.random.seed(3)
    torch.manual_seed(3)
    checkpointer.save_last({"done": 1, "rng": rng_state(), "history": [{"val_acc": 0.5}]})
    expected = (np.random.rand(3), torch.rand(3))
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(checkpointer.load_last()["rng"])
    assert np.array_equal(np.random.rand(3), expected[0]) and torch.equal(torch.rand(3), expected[1])


def test_save_torch_is_byte_stable_and_atomic(tmp_path):
    payload = {"features": torch.arange(12.0).reshape(3, 4), "paths": ["a", "b", "c"]}
    save_torch(tmp_path / "a" / "train.pt", payload)
    first = (tmp_path / "a" / "train.pt").read_bytes()
    save_torch(tmp_path / "a" / "train.pt", payload)
    assert (tmp_path / "a" / "train.pt").read_bytes() == first
    assert os.listdir(tmp_path / "a") == ["train.pt"]  # no temporary left behind


def test_no_weights_only_false_in_the_package_or_stages():
    found = [
        f"{path.relative_to(REPO_ROOT)}:{n}"
        for folder in ("src", "stages")
        for path in (REPO_ROOT / folder).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"weights_only\s*=\s*False", line)
    ]
    assert found == []

"""backbone.weights as a DVC dependency: a local weights file lives in weights/, which the features and train
stages depend on, so editing the file re-runs features (and what follows); a path elsewhere is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from project_helpers import DVC, copy_project, git_env, run
from safetensors.torch import save_file

from transfer.models.backbones import build_network
from transfer.pipeline.params import ParamsError, parse_params

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def with_backbone(backbone) -> dict:
    return {**yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), "backbone": backbone}


@pytest.mark.parametrize("weights", ["weights/model.safetensors", "./weights/sub/model.pth", "imagenet", "none"])
def test_weights_in_the_tracked_folder_or_named_are_accepted(weights):
    assert parse_params(with_backbone({"name": "resnet10t", "weights": weights})).backbone.weights == weights


@pytest.mark.parametrize(
    "weights", ["/tmp/model.pth", "models/model.pth", "weights/../model.pth", "weights", "model.safetensors"]
)
def test_weights_outside_the_tracked_folder_are_refused(weights):
    with pytest.raises(ParamsError, match=r"backbone.weights: .*inside the repository's weights/ folder"):
        parse_params(with_backbone({"name": "resnet10t", "weights": weights}))
    with pytest.raises(ParamsError, match=r"backbone.1.weights: .*weights/ folder"):  # each entry of a list
        parse_params(with_backbone([{"name": "resnet10t"}, {"name": "resnet10t", "weights": weights}]))


def test_the_stages_that_load_backbone_weights_depend_on_the_folder():
    assert "weights" in STAGES["features"]["deps"] and "weights" in STAGES["train"]["deps"]
    assert (REPO_ROOT / "weights").is_dir()  # a dep must exist, even when no file is in use


def write_random_weights(path: Path, seed: int) -> None:
    import torch

    # build_network's random weights come from a fixed seed: other weights for every `seed`, by scaling each
    # value by its own random factor near 1 (BatchNorm variances stay positive)
    generator = torch.Generator().manual_seed(seed)
    state = build_network("resnet10t", "none")[0].state_dict()
    noisy = {
        key: value * (1 + 0.1 * torch.randn(value.shape, generator=generator)) if value.is_floating_point() else value
        for key, value in state.items()
    }
    save_file({key: value.contiguous() for key, value in noisy.items()}, str(path))


@pytest.mark.slow
def test_editing_the_weights_file_re_runs_features(tmp_path):
    """The real DVC: `dvc status` sees the edited file, `dvc repro` re-runs features, new features come out."""
    repo = copy_project(tmp_path / "repo")  # the project as a fresh clone has it
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["backbone"] = {"name": "resnet10t", "weights": "weights/random.safetensors", "image_size": 32}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_random_weights(repo / "weights/random.safetensors", seed=0)
    env = git_env({"TRANSFER_SERVER_DIR": str(tmp_path / "server")}, importable=False)
    dvc = DVC
    run(["git", "init", "-q", "-b", "main"], repo, env)

    assert "features" in re.findall(r"Running stage '(\w+)'", run(dvc + ["repro", "features"], repo, env))
    assert "features" not in run(dvc + ["status", "features"], repo, env)  # up to date
    before = (repo / "data/features/train.pt").read_bytes()

    write_random_weights(repo / "weights/random.safetensors", seed=1)  # same architecture, other values
    status = run(dvc + ["status", "features"], repo, env)
    assert re.search(r"features:\s+changed deps:\s+modified:\s+weights", status), status
    ran = re.findall(r"Running stage '(\w+)'", run(dvc + ["repro", "features"], repo, env))
    assert ran == ["features"], ran  # params.yaml did not change: only the stage that reads the file
    assert (repo / "data/features/train.pt").read_bytes() != before
    assert "changed deps" not in run(dvc + ["status", "features"], repo, env)

"""backbone.weights as a DVC dependency, for real: editing the weights file in weights/ re-runs features."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from project_helpers import DVC, run
from safetensors.torch import save_file

from transfer.models.backbones import build_network


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


def test_editing_the_weights_file_re_runs_features(pipeline):
    """The real DVC: `dvc status` sees the edited file, `dvc repro` re-runs features, new features come out."""
    repo, env = pipeline  # the project as a fresh clone has it, built
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["backbone"] = {"name": "resnet10t", "weights": "weights/random.safetensors", "image_size": 32}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_random_weights(repo / "weights/random.safetensors", seed=0)
    dvc = DVC

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

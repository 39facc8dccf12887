"""Several layer groups and two backbones through the real pipeline on the embedded default (the session's
build at 32 px): what re-runs when `features.layers` or `backbone` changes, and the features' width."""

from __future__ import annotations

import json
import sys

import torch
import yaml
from project_helpers import run, stages_run


def test_layers_and_two_backbones_re_run_what_they_change(small_pipeline):
    repo, env = small_pipeline
    dvc = [sys.executable, "-m", "dvc"]

    # Two layer groups pooled and concatenated: the features stage re-runs, then a head on them.
    output = run(dvc + ["exp", "run", "-S", "features.layers=[stage6,-1]", "-S", "head.kind=logreg"], repo, env)
    assert stages_run(output) == ["params", "features", "label_issues", "train", "evaluate"]
    features = torch.load(repo / "data/features/val.pt", weights_only=True)["features"]
    assert features.shape[1] == 192 + 1280
    assert json.loads((repo / "reports/metrics.json").read_text())["accuracy"] > 0.3

    # Two backbones (both with offline ImageNet weights), their features concatenated.
    # Edited into params.yaml: `-S backbone=[...]` cannot turn DVC's mapping into a list (Hydra merges them).
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["features"]["layers"] = [-1]
    params["backbone"] = [
        {"name": "efficientnet_lite0", "image_size": 32},
        {"name": "efficientnet_lite1", "image_size": 32},
    ]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = run(dvc + ["exp", "run"], repo, env)
    # The image cache depends on `backbone` (its images are sized for it), so it re-runs too.
    assert stages_run(output) == ["params", "cache", "features", "label_issues", "train", "evaluate"]
    features = torch.load(repo / "data/features/val.pt", weights_only=True)["features"]
    assert features.shape[1] == 1280 + 1280
    assert json.loads((repo / "reports/metrics.json").read_text())["accuracy"] > 0.3

"""Every head kind, several layers and two backbones through the real pipeline on the embedded default:
`dvc exp run --queue -S 'head.kind=...'`, `dvc exp show`, and the MLflow model of each run."""

from __future__ import annotations

import json
import sys

import yaml
from project_helpers import run, stages_run, wait_for_queue
from test_pipeline import mlflow_runs

SKLEARN_KINDS = ["logreg", "svm", "knn", "forest", "bayes"]


def test_each_head_kind_layers_and_two_backbones_through_the_pipeline(pipeline):
    repo, env = pipeline
    dvc = [sys.executable, "-m", "dvc"]
    built = set(mlflow_runs(repo)["run_id"])  # the run of the session's build, not of this test
    # 32 px: features in seconds (the heads, not the backbone, are under test here).
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["backbone"]["image_size"] = 32
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "heads at 32 px"], repo, env)
    run(dvc + ["repro"], repo, env)

    # The comparison the README shows: one queued experiment per kind, on two workers.
    run(dvc + ["exp", "run", "--queue", "-S", f"head.kind={','.join(SKLEARN_KINDS)}"], repo, env)
    run(dvc + ["queue", "start", "-j", "2"], repo, env)
    status = wait_for_queue(repo, env)
    assert status.count("Success") == len(SKLEARN_KINDS), status

    shown = json.loads(run(dvc + ["exp", "show", "--json"], repo, env))
    accuracy = {}
    for entry in shown:  # the workspace, then the commit the queued experiments ran from
        for experiment in entry.get("experiments") or []:
            for revision in experiment["revs"]:
                data = revision["data"]
                kind = data["params"]["params.yaml"]["data"]["head"]["kind"]
                accuracy[kind] = data["metrics"]["reports/metrics.json"]["data"]["accuracy"]
    assert set(accuracy) == set(SKLEARN_KINDS)
    assert all(value > 0.3 for value in accuracy.values()), accuracy  # ten classes: chance is 0.1

    # Each run has a model predicting from features: scikit-learn heads in the sklearn flavour (skops).
    import mlflow
    import torch

    runs = mlflow_runs(repo)
    runs = runs[~runs["run_id"].isin(built)]
    assert sorted(runs["params.head.kind"]) == sorted(["linear", *SKLEARN_KINDS])
    test_features = torch.load(repo / "data/features/test.pt", weights_only=True)["features"][:5].numpy()
    for _, row in runs[runs["params.head.kind"] != "linear"].iterrows():
        model = mlflow.sklearn.load_model(f"runs:/{row['run_id']}/model")
        assert model.predict(test_features).shape == (5,)
        assert row["metrics.test.accuracy"] > 0.3 and row["metrics.head_fit_seconds"] > 0

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

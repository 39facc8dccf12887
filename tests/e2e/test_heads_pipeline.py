"""Every head kind through the real pipeline on the embedded default (the session's build at 32 px):
`dvc exp run --queue -S 'head.kind=...'`, `dvc exp show`, and the MLflow model of each run."""

from __future__ import annotations

import json
import sys

from project_helpers import run, wait_for_queue
from test_pipeline import mlflow_runs

SKLEARN_KINDS = ["logreg", "svm", "knn", "forest", "bayes"]


def test_each_head_kind_through_the_queue_with_its_mlflow_model(small_pipeline):
    # 32 px: features in seconds (the heads, not the backbone, are under test here).
    repo, env = small_pipeline
    dvc = [sys.executable, "-m", "dvc"]
    built = mlflow_runs(repo)  # the runs of the session's builds (112 px, then 32 px), not of this test
    assert sorted(built["params.head.kind"]) == ["linear", "linear"]
    built = set(built["run_id"])

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
    assert sorted(runs["params.head.kind"]) == sorted(SKLEARN_KINDS)
    test_features = torch.load(repo / "data/features/test.pt", weights_only=True)["features"][:5].numpy()
    for _, row in runs.iterrows():
        model = mlflow.sklearn.load_model(f"runs:/{row['run_id']}/model")
        assert model.predict(test_features).shape == (5,)
        assert row["metrics.test.accuracy"] > 0.3 and row["metrics.head_fit_seconds"] > 0

"""A registered-model name from params.yaml (tracking.registered_model) is a name, never query text."""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient

from transfer import tracking

HOSTILE = "x' OR name LIKE '%"


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def test_register_model_with_quotes_in_the_name_registers_exactly_that_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.use_experiment("names", tmp_path)  # points MLflow at this store (earlier tests set another)
    client = MlflowClient()
    client.create_registered_model("bystander")  # a filter `name = 'x' OR name LIKE '%'` would match it
    with mlflow.start_run():
        uri = mlflow.pyfunc.log_model(name="model", python_model=Constant()).model_uri
    assert int(tracking.register_model(uri, HOSTILE)) == 1
    assert int(tracking.register_model(uri, HOSTILE)) == 2  # the second call finds the model by its exact name
    assert sorted(model.name for model in client.search_registered_models()) == ["bystander", HOSTILE]
    assert client.search_model_versions("name = 'bystander'") == []

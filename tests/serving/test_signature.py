"""Why the served model declares no input schema (#23): MLflow's enforcement of any AnyType schema
rejects input forms the model accepts. If MLflow changes that, these fail and the schema can be declared."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.models.utils import _enforce_schema
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

JPEG = b"\xff\xd8\xff\xe0 stand-in bytes: enforcement runs before any decoding"
GRAY = np.zeros((57, 33), dtype=np.uint8)
RGB = np.zeros((32, 90, 3), dtype=np.uint8)


def _rejected(form: object, schema: Schema) -> bool:
    """Whether MLflow's schema enforcement (what load_model applies before predict) refuses the form."""
    try:
        _enforce_schema(form, schema)
    except Exception:  # noqa: BLE001 - MLflow raises several types; any refusal counts
        return True
    return False


@pytest.mark.parametrize(
    ("schema", "forms"),
    [
        # Named column: even a plain list of bytes and a base64 list are refused.
        (Schema([ColSpec(AnyType(), "image")]), [JPEG, [JPEG], pd.Series([JPEG]), [GRAY, RGB]]),
        # Unnamed column: tuples, bytearray and lists of differently sized arrays are refused.
        (Schema([ColSpec(AnyType())]), [(JPEG,), bytearray(JPEG), [GRAY, RGB], np.stack([GRAY, GRAY])]),
    ],
    ids=["named-any", "unnamed-any"],
)
def test_an_any_type_schema_would_refuse_forms_the_model_accepts(schema, forms):
    refused = [type(form).__name__ for form in forms if _rejected(form, schema)]
    assert refused == [type(form).__name__ for form in forms]


def test_without_a_schema_nothing_is_refused_before_predict():
    # The served model's signature (packaging._pyfunc_spec) has inputs=None: predict() checks items itself.
    from mlflow.pyfunc import _validate_prediction_input

    for form in (JPEG, (JPEG,), bytearray(JPEG), [GRAY, RGB], np.stack([GRAY, GRAY]), {"image": [JPEG]}):
        data, _ = _validate_prediction_input(form, None, None, None)
        assert data is form


def test_a_linked_version_is_tagged_as_register_model_tags_it(tmp_path, monkeypatch):
    # A real (SQLite) MLflow store: mlflow.register_model's own tag is the reference format.
    import mlflow
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    from pneumo.serving.packaging import link_registered_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # set_registry_uri also writes MLFLOW_REGISTRY_URI, and set_registry_uri(None) leaves it: every later
    # MlflowClient in the session would read this test's registry. monkeypatch removes it at teardown.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        client = MlflowClient(uri, uri)
        experiment = client.create_experiment("link", artifact_location=(tmp_path / "artifacts").as_uri())
        run = client.create_run(experiment).info.run_id
        ours, reference = (client.create_logged_model(experiment, name=name, source_run_id=run).model_id
                           for name in ("cnn-serving", "reference"))
        client.create_registered_model("clf")
        version = client.create_model_version("clf", source=f"models:/{ours}", run_id=run, model_id=ours).version
        assert MLFLOW_MODEL_VERSIONS not in client.get_logged_model(ours).tags  # what registry.py gets today

        link_registered_version(client, ours, "clf", version)
        link_registered_version(client, ours, "clf", version)  # a retry adds nothing
        mlflow.register_model(f"models:/{reference}", "clf")
        tag = client.get_logged_model(ours).tags[MLFLOW_MODEL_VERSIONS]
        assert json.loads(tag) == [{"name": "clf", "version": int(version)}]
        assert json.loads(client.get_logged_model(reference).tags[MLFLOW_MODEL_VERSIONS]) == [
            {"name": "clf", "version": int(version) + 1}]  # register_model's own format
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_logged_models_are_named_by_candidate_and_role(tmp_path):
    import keras
    import mlflow
    from mlflow import MlflowClient

    from pneumo.serving.packaging import log_keras_model, logged_model_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("names", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment).info.run_id
    tiny = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(1, "sigmoid")])
    mlflow.set_tracking_uri(uri)  # Model.log writes through the fluent client
    try:
        log_keras_model(client, run, tiny, 8, candidate="cnn")
    finally:
        mlflow.set_tracking_uri(None)
    [logged] = client.search_logged_models([experiment])
    assert logged.name == "cnn-keras" and logged_model_name("cnn", "serving") == "cnn-serving"
    assert logged_model_name(None, "serving") == "serving_model"  # callers that do not say keep the old name

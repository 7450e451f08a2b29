"""The served model refuses what the artifact store could have changed: bad settings, changed files."""

from __future__ import annotations

import math
import os
import uuid
from contextlib import contextmanager

import pytest

from pneumo.errors import ModelError
from pneumo.serving.packaging import save_serving_model
from pneumo.serving.pyfunc import model_settings

SIZE = 32
GOOD = {"threshold": 0.4, "image_size": SIZE, "calibration": {"method": "temperature", "temperature": 1.5, "bias": 0.1}}


def test_good_settings_are_read():
    threshold, size, calibrator = model_settings(GOOD)
    assert (threshold, size, calibrator.temperature, calibrator.bias) == (0.4, SIZE, 1.5, 0.1)


@pytest.mark.parametrize("change, message", [
    ({"threshold": math.nan}, "threshold nan is outside [0, 1]"),
    ({"threshold": 1.5}, "threshold 1.5 is outside [0, 1]"),
    ({"threshold": "high"}, "threshold 'high' is not a number"),
    ({"image_size": 0}, "image_size 0 is not an integer"),
    ({"image_size": 32.5}, "image_size 32.5 is not an integer"),
    ({"image_size": 100_000}, "image_size 100000 is not an integer"),
    ({"calibration": {"method": "temperature", "temperature": -1.0}}, "calibration"),
    ({"calibration": {"method": "voodoo"}}, "calibration"),
    ({"threshold": None, "image_size": None}, "not a number"),
])
def test_out_of_range_settings_are_refused(change, message):
    with pytest.raises(ModelError, match="model config") as caught:
        model_settings({**GOOD, **change})
    assert message in str(caught.value)


def test_missing_settings_are_named():
    with pytest.raises(ModelError, match="lacks threshold, image_size"):
        model_settings({})


def test_a_nan_threshold_written_into_mlmodel_refuses_the_load(tmp_path):
    import mlflow.pyfunc

    from pneumo.training.models import build_model

    path = save_serving_model(tmp_path / "model", build_model("dense", SIZE), threshold=0.5, image_size=SIZE,
                              candidate="dense")
    mlmodel = path / "MLmodel"
    text = mlmodel.read_text()
    assert "threshold: 0.5" in text
    mlmodel.write_text(text.replace("threshold: 0.5", "threshold: .nan"))
    with pytest.raises(ModelError, match="threshold nan is outside"):
        mlflow.pyfunc.load_model(str(path))


# ----------------------------------------------------------------------------- checksums of registered versions
@pytest.fixture(scope="module")
def registered(mlflow_server, s3_server):
    """A champion promoted the normal way (so its checksums are recorded), and where its files live in S3."""
    from mlflow import MlflowClient

    from pneumo.config import Gate
    from pneumo.promotion import registry
    from tests.plugins.mlflow_server import brightness_model, log_retraining, threshold_for

    uri, name = mlflow_server.uri, f"integrity-{uuid.uuid4().hex[:10]}"
    parent = log_retraining(uri, name, brightness_model(SIZE), {"cnn": (threshold_for(110.0), 0.9)})
    decision = registry.promote(parent, _test_set(), gate=Gate(floors_on="point"), model_name=name, tracking_uri=uri)
    assert decision.promoted and decision.version == "1"
    model_id = MlflowClient(uri).get_model_version(name, "1").source.removeprefix("models:/")
    bucket = mlflow_server.artifacts_destination.removeprefix("s3://").split("/")[0]
    return uri, name, parent, bucket, model_id


def _test_set():
    from pneumo.evaluation.holdout import TestSet
    from tests.plugins.mlflow_server import labelled_images

    images, labels = labelled_images(6, 6)
    return TestSet(images, labels, [f"p{index}" for index in range(len(images))])


def _key(s3_server, bucket: str, fragment: str) -> str:
    """The one key of ``bucket`` containing ``fragment`` (all pages: the shared bucket holds thousands)."""
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    [key] = [item["Key"] for page in pages for item in page.get("Contents", []) if fragment in item["Key"]]
    return key


@contextmanager
def _tampered(s3_server, bucket: str, fragment: str, change):
    """Rewrite the one S3 object whose key contains ``fragment`` (``change(bytes) -> bytes``); restore it after."""
    s3, key = s3_server.client(), _key(s3_server, bucket, fragment)
    original = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=change(original))
    try:
        yield key
    finally:
        s3.put_object(Bucket=bucket, Key=key, Body=original)


def test_registration_records_a_checksum_for_every_file_and_an_untouched_version_loads(registered):
    from mlflow import MlflowClient

    from pneumo.serving.integrity import CHECKSUMS_TAG, load_registered, recorded_checksums

    uri, name, *_ = registered
    version = MlflowClient(uri).get_model_version(name, "1")
    assert len(version.tags[CHECKSUMS_TAG]) == 64
    recorded = recorded_checksums(MlflowClient(uri), version)
    assert {"MLmodel", "served_model.py", "artifacts/model.keras"} <= set(recorded)
    assert any(path.startswith("code/pneumo/") for path in recorded)  # the vendored code is covered too
    output = load_registered(name, "champion", tracking_uri=uri).predict(_test_set().images[:2])
    assert output["probability"].between(0, 1).all()


def test_code_appended_to_the_served_model_is_refused_before_it_runs(registered, s3_server, monkeypatch):
    from pneumo.errors import PromotionError
    from pneumo.serving.follower import load_version
    from pneumo.serving.integrity import IntegrityError, load_registered
    from pneumo.serving.smoke import ModelRefused

    uri, name, _, bucket, model_id = registered
    monkeypatch.delenv("PNEUMO_TAMPERED", raising=False)
    attack = b'\nimport os; os.environ["PNEUMO_TAMPERED"] = "ran"\n'
    with _tampered(s3_server, bucket, f"{model_id}/artifacts/served_model.py", lambda data: data + attack):
        with pytest.raises(IntegrityError, match=r"version 1: .*\(changed: served_model\.py\)"):
            load_registered(name, "1", tracking_uri=uri)
        with pytest.raises(ModelRefused, match="checksum check failed: .*changed: served_model.py"):
            load_version(name, "1")
        # The gate scores the champion before comparing: a changed champion stops the next promotion, named.
        from pneumo.config import Gate
        from pneumo.promotion import registry
        from tests.plugins.mlflow_server import brightness_model, log_retraining, threshold_for

        next_retraining = log_retraining(uri, name, brightness_model(SIZE), {"dense": (threshold_for(128.0), 0.95)})
        with pytest.raises(PromotionError, match="champion version 1 cannot be compared: .*changed: served_model.py"):
            registry.promote(next_retraining, _test_set(), gate=Gate(floors_on="point"), model_name=name,
                             tracking_uri=uri)
        assert "PNEUMO_TAMPERED" not in os.environ  # the appended line never ran
    assert load_registered(name, "1", tracking_uri=uri) is not None  # restored: verifies again


def test_a_rewritten_manifest_and_an_added_file_are_named(registered, s3_server, tmp_path):
    from mlflow import MlflowClient

    from pneumo.serving.integrity import CHECKSUMS_TAG, IntegrityError, download_verified, recorded_checksums

    uri, name, _, bucket, model_id = registered
    client = MlflowClient(uri)
    version = client.get_model_version(name, "1")
    # An attacker who rewrites the files and the manifest still cannot match the tag in the tracking database.
    digest = version.tags[CHECKSUMS_TAG]
    with _tampered(s3_server, bucket, f"checksums/{digest}.json", lambda data: data.replace(b'"', b'"', 1) + b" "):
        with pytest.raises(IntegrityError, match="checksum manifest was changed"):
            recorded_checksums(client, version)
    extra = s3_server.client()
    key = _key(s3_server, bucket, f"{model_id}/artifacts/MLmodel").replace("MLmodel", "sitecustomize.py")
    extra.put_object(Bucket=bucket, Key=key, Body=b"print('hello')\n")
    try:
        with pytest.raises(IntegrityError, match=r"added: sitecustomize\.py"):
            download_verified(name, "1", tmp_path, tracking_uri=uri)
    finally:
        extra.delete_object(Bucket=bucket, Key=key)

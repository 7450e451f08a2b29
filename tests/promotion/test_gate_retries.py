"""A transient failure while loading the best candidate is retried: a blip must not change the winner."""

from __future__ import annotations

import pytest

from pneumo.config import Gate
from pneumo.evaluation.holdout import TestSet
from pneumo.mlflow_client import is_transient
from pneumo.promotion import registry
from pneumo.promotion.runs import ranked_candidates
from pneumo.promotion.tracking import TAG_SERVING_MODEL
from tests.plugins.mlflow_server import brightness_model, labelled_images, log_retraining, threshold_for
from tests.plugins.s3 import FaultProxy


def test_a_503_while_loading_the_best_candidate_is_retried_and_it_still_wins(s3_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    # Artifacts in S3, read by this process itself (no tracking server in between), so that a fault
    # proxy in front of the store reaches the gate's download; boto's own retries off, so it does.
    bucket = s3_server.make_bucket("blip")
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setattr(registry, "LOAD_RETRY_DELAYS", (0.1, 0.1), raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("blip", artifact_location=f"s3://{bucket}/artifacts")
    parent = log_retraining(uri, "blip", brightness_model(32), {"cnn": (threshold_for(128.0), 0.95),
                                                                "dense": (threshold_for(100.0), 0.5)})
    best = ranked_candidates(parent, None, tracking_uri=uri)[0]
    model_id = best.data.tags[TAG_SERVING_MODEL].removeprefix("models:/")

    images, labels = labelled_images(6, 6)
    test = TestSet(images, labels, [f"p{index}" for index in range(len(images))])
    # The first request for the best candidate's MLmodel file gets a 503, as a store under load answers.
    with FaultProxy.start(s3_server.endpoint_url, faults=("503",), only=f"{model_id}/artifacts/MLmodel",
                          fail_first=1) as proxy:
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", proxy.endpoint_url)
        decision = registry.promote(parent, test, gate=Gate(floors_on="point"), model_name="blip", tracking_uri=uri,
                                    dry_run=True)
        assert proxy.stats().get("503") == 1  # the blip happened
    assert decision.candidate == "cnn" and decision.skipped == []


def test_only_transient_errors_are_retried():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    def client_error(status: int) -> ClientError:
        return ClientError({"Error": {"Code": str(status)}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient(client_error(503)) and is_transient(client_error(429))
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_transient(RestException({"error_code": "INTERNAL_ERROR", "message": "database is locked"}))
    try:  # how MLflow reports a tracking server that dropped the connection
        try:
            raise ConnectionRefusedError("connection refused")
        except OSError as dropped:
            raise MlflowException("API request to http://127.0.0.1:9/api failed") from dropped
    except MlflowException as wrapped:
        assert is_transient(wrapped)
    # MLflow's own report of a multi-file download keeps only the messages of what failed.
    gathered = "The following failures occurred while downloading one or more artifacts from s3://b/m:\n##### File {} #####\n{}"
    assert is_transient(MlflowException(gathered.format("MLmodel", "An error occurred (503) when calling the "
                                                        "HeadObject operation: Service Unavailable")))
    assert not is_transient(MlflowException(gathered.format("MLmodel", "An error occurred (403) when calling the "
                                                            "HeadObject operation: Forbidden")))
    assert not is_transient(client_error(403)) and not is_transient(client_error(404))
    assert not is_transient(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(MlflowException("flavor not found"))  # a local error: INTERNAL_ERROR by default
    assert not is_transient(ValueError("a broken model file"))


def test_a_permanent_failure_skips_to_the_runner_up_without_retrying(monkeypatch):
    calls = []

    def broken():
        calls.append(1)
        raise ValueError("not a zip file")

    with pytest.raises(ValueError):
        registry._retrying_transient(broken, "loading", delays=(0.0, 0.0))
    assert len(calls) == 1

"""``pneumo serve`` as a real process against a real ``mlflow server``: MLflow's protocol, alias following, refusals, webhook."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from pneumo.serving.packaging import log_serving_model
from tests.plugins.mlflow_server import MlflowServer, brightness_model, labelled_images
from tests.plugins.processes import free_port, stop_process, wait_http

SIZE = 32
# The versions answer differently so that a response's label proves which model scored it:
# every image is PNEUMONIA for version 1 (threshold below any probability), NORMAL for version 2.
LABEL_OF = {"1": "PNEUMONIA", "2": "NORMAL"}
THRESHOLD_OF = {"1": 0.001, "2": 0.999}
POLL = 0.5


def _register(client: Any, name: str, experiment_id: str, threshold: float) -> str:
    """A new registry version of a brightness model logged as our served pyfunc (by a run of its own)."""
    run_id = client.create_run(experiment_id).info.run_id
    uri = log_serving_model(client, run_id, brightness_model(SIZE), threshold=threshold, image_size=SIZE,
                            candidate="cnn")
    return str(client.create_model_version(name, source=uri, run_id=run_id, model_id=uri.removeprefix("models:/")).version)


def _registered_model(uri: str) -> tuple[str, Any]:
    """(name, client) with versions 1 and 2 of a fresh registered model, champion at 1."""
    from pneumo.mlflow_client import mlflow_client

    client, name = mlflow_client(uri), f"serve-{uuid.uuid4().hex[:10]}"
    experiment_id = client.create_experiment(name)
    client.create_registered_model(name)
    assert [_register(client, name, experiment_id, THRESHOLD_OF[v]) for v in ("1", "2")] == ["1", "2"]
    client.set_registered_model_alias(name, "champion", "1")
    return name, client


class Served:
    """A running ``pneumo serve`` process."""

    def __init__(self, process: subprocess.Popen[Any], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def get(self, path: str) -> Any:
        response = requests.get(self.url + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 90) -> dict[str, Any]:
        """Poll ``/health`` until ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(health := self.get("/health")):
                return health
            time.sleep(0.1)
        raise AssertionError(f"{what} did not happen within {timeout} s: {health}\n{self.log.read_text()[-3000:]}")


@contextmanager
def _start(tmp: Path, uri: str, name: str, *extra: str, port: int | None = None) -> Iterator[Served]:
    port = port or free_port()
    log = tmp / "serve.log"
    command = [sys.executable, "-m", "pneumo.cli", "serve", "--model", name, "--tracking-uri", uri,
               "--host", "127.0.0.1", "--port", str(port), *extra]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", process, timeout=180, log=log)
        yield Served(process, f"http://127.0.0.1:{port}", log)
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def polled(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str, Any, str]]:
    """``pneumo serve`` polling every 0.5 s; it asks for a webhook the shared server refuses (http URL)."""
    name, client = _registered_model(mlflow_server.uri)
    tmp = tmp_path_factory.mktemp("serve")
    refused_hook = "http://127.0.0.1:9/webhook"  # the shared server allows only https webhooks: polling takes over
    with _start(tmp, mlflow_server.uri, name, "--poll-seconds", str(POLL), "--webhook-url", refused_hook) as served:
        yield served, name, client, mlflow_server.uri


def _images_b64(count: int = 2, seed: int = 90) -> list[str]:
    images, _ = labelled_images(count // 2, count - count // 2, seed=seed)
    return [base64.b64encode(image).decode("ascii") for image in images]


def _bodies(encoded: list[str]) -> dict[str, dict[str, Any]]:
    """The same images in each of MLflow's four JSON request forms."""
    return {"inputs": {"inputs": {"image": encoded}},
            "instances": {"instances": [{"image": item} for item in encoded]},
            "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[item] for item in encoded]}},
            "dataframe_records": {"dataframe_records": [{"image": item} for item in encoded]}}


def test_serve_answers_every_mlflow_form_like_mlflow_scoring_server(polled):
    import mlflow.pyfunc
    from mlflow.pyfunc.scoring_server import invocations

    served, name, _, _ = polled
    # What `mlflow models serve` answers: MLflow's own invocations() on the same registry version.
    reference = mlflow.pyfunc.load_model(f"models:/{name}/1")
    encoded = _images_b64(4)
    for form, body in _bodies(encoded).items():
        response = requests.post(f"{served.url}/invocations", json=body, timeout=60)
        expected = invocations(json.dumps(body), "application/json", reference, reference.metadata.get_input_schema())
        assert (response.status_code, response.json()) == (expected.status, json.loads(expected.response)), form
        assert response.headers["X-Model-Version"] == "1"
        assert [row["label"] for row in response.json()["predictions"]] == ["PNEUMONIA"] * 4

    asked = requests.post(f"{served.url}/invocations?include_version=true", json=_bodies(encoded)["inputs"], timeout=60)
    assert asked.json()["model_version"] == "1" and len(asked.json()["predictions"]) == 4

    bad = {"dataframe_split": {"columns": ["image"], "data": [[encoded[0]], ["bm90IGFuIGltYWdl"]]}}
    response = requests.post(f"{served.url}/invocations", json=bad, timeout=60)
    assert response.status_code == 400 and response.headers["X-Model-Version"] == "1"
    assert "item 1: not a JPEG or PNG image" in response.json()["message"]
    assert requests.post(f"{served.url}/invocations", data="{not json", timeout=30,
                         headers={"Content-Type": "application/json"}).status_code == 400

    assert requests.get(f"{served.url}/ping", timeout=10).status_code == 200
    version = served.get("/version")
    assert {key: version[key] for key in ("model", "version", "alias")} == {"model": name, "version": "1",
                                                                             "alias": "champion"}
    assert version["loaded_at"].startswith(time.strftime("%Y-", time.gmtime()))
    health = served.get("/health")
    assert health["status"] == "ok" and health["refused"] == [] and health["load_seconds"] > 0
    assert "scheme" in health["webhook"]["unavailable"]  # refused by the server, so polling alone follows


def _load(url: str, stop: threading.Event, results: list[tuple[float, int, str, list[str]]], batch: list[str]) -> None:
    """One client: post a batch until told to stop, recording (start, status, version header, labels)."""
    with requests.Session() as session:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = session.post(f"{url}/invocations", json={"inputs": {"image": batch}}, timeout=60)
                labels = [row["label"] for row in response.json()["predictions"]] if response.ok else []
                results.append((started, response.status_code, response.headers.get("X-Model-Version", ""), labels))
            except requests.RequestException as error:
                results.append((started, 0, type(error).__name__, []))


def test_promote_and_rollback_are_followed_with_no_failed_request(polled):
    from pneumo.promotion import registry

    served, name, client, uri = polled
    results: list[tuple[float, int, str, list[str]]] = []
    stop = threading.Event()
    batch = _images_b64(2, seed=5)
    clients = [threading.Thread(target=_load, args=(served.url, stop, results, batch)) for _ in range(8)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1)
        # A promotion as registry.promote leaves it, then the real rollback command's code.
        client.set_registered_model_alias(name, "previous-champion", "1")
        client.set_registered_model_alias(name, "champion", "2")
        served.wait_for("the swap to version 2", lambda h: h["version"] == "2")
        promoted_seen = time.monotonic()
        time.sleep(1)
        rollback_started = time.monotonic()
        info = registry.rollback(name, tracking_uri=uri)
        assert (info["version"], info["rolled_back"]) == ("1", "2")
        served.wait_for("the rollback to version 1", lambda h: h["version"] == "1")
        rolled_back_seen = time.monotonic()
        time.sleep(1)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)

    failures = [r for r in results if r[1] != 200]
    assert failures == [] and len(results) > 40, failures[:5]
    # Each answer came from the model its header names (in-flight requests finished on the old one).
    assert all(labels == [LABEL_OF[version]] * 2 for _, _, version, labels in results)
    # Requests sent after each swap was visible went to the new version.
    assert {r[2] for r in results if promoted_seen < r[0] < rollback_started} == {"2"}
    assert {r[2] for r in results if r[0] > rolled_back_seen} == {"1"}
    assert {r[2] for r in results} == {"1", "2"}


def test_a_version_that_does_not_load_is_refused_and_the_last_good_one_keeps_serving(polled, tmp_path):
    import mlflow

    served, name, client, _ = polled
    # Version 3: the files of version 1 with the Keras network truncated, as a broken upload would leave them.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path)))
    [keras_file] = local.rglob("*.keras")
    keras_file.write_bytes(keras_file.read_bytes()[:200])
    run_id = client.get_model_version(name, "1").run_id
    client.log_artifacts(run_id, str(local), "broken_model")
    source = f"{client.get_run(run_id).info.artifact_uri}/broken_model"
    broken = str(client.create_model_version(name, source=source, run_id=run_id).version)

    client.set_registered_model_alias(name, "champion", broken)
    health = served.wait_for("the refusal", lambda h: any(r["version"] == broken for r in h["refused"]))
    [refusal] = health["refused"]
    assert health["version"] == "1" and refusal["reason"].startswith("does not load")
    response = requests.post(f"{served.url}/invocations", json={"inputs": {"image": _images_b64(2)}}, timeout=60)
    assert response.status_code == 200 and response.headers["X-Model-Version"] == "1"
    # Not retried while the alias stays put; retried once it moves away and back.
    time.sleep(4 * POLL + 1)
    assert served.get("/health")["refused"] == [refusal]
    client.set_registered_model_alias(name, "champion", "1")
    served.wait_for("the check of version 1", lambda h: h["last_check"].get("alias_version") == "1")
    client.set_registered_model_alias(name, "champion", broken)
    served.wait_for("the second refusal", lambda h: h["refused"] and h["refused"][0]["at"] != refusal["at"])
    assert served.get("/version")["version"] == "1"
    client.set_registered_model_alias(name, "champion", "1")


@pytest.fixture(scope="module")
def webhook_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """An ``mlflow server`` that may post webhooks to loopback over http (its defaults allow only public https)."""
    from cryptography.fernet import Fernet

    workdir = tmp_path_factory.mktemp("webhook-mlflow")
    env = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           # One key for every worker, or a secret one worker stored cannot be read by another.
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(), "MLFLOW_WEBHOOK_CACHE_TTL": "1"}
    server = MlflowServer.start(workdir, str(workdir / "artifacts"), env, workers=1)
    try:
        yield server
    finally:
        server.stop()


def test_webhook_swaps_without_waiting_for_a_poll(webhook_server, tmp_path):
    import mlflow

    from pneumo.serving import webhook

    if not hasattr(mlflow.MlflowClient, "create_webhook"):
        pytest.skip(f"MLflow {mlflow.__version__} has no registry webhooks (MLflow >= 3.3)")
    name, client = _registered_model(webhook_server.uri)
    port = free_port()
    hook = f"http://127.0.0.1:{port}/webhook"
    # Polling once an hour: only the webhook can explain a swap within seconds.
    with _start(tmp_path, webhook_server.uri, name, "--poll-seconds", "3600", "--webhook-url", hook,
                port=port) as served:
        health = served.get("/health")
        if "unavailable" in health["webhook"]:
            pytest.skip(f"this MLflow server cannot hold webhooks: {health['webhook']['unavailable']}")
        moved = time.monotonic()
        client.set_registered_model_alias(name, "champion", "2")
        served.wait_for("the webhook-driven swap", lambda h: h["version"] == "2", timeout=30)
        assert time.monotonic() - moved < 30
        assert "webhook: @champion set to version 2" in served.log.read_text()
        # A delivery without the secret is refused and changes nothing.
        body = json.dumps({"entity": "model_version_alias", "action": "created",
                           "data": {"name": name, "alias": "champion", "version": "1"}})
        stamp = str(int(time.time()))
        forged = {"X-MLflow-Delivery-Id": "x", "X-MLflow-Timestamp": stamp,
                  "X-MLflow-Signature": webhook.signature("not-the-secret", "x", stamp, body)}
        assert requests.post(hook, data=body, headers=forged, timeout=10).status_code == 401
        assert [w.url for w in client.list_webhooks()] == [hook]
    assert list(client.list_webhooks()) == []  # removed at shutdown


def test_bad_arguments_fail_with_one_line_before_loading_anything(polled, capsys):
    from pneumo.cli import main

    served, name, _, uri = polled
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "70000"])
    assert exited.value.code == 2 and "not a TCP port" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--poll-seconds", "0"])
    assert "not a positive number of seconds" in capsys.readouterr().err
    cases = [
        (["--tracking-uri", "http://user:secret@127.0.0.1:9", "--model", name], "is unreachable"),
        (["--tracking-uri", uri, "--model", f"{name}-missing"], f"{name}-missing' has no alias 'champion'"),
        (["--tracking-uri", uri, "--model", name, "--alias", "nonexistent"], "has no alias 'nonexistent'"),
        (["--tracking-uri", uri, "--model", name, "--port", served.url.rsplit(":", 1)[1]], "cannot listen on"),
    ]
    for args, message in cases:
        assert main(["serve", "--host", "127.0.0.1", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pneumo: error: ") and message in err and "\n" not in err and "secret" not in err, err

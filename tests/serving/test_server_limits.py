"""``pneumo serve`` under hostile requests (#25 items 8 and 9), as a real process against a real ``mlflow server``:
oversized and deeply nested bodies, errors that echo the request or show a stack trace, heavy requests
that starve small ones."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import numpy as np
import pytest
import requests
from PIL import Image

from tests.plugins.mlflow_server import MlflowServer
from tests.serving.test_serve import Served, _images_b64, _registered_model, _start

MAX_BYTES = 2**20  # the server's PNEUMO_MAX_REQUEST_BYTES here: heavy requests (~190 kB) stay under it
TIMEOUT = 3  # MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, seconds
HEAVY_REQUESTS = 64  # more than any default thread pool (at most 32 threads) holds at once
HEAVY_SIDE = 5000  # four 25 Mpx images: the request's whole pixel budget (100 Mpx), ~0.35 s of decoding


@pytest.fixture(scope="module")
def served(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ``pneumo serve`` with a 1 MiB body limit and a 3 s request time limit."""
    name, _ = _registered_model(mlflow_server.uri)
    with ExitStack() as stack:
        with pytest.MonkeyPatch.context() as env:  # the server process's environment, copied at start
            env.setenv("PNEUMO_MAX_REQUEST_BYTES", str(MAX_BYTES))
            env.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", str(TIMEOUT))
            served = stack.enter_context(_start(tmp_path_factory.mktemp("limits"), mlflow_server.uri, name))
        yield served


def _post(served: Served, body: str | bytes, timeout: float = 30) -> requests.Response:
    return requests.post(f"{served.url}/invocations", data=body, timeout=timeout,
                         headers={"Content-Type": "application/json"})


def _assert_clean(response: requests.Response, status: int) -> dict:
    """A short JSON error of ``status``: no stack trace, no server path."""
    assert response.status_code == status, response.text[:300]
    assert len(response.content) < 1000, len(response.content)
    error = response.json()
    assert "stack_trace" not in error and "Traceback" not in response.text
    assert ".py" not in response.text and "site-packages" not in response.text
    assert response.headers["X-Model-Version"] == "1"
    return error


def test_a_body_over_the_limit_is_refused_with_413(served: Served) -> None:
    payload = json.dumps({"inputs": {"image": ["A" * (MAX_BYTES + 10)]}})
    error = _assert_clean(_post(served, payload), 413)
    assert error["error_code"] == "REQUEST_LIMIT_EXCEEDED" and "PNEUMO_MAX_REQUEST_BYTES" in error["message"]
    # Chunked, with no Content-Length to refuse it by: refused while reading.
    chunks = (payload[i:i + 65536].encode() for i in range(0, len(payload), 65536))
    _assert_clean(_post(served, chunks), 413)
    assert _post(served, json.dumps({"inputs": {"image": _images_b64(1)}})).status_code == 200


def test_a_scalar_input_gets_no_stack_trace(served: Served) -> None:
    error = _assert_clean(_post(served, json.dumps({"inputs": 5})), 400)
    assert "value is not an image: send a list of images" in error["message"] and "/" not in error["message"]


def test_a_deeply_nested_body_is_a_400_not_a_500(served: Served) -> None:
    depth = 100_000
    for body in ('{"inputs": ' + "[" * depth + "]" * depth + "}",
                 '{"inputs": {"image": ' + "[" * depth + "]" * depth + "}}"):
        error = _assert_clean(_post(served, body), 400)
        assert "nested too deeply" in error["message"]


def test_errors_name_the_item_and_never_echo_the_payload(served: Served) -> None:
    bad = "QUJD" * 50_000 + "!"  # 200 kB of base64 that is not valid as a whole
    forms = {"inputs": {"inputs": {"image": [_images_b64(1)[0], bad]}},
             "instances": {"instances": [{"image": bad}]},
             "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[bad]]}},
             "params": {"inputs": {"image": [bad]}, "params": {"explain": bad}}}
    for form, body in forms.items():
        error = _assert_clean(_post(served, json.dumps(body)), 400)
        assert "QUJDQUJD" not in error["message"], (form, error)
        assert form == "params" or "a string must be base64-encoded" in error["message"], (form, error)
    assert "item 1:" in _post(served, json.dumps(forms["inputs"])).json()["message"]
    error = _assert_clean(_post(served, "{not json " + bad), 400)
    assert "JSON" in error["message"] and "QUJDQUJD" not in error["message"]


def _gradient_png(side: int) -> str:
    """A base64 PNG of ``side``² pixels that compresses to a few kB: many pixels in a small body."""
    row = (np.arange(side) * 255 // side).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.tile(row, (side, 1))).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_heavy_requests_do_not_starve_a_small_one(served: Served) -> None:
    heavy = json.dumps({"inputs": {"image": [_gradient_png(HEAVY_SIDE)] * 4}})
    assert len(heavy) < MAX_BYTES
    small = json.dumps({"inputs": {"image": _images_b64(1)}})
    with ThreadPoolExecutor(HEAVY_REQUESTS) as clients:
        answers = [clients.submit(_post, served, heavy) for _ in range(HEAVY_REQUESTS)]
        time.sleep(0.5)  # every heavy request is in (and the server's threads were taken without the fix)
        started = time.monotonic()
        response = _post(served, small)
        took = time.monotonic() - started
        statuses = [answer.result().status_code for answer in answers]
    assert response.status_code == 200 and took < TIMEOUT, (response.status_code, took, response.text[:200])
    assert set(statuses) <= {200, 504} and 504 in statuses, statuses  # the load was real: some gave up
    # Heavy requests that gave up while queued never started: the server is idle again at once.
    started = time.monotonic()
    assert _post(served, small).status_code == 200 and time.monotonic() - started < 1.5

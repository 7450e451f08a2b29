"""The served pyfunc model: same numbers as training, every input form, clear errors, registry pull, REST."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pneumo.config import DEFAULT_REGISTERED_MODEL, Gate
from pneumo.errors import PneumoError, ServingError
from pneumo.evaluation.holdout import TestSet
from pneumo.promotion import registry
from pneumo.serving import pyfunc as serving
from pneumo.serving.packaging import save_serving_model
from tests.plugins.mlflow_server import (
    brightness_model,
    labelled_images,
    log_retraining,
    mlflow_executable,
    stop_process,
    threshold_for,
    wait_http,
    xray_jpeg,
)
from tests.plugins.s3 import free_port

SIZE = 32


def _encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    """Images of several kinds: big gray JPEG (DCT-scaled decode), RGB JPEG, gray PNG, RGBA PNG."""
    rng = np.random.default_rng(1)
    return {
        "gray-large.jpeg": _encode(rng.integers(0, 255, (300, 420), dtype=np.uint8), "JPEG", quality=90),
        "rgb.jpeg": _encode(rng.integers(0, 255, (70, 50, 3), dtype=np.uint8), "JPEG", quality=90),
        "gray.png": _encode(rng.integers(0, 255, (45, 61), dtype=np.uint8), "PNG"),
        "rgba.png": _encode(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "PNG"),
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A cnn (the seed architecture, untrained) saved as the pyfunc model, loaded back through MLflow."""
    import keras
    import mlflow.pyfunc

    from pneumo.training.models import build_model

    keras.utils.set_random_seed(3)
    model = build_model("cnn", SIZE)
    path = save_serving_model(tmp_path_factory.mktemp("served") / "model", model, threshold=0.5,
                                      image_size=SIZE, candidate="cnn")
    return model, mlflow.pyfunc.load_model(str(path))


def test_preprocessing_is_the_training_pipeline(files, served, tmp_path):
    from pneumo.data.images import make_dataset

    # The training path: files on disk → make_dataset (tf.data + data.decode_image).
    folder = tmp_path / "chest_xray" / "test" / "NORMAL"
    folder.mkdir(parents=True)
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(f"chest_xray/test/NORMAL/{name}")
    dataset = make_dataset(tmp_path, paths, [0] * len(paths), image_size=SIZE, batch_size=len(paths),
                           training=False, cache=False)
    trained_pixels = np.concatenate([x.numpy() for x, _ in dataset])

    served_pixels = serving.preprocess(list(files.values()), SIZE)
    np.testing.assert_array_equal(served_pixels, trained_pixels)  # bit-identical inputs

    model, pyfunc = served
    expected = np.asarray(model.predict_on_batch(trained_pixels)).ravel()
    output = pyfunc.predict(list(files.values()))
    np.testing.assert_allclose(output["probability"].to_numpy(), expected, rtol=1e-6, atol=1e-7)
    assert list(output["label"]) == ["PNEUMONIA" if p >= 0.5 else "NORMAL" for p in expected]


def test_a_model_logged_before_the_stage_layout_still_loads(files, served, tmp_path):
    # Champions registered by older code run "from pneumo.serving import PneumoniaClassifier".
    import mlflow.pyfunc

    from pneumo.training.models import build_model

    path = save_serving_model(tmp_path / "model", build_model("cnn", SIZE), threshold=0.5, image_size=SIZE,
                              candidate="cnn")
    [code] = [file for file in path.glob("*.py") if "set_model(" in file.read_text()]  # not code/pneumo/
    code.write_text(code.read_text().replace("from pneumo.serving.pyfunc import", "from pneumo.serving import"))
    assert "from pneumo.serving import PneumoniaClassifier" in code.read_text()
    output = mlflow.pyfunc.load_model(str(path)).predict(list(files.values()))
    assert len(output) == len(files) and output["probability"].between(0, 1).all()


def test_every_input_form_gives_the_same_answer(files, served):
    _, pyfunc = served
    jpeg = files["rgb.jpeg"]
    reference = pyfunc.predict([jpeg])["probability"].iloc[0]
    for form in (jpeg, [jpeg], (jpeg,), bytearray(jpeg), pd.DataFrame({"image": [jpeg]}),
                 pd.DataFrame({"anything": [jpeg]}), pd.Series([jpeg]),
                 [base64.b64encode(jpeg).decode()], np.array([jpeg], dtype=object)):
        assert pyfunc.predict(form)["probability"].iloc[0] == pytest.approx(reference, abs=1e-7), type(form)

    # Arrays of any size, gray or RGB(A), go through the same decode path as a PNG of them.
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 255, (57, 33), dtype=np.uint8)
    rgb = rng.integers(0, 255, (32, 90, 3), dtype=np.uint8)
    as_png = pyfunc.predict([_encode(gray, "PNG"), _encode(rgb, "PNG")])["probability"].to_numpy()
    for form in ([gray, rgb], [gray.astype(np.float32), rgb.astype(np.float64)], [gray.tolist(), rgb.tolist()],
                 pd.DataFrame({"image": [gray, rgb]})):
        np.testing.assert_allclose(pyfunc.predict(form)["probability"].to_numpy(), as_png, atol=1e-7)
    assert len(pyfunc.predict(gray)) == 1 and len(pyfunc.predict(np.stack([gray, gray]))) == 2
    assert len(pyfunc.predict(rgb)) == 1 and len(pyfunc.predict(gray[:, :, None])) == 1

    # More images than one model call takes are scored in chunks, in order.
    many = [xray_jpeg(level, size=32, seed=i) for i, level in enumerate(np.linspace(20, 230, serving.CHUNK + 6))]
    chunked = pyfunc.predict(many)["probability"].to_numpy()
    np.testing.assert_allclose(chunked[-6:], pyfunc.predict(many[-6:])["probability"].to_numpy(), atol=1e-7)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([b"ok", b""], "item 1: empty bytes"),
        ([b"ok", b"hello, I am text"], "item 1: not a JPEG or PNG image"),
        ([b"ok", b"ok", 42], "item 2: unsupported type int"),
        ([b"ok", None], "item 1: unsupported type NoneType"),
        ([b"ok", "%%% not base64 %%%"], "item 1: a string must be base64"),
        ([b"ok", b"truncated"], "item 1: cannot decode image"),
        ([b"ok", np.zeros((4, 4, 2))], r"item 1: array of shape \(4, 4, 2\) is not an image"),
        ([b"ok", np.full((4, 4), 300.0)], "item 1: pixel values must be 0..255"),
        ([b"ok", np.full((4, 4), np.nan)], "item 1: array contains NaN"),
        ([b"ok", np.zeros((0, 5))], "item 1: empty image array"),
        ([b"ok", [[1, 2], [3]]], "item 1: nested list is not a rectangular pixel array"),
        ([], "no images in the input"),
        (pd.DataFrame({"a": [b"ok"], "b": [b"ok"]}), "expected one column"),
        (3.5, "unsupported input type float"),
    ],
)
def test_bad_inputs_name_the_offending_item(served, files, bad, message):
    _, pyfunc = served
    ok = files["gray.png"]
    truncated = files["gray-large.jpeg"][:300]
    if isinstance(bad, list):
        swap = {b"ok": ok, b"truncated": truncated}
        bad = [swap.get(item, item) if isinstance(item, bytes) else item for item in bad]
    elif isinstance(bad, pd.DataFrame):
        bad = bad.map(lambda _: ok)
    with pytest.raises(ServingError, match=message) as raised:
        pyfunc.predict(bad)
    assert isinstance(raised.value, PneumoError) and "\n" not in str(raised.value)


@pytest.fixture(scope="module")
def champion(mlflow_server, tmp_path_factory):
    """``pneumonia-classifier@champion`` on the test server: a brightness model that is right on every image."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_server.uri)
    parent = log_retraining(mlflow_server.uri, "serving-tests", brightness_model(SIZE), {"cnn": (threshold_for(128), 1.0)},
                            source="local")
    images, labels = labelled_images(5, 5)
    test = TestSet(images, labels, [f"patient-{index}" for index in range(len(images))])
    decision = registry.promote(parent, test, gate=Gate(floors_on="point"), model_name=DEFAULT_REGISTERED_MODEL,
                                tracking_uri=mlflow_server.uri)
    assert decision.promoted
    return decision


def test_apps_pull_the_champion_and_predict_on_raw_jpeg_bytes(mlflow_uri, champion):
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model("models:/pneumonia-classifier@champion")
    images, labels = labelled_images(4, 4, seed=50)  # fresh images, also RGB ones
    images.append(xray_jpeg(200, seed=7, rgb=True))
    labels.append(1)
    output = model.predict(images)
    assert list(output["label"]) == ["PNEUMONIA" if label else "NORMAL" for label in labels]
    assert output["probability"].between(0, 1).all()
    assert model.model_config["threshold"] == pytest.approx(threshold_for(128))


@pytest.fixture(scope="module")
def scoring_server(mlflow_server, champion, tmp_path_factory):
    """``mlflow models serve -m models:/pneumonia-classifier@champion --env-manager local`` on loopback."""
    port = free_port()
    log = tmp_path_factory.mktemp("scoring") / "serve.log"
    # The scoring server execs ``uvicorn`` by name: the venv's bin must be on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # Pickle deserialization off: the served model is packaged from code, so it must load anyway.
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": mlflow_server.uri, "TF_CPP_MIN_LOG_LEVEL": "2",
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [mlflow_executable(), "models", "serve", "-m", "models:/pneumonia-classifier@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", process, timeout=180, log=log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_scoring_server_answers_invocations(scoring_server):
    images, labels = labelled_images(2, 2, seed=90)
    encoded = [base64.b64encode(image).decode("ascii") for image in images]
    expected = ["PNEUMONIA" if label else "NORMAL" for label in labels]

    status, body = _post(f"{scoring_server}/invocations",
                         {"dataframe_split": {"columns": ["image"], "data": [[item] for item in encoded]}})
    assert status == 200, body
    assert [row["label"] for row in body["predictions"]] == expected
    assert all(0 <= row["probability"] <= 1 for row in body["predictions"])

    status, body = _post(f"{scoring_server}/invocations", {"inputs": {"image": encoded}})
    assert status == 200, body
    assert [row["label"] for row in body["predictions"]] == expected

    # Asked to explain, it adds one PNG heatmap overlay per image (base64); the default stays as it was.
    status, body = _post(f"{scoring_server}/invocations", {"inputs": {"image": encoded}, "params": {"explain": True}})
    assert status == 200, body
    assert [row["label"] for row in body["predictions"]] == expected
    for row in body["predictions"]:
        with Image.open(io.BytesIO(base64.b64decode(row["heatmap"]))) as overlay:
            assert overlay.format == "PNG" and overlay.size == (SIZE, SIZE)

    # A bad item is a 400 naming it, not a 500 with a TensorFlow trace.
    status, body = _post(f"{scoring_server}/invocations",
                         {"dataframe_split": {"columns": ["image"], "data": [[encoded[0]], ["bm90IGFuIGltYWdl"]]}})
    assert status == 400 and "item 1: not a JPEG or PNG image (12 bytes;" in body["message"]
    assert "not an image" not in body["message"]  # the payload's bytes are never echoed back


def test_served_probability_is_the_calibrated_one(tmp_path):
    import keras
    import mlflow.pyfunc

    from pneumo.evaluation.calibration import Calibrator
    from pneumo.training.models import build_model

    keras.utils.set_random_seed(4)
    model = build_model("cnn", SIZE)
    calibrator = Calibrator("temperature", 2.5)
    path = save_serving_model(tmp_path / "model", model, threshold=0.5, image_size=SIZE, candidate="cnn",
                              calibration=calibrator.to_config())
    loaded = mlflow.pyfunc.load_model(str(path))
    images, _ = labelled_images(3, 3, seed=7)
    raw = np.asarray(model(serving.preprocess(images, SIZE), training=False), dtype=np.float64).ravel()
    np.testing.assert_allclose(loaded.predict(images)["probability"], calibrator.apply(raw), rtol=1e-5)
    assert loaded.model_config["calibration"] == {"method": "temperature", "temperature": 2.5, "bias": 0.0}
    assert not list(path.rglob("*.pkl"))  # packaged from code: nothing to unpickle


def test_champion_carries_its_model_card_and_no_pickle(mlflow_uri, champion, tmp_path, capsys):
    import mlflow

    from pneumo.cli import main

    client = mlflow.MlflowClient(mlflow_uri)
    version = client.get_model_version(DEFAULT_REGISTERED_MODEL, champion.version)
    assert version.description.startswith("# Model card: pneumonia-classifier — cnn")
    for section in ("## Intended use", "## Data", "## Metrics", "## Calibration", "## Promotion decision", "## Caveats"):
        assert section in version.description
    capsys.readouterr()
    assert main(["champion", "--card", "--tracking-uri", mlflow_uri]) == 0
    assert capsys.readouterr().out.strip() == version.description.strip()
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{DEFAULT_REGISTERED_MODEL}/{champion.version}",
                                                     dst_path=str(tmp_path)))
    assert (local / "MLmodel").is_file() and not list(local.rglob("*.pkl"))
    # The same model loads in a process that refuses pickle.
    code = ("import mlflow.pyfunc; m = mlflow.pyfunc.load_model(%r); print(m.model_config['candidate'])" % str(local))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0 and result.stdout.strip().endswith("cnn"), result.stderr[-2000:]

"""Hostile inputs (#14): 0..1 floats, NaN/inf pixels, decompression bombs and oversized batches are refused."""

from __future__ import annotations

import base64
import io
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pneumo.data.images import inspect_image, make_dataset, validate_images
from pneumo.errors import ServingError
from pneumo.serving import pyfunc as serving
from tests.plugins.data import local_manifest

SIZE = 32
BOMB_SIDE = 20_000  # 400 Mpx claimed: above Pillow's 179 Mpx error limit and the 25 Mpx default cap
PIXELS_ENV = "PNEUMO_MAX_IMAGE_PIXELS"
BATCH_ENV = "PNEUMO_MAX_BATCH_IMAGES"


# ----------------------------------------------------------------------------- crafted files
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width × height`` (8-bit gray) but whose IDAT holds one row."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    one_row = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", one_row) + _chunk(b"IEND", b"")


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to claim ``width × height``."""
    data = bytearray(encode(np.full((16, 16), 128, np.uint8), "JPEG"))
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture(autouse=True)
def default_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from the documented defaults, whatever the calling shell exports."""
    monkeypatch.delenv(PIXELS_ENV, raising=False)
    monkeypatch.delenv(BATCH_ENV, raising=False)


# ----------------------------------------------------------------------------- settings
def test_settings_are_read_at_call_time_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumo.data.decode import DEFAULT_MAX_IMAGE_PIXELS, max_image_pixels
    from pneumo.errors import ConfigError

    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS == 25_000_000
    assert serving.max_batch_images() == serving.DEFAULT_MAX_BATCH_IMAGES == 256
    monkeypatch.setenv(PIXELS_ENV, "1_000")
    monkeypatch.setenv(BATCH_ENV, "3")
    assert max_image_pixels() == 1000 and serving.max_batch_images() == 3
    for bad in ("lots", "0", "-5", "1.5"):
        monkeypatch.setenv(PIXELS_ENV, bad)
        with pytest.raises(ConfigError, match=PIXELS_ENV):
            max_image_pixels()


def test_header_size_reads_png_and_jpeg_without_decoding() -> None:
    from pneumo.data.decode import header_size

    assert header_size(png_claiming(BOMB_SIDE, 7)) == (BOMB_SIDE, 7)
    assert header_size(jpeg_claiming(9000, BOMB_SIDE)) == (9000, BOMB_SIDE)
    assert header_size(encode(np.zeros((30, 50, 3), np.uint8), "PNG")) == (50, 30)
    assert header_size(encode(np.zeros((30, 50), np.uint8), "JPEG")) == (50, 30)
    for junk in (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00", b"GIF89a" * 10):
        assert header_size(junk) is None


def test_a_png_with_text_before_its_header_is_still_capped(tmp_path: Path) -> None:
    # #25: a tEXt chunk before IHDR made the header reader return nothing, so the cap was skipped.
    from pneumo.data.decode import header_size

    plain = png_claiming(12_000, 12_000)
    texted = plain[:8] + _chunk(b"tEXt", b"Comment\x00" + b"x" * 500) + plain[8:]
    assert header_size(texted) == (12_000, 12_000)
    path = tmp_path / "texted.png"
    path.write_bytes(texted)
    assert inspect_image(path).startswith("bad-image: 144000000 pixels exceeds the cap of 25000000")
    pixels_first = plain[:8] + _chunk(b"IDAT", b"\x00" * 16) + plain[8:]  # no header before the pixels
    path.write_bytes(pixels_first)
    assert header_size(pixels_first) is None and inspect_image(path) == "bad-image: no readable size in its header"


# ----------------------------------------------------------------------------- training data
def test_validate_reports_bombs_as_bad_images_and_goes_on(small_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(small_dataset, root)
    normal = root / "chest_xray" / "train" / "NORMAL"
    (normal / "IM-9990-0001.png").write_bytes(png_claiming(BOMB_SIDE, BOMB_SIDE))  # Pillow: DecompressionBombError
    (normal / "IM-9991-0001.png").write_bytes(png_claiming(10_000, 10_000))  # 100 Mpx: Pillow only warns
    (normal / "IM-9992-0001.jpeg").write_bytes(jpeg_claiming(BOMB_SIDE, BOMB_SIDE))
    frame = local_manifest(root)

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # no warning: refused before Pillow
        checked = validate_images(root, frame, workers=2)

    reasons = {Path(skip.path).name: skip.reason for skip in checked.bad}
    assert reasons == {
        "IM-9990-0001.png": "bad-image: 400000000 pixels exceeds the cap of 25000000 (20000×20000 image; "
                            "setting PNEUMO_MAX_IMAGE_PIXELS)",
        "IM-9991-0001.png": "bad-image: 100000000 pixels exceeds the cap of 25000000 (10000×10000 image; "
                            "setting PNEUMO_MAX_IMAGE_PIXELS)",
        "IM-9992-0001.jpeg": "bad-image: 400000000 pixels exceeds the cap of 25000000 (20000×20000 image; "
                             "setting PNEUMO_MAX_IMAGE_PIXELS)",
    }
    assert len(checked.frame) == len(frame) - 3


def test_cap_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "forty.png"
    image.write_bytes(encode(np.zeros((40, 40), np.uint8), "PNG"))
    assert inspect_image(image) == (40, 40)
    monkeypatch.setenv(PIXELS_ENV, "1000")
    assert inspect_image(image) == ("bad-image: 1600 pixels exceeds the cap of 1000 (40×40 image; "
                                    "setting PNEUMO_MAX_IMAGE_PIXELS)")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("pillow-bomb.png", png_claiming(BOMB_SIDE, BOMB_SIDE)),
        ("zero-size.png", png_claiming(0, 0)),
        ("huge-jpeg.jpeg", jpeg_claiming(65_535, 65_535)),
        ("signature-only.png", b"\x89PNG\r\n\x1a\n"),
        ("jpeg-magic-junk.jpeg", b"\xff\xd8\xff" + bytes(range(256)) * 4),
        ("gif.png", b"GIF89a" + b"\x00" * 64),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_inspect_image_reports_hostile_files_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, data: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    if name == "pillow-bomb.png":  # a cap raised past Pillow's own limit: Pillow's error is reported too
        monkeypatch.setenv(PIXELS_ENV, str(10**12))
    verdict = inspect_image(path)
    assert isinstance(verdict, str) and verdict.startswith("bad-image: "), verdict


def test_pipeline_drops_over_cap_images_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumo.data.decode import decode_image

    gray = np.random.default_rng(0).integers(0, 255, (60, 60), dtype=np.uint8)
    files = {"small.png": encode(gray[:20, :20], "PNG"), "small.jpeg": encode(gray[:20, :20], "JPEG"),
             "big.png": encode(gray[:40, :40], "PNG"), "big.jpeg": encode(gray[:40], "JPEG"),
             "bomb.png": png_claiming(BOMB_SIDE, BOMB_SIDE), "bomb.jpeg": jpeg_claiming(BOMB_SIDE, BOMB_SIDE)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.setenv(PIXELS_ENV, "1000")  # 20×20 passes; 40×40 and 60×40 (valid files) must not be decoded
    dataset = make_dataset(tmp_path, list(files), [0] * len(files), image_size=SIZE, batch_size=8,
                           training=False, cache=False)
    assert sum(int(x.shape[0]) for x, _ in dataset) == 2

    # The bombs fail on their header, not after a 400 Mpx allocation, whatever the cap.
    monkeypatch.delenv(PIXELS_ENV)
    import tensorflow as tf

    for name in ("bomb.png", "bomb.jpeg"):
        with pytest.raises(tf.errors.InvalidArgumentError, match="image pixels exceed the cap"):
            decode_image(files[name], SIZE)


# ----------------------------------------------------------------------------- the served model
@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed cnn (untrained) packaged as the served pyfunc."""
    import keras

    from pneumo.serving.packaging import save_serving_model
    from pneumo.training.models import build_model

    keras.utils.set_random_seed(3)
    return save_serving_model(tmp_path_factory.mktemp("served") / "model", build_model("cnn", SIZE),
                              threshold=0.5, image_size=SIZE, candidate="cnn")


@pytest.fixture(scope="module")
def pyfunc(model_path: Path):
    """The served pyfunc loaded back through MLflow, as apps and ``mlflow models serve`` load it."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(model_path))


@pytest.fixture(scope="module")
def xray() -> np.ndarray:
    return np.random.default_rng(4).integers(0, 256, (48, 40), dtype=np.uint8)


def _refused(pyfunc, model_input, message: str) -> ServingError:
    with pytest.raises(ServingError, match=message) as raised:
        pyfunc.predict(model_input)
    assert "\n" not in str(raised.value)
    return raised.value


def test_float_pixels_scaled_to_0_1_are_refused(pyfunc, xray) -> None:
    hint = "look like an image scaled to 0..1; pixel arrays must be 0..255: multiply by 255"
    ok = encode(xray, "PNG")
    _refused(pyfunc, [ok, xray / 255.0], f"item 1: float pixels in 0..1 {hint}")
    _refused(pyfunc, [(xray / 255.0).astype(np.float32)], "item 0: float pixels in 0..1 look like")
    _refused(pyfunc, np.stack([xray, xray]) / 255.0, "item 0: float pixels")  # a numeric batch array
    _refused(pyfunc, [ok, ok, (xray / 255.0).tolist()], "item 2: float pixels")  # nested lists from JSON
    _refused(pyfunc, [np.dstack([xray] * 3) / 510.0], r"float pixels in 0..0\.5")

    # The same pixels as 0..255 floats, uint8, ints from JSON, and an all-black float image still score.
    expected = pyfunc.predict([ok])["probability"].iloc[0]
    for form in (xray.astype(np.float64), xray.astype(np.float32), xray.tolist(), xray / 255.0 * 255.0):
        assert pyfunc.predict([form])["probability"].iloc[0] == pytest.approx(expected, abs=1e-6)
    assert len(pyfunc.predict([xray.astype(np.float16), xray[:32, :32].tolist()])) == 2


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.full((40, 40), np.nan), "item 1: array contains NaN or infinity"),
        (np.full((40, 40), np.inf), "item 1: array contains NaN or infinity"),
        (np.where(np.eye(40) > 0, -np.inf, 100.0), "item 1: array contains NaN or infinity"),
        ([[1.0, float("nan")], [3.0, 4.0]], "item 1: array contains NaN or infinity"),
        ([[1.0, float("inf")], [3.0, 4.0]], "item 1: array contains NaN or infinity"),
        ([[True, False], [False, True]], "item 1: nested list is not a rectangular pixel array"),
        ([["1", "2"], ["3", "4"]], "item 1: nested list is not a rectangular pixel array"),
    ],
    ids=["nan", "inf", "minus-inf", "nan-in-list", "inf-in-list", "bool-list", "string-list"],
)
def test_non_finite_and_non_numeric_pixels_are_refused(pyfunc, xray, bad, message) -> None:
    _refused(pyfunc, [encode(xray, "PNG"), bad], message)


def test_over_cap_images_are_refused_before_decoding_and_the_model_goes_on(
    pyfunc, xray, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = encode(xray, "PNG")
    cap = r"400000000 pixels exceeds the cap of 25000000 \(20000×20000 image; setting PNEUMO_MAX_IMAGE_PIXELS\)"
    bomb = png_claiming(BOMB_SIDE, BOMB_SIDE)
    _refused(pyfunc, [ok, bomb], f"item 1: {cap}")
    _refused(pyfunc, [ok, base64.b64encode(bomb).decode("ascii")], f"item 1: {cap}")  # as REST sends it
    _refused(pyfunc, pd.DataFrame({"image": [jpeg_claiming(BOMB_SIDE, BOMB_SIDE)]}), f"item 0: {cap}")
    assert len(pyfunc.predict([ok])) == 1  # the model still answers

    monkeypatch.setenv(PIXELS_ENV, "1500")  # read per call: a lower cap applies to arrays and files alike
    _refused(pyfunc, [xray[:32, :40], xray[:40, :40]], "item 1: 1600 pixels exceeds the cap of 1500")
    _refused(pyfunc, [encode(xray[:40, :40], "JPEG")], "item 0: 1600 pixels exceeds the cap of 1500")
    assert len(pyfunc.predict([xray[:32, :40], encode(xray[:32, :40], "JPEG")])) == 2


def test_batches_over_the_maximum_are_refused(pyfunc, xray, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = encode(xray[:32, :32], "PNG")
    _refused(pyfunc, [ok] * 257, r"257 images in one request exceeds the maximum of 256 \(PNEUMO_MAX_BATCH_IMAGES\)")
    _refused(pyfunc, np.zeros((300, 8, 8), np.uint8), "300 images in one request")
    monkeypatch.setenv(BATCH_ENV, "3")
    _refused(pyfunc, pd.DataFrame({"image": [ok] * 4}), "4 images in one request exceeds the maximum of 3")
    assert len(pyfunc.predict([ok] * 3)) == 3


def test_large_images_are_decoded_in_groups_with_the_same_numbers(xray, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumo.data.decode import decoded_pixels

    images = [encode(xray, "PNG"), encode(xray[:30], "JPEG"), encode(np.dstack([xray] * 3), "PNG")]
    assert [len(group) for group in serving._pixel_groups(images, SIZE, 48 * 40 + 30 * 40)] == [2, 1]
    assert [len(group) for group in serving._pixel_groups(images, SIZE, 1)] == [1, 1, 1]
    # A big JPEG is decoded at a DCT scale (here 1/8), so it counts what is decoded, not its header.
    assert decoded_pixels(jpeg_claiming(4000, 3000), 120) == 500 * 375
    assert decoded_pixels(png_claiming(4000, 3000), 120) == 4000 * 3000
    together = serving.preprocess(images, SIZE)
    monkeypatch.setattr(serving, "DECODE_PIXEL_BUDGET", 1)  # one image per decode call
    np.testing.assert_array_equal(serving.preprocess(images, SIZE), together)


def test_a_bad_limit_setting_stops_the_model_loading(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc

    monkeypatch.setenv(BATCH_ENV, "many")
    with pytest.raises(Exception, match="PNEUMO_MAX_BATCH_IMAGES must be a positive integer, got 'many'"):
        mlflow.pyfunc.load_model(str(model_path))


def test_refusals_are_http_400() -> None:
    error = serving.InvalidImageError("item 0: too big")
    assert error.error_code == "INVALID_PARAMETER_VALUE" and error.get_http_status_code() == 400


def test_scoring_app_answers_400_then_200(pyfunc, xray, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's own scoring app (what ``mlflow models serve`` runs), in process: JSON in, status out."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")  # init() sets it; restored after
    client = TestClient(scoring_server.init(pyfunc))
    ok = base64.b64encode(encode(xray, "PNG")).decode("ascii")
    bomb = base64.b64encode(png_claiming(BOMB_SIDE, BOMB_SIDE)).decode("ascii")

    def post(payload: dict) -> tuple[int, dict]:
        response = client.post("/invocations", json=payload)
        return response.status_code, response.json()

    status, body = post({"inputs": {"image": [ok, bomb]}})
    assert status == 400 and "item 1: 400000000 pixels exceeds the cap" in body["message"]
    status, body = post({"dataframe_split": {"columns": ["image"], "data": [[ok]] * 257}})
    assert status == 400 and "257 images in one request exceeds the maximum of 256" in body["message"]
    status, body = post({"inputs": {"image": [(xray / 255.0).tolist()]}})
    assert status == 400 and "multiply by 255" in body["message"]
    status, body = post({"inputs": {"image": [ok]}})
    assert status == 200 and body["predictions"][0]["label"] in ("NORMAL", "PNEUMONIA")


# ----------------------------------------------------------------------------- #25 items 8 and 10
def test_a_request_over_the_pixel_budget_is_refused_before_decoding(pyfunc, xray, monkeypatch) -> None:
    """Each image is under the cap, together they are over the request budget: refused, naming the rule."""
    assert serving.max_request_pixels() == serving.DEFAULT_MAX_REQUEST_PIXELS == 100_000_000
    # Five 5,000×5,000 headers (125 Mpx): decoding them would take seconds; the refusal reads headers only.
    error = _refused(pyfunc, [png_claiming(5000, 5000)] * 5, "over the request budget of 100000000")
    assert "125000000 pixels" in str(error) and "PNEUMO_MAX_REQUEST_PIXELS" in str(error)
    monkeypatch.setenv("PNEUMO_MAX_REQUEST_PIXELS", str(2 * 48 * 40))
    _refused(pyfunc, [xray] * 3, "over the request budget of 3840")
    assert len(pyfunc.predict([xray] * 2)) == 2


@pytest.mark.parametrize("side", [1, 31])
def test_images_below_the_minimum_size_are_refused(pyfunc, xray, side) -> None:
    from pneumo.data.decode import MIN_IMAGE_SIDE

    assert MIN_IMAGE_SIDE == 32
    small = xray[:side, :40]
    for item in (encode(small, "PNG"), small):  # a file and a pixel array
        _refused(pyfunc, [xray, item], f"item 1: 40×{side} image is below the minimum of 32 px")
    assert len(pyfunc.predict([xray[:32, :32]])) == 1


def test_constant_images_are_refused(pyfunc, xray) -> None:
    """Blank white, black and fully transparent images scored 1.0 PNEUMONIA; they are refused, named."""
    white = encode(np.full((64, 64), 255, np.uint8), "PNG")
    clear = encode(np.zeros((64, 64, 4), np.uint8), "PNG")  # alpha 0 everywhere
    faint = np.full((64, 64), 100, np.uint8)
    faint[::8] = 101  # near-constant: std ~0.3 grey levels
    for index, item in enumerate((white, clear, faint)):
        _refused(pyfunc, [xray, item], "item 1: image is \\(near-\\)constant")
    _refused(pyfunc, [np.zeros((40, 40), np.uint8)], "item 0: image is")
    assert len(pyfunc.predict([xray])) == 1

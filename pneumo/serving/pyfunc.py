"""The pyfunc model downstream apps pull: images in, pneumonia probability and label out."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pneumo.data.decode import (
    JPEG_MAGIC, PNG_MAGIC, batch_decoder, decode_image, decoded_pixels, env_limit, header_size, max_image_pixels,
    min_size_reason, pixel_cap_reason
)
from pneumo.data.layout import CLASSES
from pneumo.errors import ModelError, ServingError

KERAS_ARTIFACT = "keras_model"
INPUT_COLUMN = "image"
CHUNK = 64  # images per model call: bounds memory for large requests
MAX_BATCH_IMAGES_ENV = "PNEUMO_MAX_BATCH_IMAGES"
DEFAULT_MAX_BATCH_IMAGES = 256  # images per request; more is refused (HTTP 400) before decoding
# Pixels decoded in one parallel call: 64 PNGs at the pixel cap would need tens of GB while
# decoding (uint8 + float32 resize input), so large images are decoded in smaller groups.
DECODE_PIXEL_BUDGET = 100_000_000
MAX_REQUEST_PIXELS_ENV = "PNEUMO_MAX_REQUEST_PIXELS"
# Pixels all images of one request may claim together: images alone do not bound the work (16 images
# of 49 Mpx took 20+ s of decoding and starved other requests); 100 Mpx is ten of the largest Kaggle X-rays.
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000
# A decoded gray image whose standard deviation (0..255 scale) is below this is (near-)constant: blank
# white, black or transparent images scored 1.0 PNEUMONIA. Real X-rays are far above it (tens).
MIN_PIXEL_STD = 2.0


class InvalidImageError(ServingError, MlflowException):
    """An input item is not a scorable image; as an ``MlflowException`` a scoring server answers HTTP 400."""

    def __init__(self, message: str) -> None:
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)

    def __str__(self) -> str:
        return self.message


# ----------------------------------------------------------------------------- inputs
def _items(model_input: Any) -> list[Any]:
    """Flatten the accepted container types into one list of per-image items."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN in model_input.columns:
            return list(model_input[INPUT_COLUMN])
        if len(model_input.columns) == 1:
            return list(model_input.iloc[:, 0])
        raise InvalidImageError(
            f"expected one column (or a column named {INPUT_COLUMN!r}) of images, "
            f"got columns {list(map(str, model_input.columns))}"
        )
    if isinstance(model_input, dict):
        if set(model_input) != {INPUT_COLUMN}:
            raise InvalidImageError(f"expected a dict with the key {INPUT_COLUMN!r}, got {sorted(model_input)}")
        return _items(model_input[INPUT_COLUMN])
    if isinstance(model_input, (bytes, bytearray, memoryview, str)):
        return [model_input]
    if isinstance(model_input, np.ndarray):
        if model_input.ndim == 0:  # `{"inputs": 5}`: one number is not an image (and list() of it would fail)
            raise InvalidImageError(f"a single {model_input.dtype} value is not an image: send a list of images")
        if model_input.dtype.kind in "OSUa" and (model_input.ndim == 1 or model_input.shape[1:] == (1,)):
            return list(model_input.reshape(-1))  # 1-D, or the REST ``inputs`` form of one column
        if model_input.dtype.kind in "uif":
            # (H, W) gray and (H, W, C) with C in 1/3/4 are one image; (N, H, W[, C]) a batch.
            single = model_input.ndim == 2 or (model_input.ndim == 3 and model_input.shape[-1] in (1, 3, 4))
            return [model_input] if single else list(model_input)
        raise InvalidImageError(f"unsupported array of dtype {model_input.dtype} and shape {model_input.shape}")
    if isinstance(model_input, (list, tuple, pd.Series)):
        return list(model_input)
    raise InvalidImageError(
        f"unsupported input type {type(model_input).__name__}: pass a list/DataFrame of encoded "
        "JPEG/PNG bytes, base64 strings, or pixel arrays"
    )


def max_batch_images() -> int:
    """Most images one request may hold (``PNEUMO_MAX_BATCH_IMAGES``, default 256), read now."""
    return env_limit(MAX_BATCH_IMAGES_ENV, DEFAULT_MAX_BATCH_IMAGES)


def _png_from_array(array: np.ndarray, index: int, max_pixels: int) -> bytes:
    """Losslessly encode a pixel array so it goes through the very same decode path as files."""
    import tensorflow as tf

    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InvalidImageError(f"item {index}: array of shape {array.shape} is not an image "
                                "(expected H×W gray or H×W×1/3/4)")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise InvalidImageError(f"item {index}: empty image array of shape {array.shape}")
    if array.dtype.kind not in "uif":
        raise InvalidImageError(f"item {index}: array dtype {array.dtype} is not numeric pixels")
    # Before scanning the values: a huge array should not cost more than its shape.
    if reason := pixel_cap_reason(array.shape[1], array.shape[0], max_pixels):
        raise InvalidImageError(f"item {index}: {reason}")
    if array.dtype != np.uint8:
        if not np.all(np.isfinite(array)):
            raise InvalidImageError(f"item {index}: array contains NaN or infinity")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 255:
            raise InvalidImageError(f"item {index}: pixel values must be 0..255, got {low:g}..{high:g}")
        # A float image scaled to 0..1 would otherwise be scored as a near-black image with a confident
        # label and no error; a truly dark image can be sent as uint8.
        if array.dtype.kind == "f" and 0 < high <= 1:
            raise InvalidImageError(
                f"item {index}: float pixels in 0..{high:g} look like an image scaled to 0..1; pixel arrays "
                "must be 0..255: multiply by 255 (or send uint8)"
            )
        array = np.rint(array).astype(np.uint8)
    if reason := min_size_reason(array.shape[1], array.shape[0]):  # after the value checks, which say more
        raise InvalidImageError(f"item {index}: {reason}")
    return bytes(tf.io.encode_png(array).numpy())


def _encoded(item: Any, index: int, max_pixels: int) -> bytes:
    """One item as encoded JPEG/PNG bytes within the pixel cap, or an error naming the item."""
    if isinstance(item, str):
        # Strings are how binary data travels in JSON (MLflow's REST format): base64.
        try:
            item = base64.b64decode(item.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImageError(f"item {index}: a string must be base64-encoded JPEG/PNG bytes") from None
    elif isinstance(item, (bytearray, memoryview, np.bytes_)):
        item = bytes(item)
    elif isinstance(item, (list, tuple)):  # nested lists from JSON: a pixel array, ints kept as ints
        try:
            item = np.asarray(item)
        except (TypeError, ValueError):
            item = None
        if item is None or item.dtype.kind not in "uif":
            raise InvalidImageError(f"item {index}: nested list is not a rectangular pixel array of numbers")
    if isinstance(item, np.ndarray):
        return _png_from_array(item, index, max_pixels)
    if not isinstance(item, bytes):
        raise InvalidImageError(
            f"item {index}: unsupported type {type(item).__name__} (expected bytes, base64 str or array)"
        )
    if not item:
        raise InvalidImageError(f"item {index}: empty bytes")
    if not item.startswith((JPEG_MAGIC, PNG_MAGIC)):
        # Say what was expected, never echo the bytes (a REST error must not hand the payload back).
        raise InvalidImageError(f"item {index}: not a JPEG or PNG image ({len(item)} bytes; a JPEG starts with "
                                "FF D8 FF, a PNG with 89 50 4E 47)")
    # Refuse a header that claims too many pixels before any decoder allocates them.
    claimed = header_size(item)
    if claimed is None:
        raise InvalidImageError(f"item {index}: cannot decode image (no readable size in its header)")
    if reason := pixel_cap_reason(*claimed, max_pixels) or min_size_reason(*claimed):
        raise InvalidImageError(f"item {index}: {reason}")
    return item


def as_encoded_images(model_input: Any) -> list[bytes]:
    """Normalize any accepted input (see docs/serving.md) to a list of encoded JPEG/PNG images.

    Both limits (``PNEUMO_MAX_BATCH_IMAGES``, ``PNEUMO_MAX_IMAGE_PIXELS``) are read on every call.
    Raises InvalidImageError naming the first offending item's index.
    """
    items = _items(model_input)
    if not items:
        raise InvalidImageError("no images in the input")
    limit = max_batch_images()
    if len(items) > limit:
        raise InvalidImageError(f"{len(items)} images in one request exceeds the maximum of {limit} "
                                f"({MAX_BATCH_IMAGES_ENV}); send smaller batches")
    encoded = checked_images(items)
    _check_request_pixels(encoded)
    return encoded


def max_request_pixels() -> int:
    """Most pixels one request's images may claim together (``PNEUMO_MAX_REQUEST_PIXELS``, default 100 Mpx)."""
    return env_limit(MAX_REQUEST_PIXELS_ENV, DEFAULT_MAX_REQUEST_PIXELS)


def _check_request_pixels(encoded: Sequence[bytes]) -> None:
    """Refuse a request whose images claim more pixels together than the budget, before any decoding."""
    budget, total = max_request_pixels(), 0
    for data in encoded:
        width, height = header_size(data) or (0, 0)  # checked images always have a readable header
        total += width * height
    if total > budget:
        raise InvalidImageError(f"the request's images hold {total} pixels together, over the request budget of "
                                f"{budget} ({MAX_REQUEST_PIXELS_ENV}); send fewer or smaller images")


def checked_images(items: Sequence[Any]) -> list[bytes]:
    """Each item as encoded JPEG/PNG bytes within the pixel cap (no request cap: callers chunk)."""
    max_pixels = max_image_pixels()
    return [_encoded(item, index, max_pixels) for index, item in enumerate(items)]


def _pixel_groups(encoded: Sequence[bytes], image_size: int, budget: int) -> list[list[bytes]]:
    """Consecutive runs of images whose decoded pixels add up to at most ``budget`` (≥ 1 image each)."""
    groups: list[list[bytes]] = [[]]  # one empty group when there are no images
    total = 0
    for data in encoded:
        pixels = decoded_pixels(data, image_size)
        if groups[-1] and total + pixels > budget:
            groups.append([])
            total = 0
        groups[-1].append(data)
        total += pixels
    return groups


def preprocess(encoded: Sequence[bytes], image_size: int, first_index: int = 0) -> np.ndarray:
    """Decode a batch exactly as training does: what the model sees, float32 ``(n, size, size, 3)`` of 0..255.

    Images are decoded in parallel in groups of at most :data:`DECODE_PIXEL_BUDGET` pixels, which
    bounds a request's memory. ``first_index`` is the request index of ``encoded[0]``, for messages.
    """
    import tensorflow as tf

    size, max_pixels = int(image_size), max_image_pixels()
    errors = (tf.errors.InvalidArgumentError, tf.errors.UnknownError, tf.errors.DataLossError)
    decoded, offset = [], first_index
    for group in _pixel_groups(encoded, size, DECODE_PIXEL_BUDGET):
        try:
            decoded.append(batch_decoder(size)(tf.constant(list(group), dtype=tf.string),
                                               tf.constant(max_pixels, dtype=tf.int64)))
        except errors:
            # The group failed somewhere: decode one by one to name the culprit.
            for index, data in enumerate(group, offset):
                try:
                    decode_image(data, size, max_pixels)
                except errors as error:
                    raise InvalidImageError(f"item {index}: cannot decode image ({_tf_reason(error)})") from None
            raise InvalidImageError("the batch could not be decoded") from None  # pragma: no cover - defensive
        offset += len(group)
    pixels = (decoded[0] if len(decoded) == 1 else tf.concat(decoded, axis=0)).numpy()
    _check_content(pixels, first_index)
    return pixels


def _check_content(pixels: np.ndarray, first_index: int) -> None:
    """Refuse (near-)constant images, measured on the decoded gray image the model sees (cheap: size²)."""
    spread = pixels.mean(axis=-1).reshape(len(pixels), -1).std(axis=1)
    for index in np.flatnonzero(spread < MIN_PIXEL_STD):
        raise InvalidImageError(
            f"item {first_index + int(index)}: image is (near-)constant (gray standard deviation "
            f"{spread[index]:.2f} < {MIN_PIXEL_STD:g}): blank, white, black or transparent, not an X-ray"
        )


def _tf_reason(error: Exception) -> str:
    """TensorFlow's message without its graph-node prefix and op suffix."""
    text = str(getattr(error, "message", "") or error).splitlines()[0]
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    return text.split(" [Op:")[0].strip()[:160] or type(error).__name__


# ----------------------------------------------------------------------------- the pyfunc
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # beyond what any candidate trains on; outside means a bad config


def model_settings(config: dict[str, Any] | None) -> tuple[float, int, Any]:
    """Threshold, image size and calibrator from a model's ``model_config``, each range-checked.

    The config lives in the MLmodel file of the artifact store: ``threshold: .nan`` there would turn
    every probability into NORMAL, so a value outside its range refuses the load instead.

    Raises:
        ModelError: a setting is missing or out of range (named).
    """
    from pneumo.evaluation.calibration import Calibrator

    config = config or {}
    missing = [key for key in ("threshold", "image_size") if key not in config]
    if missing:
        raise ModelError(f"model config lacks {', '.join(missing)}: not pneumo's served model")
    try:
        threshold = float(config["threshold"])
    except (TypeError, ValueError):
        raise ModelError(f"model config threshold {config['threshold']!r} is not a number") from None
    if not 0.0 <= threshold <= 1.0:  # NaN fails both comparisons
        raise ModelError(f"model config threshold {threshold!r} is outside [0, 1]")
    size = config["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ModelError(f"model config image_size {size!r} is not an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]")
    try:
        calibrator = Calibrator.from_config(config.get("calibration"))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"model config calibration {config.get('calibration')!r} is invalid: {error}") from None
    return threshold, size, calibrator


class PneumoniaClassifier(mlflow.pyfunc.PythonModel):
    """Keras model + calibration + tuned threshold + image size, behind MLflow's pyfunc interface."""

    # Inputs come in several shapes (bytes, base64, arrays, DataFrames) that predict checks itself;
    # MLflow's type-hint validation cannot express them, and without hints it warns on every load.
    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the Keras file (safe mode: no code in it runs) and read the model config."""
        import keras

        # A bad limit setting (ConfigError) should stop the server at start-up, not fail every request.
        max_image_pixels()
        max_batch_images()
        self.threshold, self.image_size, self.calibrator = model_settings(context.model_config)
        self.model = keras.models.load_model(context.artifacts[KERAS_ARTIFACT], compile=False, safe_mode=True)

    # model_input is deliberately unannotated: MLflow would try to derive a schema from the hint.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:  # noqa: ANN001
        """One row per image: calibrated ``probability`` and ``label`` (PNEUMONIA when ≥ the threshold).

        ``params={"explain": True}`` adds a ``heatmap`` column: a base64 PNG overlay per image (JSON
        carries text). Images go to the model in chunks of :data:`CHUNK`.
        """
        explain = bool((params or {}).get("explain", False))
        return self._frame(as_encoded_images(model_input), explain)

    def score(self, images: Sequence[Any]) -> pd.DataFrame:
        """:meth:`predict` for in-process callers (the gate) that bound memory by chunking themselves:
        every item is checked as in a request, but ``PNEUMO_MAX_BATCH_IMAGES`` (a REST limit) does not apply."""
        return self._frame(checked_images(images), explain=False)

    def _frame(self, encoded: list[bytes], explain: bool) -> pd.DataFrame:
        """The prediction frame of checked images, :data:`CHUNK` per model call."""
        outputs, overlays = [], []
        for start in range(0, len(encoded), CHUNK):
            pixels = preprocess(encoded[start:start + CHUNK], self.image_size, first_index=start)
            # An eager call: a tf.function per loaded model makes TensorFlow warn about retracing.
            outputs.append(np.asarray(self.model(pixels, training=False), dtype=np.float64).ravel())
            if explain:
                from pneumo.evaluation.explain import heatmaps, overlay_png

                overlays += [base64.b64encode(overlay_png(image, heatmap)).decode("ascii")
                             for image, heatmap in zip(pixels, heatmaps(self.model, pixels))]
        probabilities = np.asarray(self.calibrator.apply(np.concatenate(outputs)), dtype=np.float64).ravel()
        labels = np.where(probabilities >= self.threshold, CLASSES[1], CLASSES[0])
        frame = pd.DataFrame({"probability": probabilities, "label": labels.astype(object)})
        if explain:
            frame["heatmap"] = overlays
        return frame

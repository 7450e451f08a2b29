"""Image bytes → model input: the one decode step shared by training, evaluation and serving."""

from __future__ import annotations

import functools
import io
import os
from typing import TYPE_CHECKING, Any, BinaryIO

from pneumo.errors import ConfigError

if TYPE_CHECKING:  # TensorFlow costs seconds to import; only callers that decode need it.
    import tensorflow as tf

BATCH_PARALLELISM = 64  # images decoded at once by the batch decoder
MAX_IMAGE_PIXELS_ENV = "PNEUMO_MAX_IMAGE_PIXELS"
# Far above the Kaggle images (at most ~3000×3000 = 9 Mpx), far below what exhausts a worker:
# a 50 Mpx PNG already takes ~750 MB while it is decoded and resized.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4/C8/CC are not frames.
_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_DCT_RATIOS = (2, 4, 8)  # JPEG scale-downs libjpeg decodes directly (ascending)
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI carry no segment length


# ----------------------------------------------------------------------------- settings
def env_limit(name: str, default: int) -> int:
    """A positive integer setting read from the environment now (never at import).

    Args:
        name: the environment variable.
        default: the value when it is unset or empty.

    Returns:
        The setting.

    Raises:
        ConfigError: the variable is set to something other than a positive integer.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)  # accepts 50_000_000 too
    except ValueError:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}")
    return value


def max_image_pixels() -> int:
    """Largest width × height an image may claim (``PNEUMO_MAX_IMAGE_PIXELS``, default 50 Mpx)."""
    return env_limit(MAX_IMAGE_PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS)


# ----------------------------------------------------------------------------- headers
def _png_size(stream: BinaryIO) -> tuple[int, int] | None:
    """Width and height from the IHDR chunk, which the PNG format requires to come first."""
    header = stream.read(24)
    if len(header) < 24 or header[12:16] != b"IHDR":
        return None
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def _jpeg_size(stream: BinaryIO) -> tuple[int, int] | None:
    """Width and height from the first frame header, skipping other segments by their length."""
    stream.seek(2)  # past SOI
    while True:
        if stream.read(1) != b"\xff":
            return None
        marker = stream.read(1)
        while marker == b"\xff":  # fill bytes may pad before a marker
            marker = stream.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # end of data or a scan before any frame
            return None
        if marker[0] in _JPEG_NO_LENGTH:
            continue
        length = int.from_bytes(stream.read(2), "big")
        if length < 2:
            return None
        if marker[0] in _JPEG_FRAMES:
            frame = stream.read(5)  # precision, height, width
            if len(frame) < 5:
                return None
            return int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")
        stream.seek(length - 2, io.SEEK_CUR)


def header_size(data: bytes | BinaryIO) -> tuple[int, int] | None:
    """``(width, height)`` a PNG or JPEG claims in its header, reading no pixel data.

    Cheap and independent of Pillow's global bomb limit, so a size can be refused before any
    decoder allocates memory for it.

    Args:
        data: the encoded image, or a seekable binary stream over it (read from offset 0).

    Returns:
        The claimed size, or None when the data is not a PNG/JPEG with a readable header.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    start = stream.read(8)
    stream.seek(0)
    if start.startswith(PNG_MAGIC):
        return _png_size(stream)
    if start.startswith(JPEG_MAGIC):
        return _jpeg_size(stream)
    return None


def pixel_cap_reason(width: int, height: int, max_pixels: int) -> str | None:
    """Why an image of this size is refused (None when it is within the cap)."""
    pixels = width * height
    if pixels <= max_pixels:
        return None
    return (f"{pixels} pixels exceeds the cap of {max_pixels} ({width}×{height} image; "
            f"setting {MAX_IMAGE_PIXELS_ENV})")


def decoded_pixels(data: bytes, image_size: int) -> int:
    """Pixels :func:`decode_image` decodes for these bytes before resizing (0: unreadable header).

    JPEGs are decoded at the DCT scale :func:`_dct_ratio` picks, so a large JPEG costs far fewer
    pixels than its header claims; PNGs are decoded at full size.
    """
    claimed = header_size(data)
    if claimed is None:
        return 0
    width, height = claimed
    ratio = 1
    if bytes(data[:3]) == JPEG_MAGIC:
        ratio = max([r for r in _DCT_RATIOS if min(width, height) // r >= image_size], default=1)
    return -(-width // ratio) * -(-height // ratio)


# ----------------------------------------------------------------------------- TensorFlow decode
def _dct_ratio(short_side: tf.Tensor, image_size: int) -> tf.Tensor:
    """Largest JPEG DCT scale-down (1, 2, 4, 8) that keeps the short side ≥ the target size."""
    import tensorflow as tf

    ratio = tf.constant(1, tf.int32)
    for candidate in _DCT_RATIOS:
        ratio = tf.where(short_side // candidate >= image_size, candidate, ratio)
    return ratio


def _png_header_size(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Height and width (int64) from a PNG's IHDR chunk (big-endian, bytes 16..23).

    A file too short to hold them fails on the indexing below, which fails the element too.
    """
    import tensorflow as tf

    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.uint8), tf.int64)

    def number(offset: int) -> tf.Tensor:
        return ((raw[offset] * 256 + raw[offset + 1]) * 256 + raw[offset + 2]) * 256 + raw[offset + 3]

    return number(4), number(0)


def _within_cap(height: tf.Tensor, width: tf.Tensor, max_pixels: tf.Tensor) -> tf.Operation:
    """An assertion that fails the element (before any decode) when the header claims too many pixels."""
    import tensorflow as tf

    pixels = tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
    return tf.debugging.assert_less_equal(
        pixels, max_pixels, message=f"image pixels exceed the cap ({MAX_IMAGE_PIXELS_ENV})")


def decode_image(encoded: tf.Tensor | bytes, image_size: int,
                 max_pixels: int | tf.Tensor | None = None) -> tf.Tensor:
    """Decode JPEG/PNG bytes of any mode to a ``[size, size, 3]`` float32 tensor of 0..255 integers.

    This is the only preprocessing before the model (rescaling lives inside the model), shared by
    training, evaluation and the served model so they see identical numbers. Large JPEGs are
    decoded at a reduced DCT scale that still exceeds the target size, which is several times
    faster than a full decode followed by a resize. Values are rounded to integers so the
    pipeline can cache them as uint8 without changing them.

    An image whose header claims more than ``max_pixels`` pixels, or that is neither JPEG nor
    PNG, fails with ``InvalidArgumentError`` before anything is decoded (a tf.data pipeline with
    ``ignore_errors`` then drops it).

    Args:
        encoded: the file's bytes (scalar string tensor or Python bytes).
        image_size: side of the square output.
        max_pixels: the pixel cap; None reads :func:`max_image_pixels` now (for a tf.data map,
            when the pipeline is built).
    """
    import tensorflow as tf

    encoded = tf.convert_to_tensor(encoded, dtype=tf.string)
    cap = tf.cast(max_image_pixels() if max_pixels is None else max_pixels, tf.int64)

    def jpeg() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(encoded)
        with tf.control_dependencies([_within_cap(shape[0], shape[1], cap)]):
            ratio = _dct_ratio(tf.minimum(shape[0], shape[1]), image_size)

            # The fast integer IDCT differs from the accurate one by about one grey level, far below
            # what the resize to the model's size keeps; it is measurably faster on 2 cores.
            def decode(r: int) -> tf.Tensor:
                return tf.io.decode_jpeg(encoded, channels=3, ratio=r, dct_method="INTEGER_FAST")

            branches = [(tf.equal(ratio, r), lambda r=r: decode(r)) for r in (8, 4, 2)]
            return tf.case(branches, default=lambda: decode(1))

    def png() -> tf.Tensor:
        height, width = _png_header_size(encoded)
        with tf.control_dependencies([_within_cap(height, width, cap)]):
            return tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)

    is_png = tf.equal(tf.strings.substr(encoded, 0, len(PNG_MAGIC)), PNG_MAGIC)

    def unsupported() -> tf.Tensor:
        # GIF/BMP headers are not checked against the cap, and nothing upstream accepts them.
        with tf.control_dependencies([tf.debugging.assert_equal(is_png, True, message="not a JPEG or PNG image")]):
            return tf.zeros([1, 1, 3], tf.uint8)

    pixels = tf.cond(tf.io.is_jpeg(encoded), jpeg, lambda: tf.cond(is_png, png, unsupported))
    pixels.set_shape([None, None, 3])
    resized = tf.image.resize(pixels, [image_size, image_size], method="bilinear", antialias=True)
    return tf.round(tf.clip_by_value(resized, 0.0, 255.0))


@functools.lru_cache(maxsize=8)
def batch_decoder(image_size: int) -> Any:
    """A traced-once TensorFlow function mapping :func:`decode_image` over a batch of encoded images.

    Building a tf.data pipeline per request would retrace ``decode_image`` every call (hundreds
    of ms); this graph is traced once per image size and decodes the items in parallel. It takes
    ``(encoded [n] string, max_pixels int64 scalar)``: the cap is an argument, not baked into
    the trace, so a changed setting applies to the next call.
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.int64)])
    def decode(encoded: tf.Tensor, max_pixels: tf.Tensor) -> tf.Tensor:
        return tf.map_fn(lambda data: decode_image(data, image_size, max_pixels), encoded,
                         parallel_iterations=BATCH_PARALLELISM,
                         fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))

    return decode

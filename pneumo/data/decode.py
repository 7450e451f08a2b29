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
# Above the largest Kaggle image (~10 Mpx) with room for larger detectors, far below what exhausts a
# worker: a 50 Mpx PNG takes ~750 MB and seconds of a core while it is decoded and resized.
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000
# Smallest short side an input may have: a chest X-ray is hundreds of pixels; a 1×1 PNG scored 0.999.
MIN_IMAGE_SIDE = 32
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAX_CHUNKS_BEFORE_IHDR = 64  # text and other ancillary chunks a hostile file may put first
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4/C8/CC are not frames.
_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_DCT_RATIOS = (2, 4, 8)  # JPEG scale-downs libjpeg decodes directly (ascending)
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI carry no segment length


# ----------------------------------------------------------------------------- settings
def env_limit(name: str, default: int) -> int:
    """A positive integer setting read from the environment now (never at import); ``default`` when unset or empty.

    Raises ConfigError when it is set to anything else.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)  # accepts 50_000_000 too
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}")
    return value


def max_image_pixels() -> int:
    """Largest width × height an image may claim (``PNEUMO_MAX_IMAGE_PIXELS``, default 25 Mpx)."""
    return env_limit(MAX_IMAGE_PIXELS_ENV, DEFAULT_MAX_IMAGE_PIXELS)


# ----------------------------------------------------------------------------- headers
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


def _png_size(stream: BinaryIO) -> tuple[int, int] | None:
    """Width and height from the IHDR chunk, wherever it is: the format puts it first, but Pillow also
    decodes a PNG whose text chunks come before it, so skipping the cap there would let a bomb through."""
    stream.seek(len(PNG_MAGIC))
    for _ in range(_PNG_MAX_CHUNKS_BEFORE_IHDR):
        head = stream.read(8)
        if len(head) < 8 or head[4:8] == b"IDAT":  # truncated, or pixels before any header
            return None
        if head[4:8] == b"IHDR":
            size = stream.read(8)
            return (int.from_bytes(size[:4], "big"), int.from_bytes(size[4:], "big")) if len(size) == 8 else None
        stream.seek(int.from_bytes(head[:4], "big") + 4, io.SEEK_CUR)  # the chunk's data and CRC
    return None


def header_size(data: bytes | BinaryIO) -> tuple[int, int] | None:
    """``(width, height)`` a PNG or JPEG (bytes or a seekable stream) claims in its header; None if unreadable.

    Reads no pixel data and ignores Pillow's bomb limit, so a size can be refused before any decoder
    allocates memory for it.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    header = stream.read(len(PNG_MAGIC))
    if header.startswith(PNG_MAGIC):
        return _png_size(stream)
    return _jpeg_size(stream) if header.startswith(JPEG_MAGIC) else None


def pixel_cap_reason(width: int, height: int, max_pixels: int) -> str | None:
    """Why an image of this size is refused (None when it is within the cap)."""
    pixels = width * height
    if pixels <= max_pixels:
        return None
    return (f"{pixels} pixels exceeds the cap of {max_pixels} ({width}×{height} image; "
            f"setting {MAX_IMAGE_PIXELS_ENV})")


def min_size_reason(width: int, height: int) -> str | None:
    """Why an image this small is refused (None when its short side is at least :data:`MIN_IMAGE_SIDE`)."""
    if min(width, height) >= MIN_IMAGE_SIDE:
        return None
    return f"{width}×{height} image is below the minimum of {MIN_IMAGE_SIDE} px on the short side: not an X-ray"


def decoded_pixels(data: bytes, image_size: int) -> int:
    """Pixels :func:`decode_image` decodes before resizing: JPEGs at its DCT scale, PNGs in full (0: bad header)."""
    claimed = header_size(data)
    if claimed is None:
        return 0
    width, height = claimed
    ratio = 1
    if bytes(data[:3]) == JPEG_MAGIC:
        ratio = max([r for r in _DCT_RATIOS if min(width, height) // r >= image_size], default=1)
    return -(-width // ratio) * -(-height // ratio)


# ----------------------------------------------------------------------------- TensorFlow decode
def decode_image(encoded: tf.Tensor | bytes, image_size: int,
                 max_pixels: int | tf.Tensor | None = None) -> tf.Tensor:
    """Decode JPEG/PNG bytes of any mode to a ``[size, size, 3]`` float32 tensor of 0..255 integers.

    Shared by training, evaluation and serving so they see identical numbers. Large JPEGs are decoded
    at a reduced DCT scale (several times faster); values are rounded so they cache as uint8 unchanged.
    An image over ``max_pixels`` (None: :func:`max_image_pixels`, read now) or neither JPEG nor PNG
    fails with ``InvalidArgumentError`` before anything is decoded.
    """
    import tensorflow as tf

    encoded = tf.convert_to_tensor(encoded, dtype=tf.string)
    cap = tf.cast(max_image_pixels() if max_pixels is None else max_pixels, tf.int64)

    def within_cap(height: tf.Tensor, width: tf.Tensor) -> Any:
        """A context in which ops run only after the header's claimed size passed the cap."""
        pixels = tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
        message = f"image pixels exceed the cap ({MAX_IMAGE_PIXELS_ENV})"
        return tf.control_dependencies([tf.debugging.assert_less_equal(pixels, cap, message=message)])

    def jpeg() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(encoded)
        with within_cap(shape[0], shape[1]):
            short_side = tf.minimum(shape[0], shape[1])

            # The fast integer IDCT differs from the accurate one by about one grey level, far below
            # what the resize to the model's size keeps; it is measurably faster on 2 cores.
            def decode(r: int) -> tf.Tensor:
                return tf.io.decode_jpeg(encoded, channels=3, ratio=r, dct_method="INTEGER_FAST")

            # The largest DCT scale-down that keeps the short side ≥ the target size (the first true case).
            branches = [(short_side // r >= image_size, lambda r=r: decode(r)) for r in reversed(_DCT_RATIOS)]
            return tf.case(branches, default=lambda: decode(1))

    def png() -> tf.Tensor:
        # Width and height from the IHDR chunk (big-endian); a file too short for them fails the element.
        raw = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.uint8), tf.int64)
        width, height = tf.unstack(tf.reduce_sum(tf.reshape(raw, [2, 4]) * [2**24, 2**16, 2**8, 1], axis=1))
        with within_cap(height, width):
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
    """A traced-once function ``(encoded [n] string, max_pixels int64) →`` :func:`decode_image` of each, in parallel.

    A tf.data pipeline per request would retrace every call (hundreds of ms); the cap is an argument,
    not baked into the trace, so a changed setting applies to the next call.
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([], tf.int64)])
    def decode(encoded: tf.Tensor, max_pixels: tf.Tensor) -> tf.Tensor:
        return tf.map_fn(lambda data: decode_image(data, image_size, max_pixels), encoded,
                         parallel_iterations=BATCH_PARALLELISM,
                         fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))

    return decode

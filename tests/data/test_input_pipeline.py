"""tf.data pipeline: decoding any mode, caching, train-only augmentation, bad files skipped."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumo.data.decode import decode_image
from pneumo.data.images import assign_subsets, make_dataset
from tests.plugins.data import local_manifest


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _gradient(mode: str, size: tuple[int, int]) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.float32)
    gray = np.tile(x, (size[1], 1)).astype(np.uint8)
    return Image.fromarray(gray).convert(mode)


@pytest.mark.parametrize(("mode", "fmt"), [("L", "JPEG"), ("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"),
                                           ("I;16", "PNG")])
def test_decode_any_mode_to_three_channels(mode: str, fmt: str) -> None:
    image = _gradient("L", (300, 240)).convert(mode) if mode != "I;16" else Image.fromarray(
        (np.tile(np.linspace(0, 65535, 300), (240, 1))).astype(np.uint16))
    out = decode_image(_encode(image, fmt), 48).numpy()
    assert out.shape == (48, 48, 3) and out.dtype == np.float32
    assert np.array_equal(out, np.round(out)) and out.min() >= 0 and out.max() <= 255
    assert np.allclose(out[..., 0], out[..., 2])  # gray stays gray in all three channels
    assert out[:, -1].mean() > out[:, 0].mean() + 150  # left-to-right gradient survives


def test_reduced_scale_jpeg_decode_matches_full_decode() -> None:
    big = _gradient("L", (1600, 1200))
    fast = decode_image(_encode(big, "JPEG"), 64).numpy()
    import tensorflow as tf

    full = tf.io.decode_jpeg(_encode(big, "JPEG"), channels=3)
    slow = tf.round(tf.image.resize(full, [64, 64], antialias=True)).numpy()
    assert np.abs(fast - slow).mean() < 2.0


def test_later_epochs_come_from_the_cache(small_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(small_dataset, root)
    frame = local_manifest(root).head(20)
    dataset = make_dataset(root, frame["path"].tolist(), frame["label"].tolist(), image_size=32,
                           batch_size=8, training=False)
    first = np.concatenate([x.numpy() for x, _ in dataset])
    shutil.rmtree(root / "chest_xray")  # a second epoch that re-read files would now fail
    second = np.concatenate([x.numpy() for x, _ in dataset])
    assert first.shape == (20, 32, 32, 3)
    assert np.array_equal(first, second)


def test_augmentation_only_when_training(small_dataset: Path) -> None:
    frame = local_manifest(small_dataset).head(16)
    args = (small_dataset, frame["path"].tolist(), frame["label"].tolist())

    def epoch(dataset) -> np.ndarray:
        return np.concatenate([x.numpy() for x, _ in dataset])

    evaluation = make_dataset(*args, image_size=32, batch_size=16, training=False)
    assert np.array_equal(epoch(evaluation), epoch(evaluation))
    training = make_dataset(*args, image_size=32, batch_size=16, training=True, seed=1)
    one, two = epoch(training), epoch(training)
    assert one.shape == two.shape and not np.array_equal(np.sort(one, axis=None), np.sort(two, axis=None))


def test_undecodable_file_is_skipped_not_fatal(small_dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(small_dataset, root)
    frame = assign_subsets(local_manifest(root)).head(10)
    # Corrupt a file after the manifest checked it: the pipeline must drop it, not crash.
    (root / frame["path"].iloc[3]).write_bytes(b"GIF89a not really")
    dataset = make_dataset(root, frame["path"].tolist(), frame["label"].tolist(), image_size=32,
                           batch_size=4, training=False)
    assert sum(int(x.shape[0]) for x, _ in dataset) == 9

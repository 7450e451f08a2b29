"""An ingested manifest → decode-checked images → patient-grouped subsets → tf.data input pipelines."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pneumo.data.decode import (
    JPEG_MAGIC, PNG_MAGIC, decode_image, header_size, max_image_pixels, pixel_cap_reason
)
from pneumo.data.layout import CLASSES
from pneumo.data.storage.report import MANIFEST_COLUMNS
from pneumo.errors import DataError

if TYPE_CHECKING:  # TensorFlow costs seconds to import; only the pipeline functions need it.
    import tensorflow as tf

# Keras 2's ImageDataGenerator read shear_range in *degrees* (its docstring says so), so the
# seed's shear_range=0.2 is a ±0.2° shear; RandomShear takes the affine shear factor tan(angle).
SEED_SHEAR_DEGREES = 0.2
SEED_ZOOM = 0.2


@dataclass(frozen=True)
class Skipped:
    """An image left out of the manifest and why (it does not decode)."""

    path: str
    reason: str


@dataclass
class CheckedImages:
    """The manifest's images that decode (with ``width``/``height``) and the ones that do not."""

    frame: pd.DataFrame
    bad: list[Skipped] = field(default_factory=list)


def inspect_image(path: Path, max_pixels: int | None = None) -> tuple[int, int] | str:
    """``(width, height)`` of a JPEG/PNG that decodes, else the reason it is bad; cheap, never raises for a bad file.

    The size the header claims is checked against the pixel cap (``max_pixels``, default
    :func:`pneumo.data.decode.max_image_pixels`) before Pillow opens the file, so a decompression bomb
    costs a header read. JPEGs are then decoded in draft mode (DCT scaling to about 1/8), which
    still walks every compressed block and so still catches truncated files, at a fraction of the cost.
    """
    cap = max_image_pixels() if max_pixels is None else max_pixels
    try:
        if path.stat().st_size == 0:
            return "bad-image: empty file"
        with path.open("rb") as stream:
            claimed = header_size(stream)
            stream.seek(0)
            magic = stream.read(len(PNG_MAGIC))
        if claimed is None and magic.startswith((PNG_MAGIC, JPEG_MAGIC)):  # no size, so no cap: never decode it
            return "bad-image: no readable size in its header"
        if claimed is not None and (reason := pixel_cap_reason(*claimed, cap)):
            return f"bad-image: {reason}"
        with Image.open(path) as image:
            width, height = image.size
            if image.format == "JPEG":
                image.draft("L", (max(1, width // 8), max(1, height // 8)))
            elif image.format != "PNG":
                return f"bad-image: unsupported format {image.format}"
            image.load()
        return width, height
    except UnidentifiedImageError:
        return "bad-image: not a decodable image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL reports truncation as OSError; its own bomb limit still applies to a raised cap.
        return f"bad-image: {_first_line(error)}"
    except Exception as error:  # noqa: BLE001 - a hostile file must cost one image, not the validation
        return f"bad-image: {type(error).__name__}: {_first_line(error)}"


def _first_line(error: Exception) -> str:
    """An exception's message, one line and short enough for a report row."""
    lines = str(error).splitlines()
    return lines[0][:120] if lines else type(error).__name__


def validate_images(
    root: Path, frame: pd.DataFrame, *, workers: int = 8, progress: Callable[[int, int], None] | None = None,
) -> CheckedImages:
    """Decode-check every image of an ingested manifest frame, on ``workers`` threads (PIL releases the GIL).

    Returns the good rows with ``width`` and ``height`` added, and the bad ones with their reasons.
    """
    cap = max_image_pixels()  # once, so a bad setting fails here rather than once per image
    verdicts: list[tuple[int, int] | str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, verdict in enumerate(pool.map(lambda p: inspect_image(Path(root) / p, cap), frame["path"]), 1):
            verdicts.append(verdict)
            if progress is not None:
                progress(done, len(frame))
    sizes = [v for v in verdicts if not isinstance(v, str)]
    result = frame.loc[[not isinstance(v, str) for v in verdicts]].copy()
    result["width"] = [width for width, _ in sizes]
    result["height"] = [height for _, height in sizes]
    bad = [Skipped(path, v) for path, v in zip(frame["path"], verdicts) if isinstance(v, str)]
    columns = [c for c in MANIFEST_COLUMNS if c in result.columns]
    columns += [c for c in result.columns if c not in columns]
    return CheckedImages(frame=result[columns].sort_values("path", ignore_index=True), bad=bad)


def assign_subsets(frame: pd.DataFrame, val_fraction: float = 0.15, seed: int = 42) -> pd.DataFrame:
    """Add a ``subset`` column: train / validation (``val_fraction`` of each class, carved from train) / test.

    The official ``val`` split (16 images) is too small to choose models or thresholds, so its
    images join the train pool before validation is carved out, stratified by class and grouped
    by patient: near-duplicate views of a training patient must not inflate validation scores.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    result = frame.copy()
    result["subset"] = np.where(result["split"] == "test", "test", "train")
    pool = result[result["subset"] == "train"]
    # A patient belongs to the class most of their images carry (real patients have one class).
    patient_label = pool.groupby("patient_id")["label"].agg(lambda s: int(s.mode().iloc[0]))
    patient_size = pool.groupby("patient_id").size()
    rng = np.random.default_rng(seed)
    held_out: list[str] = []
    for label in sorted(patient_label.unique()):
        patients = sorted(patient_label.index[patient_label == label])
        rng.shuffle(patients)
        goal = val_fraction * int(patient_size[patients].sum())
        taken = 0
        for patient in patients[:-1]:  # the last patient stays, so train keeps every class
            if taken >= goal:
                break
            held_out.append(patient)
            taken += int(patient_size[patient])
    result.loc[result["patient_id"].isin(held_out) & (result["subset"] == "train"), "subset"] = "validation"
    return result


def class_weights(frame: pd.DataFrame) -> dict[int, float]:
    """Inverse-frequency weights ``n / (classes * n_c)`` from the train subset (or all rows)."""
    rows = frame[frame["subset"] == "train"] if "subset" in frame else frame
    counts = rows["label"].value_counts()
    missing = [CLASSES[i] for i in range(len(CLASSES)) if counts.get(i, 0) == 0]
    if missing:
        raise DataError(f"train subset has no {', '.join(missing)} images")
    total = int(counts.sum())
    return {int(label): total / (len(CLASSES) * int(count)) for label, count in counts.items()}


def augmentation(seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """The seed's train-time augmentation (shear 0.2°, zoom ±20% per axis), for image batches."""
    import keras

    shear_factor = math.tan(math.radians(SEED_SHEAR_DEGREES))
    shear = keras.layers.RandomShear(x_factor=shear_factor, y_factor=shear_factor, fill_mode="nearest", seed=seed)
    zoom = keras.layers.RandomZoom(height_factor=SEED_ZOOM, width_factor=SEED_ZOOM, fill_mode="nearest", seed=seed + 1)
    return lambda images: zoom(shear(images, training=True), training=True)


def make_dataset(
    root: Path, paths: Sequence[str], labels: Sequence[int], *, image_size: int, batch_size: int, training: bool,
    augment: bool = True, seed: int = 42, cache: bool | str = True,
) -> tf.data.Dataset:
    """Batches of ``(float32 [b, size, size, 3] in 0..255, float32 [b] labels)``: read → decode → resize →
    cache → (shuffle) → batch → (augment) → prefetch.

    Decoded images are cached as uint8 (a quarter of float32's memory), so only the first epoch
    reads and decodes files. An image that fails to decode here (rare: it passed the manifest's
    check) or whose header claims more than ``PNEUMO_MAX_IMAGE_PIXELS`` is dropped with a warning
    instead of stopping training. ``training`` shuffles and (with ``augment``) augments; ``cache``
    True caches in memory, a string to that file prefix, False not at all.
    """
    import tensorflow as tf

    if len(paths) != len(labels):
        raise DataError(f"{len(paths)} paths but {len(labels)} labels")
    if not paths:
        raise DataError("cannot build a dataset from an empty subset")
    files = [str(Path(root) / path) for path in paths]
    max_pixels = max_image_pixels()
    dataset = tf.data.Dataset.from_tensor_slices((files, np.asarray(labels, dtype=np.float32)))

    def load(file: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = decode_image(tf.io.read_file(file), image_size, max_pixels)
        return tf.cast(image, tf.uint8), label

    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.ignore_errors(log_warning=True)
    if cache:
        dataset = dataset.cache("" if cache is True else str(cache))
    if training:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if training and augment:
        augment_batch = augmentation(seed)
        dataset = dataset.map(lambda x, y: (augment_batch(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    # No tf.data autotuning: deleting an autotuned iterator waits for its model thread's next
    # wake-up (seconds, and longer each epoch), so each epoch of a model training alone ended
    # with ~15 s of both cores idle. With the tuner off, AUTOTUNE means "one per core".
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


"""Dataset on disk → validated manifest → patient-grouped splits → tf.data input pipelines."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pneumo.errors import DataError
from pneumo.layout import CLASSES, SPLITS, ImageKey, Ignored, classify

if TYPE_CHECKING:  # TensorFlow costs seconds to import; only the pipeline functions need it.
    import tensorflow as tf

MANIFEST_COLUMNS: tuple[str, ...] = ("path", "split", "label", "patient_id", "bytes", "width", "height")

# Keras 2's ImageDataGenerator read shear_range in *degrees* (its docstring says so), so the
# seed's shear_range=0.2 is a ±0.2° shear; RandomShear takes the affine shear factor tan(angle).
SEED_SHEAR_DEGREES = 0.2
SEED_ZOOM = 0.2


@dataclass(frozen=True)
class Skipped:
    """A path left out of the manifest and why (quirk files, undecodable images)."""

    path: str
    reason: str


@dataclass
class Manifest:
    """The dataset's images (one row each) plus everything that was left out, with reasons."""

    frame: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per on-disk split and class name."""
        return counts_by(self.frame, "split")

    def skipped_counts(self) -> dict[str, int]:
        """How many paths were left out, by reason."""
        return dict(Counter(item.reason for item in self.skipped))

    def bad_images(self) -> list[Skipped]:
        """Files in the layout that could not be decoded (quirk files such as .DS_Store excluded)."""
        return [item for item in self.skipped if item.reason.startswith("bad-image")]


def counts_by(frame: pd.DataFrame, column: str) -> dict[str, dict[str, int]]:
    """Image counts per value of ``column`` and class name."""
    result: dict[str, dict[str, int]] = {}
    for (group, label), count in frame.groupby([column, "label"]).size().items():
        result.setdefault(str(group), {})[CLASSES[int(label)]] = int(count)
    return result


def inspect_image(path: Path) -> tuple[int, int] | str:
    """Check that a file decodes as an image, cheaply.

    JPEGs are decoded in draft mode (DCT scaling to about 1/8), which still walks every
    compressed block and so still catches truncated files, at a fraction of the cost.

    Returns:
        ``(width, height)`` of a good image, otherwise the reason it is bad.
    """
    try:
        if path.stat().st_size == 0:
            return "bad-image: empty file"
        with Image.open(path) as image:
            width, height = image.size
            if image.format == "JPEG":
                image.draft("L", (max(1, width // 8), max(1, height // 8)))
            elif image.format not in ("PNG",):
                return f"bad-image: unsupported format {image.format}"
            image.load()
        return width, height
    except UnidentifiedImageError:
        return "bad-image: not a decodable image"
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports truncation as OSError
        return f"bad-image: {str(error).splitlines()[0][:120]}"


def find_dataset_root(root: Path) -> Path:
    """Accept either the folder holding ``chest_xray/`` or ``chest_xray/`` itself.

    Raises:
        DataError: the folder does not exist or has no Kaggle layout in it.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    if (root / "chest_xray").is_dir():
        return root
    if root.name == "chest_xray" and any((root / split).is_dir() for split in SPLITS):
        return root.parent
    raise DataError(
        f"{root} has no chest_xray/{{train,val,test}}/{{NORMAL,PNEUMONIA}} layout "
        "(point at the folder that contains chest_xray/)"
    )


def build_manifest(
    root: Path,
    *,
    workers: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """List and validate every dataset image under ``root``.

    Args:
        root: folder containing ``chest_xray/`` (or that folder itself).
        workers: threads decoding images for validation (PIL releases the GIL while decoding).
        progress: called with (done, total) while images are checked.

    Returns:
        A :class:`Manifest`; quirk files and undecodable images are in ``skipped`` with reasons.

    Raises:
        DataError: wrong layout, or no image at all.
    """
    root = find_dataset_root(root)
    keys: list[ImageKey] = []
    skipped: list[Skipped] = []
    # Walk the whole root, not just chest_xray/, so the zip's __MACOSX/ clutter is reported too.
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            relative = (Path(directory) / filename).relative_to(root).as_posix()
            verdict = classify(relative)
            if isinstance(verdict, Ignored):
                skipped.append(Skipped(verdict.path, verdict.reason))
            else:
                keys.append(verdict)
    if not keys:
        raise DataError(f"no dataset images found under {root / 'chest_xray'}")

    frame = pd.DataFrame(
        [{"path": k.path, "split": k.split, "label": k.label, "patient_id": k.patient_id,
          "bytes": (root / k.path).stat().st_size} for k in keys]
    )
    checked = validate_images(root, frame, workers=workers, progress=progress)
    return Manifest(frame=checked.frame, skipped=skipped + checked.skipped)


def validate_images(
    root: Path,
    frame: pd.DataFrame,
    *,
    workers: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """Decode-check every image of a manifest frame (e.g. one synced from object storage).

    Args:
        root: folder the frame's paths are relative to.
        frame: rows with at least ``path``, ``split``, ``label``, ``patient_id``, ``bytes``.
        workers: threads decoding images (PIL releases the GIL while decoding).
        progress: called with (done, total).

    Returns:
        The good rows, with ``width`` and ``height`` filled in, and the bad ones in ``skipped``.
    """
    verdicts: list[tuple[int, int] | str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, verdict in enumerate(pool.map(lambda p: inspect_image(Path(root) / p), frame["path"]), 1):
            verdicts.append(verdict)
            if progress is not None:
                progress(done, len(frame))
    good = [not isinstance(v, str) for v in verdicts]
    result = frame.loc[good].copy()
    result["width"] = [v[0] for v in verdicts if not isinstance(v, str)]
    result["height"] = [v[1] for v in verdicts if not isinstance(v, str)]
    skipped = [Skipped(path, v) for path, v in zip(frame["path"], verdicts) if isinstance(v, str)]
    columns = list(MANIFEST_COLUMNS) + [c for c in result.columns if c not in MANIFEST_COLUMNS]
    return Manifest(frame=result[columns].sort_values("path", ignore_index=True), skipped=skipped)


def assign_subsets(frame: pd.DataFrame, val_fraction: float = 0.15, seed: int = 42) -> pd.DataFrame:
    """Add a ``subset`` column: train / validation (carved from train) / test.

    The official ``val`` split (16 images) is too small to choose models or thresholds, so its
    images join the train pool before a validation set is carved out. The carve is stratified by
    class and grouped by patient: a patient's images all land on one side, so validation scores
    are not inflated by near-duplicate views of a training patient.

    Args:
        frame: a manifest frame (``split``, ``label``, ``patient_id`` columns).
        val_fraction: share of each class's train-pool images to hold out.
        seed: makes the carve reproducible.

    Returns:
        A copy of ``frame`` with the ``subset`` column.
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


def _dct_ratio(short_side: tf.Tensor, image_size: int) -> tf.Tensor:
    """Largest JPEG DCT scale-down (1, 2, 4, 8) that keeps the short side ≥ the target size."""
    import tensorflow as tf

    ratio = tf.constant(1, tf.int32)
    for candidate in (2, 4, 8):
        ratio = tf.where(short_side // candidate >= image_size, candidate, ratio)
    return ratio


def decode_image(encoded: tf.Tensor | bytes, image_size: int) -> tf.Tensor:
    """Decode JPEG/PNG bytes of any mode to a ``[size, size, 3]`` float32 tensor of 0..255 integers.

    This is the only preprocessing before the model (rescaling lives inside the model), shared by
    training, evaluation and the served model so they see identical numbers. Large JPEGs are
    decoded at a reduced DCT scale that still exceeds the target size, which is several times
    faster than a full decode followed by a resize. Values are rounded to integers so the
    pipeline can cache them as uint8 without changing them.

    Args:
        encoded: the file's bytes (scalar string tensor or Python bytes).
        image_size: side of the square output.
    """
    import tensorflow as tf

    encoded = tf.convert_to_tensor(encoded, dtype=tf.string)

    def jpeg() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(encoded)
        ratio = _dct_ratio(tf.minimum(shape[0], shape[1]), image_size)
        # The fast integer IDCT differs from the accurate one by about one grey level, far below
        # what the resize to the model's size keeps; it is measurably faster on 2 cores.
        def decode(r: int) -> tf.Tensor:
            return tf.io.decode_jpeg(encoded, channels=3, ratio=r, dct_method="INTEGER_FAST")

        branches = [(tf.equal(ratio, r), lambda r=r: decode(r)) for r in (8, 4, 2)]
        return tf.case(branches, default=lambda: decode(1))

    def other() -> tf.Tensor:
        return tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)

    pixels = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    pixels.set_shape([None, None, 3])
    resized = tf.image.resize(pixels, [image_size, image_size], method="bilinear", antialias=True)
    return tf.round(tf.clip_by_value(resized, 0.0, 255.0))


def augmentation(seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """The seed's train-time augmentation (shear 0.2°, zoom ±20% per axis), for image batches."""
    import keras

    shear = math.tan(math.radians(SEED_SHEAR_DEGREES))
    layers = [
        keras.layers.RandomShear(x_factor=shear, y_factor=shear, fill_mode="nearest", seed=seed),
        keras.layers.RandomZoom(
            height_factor=SEED_ZOOM, width_factor=SEED_ZOOM, fill_mode="nearest", seed=seed + 1
        ),
    ]

    def apply(images: tf.Tensor) -> tf.Tensor:
        for layer in layers:
            images = layer(images, training=True)
        return images

    return apply


def make_dataset(
    root: Path,
    paths: Sequence[str],
    labels: Sequence[int],
    *,
    image_size: int,
    batch_size: int,
    training: bool,
    augment: bool = True,
    seed: int = 42,
    cache: bool | str = True,
) -> tf.data.Dataset:
    """Build the input pipeline: read → decode → resize → cache → (shuffle, augment) → batch → prefetch.

    Decoded images are cached as uint8 (a quarter of float32's memory), so only the first epoch
    reads and decodes files. An image that fails to decode here (it passed the manifest's check,
    so this is rare) is dropped with a warning instead of stopping training.

    Args:
        root: folder the manifest paths are relative to.
        paths: manifest paths of this subset.
        labels: 0 NORMAL / 1 PNEUMONIA per path.
        image_size: side of the square model input.
        batch_size: images per batch.
        training: shuffle and augment (train subset only).
        augment: apply the seed's augmentation when training.
        seed: shuffle/augmentation seed.
        cache: True caches in memory, a string caches to that file prefix, False disables.

    Returns:
        Batches of ``(float32 [b, size, size, 3] in 0..255, float32 [b] labels)``.
    """
    import tensorflow as tf

    if len(paths) != len(labels):
        raise DataError(f"{len(paths)} paths but {len(labels)} labels")
    if not paths:
        raise DataError("cannot build a dataset from an empty subset")
    files = [str(Path(root) / path) for path in paths]
    dataset = tf.data.Dataset.from_tensor_slices((files, np.asarray(labels, dtype=np.float32)))

    def load(file: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = decode_image(tf.io.read_file(file), image_size)
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
    return dataset.prefetch(tf.data.AUTOTUNE)


def subset_dataset(
    root: Path, frame: pd.DataFrame, subset: str, *, image_size: int, batch_size: int,
    augment: bool = True, seed: int = 42,
) -> tf.data.Dataset:
    """:func:`make_dataset` for one subset of a frame with a ``subset`` column."""
    rows = frame[frame["subset"] == subset]
    return make_dataset(
        root, rows["path"].tolist(), rows["label"].tolist(), image_size=image_size,
        batch_size=batch_size, training=subset == "train", augment=augment, seed=seed,
    )

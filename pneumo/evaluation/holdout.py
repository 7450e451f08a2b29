"""The held-out test split the gate scores: images (or files read a chunk at a time), labels, patients."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pneumo.data.layout import CLASSES
from pneumo.errors import DataError


@dataclass
class TestSet:
    """Test images (encoded bytes, or files read only when scored) with labels and patient ids.

    Files are read a chunk at a time by :meth:`chunks`, so scoring holds one chunk of encoded
    images in memory whatever the split's size (the paired gate resamples patients).
    """

    __test__ = False  # not a pytest test class, despite the name

    images: Sequence[bytes | Path]
    labels: list[int]
    patients: list[str]
    names: list[str] | None = None  # paths relative to the dataset root, for the manifest; else item-N
    _manifest: list[dict[str, Any]] | None = field(default=None, init=False, repr=False, compare=False)

    def manifest(self) -> list[dict[str, Any]]:
        """One ``{"path", "class", "sha256"}`` per image, in order (the images are read once, a chunk at a time)."""
        if self._manifest is None:
            names = self.names or [f"item-{index}" for index in range(len(self.images))]
            hashes = [hashlib.sha256(image).hexdigest() for chunk in self.chunks(64) for image in chunk]
            self._manifest = [{"path": name, "class": CLASSES[label], "sha256": digest}
                              for name, label, digest in zip(names, self.labels, hashes)]
        return self._manifest

    def digest(self) -> str:
        """SHA-256 of :meth:`manifest` as canonical JSON: equal digests mean the same locked test set."""
        return manifest_digest(self.manifest())

    def chunks(self, size: int) -> Iterator[list[bytes]]:
        """The encoded images, ``size`` at a time, in order."""
        for start in range(0, len(self.images), size):
            yield [item if isinstance(item, bytes) else Path(item).read_bytes()
                   for item in self.images[start:start + size]]


def read_test_set(root: Path, frame: pd.DataFrame, min_per_class: int = 2) -> TestSet:
    """The test rows of a manifest (``subset`` column, else ``split``) as files under ``root``.

    Raises:
        DataError: a class has fewer than ``min_per_class`` test images (the flow's own rule), so
            recall or specificity could not be evaluated.
    """
    column = "subset" if "subset" in frame.columns else "split"
    rows = frame[frame[column] == "test"]
    short = [f"{int((rows['label'] == label).sum())} {name}" for label, name in enumerate(CLASSES)
             if (rows["label"] == label).sum() < min_per_class]
    if short:
        raise DataError(f"the test split has {' and '.join(short)} images (need ≥{min_per_class} per class): "
                        "cannot evaluate before promoting")
    return TestSet([Path(root) / path for path in rows["path"]], [int(v) for v in rows["label"]],
                   [str(v) for v in rows["patient_id"]], names=[str(path) for path in rows["path"]])


def manifest_digest(manifest: Sequence[dict[str, Any]]) -> str:
    """SHA-256 of a test manifest, independent of row order."""
    rows = sorted((row["path"], row["class"], row["sha256"]) for row in manifest)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class TestSetChange:
    """How the test split differs from the one a champion was promoted on (images matched by content)."""

    __test__ = False

    added: dict[str, int]  # per class, images in the current split only
    removed: dict[str, int]  # per class, images in the champion's split only
    shared: list[int]  # indices into the current split of the images both hold (same content and class)

    def describe(self) -> str:
        def per_class(counts: dict[str, int]) -> str:
            return ", ".join(f"{counts[name]} {name}" for name in CLASSES)

        return (f"added {per_class(self.added)}; removed {per_class(self.removed)}; "
                f"{len(self.shared)} images are in both")


def test_set_change(recorded: Sequence[dict[str, Any]], current: Sequence[dict[str, Any]]) -> TestSetChange:
    """What changed from the ``recorded`` manifest to the ``current`` one (both from :meth:`TestSet.manifest`)."""
    old = {(row["sha256"], row["class"]) for row in recorded}
    new = {(row["sha256"], row["class"]) for row in current}
    count = {name: 0 for name in CLASSES}
    added, removed = dict(count), dict(count)
    for _, name in new - old:
        added[name] += 1
    for _, name in old - new:
        removed[name] += 1
    return TestSetChange(added, removed, [index for index, row in enumerate(current)
                                          if (row["sha256"], row["class"]) in old])

"""The held-out test split the gate scores: images (or files read a chunk at a time), labels, patients."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
                   [str(v) for v in rows["patient_id"]])

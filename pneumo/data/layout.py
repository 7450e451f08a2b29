"""The Kaggle chest-xray layout: which relative paths are dataset images, and what they mean."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

SPLITS: tuple[str, ...] = ("train", "val", "test")
CLASSES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")  # index = label (PNEUMONIA is the positive class)
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg", ".png"})

# personN_bacteria_K / personN_virus_K; IM-XXXX-YYYY; NORMAL2-IM-XXXX-YYYY (patient = the IM-XXXX part).
_PERSON = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+$", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class ImageKey:
    """A dataset image identified by its path relative to the dataset root."""

    path: str  # POSIX, relative, starts with chest_xray/
    split: str  # as on disk: train | val | test
    label: int  # 0 NORMAL, 1 PNEUMONIA
    patient_id: str


@dataclass(frozen=True)
class Ignored:
    """A path that is not a dataset image, with the reason (reported, never silently dropped)."""

    path: str
    reason: str


def patient_id_of(filename_stem: str) -> str:
    """Patient id from a Kaggle file stem; unknown patterns are their own patient (safe for grouping)."""
    for pattern in (_PERSON, _NORMAL):
        match = pattern.match(filename_stem)
        if match:
            return match.group(1)
    return filename_stem


def classify(relative_path: str) -> ImageKey | Ignored:
    """An :class:`ImageKey` if a POSIX path relative to the dataset root is a dataset image, else :class:`Ignored`.

    The Kaggle zip also ships a duplicate ``chest_xray/chest_xray/`` tree, a ``__MACOSX/`` tree of
    ``._*`` resource forks and ``.DS_Store`` files; counting those would triple the dataset.
    """
    parts = PurePosixPath(relative_path).parts
    name = parts[-1] if parts else ""
    if "__MACOSX" in parts:
        return Ignored(relative_path, "macos-metadata")
    if any(part.startswith(".") for part in parts):
        return Ignored(relative_path, "hidden-file")
    if len(parts) >= 2 and parts[0] == "chest_xray" and parts[1] == "chest_xray":
        return Ignored(relative_path, "nested-duplicate-tree")
    if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES:
        return Ignored(relative_path, "not-an-image-extension")
    if len(parts) != 4 or parts[0] != "chest_xray" or parts[1] not in SPLITS or parts[2] not in CLASSES:
        return Ignored(relative_path, "outside-layout")
    return ImageKey(
        path=relative_path,
        split=parts[1],
        label=CLASSES.index(parts[2]),
        patient_id=patient_id_of(PurePosixPath(name).stem),
    )

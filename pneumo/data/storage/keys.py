"""Which listed keys become dataset files: folder markers, unsafe keys, Unicode spellings, the layout."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from pneumo.data.layout import Ignored, ImageKey, classify
from pneumo.data.storage.sources import unsafe_reason

FOLDER_MARKER = "folder-marker"
UNICODE_DUPLICATE = "unicode-duplicate"
UNSAFE_PREFIX = "unsafe-key: "
T = TypeVar("T")


@dataclass(frozen=True)
class Listed:
    """One object of a listing that is a dataset image."""

    info: ImageKey  # info.path is the NFC spelling: the cache path
    key: str  # as the store spells it: what a GET must ask for
    size: int
    etag: str  # without quotes


@dataclass
class Selection:
    """A listing sorted into images (by NFC path) and sorted ``(path, reason)`` skipped entries."""

    images: dict[str, Listed] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    refused: int = 0  # how many skipped entries were unsafe keys


def nfc(path: str) -> str:
    """``path`` in Unicode NFC: macOS file systems hand out NFD names, most other tools NFC."""
    return unicodedata.normalize("NFC", path)


def printable(path: str) -> str:
    """``path`` with control and non-ASCII characters escaped, so two spellings look different."""
    return ascii(path)[1:-1]


def images_among(names: Iterable[tuple[str, T]], skipped: list[tuple[str, str]]) -> list[tuple[ImageKey, T]]:
    """The dataset images among ``(name as stored, item)`` pairs, classified by NFC name, with their items.

    One spelling per NFC name is kept, deterministically: the one that already is NFC, else the
    smallest. The other spellings and the non-images are added to ``skipped``, which is then sorted.
    """
    groups: dict[str, list[tuple[str, T]]] = {}
    for raw, item in names:
        groups.setdefault(nfc(raw), []).append((raw, item))
    images: list[tuple[ImageKey, T]] = []
    for name, group in groups.items():
        (_, item), *duplicates = sorted(group, key=lambda spelling: (spelling[0] != name, spelling[0]))
        skipped.extend((printable(raw), UNICODE_DUPLICATE) for raw, _ in duplicates)
        verdict = classify(name)
        if isinstance(verdict, Ignored):
            skipped.append((verdict.path, verdict.reason))
        else:
            images.append((verdict, item))
    skipped.sort()
    return images


def is_folder_marker(relative: str, size: int) -> bool:
    """Whether a listed entry is the empty ``folder/`` object that consoles and tools create.

    Only an empty object whose name ends in "/" and is otherwise safe: a marker is never written,
    but an attack-shaped one (``../x/``) is still reported as unsafe.
    """
    if size != 0 or not (relative == "" or relative.endswith("/")):
        return False
    return relative == "" or unsafe_reason(relative[:-1]) is None


def select(listing: Iterable[tuple[str, int, str]], base: str) -> Selection:
    """Sort an S3 listing of ``(key, size, etag)`` into dataset images and skipped entries; paths drop ``base``."""
    selection = Selection()
    candidates: list[tuple[str, tuple[str, int, str]]] = []
    for key, size, etag in listing:
        relative = key[len(base):]
        if is_folder_marker(relative, size):
            selection.skipped.append((relative or "./", FOLDER_MARKER))
            continue
        reason = unsafe_reason(nfc(relative))
        if reason is not None:
            selection.skipped.append((printable(relative), UNSAFE_PREFIX + reason))
            selection.refused += 1
            continue
        candidates.append((relative, (key, size, etag)))
    for info, (key, size, etag) in images_among(candidates, selection.skipped):
        selection.images[info.path] = Listed(info, key, size, etag)
    return selection

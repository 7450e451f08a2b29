"""Which listed keys become dataset files: folder markers, unsafe keys, Unicode spellings, the layout."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pneumo.layout import Ignored, ImageKey, classify
from pneumo.storage.sources import unsafe_reason

FOLDER_MARKER = "folder-marker"
UNICODE_DUPLICATE = "unicode-duplicate"
UNSAFE_PREFIX = "unsafe-key: "
T = TypeVar("T")


@dataclass(frozen=True)
class Listed:
    """One object of a listing that is a dataset image.

    Attributes:
        info: the image's layout facts; ``info.path`` is the NFC spelling (the cache path).
        key: the object's key as the store spells it (what a GET must ask for).
        size: bytes, as listed.
        etag: the listed ETag, without quotes.
    """

    info: ImageKey
    key: str
    size: int
    etag: str


@dataclass
class Selection:
    """A listing sorted into images and skipped entries.

    Attributes:
        images: kept images by NFC path relative to the dataset root.
        skipped: ``(path, reason)`` for every listed entry that is not an image, sorted.
        refused: how many of the skipped entries were unsafe keys (see :func:`unsafe_reason`).
    """

    images: dict[str, Listed] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    refused: int = 0


@dataclass(frozen=True)
class Spelling(Generic[T]):
    """A name as stored (``raw``) with its NFC form and whatever the caller attaches."""

    raw: str
    nfc: str
    item: T


def nfc(path: str) -> str:
    """``path`` in Unicode NFC: macOS file systems hand out NFD names, most other tools NFC."""
    return unicodedata.normalize("NFC", path)


def printable(path: str) -> str:
    """``path`` with control and non-ASCII characters escaped, so two spellings look different."""
    return ascii(path)[1:-1]


def dedupe_spellings(spellings: Iterable[Spelling[T]]) -> tuple[dict[str, Spelling[T]], list[Spelling[T]]]:
    """Keep one spelling per NFC name; the others are duplicates.

    The winner is deterministic: the spelling that already is NFC, else the smallest raw string.

    Args:
        spellings: names as stored, with their NFC forms.

    Returns:
        ``(kept by NFC name, duplicates)``.
    """
    groups: dict[str, list[Spelling[T]]] = {}
    for spelling in spellings:
        groups.setdefault(spelling.nfc, []).append(spelling)
    kept: dict[str, Spelling[T]] = {}
    duplicates: list[Spelling[T]] = []
    for name, group in groups.items():
        winner, *losers = sorted(group, key=lambda s: (s.raw != s.nfc, s.raw))
        kept[name] = winner
        duplicates.extend(losers)
    return kept, duplicates


def is_folder_marker(relative: str, size: int) -> bool:
    """Whether a listed entry is the empty ``folder/`` object that consoles and tools create.

    Only an empty object whose name ends in "/" and is otherwise safe: a marker is never written,
    but an attack-shaped one (``../x/``) is still reported as unsafe.
    """
    if size != 0 or not (relative == "" or relative.endswith("/")):
        return False
    return relative == "" or unsafe_reason(relative[:-1]) is None


def select(listing: Iterable[tuple[str, int, str]], base: str) -> Selection:
    """Sort an S3 listing into dataset images (by NFC path) and skipped entries with reasons.

    Args:
        listing: ``(key, size, etag)`` per object.
        base: the key prefix dataset paths are relative to.

    Returns:
        A :class:`Selection`.
    """
    selection = Selection()
    spellings: list[Spelling[tuple[str, int, str]]] = []
    for key, size, etag in listing:
        relative = key[len(base):]
        if is_folder_marker(relative, size):
            selection.skipped.append((relative or "./", FOLDER_MARKER))
            continue
        normal = nfc(relative)
        reason = unsafe_reason(normal)
        if reason is not None:
            selection.skipped.append((printable(relative), UNSAFE_PREFIX + reason))
            selection.refused += 1
            continue
        spellings.append(Spelling(relative, normal, (key, size, etag)))
    kept, duplicates = dedupe_spellings(spellings)
    selection.skipped.extend((printable(d.raw), UNICODE_DUPLICATE) for d in duplicates)
    for path, spelling in kept.items():
        verdict = classify(path)
        if isinstance(verdict, Ignored):
            selection.skipped.append((verdict.path, verdict.reason))
        else:
            key, size, etag = spelling.item
            selection.images[path] = Listed(verdict, key, size, etag)
    selection.skipped.sort()
    return selection

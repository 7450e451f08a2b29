"""What an ingest produces: the manifest frame, its content fingerprint, and the sync/upload reports.

The fingerprint hashes content MD5s computed from the bytes, never ETags (which are no MD5 for
multipart, SSE-KMS or SSE-C objects), so a local folder and the same files in a bucket agree.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo.data.layout import CLASSES, ImageKey

if TYPE_CHECKING:  # pandas is imported where frames are built: keeps `pneumo --help` fast.
    import pandas as pd

    from pneumo.data.storage.sources import Source


MANIFEST_COLUMNS: tuple[str, ...] = ("path", "split", "label", "patient_id", "bytes", "etag", "md5")
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class IngestReport:
    """What a sync saw and did. Holds no credentials."""

    source: str
    endpoint: str | None
    root: str
    fingerprint: str
    listed: int
    images: int
    downloaded: int
    reused: int
    removed: int
    refused: int
    bytes_downloaded: int
    seconds: float
    counts: dict[str, dict[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Downloads that only their size could verify: the ETag was no MD5 (SSE-KMS, SSE-C, multipart)
    # and the store returned no full-object checksum that botocore can compute.
    size_only: int = 0

    def skipped_by_reason(self) -> dict[str, int]:
        """How many listed entries were left out, by reason."""
        return dict(Counter(reason for _, reason in self.skipped))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (also what ``pneumo ingest --json`` prints)."""
        return {**asdict(self), "skipped": len(self.skipped), "skipped_by_reason": self.skipped_by_reason(),
                "seconds": round(self.seconds, 3),
                "skipped_files": [{"path": path, "reason": reason} for path, reason in self.skipped]}


@dataclass
class IngestResult:
    """A synced dataset: its manifest, fingerprint, report, and the local folder holding it."""

    frame: pd.DataFrame  # MANIFEST_COLUMNS; etag is the S3 ETag (local files: the MD5), md5 the content MD5
    fingerprint: str
    report: IngestReport
    root: Path  # holds chest_xray/: the cache for S3, the folder itself for a local source
    source: Source


@dataclass
class UploadReport:
    """What :func:`upload_tree` did."""

    target: str
    endpoint: str | None
    uploaded: int
    unchanged: int
    bytes_uploaded: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "seconds": round(self.seconds, 3)}


def fingerprint(frame: pd.DataFrame) -> str:
    """SHA-256 over a manifest's sorted ``path, md5 (else etag), bytes`` lines: same files, same value.

    Independent of the source, the row order and the Unicode normalization of the paths.
    """
    digests = frame["md5"] if "md5" in frame.columns else frame["etag"]
    # NFC: a local copy of macOS-origin files keeps NFD names, the S3 cache stores NFC ones.
    lines = sorted(f"{unicodedata.normalize('NFC', str(p))}\t{d}\t{int(b)}\n"
                   for p, d, b in zip(frame["path"], digests, frame["bytes"]))
    return hashlib.sha256("".join(lines).encode("utf-8", "surrogatepass")).hexdigest()


def _pinned_md5(etag: str, md5: str | None) -> str | None:
    """The content MD5 a pinned row promises: its ``md5``, else its ETag when that is a plain MD5."""
    return md5 or (etag if _PLAIN_MD5.match(etag) else None)


def _build_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    frame = frame.astype({"label": "int64", "bytes": "int64"})
    return frame.sort_values("path", ignore_index=True)


def counts_by(frame: pd.DataFrame, column: str) -> dict[str, dict[str, int]]:
    """Image counts per value of ``column`` (``split``, ``subset``) and class name."""
    result: dict[str, dict[str, int]] = {}
    for (group, label), count in frame.groupby([column, "label"]).size().items():
        result.setdefault(str(group), {})[CLASSES[int(label)]] = int(count)
    return result


def _row(key: ImageKey, size: int, etag: str, md5: str) -> dict[str, Any]:
    return {"path": key.path, "split": key.split, "label": key.label, "patient_id": key.patient_id,
            "bytes": size, "etag": etag, "md5": md5}


def _result(src: Source, root: Path, rows: list[dict[str, Any]], started: float, **report: Any) -> IngestResult:
    """The manifest, fingerprint and report of a sync whose images are ``rows``."""
    frame = _build_frame(rows)
    fp = fingerprint(frame)
    summary = IngestReport(source=src.uri, root=str(root), fingerprint=fp, images=len(rows),
                           seconds=time.perf_counter() - started, counts=counts_by(frame, "split"), **report)
    return IngestResult(frame=frame, fingerprint=fp, report=summary, root=root, source=src)


def manifest_changes(before: pd.DataFrame, after: pd.DataFrame) -> dict[str, dict[str, dict[str, int]]]:
    """Images added, removed and changed (another ETag or size) from ``before`` to ``after``.

    Keyed by split, then class name, then ``added``/``removed``/``changed``, with only non-zero
    counts; an empty result means both list the same files.
    """
    def by_path(frame: pd.DataFrame) -> dict[str, tuple[str, int, str, str]]:
        return {unicodedata.normalize("NFC", str(path)): (str(etag), int(size), str(split), CLASSES[int(label)])
                for path, etag, size, split, label in zip(frame["path"], frame["etag"], frame["bytes"],
                                                          frame["split"], frame["label"])}

    old, new = by_path(before), by_path(after)
    changes: Counter[tuple[str, str, str]] = Counter()
    for path, (etag, size, split, label) in new.items():
        if path not in old:
            changes[split, label, "added"] += 1
        elif old[path][:2] != (etag, size):
            changes[split, label, "changed"] += 1
    for path, (_, _, split, label) in old.items():
        if path not in new:
            changes[split, label, "removed"] += 1
    result: dict[str, dict[str, dict[str, int]]] = {}
    for (split, label, kind), count in sorted(changes.items()):
        result.setdefault(split, {}).setdefault(label, {})[kind] = count
    return result

"""What an ingest produces: the manifest frame, its content fingerprint, and the sync/upload reports.

Fingerprint: SHA-256 of the sorted ``path (NFC), MD5 of content, size`` lines. The MD5 is always
computed from the bytes (while downloading, kept in the cache state): an ETag is the content MD5
only for single-part objects in plain text or SSE-S3, never for multipart, SSE-KMS or SSE-C ones.
A local folder and the same files in a bucket therefore give the same fingerprint either way.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo.layout import CLASSES, ImageKey

if TYPE_CHECKING:  # pandas is imported where frames are built: keeps `pneumo --help` fast.
    import pandas as pd

    from pneumo.storage.sources import Source


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
        return {
            "source": self.source,
            "endpoint": self.endpoint,
            "root": self.root,
            "fingerprint": self.fingerprint,
            "listed": self.listed,
            "images": self.images,
            "downloaded": self.downloaded,
            "reused": self.reused,
            "removed": self.removed,
            "refused": self.refused,
            "skipped": len(self.skipped),
            "skipped_by_reason": self.skipped_by_reason(),
            "bytes_downloaded": self.bytes_downloaded,
            "size_only": self.size_only,
            "seconds": round(self.seconds, 3),
            "counts": self.counts,
            "skipped_files": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }


@dataclass
class IngestResult:
    """A synced dataset: its manifest, fingerprint, report, and the local folder holding it.

    Attributes:
        frame: one row per image; columns :data:`MANIFEST_COLUMNS` (``etag`` is the S3 ETag, or
            the content MD5 for local files; ``md5`` is always the content MD5).
        fingerprint: see :func:`fingerprint`.
        report: the :class:`IngestReport`.
        root: local folder containing ``chest_xray/`` (the cache for S3, the folder itself for a
            local source).
        source: the parsed source.
    """

    frame: pd.DataFrame
    fingerprint: str
    report: IngestReport
    root: Path
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
    """Stable content hash of a manifest: SHA-256 over sorted ``path, md5, bytes`` lines.

    Args:
        frame: a manifest with ``path``, ``bytes`` and ``md5`` (or, failing that, ``etag``).

    Returns:
        64 hex digits; the same files give the same value whatever the source, row order or
        Unicode normalization of the paths.
    """
    digests = frame["md5"] if "md5" in frame.columns else frame["etag"]
    # NFC: a local copy of macOS-origin files keeps NFD names, the S3 cache stores NFC ones.
    lines = sorted(f"{unicodedata.normalize('NFC', str(p))}\t{d}\t{int(b)}\n"
                   for p, d, b in zip(frame["path"], digests, frame["bytes"]))
    sha = hashlib.sha256()
    for line in lines:
        sha.update(line.encode("utf-8", "surrogatepass"))
    return sha.hexdigest()


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

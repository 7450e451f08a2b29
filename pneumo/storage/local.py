"""Local-folder sources: walk and hash a folder into a manifest, verify it against a pinned one."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from pneumo.errors import StorageError
from pneumo.layout import SPLITS, Ignored, ImageKey, classify
from pneumo.storage.cache import META_DIR, _Md5Memo
from pneumo.storage.keys import (
    UNICODE_DUPLICATE,
    Spelling,
    dedupe_spellings,
    nfc,
    printable,
)
from pneumo.storage.parallel import ProgressFn, _run_parallel
from pneumo.storage.report import (
    IngestReport,
    IngestResult,
    _build_frame,
    _pinned_md5,
    _row,
    counts_by,
    fingerprint,
)
from pneumo.storage.sources import Source, _no_images_message


def _local_root(src: Source) -> tuple[Path, Path]:
    """(dataset root holding chest_xray/, folder to walk)."""
    assert src.path is not None
    path = src.path
    if not path.is_dir():
        raise StorageError(f"dataset folder {path} does not exist or is not a folder")
    # Pointing at chest_xray/ itself (which may hold the zip's nested chest_xray/ duplicate).
    if path.name == "chest_xray" and any((path / split).is_dir() for split in SPLITS):
        return path.parent, path
    return path, path


def _sync_local(src: Source, cache_dir: Path | None, *, workers: int, progress: ProgressFn | None,
                started: float) -> IngestResult:
    root, walk_from = _local_root(src)
    relatives = _walk(root, walk_from)
    kept, duplicates = dedupe_spellings(Spelling(r, nfc(r), None) for r in relatives)
    images: list[ImageKey] = []
    skipped: list[tuple[str, str]] = [(printable(d.raw), UNICODE_DUPLICATE) for d in duplicates]
    listed = len(relatives)
    for name, spelling in kept.items():
        verdict = classify(name)
        if isinstance(verdict, Ignored):
            skipped.append((verdict.path, verdict.reason))
        else:
            # Classified by its NFC name like an S3 key; read by the name the file really has.
            images.append(dataclasses.replace(verdict, path=spelling.raw))
    skipped.sort()
    if not images:
        raise StorageError(_no_images_message(str(walk_from), listed, skipped))
    memo = _Md5Memo(cache_dir.expanduser() if cache_dir is not None else None)

    def hash_one(key: ImageKey) -> dict[str, Any]:
        size, md5 = memo.md5(root / key.path)
        return _row(key, size, md5, md5)

    rows = _run_parallel(images, hash_one, workers, progress, 0, len(images))
    memo.save()
    frame = _build_frame(rows)
    fp = fingerprint(frame)
    report = IngestReport(
        source=str(src.path), endpoint=None, root=str(root), fingerprint=fp, listed=listed, images=len(rows),
        downloaded=0, reused=len(rows), removed=0, refused=0, bytes_downloaded=0,
        seconds=time.perf_counter() - started, counts=counts_by(frame, "split"), skipped=skipped,
    )
    return IngestResult(frame=frame, fingerprint=fp, report=report, root=root, source=src)


def _walk(root: Path, walk_from: Path) -> list[str]:
    """Every file below ``walk_from`` as a POSIX path relative to ``root``, skipping our cache folder."""
    relatives: list[str] = []
    for directory, dirnames, filenames in os.walk(walk_from):
        dirnames[:] = sorted(d for d in dirnames if not (Path(directory) == root and d == META_DIR))
        relatives.extend((Path(directory) / name).relative_to(root).as_posix() for name in sorted(filenames))
    return relatives


def _verify_local(src: Source, pinned: list[tuple[str, str, int, str | None]], cache_dir: Any,
                  workers: int, progress: ProgressFn | None) -> Path:
    root, _ = _local_root(src)
    memo = _Md5Memo(Path(cache_dir).expanduser() if cache_dir is not None else None)

    def check(row: tuple[str, str, int, str | None]) -> None:
        path, etag, size, md5 = row
        target = root / path
        if not target.is_file():
            raise StorageError(f"{target} is missing; it was in the ingested manifest (re-run the ingest)")
        actual_size = target.stat().st_size
        if actual_size != size:
            raise StorageError(f"{target} changed since the ingest ({actual_size} bytes, pinned {size}); re-run the ingest")
        expected = _pinned_md5(etag, md5)
        if expected is not None and memo.md5(target)[1] != expected:
            raise StorageError(f"{target} changed since the ingest (MD5 differs); re-run the ingest")

    _run_parallel(pinned, check, workers, progress, 0, len(pinned))
    memo.save()
    return root

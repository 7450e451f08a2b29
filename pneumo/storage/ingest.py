"""Ingest entry points: :func:`sync` a source into the local cache, :func:`materialize` a pinned manifest."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo.errors import StorageError
from pneumo.layout import Ignored, ImageKey, classify
from pneumo.storage.cache import _Cache, _Entry
from pneumo.storage.local import _sync_local, _verify_local
from pneumo.storage.parallel import DEFAULT_WORKERS, ProgressFn, _run_parallel
from pneumo.storage.report import IngestReport, IngestResult, _build_frame, _pinned_md5, counts_by, _row, fingerprint
from pneumo.storage.s3 import _check_reachable, _connect
from pneumo.storage.sources import Source, _no_images_message, parse_source, unsafe_reason
from pneumo.storage.transfer import _download, _list

if TYPE_CHECKING:  # pandas is imported where frames are built: keeps `pneumo --help` fast.
    import pandas as pd

# The package's logger, so records keep the name ``pneumo.storage`` they had before the split.
log = logging.getLogger(__package__)



def sync(
    source: str | os.PathLike[str] | Source,
    cache_dir: str | os.PathLike[str] | None,
    *,
    endpoint_url: str | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: ProgressFn | None = None,
) -> IngestResult:
    """Bring a local copy of the dataset at ``source`` up to date and describe it.

    For ``s3://`` sources: lists every object (paginated), keeps the layout's images, downloads
    new or changed objects in parallel into ``cache_dir`` (temp file, size/MD5 check, rename),
    removes files whose objects left the bucket, and reuses the rest (ETag + size + file stat).
    For local folders nothing is copied: the folder is hashed (MD5 memo kept in ``cache_dir``).

    Args:
        source: ``s3://bucket/prefix``, ``file:///path`` or a folder; either the folder holding
            ``chest_xray/`` or ``chest_xray/`` itself.
        cache_dir: local cache folder (created; must be empty or an existing pneumo cache). For
            a local source it only keeps an MD5 memo and may be None.
        endpoint_url: S3 endpoint (MinIO); default ``PNEUMO_S3_ENDPOINT_URL``, then boto3's own
            ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / config file.
        workers: parallel downloads.
        progress: called as ``progress(done, total)`` over the images.

    Returns:
        An :class:`IngestResult`.

    Raises:
        StorageError: bad source, unreachable endpoint, missing bucket, denied access, a cache
            folder that is not ours, or no dataset image at the source (one line, no credentials).
    """
    started = time.perf_counter()
    src = parse_source(source)
    if src.scheme == "file":
        local_cache = Path(cache_dir) if cache_dir is not None else None
        return _sync_local(src, local_cache, workers=workers, progress=progress, started=started)
    if cache_dir is None:
        raise StorageError(f"a cache folder is needed to sync {src.uri}")
    s3 = _connect(src, endpoint_url, workers)
    listing = _list(s3, src)
    images: dict[str, tuple[ImageKey, str, int, str]] = {}  # path -> (key info, s3 key, size, etag)
    skipped: list[tuple[str, str]] = []
    refused = 0
    for key, size, etag in listing:
        relative = key[len(src.base):]
        reason = unsafe_reason(relative)
        if reason is not None:
            skipped.append((repr(relative)[1:-1], f"unsafe-key: {reason}"))
            refused += 1
            continue
        verdict = classify(relative)
        if isinstance(verdict, Ignored):
            skipped.append((verdict.path, verdict.reason))
        else:
            images[relative] = (verdict, key, size, etag)
    skipped.sort()
    if not images:
        raise StorageError(_no_images_message(s3.where(src.prefix), len(listing), skipped))

    cache_root = Path(cache_dir).expanduser()
    with _Cache.open(cache_root) as cache:
        rows: dict[str, dict[str, Any]] = {}
        todo: list[str] = []
        for path, (info, _key, size, etag) in images.items():
            entry = cache.trusted(path, etag, size)
            if entry is None:
                todo.append(path)
            else:
                rows[path] = _row(info, size, etag, entry.md5)
        total = len(images)
        if progress is not None:
            progress(total - len(todo), total)

        def fetch(path: str) -> tuple[str, _Entry]:
            return path, _download(s3, cache, images[path][1], path)

        fetched = _run_parallel(todo, fetch, workers, progress, total - len(todo), total)
        bytes_downloaded = 0
        for path, entry in fetched:
            # The GET's own ETag/size are what we hold, even if the object changed since listing.
            rows[path] = _row(images[path][0], entry.size, entry.etag, entry.md5)
            bytes_downloaded += entry.size
        stale = [path for path in cache.entries if path not in images]
        for path in stale:
            (cache.root / path).unlink(missing_ok=True)
            cache.forget(path)
        removed = len(stale) + cache.sweep(set(images))
        cache.compact()

    row_list = list(rows.values())
    frame = _build_frame(row_list)
    fp = fingerprint(frame)
    report = IngestReport(
        source=src.uri, endpoint=s3.endpoint, root=str(cache_root), fingerprint=fp, listed=len(listing),
        images=len(row_list), downloaded=len(fetched), reused=len(row_list) - len(fetched), removed=removed,
        refused=refused, bytes_downloaded=bytes_downloaded, seconds=time.perf_counter() - started,
        counts=counts_by(frame, "split"), skipped=skipped,
    )
    log.info("ingest %s: %d images (%d downloaded, %d reused, %d removed, %d skipped), fingerprint %s",
             src.uri, report.images, report.downloaded, report.reused, report.removed, len(skipped), fp[:12])
    return IngestResult(frame=frame, fingerprint=fp, report=report, root=cache_root, source=src)


def materialize(
    manifest_frame: pd.DataFrame,
    source: str | os.PathLike[str] | Source,
    cache_dir: str | os.PathLike[str],
    *,
    endpoint_url: str | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: ProgressFn | None = None,
) -> Path:
    """Make exactly the manifest's files available locally (remote workers call this).

    For S3 each missing or stale file is fetched with ``If-Match`` on its pinned ETag, so an object
    that changed after the ingest fails loudly instead of silently training on other data. For a
    local source, files are checked against the pinned size and MD5.

    Args:
        manifest_frame: the ingest's manifest (``path``, ``bytes``, ``etag``; ``md5`` if present).
        source: the same source the manifest came from.
        cache_dir: local cache (shared with :func:`sync` is fine).
        endpoint_url: as for :func:`sync`.
        workers: parallel downloads.
        progress: called as ``progress(done, total)``.

    Returns:
        The local folder that holds ``chest_xray/`` with the manifest's files.

    Raises:
        StorageError: an object changed or vanished since the ingest (names the key), or any
            error :func:`sync` would raise.
    """
    src = parse_source(source)
    pinned = _pinned_rows(manifest_frame)
    if src.scheme == "file":
        return _verify_local(src, pinned, cache_dir, workers, progress)
    s3 = _connect(src, endpoint_url, workers)
    cache_root = Path(cache_dir).expanduser()
    with _Cache.open(cache_root) as cache:
        todo = [row for row in pinned if cache.trusted(row[0], row[1], row[2], row[3]) is None]
        total = len(pinned)
        if progress is not None:
            progress(total - len(todo), total)
        if todo:
            _check_reachable(s3, todo[0][0], "downloading")

        def fetch(row: tuple[str, str, int, str | None]) -> None:
            path, etag, size, md5 = row
            _download(s3, cache, src.base + path, path, if_match=etag, expect_size=size,
                      expect_md5=_pinned_md5(etag, md5))

        _run_parallel(todo, fetch, workers, progress, total - len(todo), total)
        cache.compact()
    return cache_root


def _pinned_rows(frame: pd.DataFrame) -> list[tuple[str, str, int, str | None]]:
    missing = {"path", "bytes", "etag"} - set(frame.columns)
    if missing:
        raise StorageError(f"manifest lacks column(s) {', '.join(sorted(missing))}; pass the frame sync() returned")
    md5s = frame["md5"] if "md5" in frame.columns else [None] * len(frame)
    rows = []
    for path, etag, size, md5 in zip(frame["path"], frame["etag"], frame["bytes"], md5s):
        reason = unsafe_reason(str(path))
        if reason is not None:
            raise StorageError(f"manifest path {path!r} is unsafe ({reason})")
        rows.append((str(path), str(etag).strip('"'), int(size), str(md5) if isinstance(md5, str) and md5 else None))
    return rows

"""Ingest entry points: :func:`sync` a source into the cache; :func:`materialize` / :func:`materialized` a pinned manifest."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo.errors import StorageError, TransientStorageError
from pneumo.storage.cache import _Cache, reading
from pneumo.storage.keys import nfc, select
from pneumo.storage.local import _sync_local, _verify_local
from pneumo.storage.parallel import DEFAULT_WORKERS, ProgressFn, _run_parallel
from pneumo.storage.report import (
    IngestReport,
    IngestResult,
    _build_frame,
    _row,
    counts_by,
    fingerprint,
)
from pneumo.storage.s3 import _S3, _check_reachable, _connect
from pneumo.storage.sources import (
    Source,
    _no_images_message,
    parse_source,
    unsafe_reason,
)
from pneumo.storage.transfer import _download, _Fetched, _list

if TYPE_CHECKING:  # pandas is imported where frames are built: keeps `pneumo --help` fast.
    import pandas as pd

# The package's logger, so records keep the name ``pneumo.storage`` they had before the split.
log = logging.getLogger(__package__)
# Rounds of "materialize, then re-check under the shared lock" before giving up on a busy cache.
_HOLD_ATTEMPTS = 3


def sync(
    source: str | os.PathLike[str] | Source,
    cache_dir: str | os.PathLike[str] | None,
    *,
    endpoint_url: str | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: ProgressFn | None = None,
) -> IngestResult:
    """Bring a local copy of the dataset at ``source`` up to date and describe it.

    For ``s3://`` sources: lists every object (paginated), keeps the layout's images (keys in
    Unicode NFC; see :mod:`.keys` for what is skipped), downloads new or changed objects in
    parallel into ``cache_dir`` (temp file, verified, rename; see docs/storage.md), removes files
    whose objects left the bucket, and reuses the rest (ETag + size + file stat), all under the
    cache's exclusive lock. For local folders nothing is copied: the folder is hashed (MD5 memo
    kept in ``cache_dir``).

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
            A :class:`TransientStorageError` when the store still throttled, failed (5xx) or
            dropped connections after every retry.
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
    selection = select(listing, src.base)
    images = selection.images
    if not images:
        raise StorageError(_no_images_message(s3.where(src.prefix), len(listing), selection.skipped))

    cache_root = Path(cache_dir).expanduser()
    with _Cache.open(cache_root) as cache:
        rows: dict[str, dict[str, Any]] = {}
        todo: list[str] = []
        for path, listed in images.items():
            entry = cache.trusted(path, listed.etag, listed.size)
            if entry is None:
                todo.append(path)
            else:
                rows[path] = _row(listed.info, listed.size, listed.etag, entry.md5)
        total = len(images)
        if progress is not None:
            progress(total - len(todo), total)

        def fetch(path: str) -> tuple[str, _Fetched]:
            return path, _download(s3, cache, images[path].key, path)

        fetched = _run_parallel(todo, fetch, workers, progress, total - len(todo), total)
        bytes_downloaded = 0
        for path, done in fetched:
            # The GET's own ETag/size are what we hold, even if the object changed since listing.
            rows[path] = _row(images[path].info, done.entry.size, done.entry.etag, done.entry.md5)
            bytes_downloaded += done.entry.size
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
        refused=selection.refused, bytes_downloaded=bytes_downloaded, seconds=time.perf_counter() - started,
        counts=counts_by(frame, "split"), skipped=selection.skipped,
        size_only=sum(done.verified_by == "size" for _, done in fetched),
    )
    log.info("ingest %s: %d images (%d downloaded, %d reused, %d removed, %d skipped), fingerprint %s",
             src.uri, report.images, report.downloaded, report.reused, report.removed, len(report.skipped), fp[:12])
    if report.size_only:
        log.warning("ingest %s: %d downloads could be checked by size only (ETags that are no MD5 and no "
                    "stored checksum: SSE-KMS, SSE-C or multipart objects)", src.uri, report.size_only)
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
    local source, files are checked against the pinned size and MD5. Once this returns, a later
    sync into the same cache may rewrite the files: to read them safely use :func:`materialized`.

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
        todo = _untrusted(cache, pinned)
        total = len(pinned)
        if progress is not None:
            progress(total - len(todo), total)
        if todo:
            _check_reachable(s3, todo[0][0], "downloading")
        keys = _keys_of(s3, src, [row[0] for row in todo])

        def fetch(row: tuple[str, str, int, str | None]) -> None:
            path, etag, size, md5 = row
            # The row's md5 column is the content MD5; a pinned ETag is checked by If-Match and,
            # where it is one, as the MD5 by _download itself.
            _download(s3, cache, keys[path], path, if_match=etag, expect_size=size, expect_md5=md5)

        _run_parallel(todo, fetch, workers, progress, total - len(todo), total)
        cache.compact()
    return cache_root


@contextlib.contextmanager
def materialized(
    manifest_frame: pd.DataFrame,
    source: str | os.PathLike[str] | Source,
    cache_dir: str | os.PathLike[str],
    *,
    endpoint_url: str | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: ProgressFn | None = None,
) -> Iterator[Path]:
    """:func:`materialize`, then hold the files: read them inside the ``with`` block.

    Inside the block the manifest's files are in the cache, verified, and held for reading
    (:func:`~pneumo.storage.reading`): a ``sync`` or ``materialize`` into the same cache (another
    task, ``pneumo promote``) waits until the block exits. Every file is checked against the
    cache state (ETag, size, MD5, file size and mtime) under the shared lock, so a writer that
    slipped in after the download is caught; with a warm cache nothing else happens, so readers
    of one cache run side by side. The thread must not sync into the same cache inside the block.

    Args:
        manifest_frame, source, cache_dir, endpoint_url, workers, progress: as for :func:`materialize`.

    Returns:
        A context manager yielding the local folder that holds ``chest_xray/``.

    Raises:
        StorageError: as :func:`materialize`; :class:`TransientStorageError` when other writers
            kept changing the cache for every attempt.
    """
    src = parse_source(source)
    if src.scheme == "file":  # the user's own folder: nothing of ours rewrites it
        yield materialize(manifest_frame, src, cache_dir, endpoint_url=endpoint_url, workers=workers,
                          progress=progress)
        return
    pinned = _pinned_rows(manifest_frame)
    for attempt in range(_HOLD_ATTEMPTS + 1):
        # A warm cache is checked under the shared lock only: readers of one cache never queue
        # behind each other. Only what is missing is fetched, under the exclusive lock.
        if attempt:
            materialize(manifest_frame, src, cache_dir, endpoint_url=endpoint_url, workers=workers,
                        progress=progress)
        with reading(cache_dir) as root:
            if not _untrusted(_Cache.snapshot(root), pinned):
                yield root
                return
    raise TransientStorageError(f"the cache {cache_dir} changed after each of {_HOLD_ATTEMPTS} downloads of "
                                f"{src.uri}'s files; another sync keeps writing into it")


def _untrusted(cache: _Cache, pinned: list[tuple[str, str, int, str | None]]) -> list[tuple[str, str, int, str | None]]:
    """The pinned rows whose file the cache does not hold complete and unchanged."""
    return [row for row in pinned if cache.trusted(row[0], row[1], row[2], row[3]) is None]


def _keys_of(s3: _S3, src: Source, paths: list[str]) -> dict[str, str]:
    """The object key of each manifest path.

    Paths are NFC (see :mod:`.keys`) while a key may be stored in another normalization, so
    non-ASCII paths are looked up in a listing (once, and only when some are needed).
    """
    keys = {path: src.base + path for path in paths}
    if all(path.isascii() for path in paths):
        return keys
    images = select(_list(s3, src), src.base).images
    for path in paths:
        listed = images.get(nfc(path))
        if listed is not None:
            keys[path] = listed.key
    return keys


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

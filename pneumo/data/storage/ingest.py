"""Ingest entry points: :func:`sync` a source into the cache, :func:`materialize` a pinned manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumo.data.layout import SPLITS, ImageKey
from pneumo.data.storage.cache import META_DIR, _Cache, _Md5Memo, reading
from pneumo.data.storage.keys import images_among, nfc, select
from pneumo.data.storage.report import IngestResult, _build_frame, _pinned_md5, _result, _row
from pneumo.data.storage.s3 import _S3, _check_reachable, _connect
from pneumo.data.storage.sources import Source, parse_source, unsafe_reason
from pneumo.data.storage.transfer import DEFAULT_WORKERS, ProgressFn, _download, _Fetched, _list, _run_parallel
from pneumo.errors import StorageError, TransientStorageError

if TYPE_CHECKING:  # pandas is imported where frames are built: keeps `pneumo --help` fast.
    import pandas as pd

# The package's logger (``pneumo.data.storage``): one name for every storage module's records.
log = logging.getLogger(__package__)
# Rounds of "materialize, then re-check under the shared lock" before giving up on a busy cache.
_HOLD_ATTEMPTS = 3
_Pin = tuple[str, str, int, str | None]  # a manifest row: path, ETag, size, content MD5 if known


def sync(
    source: str | os.PathLike[str] | Source,
    cache_dir: str | os.PathLike[str] | None,
    *,
    endpoint_url: str | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: ProgressFn | None = None,
) -> IngestResult:
    """Bring a local copy of the dataset at ``source`` (the folder holding ``chest_xray/``, or it) up to date.

    For ``s3://``: under the cache's exclusive lock, downloads new or changed images in parallel into
    ``cache_dir`` (verified, then renamed; see docs/storage.md), removes files whose objects left the
    bucket and reuses the rest (ETag + size + file stat). The endpoint defaults to
    ``PNEUMO_S3_ENDPOINT_URL``, then boto3's own settings. A local folder is only hashed, with an MD5
    memo kept in ``cache_dir`` (may be None). Errors are one-line StorageErrors without credentials;
    TransientStorageError when the store still throttled, failed or dropped connections after retries.
    """
    started = time.perf_counter()
    src = parse_source(source)
    if src.scheme == "file":
        return _sync_local(src, cache_dir, workers, progress, started)
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
        for path, done in fetched:
            # The GET's own ETag/size are what we hold, even if the object changed since listing.
            rows[path] = _row(images[path].info, done.entry.size, done.entry.etag, done.entry.md5)
        stale = [path for path in cache.entries if path not in images]
        for path in stale:
            (cache.root / path).unlink(missing_ok=True)
            cache.forget(path)
        removed = len(stale) + cache.sweep(set(images))
        cache.compact()

    result = _result(src, cache_root, list(rows.values()), started, endpoint=s3.endpoint, listed=len(listing),
                     downloaded=len(fetched), reused=len(rows) - len(fetched), removed=removed,
                     refused=selection.refused, bytes_downloaded=sum(done.entry.size for _, done in fetched),
                     skipped=selection.skipped, size_only=sum(done.verified_by == "size" for _, done in fetched))
    report = result.report
    log.info("ingest %s: %d images (%d downloaded, %d reused, %d removed, %d skipped), fingerprint %s",
             src.uri, report.images, report.downloaded, report.reused, report.removed, len(report.skipped),
             report.fingerprint[:12])
    if report.size_only:
        log.warning("ingest %s: %d downloads could be checked by size only (ETags that are no MD5 and no "
                    "stored checksum: SSE-KMS, SSE-C or multipart objects)", src.uri, report.size_only)
    return result


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
    Returns the folder holding ``chest_xray/``. Raises StorageError naming the key of an object that
    changed or vanished since the ingest, or any error :func:`sync` would raise.
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

        def fetch(row: _Pin) -> None:
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
    (:func:`~pneumo.data.storage.reading`): a ``sync`` or ``materialize`` into the same cache (another
    task, ``pneumo promote``) waits until the block exits. Every file is checked against the
    cache state (ETag, size, MD5, file size and mtime) under the shared lock, so a writer that
    slipped in after the download is caught; with a warm cache nothing else happens, so readers
    of one cache run side by side. The thread must not sync into the same cache inside the block.
    Raises as :func:`materialize`; TransientStorageError when other writers changed the cache every time.
    """
    src = parse_source(source)
    fetch = functools.partial(materialize, manifest_frame, src, cache_dir, endpoint_url=endpoint_url,
                              workers=workers, progress=progress)
    if src.scheme == "file":  # the user's own folder: nothing of ours rewrites it
        yield fetch()
        return
    pinned = _pinned_rows(manifest_frame)
    for attempt in range(_HOLD_ATTEMPTS + 1):
        # A warm cache is checked under the shared lock only: readers of one cache never queue
        # behind each other. Only what is missing is fetched, under the exclusive lock.
        if attempt:
            fetch()
        with reading(cache_dir) as root:
            if not _untrusted(_Cache.snapshot(root), pinned):
                yield root
                return
    raise TransientStorageError(f"the cache {cache_dir} changed after each of {_HOLD_ATTEMPTS} downloads of "
                                f"{src.uri}'s files; another sync keeps writing into it")


def _untrusted(cache: _Cache, pinned: list[_Pin]) -> list[_Pin]:
    """The pinned rows whose file the cache does not hold complete and unchanged."""
    return [row for row in pinned if cache.trusted(*row) is None]


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


def _pinned_rows(frame: pd.DataFrame) -> list[_Pin]:
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


def _sync_local(src: Source, cache_dir: str | os.PathLike[str] | None, workers: int, progress: ProgressFn | None,
                started: float) -> IngestResult:
    root, walk_from = _local_root(src)
    relatives = _walk(root, walk_from)
    skipped: list[tuple[str, str]] = []
    # Classified by its NFC name like an S3 key; read by the name the file really has.
    images = [dataclasses.replace(info, path=raw) for info, raw in images_among(((r, r) for r in relatives), skipped)]
    if not images:
        raise StorageError(_no_images_message(str(walk_from), len(relatives), skipped))
    memo = _Md5Memo(cache_dir)

    def hash_one(key: ImageKey) -> dict[str, Any]:
        size, md5 = memo.md5(root / key.path)
        return _row(key, size, md5, md5)

    rows = _run_parallel(images, hash_one, workers, progress, 0, len(images))
    memo.save()
    return _result(src, root, rows, started, endpoint=None, listed=len(relatives), downloaded=0, reused=len(rows),
                   removed=0, refused=0, bytes_downloaded=0, skipped=skipped)


def _walk(root: Path, walk_from: Path) -> list[str]:
    """Every file below ``walk_from`` as a POSIX path relative to ``root``, skipping our cache folder."""
    relatives: list[str] = []
    for directory, dirnames, filenames in os.walk(walk_from):
        dirnames[:] = sorted(d for d in dirnames if not (Path(directory) == root and d == META_DIR))
        relatives.extend((Path(directory) / name).relative_to(root).as_posix() for name in sorted(filenames))
    return relatives


def _verify_local(src: Source, pinned: list[_Pin], cache_dir: Any, workers: int, progress: ProgressFn | None) -> Path:
    root, _ = _local_root(src)
    memo = _Md5Memo(cache_dir)

    def check(row: _Pin) -> None:
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


def _no_images_message(where: str, listed: int, skipped: list[tuple[str, str]]) -> str:
    hint = "expected keys like chest_xray/train/NORMAL/<name>.jpeg below the source"
    if any(path.split("/")[0] in ("train", "val", "test") for path, _ in skipped):
        hint = "the source seems to point inside chest_xray/: use the prefix that holds chest_xray/"
    return f"no dataset images in {where} ({listed} objects listed; {hint})"


def list_images(source: str | os.PathLike[str] | Source, cache_dir: str | os.PathLike[str] | None, *,
                endpoint_url: str | None = None, workers: int = DEFAULT_WORKERS) -> pd.DataFrame:
    """The dataset images at ``source`` as manifest rows, by the rules :func:`sync` applies, downloading nothing.

    For ``s3://`` the rows are the listing's keys, sizes and ETags (``md5`` is empty: contents are
    not read); a local folder is hashed as :func:`sync` hashes it (with its MD5 memo in ``cache_dir``).
    """
    src = parse_source(source)
    if src.scheme == "file":
        return _sync_local(src, cache_dir, workers, None, time.perf_counter()).frame
    s3 = _connect(src, endpoint_url, workers)
    listing = _list(s3, src)
    selection = select(listing, src.base)
    if not selection.images:
        raise StorageError(_no_images_message(s3.where(src.prefix), len(listing), selection.skipped))
    return _build_frame([_row(listed.info, listed.size, listed.etag, "") for listed in selection.images.values()])

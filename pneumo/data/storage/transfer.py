"""S3 object transfers on a thread pool: the paginated listing, verified atomic downloads, uploads."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pneumo.data.storage.cache import META_DIR, _Cache, _Entry, _md5_file
from pneumo.data.storage.report import UploadReport
from pneumo.data.storage.s3 import (
    _BODY_ATTEMPTS, _S3, _check_reachable, _checked_checksum, _connect, _Corrupt, _describe, _error_code, _etag_md5,
    _stream_to
)
from pneumo.data.storage.sources import Source, parse_source
from pneumo.errors import StorageError, redact

DEFAULT_WORKERS = 16
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 2.0
ProgressFn = Callable[[int, int], None]
T = TypeVar("T")


def _run_parallel(items: list[T], fn: Callable[[T], Any], workers: int, progress: ProgressFn | None,
                  done_before: int, total: int) -> list[Any]:
    """Map ``fn`` over ``items`` on threads; first error cancels the rest and is re-raised."""
    results: list[Any] = []
    done = done_before
    if not items:
        return results
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        futures: list[Future[Any]] = [pool.submit(fn, item) for item in items]
        try:
            for future in as_completed(futures):  # O(n) overall, unlike repeated wait() calls
                results.append(future.result())
                done += 1
                if progress is not None:
                    progress(done, total)
        except BaseException:
            for future in futures:  # fail fast: queued work is dropped, running work finishes
                future.cancel()
            raise
    return results


def _retry(fn: Callable[[], T], attempts: int = _BODY_ATTEMPTS) -> T:
    """Call ``fn`` again, with jittered exponential backoff, while it raises :class:`_Corrupt`.

    Requests (and their error responses: 5xx, throttling, resets before the reply) are retried
    by botocore's retry mode; what it cannot see is a streamed body cut off mid-way or hashing
    wrong, which surfaces here as ``_Corrupt``.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except _Corrupt:
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.5, 1.0) * min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
    raise AssertionError("unreachable")


def _list(s3: _S3, source: Source) -> list[tuple[str, int, str]]:
    """Every object under the source's prefix as (key, size, etag), following continuation tokens.

    A flat listing: fewest requests, and on a loopback server no slower than listing folder levels
    in parallel (measured); only a high-latency store with tens of thousands of keys would gain.
    """
    _check_reachable(s3, source.prefix, "listing")
    objects: list[tuple[str, int, str]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": s3.bucket, "Prefix": source.prefix}
        if token:
            kwargs["ContinuationToken"] = token
        try:
            page = s3.client.list_objects_v2(**kwargs)  # botocore's retry mode covers transient errors
        except Exception as exc:
            raise _describe(exc, s3, source.prefix, "listing") from None
        for item in page.get("Contents", []):
            objects.append((item["Key"], int(item["Size"]), item.get("ETag", "").strip('"')))
        if not page.get("IsTruncated"):
            return objects
        token = page.get("NextContinuationToken")
        if not token:
            raise StorageError(f"listing {s3.where(source.prefix)} failed: truncated page without a continuation token")


@dataclass(frozen=True)
class _Fetched:
    """A verified download: its cache entry, and what proved the content (``"md5"``, a checksum, or ``"size"``)."""

    entry: _Entry
    verified_by: str


def _download(s3: _S3, cache: _Cache, key: str, path: str, *, if_match: str | None = None,
              expect_size: int | None = None, expect_md5: str | None = None) -> _Fetched:
    """GET one object into a temp file, verify it, then rename it into place.

    Verified: the size always; the MD5 against the ETag when the ETag is one (see
    :func:`~pneumo.data.storage.s3._etag_md5`); the store's full-object checksum when it returns one
    (``ChecksumMode``); the pinned size/MD5 when given. A body cut off or hashing wrong is fetched
    again (:func:`_retry`).
    """
    target = cache.target(path)

    def attempt() -> _Fetched:
        kwargs: dict[str, Any] = {"Bucket": s3.bucket, "Key": key, "ChecksumMode": "ENABLED"}
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'
        response = s3.client.get_object(**kwargs)  # botocore's retry mode covers the request
        etag = str(response.get("ETag", "")).strip('"')
        size = int(response["ContentLength"])
        temporary = cache.temp_path()
        try:
            received, md5 = _stream_to(response["Body"], temporary)
            if received != size:
                raise _Corrupt(f"body ended after {received} of {size} bytes", transient=True)
            proof = _verify(s3, key, response, etag, size, md5, expect_size, expect_md5)
            os.replace(temporary, target)  # atomic: the final name only ever holds a complete file
        finally:
            temporary.unlink(missing_ok=True)
        entry = _Entry.of(target, etag, size, md5)  # the stat after the rename: rename moves ctime
        return _Fetched(entry, proof)

    try:
        fetched = _retry(attempt)
    except Exception as exc:
        code = _error_code(exc)
        if if_match and code in ("PreconditionFailed", "412"):
            raise StorageError(redact(
                f"{s3.where(key)} changed since the dataset was ingested (pinned ETag {if_match}); "
                "re-run the ingest to train on the new data")) from None
        if if_match and code in ("NoSuchKey", "404"):
            raise StorageError(redact(
                f"{s3.where(key)} was deleted since the dataset was ingested; re-run the ingest")) from None
        raise _describe(exc, s3, key, "downloading") from None
    cache.record(path, fetched.entry)
    return fetched


def _verify(s3: _S3, key: str, response: dict[str, Any], etag: str, size: int, md5: str,
            expect_size: int | None, expect_md5: str | None) -> str:
    """Check a complete body against what the ETag and the pin prove; returns what proved it.

    The checksum (if any) was already checked by botocore while streaming. Content mismatches
    are ``_Corrupt`` (fetched again); a size other than the pinned one is the object having
    changed, which fetching again cannot fix.
    """
    proved_by_etag = _etag_md5(etag, response)
    if proved_by_etag is not None and md5 != proved_by_etag:
        raise _Corrupt("content MD5 does not match the ETag", transient=False)
    if expect_size is not None and size != expect_size:
        raise StorageError(f"{s3.where(key)}: size {size} differs from the pinned {expect_size} bytes")
    if expect_md5 is not None and md5 != expect_md5:
        raise _Corrupt("content MD5 differs from the pinned MD5", transient=False)
    checksum = _checked_checksum(response)
    if proved_by_etag is not None or expect_md5 is not None:
        return "md5"
    return checksum.lower() if checksum else "size"


def upload_tree(
    local_dir: str | os.PathLike[str],
    s3_uri: str,
    *,
    endpoint_url: str | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: ProgressFn | None = None,
    create_bucket: bool = True,
) -> UploadReport:
    """Upload every file under ``local_dir`` to ``s3_uri`` (keys relative to ``local_dir``).

    Objects already there with the same size and MD5 ETag are left alone, so seeding twice is
    cheap. Quirk files (``.DS_Store``...) are uploaded too: the bucket should look like the real one.
    Raises StorageError for a bad URI or folder, an unreachable endpoint or denied access.
    """
    started = time.perf_counter()
    target = parse_source(s3_uri)
    if target.scheme != "s3":
        raise StorageError(f"upload target must be an s3:// URI, got {s3_uri!r}")
    base = Path(local_dir).expanduser()
    if not base.is_dir():
        raise StorageError(f"folder to upload {base} does not exist")
    files = sorted(p for p in base.rglob("*") if p.is_file() and META_DIR not in p.relative_to(base).parts)
    s3 = _connect(target, endpoint_url, workers)
    if create_bucket:
        _ensure_bucket(s3)
    existing = {key: (size, etag) for key, size, etag in _list(s3, target)}
    todo: list[tuple[Path, str]] = []
    for path in files:
        key = target.prefix + path.relative_to(base).as_posix()
        known = existing.get(key)
        if known and known[0] == path.stat().st_size and known[1] == _md5_file(path):
            continue
        todo.append((path, key))

    def put(item: tuple[Path, str]) -> int:
        path, key = item
        body = path.read_bytes()
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode("ascii")
        try:
            s3.client.put_object(Bucket=target.bucket, Key=key, Body=body, ContentMD5=md5)
        except Exception as exc:
            raise _describe(exc, s3, key, "uploading to") from None
        return len(body)

    sizes = _run_parallel(todo, put, workers, progress, len(files) - len(todo), len(files))
    return UploadReport(target=target.uri, endpoint=s3.endpoint, uploaded=len(todo),
                        unchanged=len(files) - len(todo), bytes_uploaded=sum(sizes),
                        seconds=time.perf_counter() - started)


def _ensure_bucket(s3: _S3) -> None:
    _check_reachable(s3, None, "checking bucket")
    try:
        s3.client.head_bucket(Bucket=s3.bucket)
        return
    except Exception as exc:
        if _error_code(exc) not in ("404", "NoSuchBucket"):
            raise _describe(exc, s3, None, "checking bucket") from None
    region = s3.client.meta.region_name
    kwargs: dict[str, Any] = {"Bucket": s3.bucket}
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.client.create_bucket(**kwargs)
    except Exception as exc:
        if _error_code(exc) not in ("BucketAlreadyOwnedByYou",):
            raise _describe(exc, s3, None, "creating bucket") from None

"""S3 object transfers: the paginated listing, and verified atomic downloads into the cache."""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pneumo.errors import StorageError
from pneumo.storage.cache import _CHUNK, _Cache, _Entry
from pneumo.storage.s3 import (
    _BODY_ATTEMPTS,
    _S3,
    _body_errors,
    _check_reachable,
    _checked_checksum,
    _checksum_errors,
    _Corrupt,
    _describe,
    _error_code,
    _etag_md5,
)
from pneumo.storage.sources import Source, redact

_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 2.0
T = TypeVar("T")


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

    A flat listing: fewest requests, and on a loopback server no slower than listing folder
    levels in parallel (measured); on a high-latency store with tens of thousands of keys the
    parallel variant would save round trips.
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
    :func:`~pneumo.storage.s3._etag_md5`); the store's full-object checksum when it returns one
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
        entry = _Entry(etag=etag, size=size, md5=md5, mtime_ns=target.stat().st_mtime_ns)
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


def _stream_to(body: Any, temporary: Path) -> tuple[int, str]:
    """Write a streamed body to ``temporary``; returns (bytes received, content MD5)."""
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    with open(temporary, "wb") as handle:
        try:
            for chunk in body.iter_chunks(_CHUNK):
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
        except _body_errors() as exc:  # the body is ours to retry: botocore has returned
            raise _Corrupt(f"connection lost while reading the body ({type(exc).__name__})", transient=True) from exc
        except _checksum_errors() as exc:  # raised by botocore once the last byte is in
            raise _Corrupt("content does not match the store's checksum", transient=False) from exc
    return received, digest.hexdigest()


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

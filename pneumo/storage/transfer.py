"""S3 object transfers: the paginated listing, and verified atomic downloads into the cache."""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pneumo.errors import StorageError
from pneumo.storage.cache import _CHUNK, _Cache, _Entry
from pneumo.storage.report import _PLAIN_MD5
from pneumo.storage.s3 import _BODY_ATTEMPTS, _S3, _body_errors, _check_reachable, _Corrupt, _describe, _error_code
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


def _download(s3: _S3, cache: _Cache, key: str, path: str, *, if_match: str | None = None,
              expect_size: int | None = None, expect_md5: str | None = None) -> _Entry:
    """GET one object into a temp file, check size and MD5, then rename it into place."""
    target = cache.target(path)

    def attempt() -> _Entry:
        kwargs: dict[str, Any] = {"Bucket": s3.bucket, "Key": key}
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'
        response = s3.client.get_object(**kwargs)  # botocore's retry mode covers the request
        etag = str(response.get("ETag", "")).strip('"')
        size = int(response["ContentLength"])
        temporary = cache.temp_path()
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        try:
            with open(temporary, "wb") as handle:
                try:
                    for chunk in response["Body"].iter_chunks(_CHUNK):
                        handle.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                except _body_errors() as exc:  # the body is ours to retry: botocore has returned
                    raise _Corrupt(f"connection lost while reading the body ({type(exc).__name__})") from exc
            md5 = digest.hexdigest()
            if received != size:
                raise _Corrupt(f"body ended after {received} of {size} bytes")
            if _PLAIN_MD5.match(etag) and md5 != etag:
                raise _Corrupt("content MD5 does not match the ETag")
            if expect_size is not None and size != expect_size:
                raise StorageError(f"{s3.where(key)}: size {size} differs from the pinned {expect_size} bytes")
            if expect_md5 is not None and md5 != expect_md5:
                raise _Corrupt("content MD5 differs from the pinned MD5")
            os.replace(temporary, target)  # atomic: the final name only ever holds a complete file
        finally:
            temporary.unlink(missing_ok=True)
        return _Entry(etag=etag, size=size, md5=md5, mtime_ns=target.stat().st_mtime_ns)

    try:
        entry = _retry(attempt)
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
    cache.record(path, entry)
    return entry

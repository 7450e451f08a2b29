"""Seed a bucket from a local folder (``pneumo synth s3://...``), skipping objects already there."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from pneumo.errors import StorageError
from pneumo.storage.cache import META_DIR, _md5_file
from pneumo.storage.parallel import DEFAULT_WORKERS, ProgressFn, _run_parallel
from pneumo.storage.report import UploadReport
from pneumo.storage.s3 import _S3, _check_reachable, _connect, _describe, _error_code
from pneumo.storage.sources import parse_source
from pneumo.storage.transfer import _list


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

    Args:
        local_dir: folder to upload (e.g. the one holding ``chest_xray/``).
        s3_uri: ``s3://bucket/prefix``.
        endpoint_url: as for :func:`sync`.
        workers: parallel uploads.
        progress: called as ``progress(done, total)``.
        create_bucket: create the bucket when it does not exist.

    Returns:
        An :class:`UploadReport`.

    Raises:
        StorageError: bad URI or folder, unreachable endpoint, denied access.
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
        try:
            s3.client.put_object(Bucket=target.bucket, Key=key, Body=body, ContentMD5=_b64_md5(body))
        except Exception as exc:
            raise _describe(exc, s3, key, "uploading to") from None
        return len(body)

    sizes = _run_parallel(todo, put, workers, progress, len(files) - len(todo), len(files))
    return UploadReport(target=target.uri, endpoint=s3.endpoint, uploaded=len(todo),
                        unchanged=len(files) - len(todo), bytes_uploaded=sum(sizes),
                        seconds=time.perf_counter() - started)


def _b64_md5(body: bytes) -> str:
    import base64

    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode("ascii")


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

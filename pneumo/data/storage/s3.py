"""The only module that imports boto3/botocore: S3 clients, endpoints, reachability, body streaming, errors."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pneumo.data.storage.cache import _CHUNK
from pneumo.data.storage.report import _PLAIN_MD5
from pneumo.data.storage.sources import Source
from pneumo.errors import StorageError, TransientStorageError, redact

# Body-read attempts of our own: botocore retries requests, not a body cut off mid-stream.
_BODY_ATTEMPTS = 6
# botocore's attempts per request, the first included (1 + 8 retries), unless AWS_MAX_ATTEMPTS
# (the standard AWS setting, which counts the same way) says otherwise.
_REQUEST_ATTEMPTS = 9
# SSE-KMS / DSSE-KMS objects have ETags that are not the MD5 of their content (SSE-S3 ones are).
_KMS_ENCRYPTIONS = frozenset({"aws:kms", "aws:kms:dsse"})
# The stored checksums a GetObject may return, by the response field botocore parses them into.
_CHECKSUM_FIELDS: tuple[str, ...] = ("ChecksumCRC64NVME", "ChecksumCRC32C", "ChecksumCRC32", "ChecksumSHA256",
                                     "ChecksumSHA1")
_PERMANENT_REASONS: dict[str, str] = {
    "NoSuchBucket": "the bucket does not exist",
    "NoSuchKey": "the object does not exist",
    "404": "not found",
    "AccessDenied": "access denied (check the credentials' permissions for this bucket)",
    "403": "access denied (check the credentials' permissions for this bucket)",
    "AllAccessDisabled": "all access to this object has been disabled",
    "InvalidAccessKeyId": "the access key id is not known to this endpoint (check AWS_ACCESS_KEY_ID or the profile)",
    "SignatureDoesNotMatch": "the secret key does not match the access key (check AWS_SECRET_ACCESS_KEY)",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "InvalidBucketName": "the bucket name is invalid",
    "PermanentRedirect": "the bucket lives in another region (set AWS_DEFAULT_REGION)",
    "301": "the bucket lives in another region (set AWS_DEFAULT_REGION)",
    "AuthorizationHeaderMalformed": "the request's region does not match the bucket's (set AWS_DEFAULT_REGION)",
}


@dataclass
class _S3:
    """A client plus the names every error message must carry."""

    client: Any
    endpoint: str
    bucket: str

    def where(self, key: str | None = None) -> str:
        return f"s3://{self.bucket}/{key or ''} at {self.endpoint}"


@functools.cache
def _shared_loader() -> Any:
    """One botocore data loader per process: it caches the parsed S3 model (~0.1 s per client).

    Sessions themselves are not shared, so credentials are resolved afresh for every client.
    """
    from botocore.loaders import create_loader

    return create_loader()


def _make_client(endpoint_url: str | None, workers: int) -> Any:
    import boto3
    import botocore.session
    from botocore.config import Config

    core = botocore.session.get_session()
    core.register_component("data_loader", _shared_loader())
    # LastModified is never used; dateutil-parsing it costs more CPU than the rest of a list page.
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)

    # Custom endpoints (MinIO, moto) need path-style addressing: bucket.host names do not resolve.
    custom = bool(endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    config = Config(
        retries={"mode": "standard", "total_max_attempts": _request_attempts()},
        max_pool_connections=max(10, workers + 4),
        connect_timeout=5.0,
        read_timeout=60,
        s3={"addressing_style": "path"} if custom else None,
        # Uploads carry Content-MD5 (CRC trailers cost CPU and some S3 clones lack them). Downloads
        # ask for the stored checksum explicitly (ChecksumMode, see transfer.py), which is when
        # "when_required" validates it: it proves what an SSE-KMS or multipart ETag cannot.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra="pneumo",
        # Our calls are built by this module from validated keys; skipping botocore's per-call
        # parameter validation saves client CPU on every one of thousands of small GETs.
        parameter_validation=False,
    )
    return boto3.session.Session(botocore_session=core).client("s3", endpoint_url=endpoint_url, config=config)


def _request_attempts() -> int:
    """botocore's attempts per request, the first included: ``AWS_MAX_ATTEMPTS`` when set and valid."""
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", "")))
    except ValueError:
        return _REQUEST_ATTEMPTS


def _connect(source: Source, endpoint_url: str | None, workers: int) -> _S3:
    """A client (with retries) plus the names error messages need."""
    if not endpoint_url:
        try:
            from pneumo.config import Settings

            endpoint_url = Settings().s3_endpoint_url
        except Exception:  # noqa: BLE001 - a broken unrelated setting must not stop an ingest
            endpoint_url = None
    try:
        client = _make_client(endpoint_url, workers)
    except Exception as exc:  # noqa: BLE001 - e.g. botocore's ValueError for a malformed endpoint URL
        raise StorageError(redact(f"cannot create an S3 client for endpoint {endpoint_url}: {exc}")) from None
    return _S3(client, redact(str(client.meta.endpoint_url)), source.bucket)


def _check_reachable(s3: _S3, key: str | None, action: str) -> None:
    """Fail in seconds, not after minutes of retry backoff, when nothing listens at the endpoint.

    A plain TCP connect; skipped when an HTTP proxy sits in between (the proxy answers instead).
    """
    import socket
    import urllib.request

    url = urlsplit(str(s3.client.meta.endpoint_url))
    host = url.hostname or ""
    if url.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return
    try:
        socket.create_connection((host, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as exc:
        detail = exc.strerror or type(exc).__name__
        # A host name that does not resolve is most often a typo; a refused or timed-out
        # connection is most often a server restarting, which a later attempt may find up.
        error = StorageError if isinstance(exc, socket.gaierror) else TransientStorageError
        raise error(redact(f"{action} {s3.where(key)} failed: cannot reach the endpoint ({detail}); "
                           "is the server up and the URL right?")) from None


def _error_code(exc: BaseException) -> str | None:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return None


def _is_transient(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from urllib3.exceptions import HTTPError as Urllib3Error

    # HTTPClientError covers ResponseStreamingError, ReadTimeoutError, ConnectionClosedError;
    # BotoConnectionError covers EndpointConnectionError and ConnectTimeoutError.
    if isinstance(exc, _Corrupt):
        return exc.transient
    if isinstance(exc, IncompleteReadError | HTTPClientError | BotoConnectionError | Urllib3Error
                  | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = _error_code(exc) or ""
        return status >= 500 or status == 429 or code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError")
    return False


def _describe(exc: BaseException, s3: _S3, key: str | None, action: str) -> StorageError:
    """One line naming the endpoint, bucket and key; never a trace, never a credential.

    A :class:`TransientStorageError` when the failure is one that passes (throttling, 5xx, dropped
    connections) and only the retries ran out, else a :class:`StorageError`.
    """
    from botocore.exceptions import (
        ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError
    )

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        reason = "no usable AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile/role)"
    elif isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        reason = "cannot reach the endpoint (is the server up and the URL right?)"
    elif isinstance(exc, ClientError):
        code = _error_code(exc) or "error"
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        known = _PERMANENT_REASONS.get(code)
        message = exc.response.get("Error", {}).get("Message", "")
        if code == "InvalidRequest" and "encrypt" in message.lower():
            known = "the object is encrypted with a customer-provided key (SSE-C), which pneumo does not send"
        reason = f"{code} (HTTP {status}): {known or message or 'request failed'}"
        if _is_transient(exc):
            reason += " — still failing after retries"
    elif isinstance(exc, _Corrupt):
        reason = f"{exc} — still failing after {_BODY_ATTEMPTS} attempts"
    else:
        reason = f"{type(exc).__name__}: {exc}"
        if _is_transient(exc):
            reason += " — still failing after retries"
    error = TransientStorageError if _is_transient(exc) else StorageError
    return error(redact(f"{action} {s3.where(key)} failed: {reason}").replace("\n", " "))


class _Corrupt(Exception):
    """A body that ended early or hashed wrong; retried by :func:`pneumo.data.storage.transfer._retry`.

    ``transient``: whether it still counts as passing once our attempts are spent. A body cut off
    every time is a flaky network; content that hashes wrong every time will not change.
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def _stream_to(body: Any, temporary: Path) -> tuple[int, str]:
    """Write a streamed body to ``temporary``; returns (bytes received, content MD5)."""
    from botocore.exceptions import FlexibleChecksumError, HTTPClientError, IncompleteReadError
    from urllib3.exceptions import HTTPError as Urllib3Error

    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    with open(temporary, "wb") as handle:
        try:
            for chunk in body.iter_chunks(_CHUNK):
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
        except (HTTPClientError, IncompleteReadError, Urllib3Error, ConnectionError, TimeoutError) as exc:
            # The connection dropped or stalled: the body is ours to retry, botocore has returned.
            raise _Corrupt(f"connection lost while reading the body ({type(exc).__name__})", transient=True) from exc
        except FlexibleChecksumError as exc:  # raised by botocore once the last byte is in
            raise _Corrupt("content does not match the store's checksum", transient=False) from exc
    return received, digest.hexdigest()


def _etag_md5(etag: str, response: dict[str, Any]) -> str | None:
    """The content MD5 that a GetObject's ETag proves, or None when it proves none.

    S3 documents the ETag as the content MD5 only for single-part objects stored in plain text or
    with SSE-S3; SSE-KMS, DSSE-KMS and SSE-C objects have 32-hex ETags that are something else,
    and multipart ETags (``<hex>-<parts>``) are never 32 hex digits.
    """
    if not _PLAIN_MD5.match(etag):
        return None
    if response.get("ServerSideEncryption") in _KMS_ENCRYPTIONS or response.get("SSECustomerAlgorithm"):
        return None
    return etag


def _checked_checksum(response: dict[str, Any]) -> str | None:
    """The stored checksum botocore verifies while the body streams (e.g. ``"CRC32"``), or None.

    botocore wraps the body only for a full-object checksum it can compute: composite multipart
    checksums (``<b64>-<parts>``) and CRC32C/CRC64NVME without ``awscrt`` go unverified.
    """
    from botocore.httpchecksum import StreamingChecksumBody

    if not isinstance(response.get("Body"), StreamingChecksumBody):
        return None
    for name in _CHECKSUM_FIELDS:
        value = response.get(name)
        if value and "-" not in str(value):
            return name.removeprefix("Checksum")
    return "checksum"

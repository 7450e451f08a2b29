"""Dataset sources (``s3://`` or a local folder): list, fingerprint, and cache incrementally and safely.

The only module that imports boto3. Three entry points:

* :func:`sync` lists a source, keeps the Kaggle layout's images (:func:`pneumo.layout.classify`,
  the same rule as the local manifest) and downloads new or changed objects in parallel into a
  local cache. It returns the manifest, a content fingerprint and a report.
* :func:`materialize` fetches exactly the objects a pinned manifest names (``If-Match`` on each
  pinned ETag) on a remote worker, so training never sees a dataset other than the one ingested.
* :func:`upload_tree` seeds a bucket from a local folder (``pneumo synth s3://...``).

Cache layout: ``CACHE/chest_xray/...`` mirrors the keys (so ``CACHE`` is a dataset root), and
``CACHE/.pneumo-cache/`` holds the state (ETag, size, MD5, mtime per path), an append-only journal
of completed downloads, a lock file and the temporary ``*.part`` files. A file is trusted only if
the state says so *and* its size and mtime still match, so a killed sync never leaves a file a
later run would trust.

Fingerprint: SHA-256 of the sorted ``path, MD5 of content, size`` lines. For S3 the MD5 is the
object's ETag when that is a plain MD5 (single-part uploads); multipart ETags (``<hex>-<parts>``)
are not content hashes, so the MD5 is computed while downloading and kept in the cache state. A
local folder and the same files in a bucket therefore give the same fingerprint either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from pneumo.errors import StorageError
from pneumo.layout import CLASSES, SPLITS, Ignored, ImageKey, classify

if TYPE_CHECKING:  # pandas is imported where frames are built: keeps `pneumo --help` fast.
    import pandas as pd

try:  # POSIX advisory lock: two syncs into one cache must not interleave.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MANIFEST_COLUMNS: tuple[str, ...] = ("path", "split", "label", "patient_id", "bytes", "etag", "md5")
META_DIR = ".pneumo-cache"
STATE_VERSION = 1
DEFAULT_WORKERS = 16
_CHUNK = 1 << 20
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENCODED_SEPARATOR = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# Body-read attempts of our own: botocore retries requests, not a body cut off mid-stream.
_BODY_ATTEMPTS = 6
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 2.0
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

ProgressFn = Callable[[int, int], None]
T = TypeVar("T")


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """A parsed dataset source.

    Attributes:
        scheme: ``"s3"`` or ``"file"``.
        bucket: S3 bucket ("" for files).
        prefix: S3 key prefix to list ("" or ending in "/").
        base: S3 key prefix that dataset paths are relative to (``prefix`` itself, or its parent
            when the URI points at the ``chest_xray/`` folder).
        path: local folder (file sources).
    """

    scheme: str
    bucket: str = ""
    prefix: str = ""
    base: str = ""
    path: Path | None = None

    @property
    def uri(self) -> str:
        """The source as a URI (never holds credentials)."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}"
        return str(self.path)

    def __str__(self) -> str:
        return self.uri


def parse_source(source: str | os.PathLike[str] | Source) -> Source:
    """Parse ``s3://bucket/prefix``, ``file:///path`` or a plain local path.

    The URI may point at the folder (prefix) that holds ``chest_xray/`` or at ``chest_xray/``
    itself, like the local manifest accepts.

    Args:
        source: the URI or path.

    Returns:
        A :class:`Source`.

    Raises:
        StorageError: unsupported scheme, malformed bucket, credentials or a query in the URI.
    """
    if isinstance(source, Source):
        return source
    if isinstance(source, os.PathLike):
        return Source(scheme="file", path=Path(source).expanduser())
    text = str(source).strip()
    if not text:
        raise StorageError("empty dataset source (use s3://bucket/prefix, file:///path or a folder)")
    if "://" not in text:
        return Source(scheme="file", path=Path(text).expanduser())
    scheme = text.split("://", 1)[0].lower()
    parts = urlsplit(text)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file URIs must be local (file:///path), got host {parts.netloc!r}")
        return Source(scheme="file", path=Path(unquote(parts.path)))
    if scheme != "s3":
        raise StorageError(f"unsupported dataset source scheme {scheme!r}: use s3://bucket/prefix, file:///path or a folder")
    if "@" in parts.netloc:
        # Never echo the URI: it holds credentials.
        raise StorageError("s3:// URIs must not contain credentials; use the AWS credential chain (env vars, profile, role)")
    if parts.query or parts.fragment:
        raise StorageError(f"s3 URI {text!r} must not have a query or fragment")
    bucket = parts.netloc
    if not _BUCKET.match(bucket):
        raise StorageError(f"invalid bucket name {bucket!r} in {text!r} (3-63 lowercase letters, digits, '.', '-')")
    prefix = parts.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    base = prefix
    if prefix == "chest_xray/" or prefix.endswith("/chest_xray/"):
        base = prefix[: -len("chest_xray/")]
    return Source(scheme="s3", bucket=bucket, prefix=prefix, base=base)


def redact(text: str) -> str:
    """Remove credentials (URL user-info, AWS secret values from the environment) from ``text``."""
    text = re.sub(r"(?<=://)[^/@\s]+@", "***@", text)
    for name in _SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def unsafe_reason(relative: str) -> str | None:
    """Why a key (relative to the dataset root) must not become a file under the cache, or None.

    Refuses what could escape the cache or alias another file: absolute paths, ``.``/``..`` and
    empty segments, backslashes, control characters, percent-encoded separators or dots (another
    tool may decode them), and names too long for the filesystem.
    """
    if not relative:
        return "empty key"
    if relative.startswith("/"):
        return "absolute path"
    if "\\" in relative:
        return "backslash in key"
    if _CONTROL.search(relative):
        return "control character in key"
    if _ENCODED_SEPARATOR.search(relative):
        return "percent-encoded dot or separator"
    segments = relative.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return "'.', '..' or empty path segment"
    if any(len(segment.encode("utf-8", "surrogatepass")) > 255 for segment in segments):
        return "path segment longer than 255 bytes"
    return None


# ----------------------------------------------------------------------------- results
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
        return {
            "target": self.target,
            "endpoint": self.endpoint,
            "uploaded": self.uploaded,
            "unchanged": self.unchanged,
            "bytes_uploaded": self.bytes_uploaded,
            "seconds": round(self.seconds, 3),
        }


def fingerprint(frame: pd.DataFrame) -> str:
    """Stable content hash of a manifest: SHA-256 over sorted ``path, md5, bytes`` lines.

    Args:
        frame: a manifest with ``path``, ``bytes`` and ``md5`` (or, failing that, ``etag``).

    Returns:
        64 hex digits; the same files give the same value whatever the source or row order.
    """
    digests = frame["md5"] if "md5" in frame.columns else frame["etag"]
    lines = sorted(f"{p}\t{d}\t{int(b)}\n" for p, d, b in zip(frame["path"], digests, frame["bytes"]))
    sha = hashlib.sha256()
    for line in lines:
        sha.update(line.encode("utf-8", "surrogatepass"))
    return sha.hexdigest()


def _build_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    frame = frame.astype({"label": "int64", "bytes": "int64"})
    return frame.sort_values("path", ignore_index=True)


def _counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        by_class = counts.setdefault(row["split"], {})
        name = CLASSES[row["label"]]
        by_class[name] = by_class.get(name, 0) + 1
    return counts


def _row(key: ImageKey, size: int, etag: str, md5: str) -> dict[str, Any]:
    return {"path": key.path, "split": key.split, "label": key.label, "patient_id": key.patient_id,
            "bytes": size, "etag": etag, "md5": md5}


# ----------------------------------------------------------------------------- the cache
@dataclass
class _Entry:
    etag: str
    size: int
    md5: str
    mtime_ns: int


class _Cache:
    """State of a cache folder: which files are complete and what object they came from.

    Completed downloads are appended to a journal as they finish (a killed run keeps them) and
    folded into ``state.json`` at the end with an atomic replace.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta = root / META_DIR
        self.tmp = self.meta / "tmp"
        self.entries: dict[str, _Entry] = {}
        self._journal: Any = None
        self._lock_file: Any = None
        self._mutex = threading.Lock()
        self._checked_dirs: set[str] = set()

    @classmethod
    @contextlib.contextmanager
    def open(cls, root: Path | str) -> Iterator[_Cache]:
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise StorageError(f"cache {root} exists and is not a folder")
        if root.is_dir() and not (root / META_DIR).is_dir() and any(root.iterdir()):
            # We delete files that left the bucket: never do that in a folder we did not create.
            raise StorageError(f"cache folder {root} is not empty and is not a pneumo cache; use an empty or new folder")
        cache = cls(root)
        cache.tmp.mkdir(parents=True, exist_ok=True)
        cache._lock_file = open(cache.meta / "lock", "a+")  # noqa: SIM115 - held for the whole sync
        try:
            if fcntl is not None:
                fcntl.flock(cache._lock_file.fileno(), fcntl.LOCK_EX)
            for leftover in cache.tmp.iterdir():  # partial downloads of a killed run: never trusted
                leftover.unlink(missing_ok=True)
            cache._load()
            cache._journal = open(cache.meta / "journal.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            yield cache
        finally:
            if cache._journal is not None:
                cache._journal.close()
            cache._lock_file.close()  # releases the flock

    def _load(self) -> None:
        try:
            state = json.loads((self.meta / "state.json").read_text(encoding="utf-8"))
            if state.get("version") == STATE_VERSION:
                for path, item in state.get("objects", {}).items():
                    if unsafe_reason(path) is None:  # a doctored state file must not aim deletes outside
                        self.entries[path] = _Entry(**item)
        except (OSError, ValueError, TypeError):
            self.entries = {}  # unreadable state: trust nothing, everything is fetched again
        try:
            lines = (self.meta / "journal.jsonl").read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                item = json.loads(line)
                path = item.pop("path")
                if unsafe_reason(path) is not None:
                    continue
                if item.get("removed"):
                    self.entries.pop(path, None)
                else:
                    self.entries[path] = _Entry(**item)
            except (ValueError, TypeError, KeyError):
                continue  # a line cut short by a kill

    def trusted(self, path: str, etag: str | None, size: int, md5: str | None = None) -> _Entry | None:
        """The entry for ``path`` if the file on disk is the complete object with this ETag/size/MD5."""
        entry = self.entries.get(path)
        if entry is None or entry.size != size:
            return None
        if etag is not None and entry.etag != etag:
            return None
        if md5 is not None and entry.md5 != md5:
            return None
        try:
            stat = (self.root / path).stat()
        except OSError:
            return None
        if stat.st_size != size or stat.st_mtime_ns != entry.mtime_ns:
            return None  # touched since we wrote it
        return entry

    def record(self, path: str, entry: _Entry) -> None:
        with self._mutex:
            self.entries[path] = entry
            self._journal.write(json.dumps({"path": path, **entry.__dict__}) + "\n")
            self._journal.flush()

    def forget(self, path: str) -> None:
        with self._mutex:
            self.entries.pop(path, None)
            self._journal.write(json.dumps({"path": path, "removed": True}) + "\n")
            self._journal.flush()

    def compact(self) -> None:
        """Fold the journal into ``state.json`` (write to a temp name, then atomic rename)."""
        with self._mutex:
            state = {"version": STATE_VERSION, "objects": {p: e.__dict__ for p, e in sorted(self.entries.items())}}
            temporary = self.meta / f"state.json.{uuid.uuid4().hex}.tmp"
            temporary.write_text(json.dumps(state), encoding="utf-8")
            os.replace(temporary, self.meta / "state.json")
            self._journal.truncate(0)
            self._journal.seek(0)

    def sweep(self, keep: set[str]) -> int:
        """Delete files under the cache (outside ``.pneumo-cache``) that are not in ``keep``."""
        removed = 0
        for directory, dirnames, filenames in os.walk(self.root, topdown=False):
            relative_dir = Path(directory).relative_to(self.root).as_posix()
            if relative_dir == META_DIR or relative_dir.startswith(META_DIR + "/"):
                continue
            for name in filenames:
                relative = name if relative_dir == "." else f"{relative_dir}/{name}"
                if relative not in keep:
                    (Path(directory) / name).unlink(missing_ok=True)
                    if relative in self.entries:
                        self.forget(relative)
                    removed += 1
            if relative_dir != "." and not os.listdir(directory):
                os.rmdir(directory)
        return removed

    def target(self, path: str) -> Path:
        """Where ``path`` (already checked by :func:`unsafe_reason`) lives; its folder is created.

        No folder on the way may be a symlink, so a link planted in the cache cannot redirect
        writes outside it. Checked once per folder, not per file.
        """
        target = self.root / path
        parent = str(target.parent)
        if parent not in self._checked_dirs:
            folder = self.root
            for part in Path(path).parent.parts:  # one level at a time: never mkdir through a link
                folder = folder / part
                if folder.is_symlink():
                    raise StorageError(f"refusing to write {path!r}: {folder} is a symlink and could lead "
                                       f"outside the cache {self.root}")
                try:
                    folder.mkdir()
                except FileExistsError:
                    if not folder.is_dir():
                        raise StorageError(f"refusing to write {path!r}: {folder} is a file") from None
            self._checked_dirs.add(parent)
        return target

    def temp_path(self) -> Path:
        return self.tmp / f"{uuid.uuid4().hex}.part"


# ----------------------------------------------------------------------------- S3 plumbing
@dataclass
class _S3:
    """A client plus the names every error message must carry."""

    client: Any
    endpoint: str
    bucket: str

    def where(self, key: str | None = None) -> str:
        return f"s3://{self.bucket}/{key or ''} at {self.endpoint}"


def _resolve_endpoint(endpoint_url: str | None) -> str | None:
    if endpoint_url:
        return endpoint_url
    try:
        from pneumo.config import Settings

        return Settings().s3_endpoint_url
    except Exception:  # noqa: BLE001 - a broken unrelated setting must not stop an ingest
        return None


_LOADER: Any = None
_LOADER_LOCK = threading.Lock()


def _shared_loader() -> Any:
    """One botocore data loader per process: it caches the parsed S3 model (~0.1 s per client).

    Sessions themselves are not shared, so credentials are resolved afresh for every client.
    """
    global _LOADER
    with _LOADER_LOCK:
        if _LOADER is None:
            from botocore.loaders import create_loader

            _LOADER = create_loader()
        return _LOADER


def _make_client(endpoint_url: str | None, workers: int, *, attempts: int = 8, connect_timeout: float = 5.0,
                 retry_mode: str = "standard") -> Any:
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
        retries={"mode": retry_mode, "max_attempts": attempts},
        max_pool_connections=max(10, workers + 4),
        connect_timeout=connect_timeout,
        read_timeout=60,
        s3={"addressing_style": "path"} if custom else None,
        # We verify size and MD5 ourselves; CRC trailers cost CPU and some S3 clones lack them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra="pneumo",
    )
    return boto3.session.Session(botocore_session=core).client("s3", endpoint_url=endpoint_url, config=config)


def _connect(source: Source, endpoint_url: str | None, workers: int) -> _S3:
    """A client (with retries) plus the names error messages need."""
    endpoint_url = _resolve_endpoint(endpoint_url)
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
        raise StorageError(redact(f"{action} {s3.where(key)} failed: cannot reach the endpoint ({detail}); "
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
    if isinstance(exc, _Corrupt | IncompleteReadError | HTTPClientError | BotoConnectionError | Urllib3Error
                  | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = _error_code(exc) or ""
        return status >= 500 or status == 429 or code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError")
    return False


def _describe(exc: BaseException, s3: _S3, key: str | None, action: str) -> StorageError:
    """One line naming the endpoint, bucket and key; never a trace, never a credential."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
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
        reason = f"{code} (HTTP {status}): {known or message or 'request failed'}"
        if _is_transient(exc):
            reason += " — still failing after retries"
    elif isinstance(exc, _Corrupt):
        reason = f"{exc} — still failing after {_BODY_ATTEMPTS} attempts"
    else:
        reason = f"{type(exc).__name__}: {exc}"
        if _is_transient(exc):
            reason += " — still failing after retries"
    return StorageError(redact(f"{action} {s3.where(key)} failed: {reason}").replace("\n", " "))


class _Corrupt(Exception):
    """A body that ended early or hashed wrong: transient (a dropped connection), so retried."""


def _body_errors() -> tuple[type[BaseException], ...]:
    """What a streamed body read raises when the connection drops or stalls."""
    from botocore.exceptions import HTTPClientError, IncompleteReadError
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (HTTPClientError, IncompleteReadError, Urllib3Error, ConnectionError, TimeoutError)


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


# ----------------------------------------------------------------------------- sync
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
        counts=_counts(row_list), skipped=skipped,
    )
    log.info("ingest %s: %d images (%d downloaded, %d reused, %d removed, %d skipped), fingerprint %s",
             src.uri, report.images, report.downloaded, report.reused, report.removed, len(skipped), fp[:12])
    return IngestResult(frame=frame, fingerprint=fp, report=report, root=cache_root, source=src)


def _no_images_message(where: str, listed: int, skipped: list[tuple[str, str]]) -> str:
    hint = "expected keys like chest_xray/train/NORMAL/<name>.jpeg below the source"
    if any(path.split("/")[0] in ("train", "val", "test") for path, _ in skipped):
        hint = "the source seems to point inside chest_xray/: use the prefix that holds chest_xray/"
    return f"no dataset images in {where} ({listed} objects listed; {hint})"


# ----------------------------------------------------------------------------- local folders
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


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Md5Memo:
    """MD5s of local files keyed by (size, mtime): re-hashing 1.2 GB on every run is wasteful."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.file = cache_dir / META_DIR / "local-md5.json" if cache_dir is not None else None
        self.items: dict[str, list[Any]] = {}
        self.lock = threading.Lock()
        if self.file is not None:
            try:
                self.items = dict(json.loads(self.file.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                self.items = {}

    def md5(self, path: Path) -> tuple[int, str]:
        stat = path.stat()
        key = str(path.resolve())
        with self.lock:
            cached = self.items.get(key)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return stat.st_size, str(cached[2])
        md5 = _md5_file(path)
        with self.lock:
            self.items[key] = [stat.st_size, stat.st_mtime_ns, md5]
        return stat.st_size, md5

    def save(self) -> None:
        if self.file is None:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.file.with_name(f"{self.file.name}.{uuid.uuid4().hex}.tmp")
        temporary.write_text(json.dumps(self.items), encoding="utf-8")
        os.replace(temporary, self.file)


def _sync_local(src: Source, cache_dir: Path | None, *, workers: int, progress: ProgressFn | None,
                started: float) -> IngestResult:
    root, walk_from = _local_root(src)
    images: list[ImageKey] = []
    skipped: list[tuple[str, str]] = []
    listed = 0
    for directory, dirnames, filenames in os.walk(walk_from):
        dirnames[:] = sorted(d for d in dirnames if not (Path(directory) == root and d == META_DIR))
        for name in sorted(filenames):
            listed += 1
            relative = (Path(directory) / name).relative_to(root).as_posix()
            verdict = classify(relative)
            if isinstance(verdict, Ignored):
                skipped.append((verdict.path, verdict.reason))
            else:
                images.append(verdict)
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
        seconds=time.perf_counter() - started, counts=_counts(rows), skipped=skipped,
    )
    return IngestResult(frame=frame, fingerprint=fp, report=report, root=root, source=src)


# ----------------------------------------------------------------------------- materialize
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
                      expect_md5=md5 or (etag if _PLAIN_MD5.match(etag) else None))

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
        expected = md5 or (etag if _PLAIN_MD5.match(etag) else None)
        if expected is not None and memo.md5(target)[1] != expected:
            raise StorageError(f"{target} changed since the ingest (MD5 differs); re-run the ingest")

    _run_parallel(pinned, check, workers, progress, 0, len(pinned))
    memo.save()
    return root


# ----------------------------------------------------------------------------- upload
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

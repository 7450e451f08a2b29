"""Dataset source URIs: parsing, and the rule for keys that must not become files."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pneumo.errors import StorageError, has_credentials

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENCODED_SEPARATOR = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.\-]*$")


@dataclass(frozen=True)
class Source:
    """A parsed dataset source."""

    scheme: str  # "s3" or "file"
    bucket: str = ""
    prefix: str = ""  # the S3 key prefix to list: "" or ending in "/"
    base: str = ""  # what dataset paths are relative to: prefix, or its parent when that is chest_xray/
    path: Path | None = None  # the local folder (file sources)

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
    itself, like the local manifest accepts. Raises StorageError for an unsupported scheme, a malformed
    bucket, credentials (any scheme; the message never echoes them) or a query in the URI.
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
    if has_credentials(text):
        # Never echo the URI: it holds a secret. No source takes one in its URI (S3 has its credential
        # chain, a file has none), and the source is stored in Prefect parameters and MLflow tags.
        raise StorageError("a dataset source URI must not contain credentials (user-info before '@' or a "
                           "password-like query parameter); for s3:// use the AWS credential chain "
                           "(env vars, profile, role); file:// URIs and folders take none")
    scheme = text.split("://", 1)[0].lower()
    if not _SCHEME.match(scheme):
        raise StorageError("not a dataset source URI (use s3://bucket/prefix, file:///path or a folder)")
    parts = urlsplit(text)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file URIs must be local (file:///path), got host {parts.netloc!r}")
        return Source(scheme="file", path=Path(unquote(parts.path)))
    if scheme != "s3":
        raise StorageError(f"unsupported dataset source scheme {scheme!r}: use s3://bucket/prefix, file:///path or a folder")
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


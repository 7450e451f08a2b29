"""Exceptions with one-line, user-facing messages (the CLI prints them without a trace), and the
redaction that keeps credentials out of everything shown or stored."""

import os
import re


class PneumoError(Exception):
    """Base class: an expected failure whose message tells the user what to fix.

    Attributes:
        transient: True when the same call may succeed later unchanged (an overloaded or briefly
            unreachable service), so an orchestrator may retry it; False means "fix the input".
    """

    transient: bool = False


class DataError(PneumoError):
    """The dataset is missing, has the wrong layout, or a split/class is empty."""


class ConfigError(PneumoError):
    """A parameter or setting is invalid."""


class ModelError(PneumoError):
    """A model cannot be built (unknown name, missing weights file)."""


class TrainingDiverged(PneumoError):
    """Training produced a NaN or infinite loss; retrying the same config will not help."""


class TrackingError(PneumoError):
    """The MLflow tracking server is unreachable or misconfigured (message names the URI)."""


class CandidateLoggingError(TrackingError):
    """Logging a trained candidate failed; worth retrying, since the trained model is kept on disk."""

    transient = True


class CandidateFailed(PneumoError):
    """A candidate did not produce a model (diverged, bad weights file, out of memory...)."""


class ServingError(PneumoError):
    """The served model got an input it cannot score (message names the offending item)."""


class PromotionError(PneumoError):
    """A registry operation (promote, rollback, champion lookup) cannot proceed."""


class StorageError(PneumoError):
    """A dataset source cannot be read or cached (bad URI, unreachable endpoint, denied, changed)."""


class TransientStorageError(StorageError):
    """The store kept failing in a way that passes (throttling, 5xx, dropped connections) after every retry."""

    transient = True


class CacheLockTimeout(TransientStorageError):
    """Another process held the local cache's lock for longer than ``PNEUMO_CACHE_LOCK_TIMEOUT`` (names it)."""


# ----------------------------------------------------------------------------- redaction
# Environment variables whose values are secrets wherever they turn up (error text, URIs, logs).
SECRET_ENV: tuple[str, ...] = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)
# Where a URI's user-info starts, whatever the scheme: after "://", or after "scheme:/" where a path
# library collapsed the "//" (str(Path("file://u:p@host/x")) is "file:/u:p@host/x").
_AUTHORITY = r"(?:(?<=://)|(?<=[A-Za-z0-9+.\-]:/))"
# user:password@ with a password that may hold '@' or '/' (typed raw, not percent-encoded): up to the
# token's last '@'. A plain user@ stops at the first '/', so an S3 key like img@2x.png is left alone.
_PASSWORD_INFO = re.compile(_AUTHORITY + r"[^\s:@/]*:[^\s]*@")
_USERINFO = re.compile(_AUTHORITY + r"[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|sslpassword|token|secret|client_secret|api_key|apikey|"
                           r"access_token|sig|signature|x-amz-signature|x-amz-security-token)=)[^&\s#]*")


def redact(text: str) -> str:
    """``text`` with every URL's user-info, password-like query values and secret env values replaced by ``***``."""
    text = _SECRET_QUERY.sub(r"\1***", _USERINFO.sub("***@", _PASSWORD_INFO.sub("***@", str(text))))
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def has_credentials(uri: str) -> bool:
    """Whether a URI carries user-info or a password-like query parameter."""
    return redact(uri) != uri

"""The one place an MlflowClient is built, and the fail-fast check that a tracking URI is usable."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

from pneumo.errors import TrackingError, has_credentials, redact

T = TypeVar("T")
MISSING = ("RESOURCE_DOES_NOT_EXIST",)
EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


def mlflow_client(tracking_uri: str | None) -> Any:
    """An ``MlflowClient`` for tracking and registry at ``tracking_uri`` (default: the process-wide URI).

    The process-wide URI is set too: model logging and ``pyfunc.load_model("models:/…")`` read it.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = tracking_uri or mlflow.get_tracking_uri()
    if has_credentials(str(uri)):
        # MLflow prints "View run … at: <tracking URI>" when a run ends: not with a password in it.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def error_code(error: BaseException) -> str:
    """MLflow's error code (``RESOURCE_DOES_NOT_EXIST``, …) of an exception, or ``""``."""
    return str(getattr(error, "error_code", ""))


def unless(codes: tuple[str, ...], call: Callable[[], T]) -> T | None:
    """``call()``, or None when MLflow refuses it with one of the error ``codes`` (already gone, already there)."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as error:
        if error_code(error) in codes:
            return None
        raise


# MLflow's codes for a server that is overloaded, not for a bad request. (INTERNAL_ERROR is also the
# code of every MlflowException raised locally, so it counts only when a server answered with it.)
_TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})
# MLflow gathers the failures of a multi-file download into one new MlflowException that keeps only
# their messages, not the errors: a store's 5xx/429 or a dropped connection is recognised by its text.
_TRANSIENT_DOWNLOAD = re.compile(
    r"failures occurred while downloading.*(\((?:5\d\d|429)\)|SlowDown|ServiceUnavailable|InternalError|"
    r"Connection (?:was )?(?:reset|refused|aborted|closed)|timed out|Read timeout)", re.DOTALL)


def is_transient(error: BaseException) -> bool:
    """Worth retrying: a dropped connection or timeout, or a 5xx/429 from the tracking server or the
    artifact store (MLflow and boto errors alike, also as the cause of another error). A refusal
    (404, 403, a bad parameter) or a local failure is not."""
    from mlflow.exceptions import MlflowException, RestException

    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # MLflow re-raises a dropped connection as its own error
        seen.add(id(error))
        if getattr(error, "transient", False) or isinstance(error, OSError) or _boto_connection_error(error):
            return True  # OSError covers ConnectionError, TimeoutError and requests' errors
        if isinstance(metadata := getattr(error, "response", None), dict) and "ResponseMetadata" in metadata:
            status = int(metadata["ResponseMetadata"].get("HTTPStatusCode", 0) or 0)  # a boto ClientError
            return status >= 500 or status == 429
        if isinstance(error, MlflowException) and (
                error_code(error) in _TRANSIENT_CODES
                or (isinstance(error, RestException) and error_code(error) == "INTERNAL_ERROR")
                or _TRANSIENT_DOWNLOAD.search(str(error))):
            return True
        error = error.__cause__ or error.__context__
    return False


def _boto_connection_error(error: BaseException) -> bool:
    """A botocore connection or read failure, recognised by class name (only the storage layer imports boto)."""
    return any(cls.__module__.startswith("botocore") and cls.__name__ in ("ConnectionError", "HTTPClientError")
               for cls in type(error).__mro__)


def one_line(error: BaseException) -> str:
    """``Type: message`` on one line, cut to 300 characters, credentials removed (for user-facing errors)."""
    text = redact(" ".join(str(error).split()))
    return f"{type(error).__name__}: {text[:300]}"


def check_tracking_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, with the URI in a one-line message, when MLflow cannot be used.

    HTTP(S) servers are probed directly (``/health`` and an experiments search) with a short
    timeout, because MLflow's own client retries connection errors with back-off for minutes.
    Other URIs (``sqlite:///…``, ``file:…``) are opened with the MLflow client.

    Raises:
        TrackingError: unreachable, not an MLflow server, or an unusable store URI.
    """
    if not uri or not uri.strip():
        raise TrackingError("MLflow tracking URI is empty (set MLFLOW_TRACKING_URI or PNEUMO_TRACKING_URI)")
    if urlparse(uri).scheme.lower() in ("http", "https"):
        _check_http(uri.rstrip("/"), timeout)
        return
    shown = redact(uri)
    try:
        mlflow_client(uri).search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means the URI is unusable
        raise TrackingError(f"MLflow tracking store {shown} is not usable: {one_line(error)}") from None


def _check_http(uri: str, timeout: float) -> None:
    import requests

    shown = redact(uri)
    try:
        health = requests.get(f"{uri}/health", timeout=timeout)
        search = requests.get(f"{uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                              timeout=timeout)
    except requests.Timeout:
        raise TrackingError(f"MLflow tracking server {shown} is unreachable (no answer within {timeout:g} s)") from None
    except requests.RequestException as error:
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(error))
        why = errno.group(0).strip() if errno else one_line(error)
        raise TrackingError(f"MLflow tracking server {shown} is unreachable ({redact(why)})") from None
    if health.status_code != 200 or search.status_code != 200 or "experiments" not in _json(search):
        status = health.status_code if health.status_code != 200 else search.status_code
        raise TrackingError(
            f"{shown} does not answer like an MLflow tracking server (HTTP {status}); check MLFLOW_TRACKING_URI"
        )


def _json(response: Any) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}

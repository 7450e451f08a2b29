"""Follow a registry alias: load each new version beside the served one, smoke-test it, swap atomically."""

from __future__ import annotations

import gc
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pneumo.errors import ServingError, redact
from pneumo.mlflow_client import MISSING, error_code, mlflow_client, one_line
from pneumo.serving.integrity import IntegrityError, download_verified
from pneumo.serving.smoke import ModelRefused, smoke_test


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Loaded:
    """One loaded, smoke-tested registry version. Requests hold a reference, so a swap never changes it under them."""

    version: str
    model: Any  # mlflow.pyfunc.PyFuncModel
    input_schema: Any  # what MLflow's scoring server parses JSON with
    loaded_at: str
    load_seconds: float


@dataclass(frozen=True)
class Refusal:
    """A version the alias pointed at that did not pass; the last good version kept serving."""

    version: str
    reason: str
    at: str


def load_version(model_name: str, version: str) -> Loaded:
    """Download, load (pickle disabled) and smoke-test one version; the caller's served model is untouched.

    Raises:
        ModelRefused: with the step that failed and why.
    """
    import mlflow
    from mlflow.models import Model

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pneumo-serve-") as tmp:
        try:
            local = str(download_verified(model_name, version, Path(tmp)))
        except IntegrityError as error:
            raise ModelRefused(f"checksum check failed: {error}") from None
        except Exception as error:  # noqa: BLE001 - any failure refuses the version
            raise ModelRefused(f"artifacts do not download: {one_line(error)}") from None
        path = list(sys.path)
        try:
            model = mlflow.pyfunc.load_model(local)
            example = Model.load(local).get_serving_input(local)
        except Exception as error:  # noqa: BLE001
            raise ModelRefused(f"does not load: {one_line(error)}") from None
        finally:
            sys.path[:] = path  # MLflow prepends the model's code/ on every load: a long-running server would pile them up
    smoke_test(model, example)
    return Loaded(str(version), model, model.metadata.get_input_schema(), _now(), time.perf_counter() - started)


class AliasNotFound(ServingError):
    """The registered model or its alias does not exist."""


class AliasFollower:
    """Serves the version ``models:/NAME@ALIAS`` points at, and follows the alias when it moves.

    A check resolves the alias; a version not yet seen is loaded beside the served one, smoke-tested
    and swapped in by one reference assignment, so a request that already took :attr:`current`
    finishes on the old model. A failed version is recorded in :attr:`refusals` and not retried
    until the alias moves again. Checks run every ``poll_seconds`` and whenever :meth:`wake` is called.
    """

    def __init__(self, tracking_uri: str, model_name: str, alias: str, *, poll_seconds: float = 30.0,
                 log: Callable[[str], None] = print) -> None:
        self.tracking_uri, self.model_name, self.alias = tracking_uri, model_name, alias
        self.poll_seconds = poll_seconds
        self._log = log
        self._current: Loaded | None = None
        self._seen: str | None = None  # the version the alias pointed at when last checked
        self.refusals: dict[str, Refusal] = {}
        self.last_check: dict[str, Any] = {}
        self.webhook: dict[str, Any] = {}  # set by the server: its URL and id, or why there is none
        self._wake, self._stop = threading.Event(), threading.Event()
        self._check_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Loaded:
        """The serving version (read once per request)."""
        if self._current is None:
            raise ServingError("no model loaded yet")
        return self._current

    def resolve(self) -> str:
        """The version the alias points at now.

        Raises:
            AliasNotFound: no such registered model or alias.
        """
        from mlflow.exceptions import MlflowException

        try:
            return str(mlflow_client(self.tracking_uri).get_model_version_by_alias(self.model_name, self.alias).version)
        except MlflowException as error:
            if error_code(error) in MISSING + ("INVALID_PARAMETER_VALUE",):
                raise AliasNotFound(f"registered model {self.model_name!r} has no alias {self.alias!r} at "
                                    f"{redact(self.tracking_uri)}") from None
            raise

    def start(self) -> Loaded:
        """Load the version the alias points at now (its failure is an error: there is nothing else to serve)."""
        version = self.resolve()
        self._seen = version
        self._current = load_version(self.model_name, version)
        self._log(f"serving {self.model_name} version {version} (@{self.alias}), loaded in "
                  f"{self._current.load_seconds:.1f} s")
        return self._current

    def check(self) -> None:
        """Resolve the alias once; load, test and swap in a version not seen before. Never raises."""
        with self._check_lock:
            try:
                version = self.resolve()
            except Exception as error:  # noqa: BLE001 - the registry may be down; keep serving what we have
                self.last_check = {"at": _now(), "error": redact(one_line(error))}
                self._log(f"alias check failed, still serving version {self.current.version}: {self.last_check['error']}")
                return
            self.last_check = {"at": _now(), "alias_version": version}
            if version == self._seen:
                return
            self._seen = version
            if version == self.current.version:  # moved back to what we serve (e.g. after a refusal)
                return
            self._log(f"@{self.alias} moved to version {version}: loading it beside version {self.current.version}")
            try:
                loaded = load_version(self.model_name, version)
            except ModelRefused as refused:
                self.refusals[version] = Refusal(version, redact(str(refused)), _now())
                self._log(f"refused version {version}, still serving version {self.current.version}: {refused}")
                return
            old, self._current = self._current, loaded  # the swap: one reference assignment
            self.refusals.pop(version, None)
            self._log(f"swapped to version {version} (loaded and smoke-tested in {loaded.load_seconds:.1f} s); "
                      f"version {old.version if old else '?'} released")
            del old
            gc.collect()  # Keras models hold reference cycles: free the old one now, not at some later collection

    def wake(self) -> None:
        """Check now instead of at the next poll (a webhook call)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            if not self._stop.is_set():
                self.check()

    def follow(self) -> None:
        """Start checking in a background thread."""
        self._thread = threading.Thread(target=self._run, name="pneumo-alias-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background checks (a load in progress finishes first)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def version_info(self) -> dict[str, Any]:
        """What ``/version`` answers."""
        current = self.current
        return {"model": self.model_name, "version": current.version, "alias": self.alias,
                "loaded_at": current.loaded_at}

    def health(self) -> dict[str, Any]:
        """What ``/health`` answers: the served version, the last check and the refused versions."""
        current = self.current
        return {"status": "ok", **self.version_info(), "load_seconds": round(current.load_seconds, 3),
                "poll_seconds": self.poll_seconds, "last_check": self.last_check,
                "refused": [vars(refusal) for refusal in self.refusals.values()], "webhook": self.webhook}

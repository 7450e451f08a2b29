"""The registry-wide promotion lock: one promotion or rollback of a registered model at a time."""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo.errors import PromotionError
from pneumo.mlflow_client import error_code

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
LOCK_OWNER_TAG = "pneumo.lock.owner"
LOCK_EXPIRES_TAG = "pneumo.lock.expires"
LOCK_PROCESS_TAG = "pneumo.lock.process"


@dataclass
class _Holder:
    owner: str
    expires: float
    process: str


def _process_id(pid: int) -> str | None:
    """``boot-id/pid-namespace/pid/start-time`` of a running process on this machine.

    None when the process is gone or ``/proc`` is missing (not Linux): then only the expiry frees
    a crashed holder's lock. The start time tells a reused pid from the original process.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    start = stat.rpartition(")")[2].split()[19]  # field 22; the command name before ")" may hold spaces
    return f"{boot}/{namespace}/{pid}/{start}"


def _abandoned(holder: _Holder) -> str | None:
    """Why a held lock may be taken over (expired, or its holder died here), else None."""
    if holder.expires < time.time():
        return "expired"
    if _holder_is_gone(holder.process):
        return "its process is gone"
    return None


def _holder_is_gone(process: str) -> bool:
    """True when the lock's holder ran on this machine, in our pid namespace, and runs no more."""
    parts = process.split("/")
    mine = _process_id(os.getpid())
    if mine is None or len(parts) != 4 or not parts[2].isdigit() or parts[:2] != mine.split("/")[:2]:
        return False  # another machine or container: only the expiry can tell
    return _process_id(int(parts[2])) != process


def _read_lock(client: Any, lock_name: str) -> _Holder | None:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(lock_name)
    except MlflowException as error:
        if error_code(error) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    tags = model.tags or {}
    try:
        expires = float(tags.get(LOCK_EXPIRES_TAG, "0"))
    except ValueError:
        expires = 0.0
    return _Holder(tags.get(LOCK_OWNER_TAG, "?"), expires, tags.get(LOCK_PROCESS_TAG, ""))


@contextmanager
def promotion_lock(
    client: Any, model_name: str, *, ttl: float = 1800.0, timeout: float = 600.0, poll: float = 0.5,
) -> Iterator[str]:
    """Hold the registry-wide promotion lock of ``model_name``.

    The lock is a registered model named ``<model_name>.promotion-lock``: creating a registered
    model is an atomic insert in MLflow's store (a unique name), so exactly one of several
    concurrent creators succeeds, across processes and hosts, with no extra infrastructure.
    Tags record the owner, its process and an expiry: a lock whose holder process has died on
    this machine is taken over at once; one held from elsewhere, after ``ttl`` seconds.

    Args:
        client: an ``MlflowClient`` for the registry.
        model_name: the registered model being promoted.
        ttl: seconds after which a lock held from another machine may be taken over.
        timeout: seconds to wait for another holder before giving up.
        poll: seconds between attempts (with jitter).

    Yields:
        This holder's token.

    Raises:
        PromotionError: the lock stayed held for ``timeout`` seconds.
    """
    from mlflow.exceptions import MlflowException

    lock_name = f"{model_name}{LOCK_SUFFIX}"
    token = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_registered_model(
                lock_name,
                tags={LOCK_OWNER_TAG: token, LOCK_EXPIRES_TAG: f"{time.time() + ttl:.3f}",
                      LOCK_PROCESS_TAG: _process_id(os.getpid()) or ""},
                description=f"Held while a promotion of {model_name} decides; deleted afterwards.",
            )
            break
        except MlflowException as error:
            if error_code(error) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        holder = _read_lock(client, lock_name)
        if holder is not None and holder.owner == token:
            break  # our create succeeded but its reply was lost and the client retried
        if holder is not None and (abandoned := _abandoned(holder)):
            # Its holder crashed: take it over, re-checking the owner right before deleting so we
            # do not delete a lock someone else has just taken over.
            again = _read_lock(client, lock_name)
            if again is not None and again.owner == holder.owner:
                log.warning("taking over the promotion lock of %s left by %s (%s)", model_name, holder.owner, abandoned)
                _delete_lock(client, lock_name)
            continue
        if time.monotonic() > deadline:
            owner = holder.owner if holder else "unknown"
            raise PromotionError(f"another promotion of {model_name} holds the registry lock ({owner}); "
                                 f"gave up after {timeout:.0f} s")
        time.sleep(poll * (0.5 + random.random()))
    try:
        yield token
    finally:
        holder = _read_lock(client, lock_name)
        if holder is not None and holder.owner == token:
            _delete_lock(client, lock_name)


def _delete_lock(client: Any, lock_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock_name)
    except MlflowException as error:
        if error_code(error) != "RESOURCE_DOES_NOT_EXIST":
            raise

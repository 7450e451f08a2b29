"""The registry-wide promotion lock: one promotion or rollback of a registered model at a time.

The protocol (lock generations, lease, takeover) is explained in docs/promotion-lock.md.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo.errors import PromotionError
from pneumo.mlflow_client import EXISTS, MISSING, error_code, unless

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
LOCK_OWNER_TAG = "pneumo.lock.owner"
LOCK_EXPIRES_TAG = "pneumo.lock.expires"
LOCK_PROCESS_TAG = "pneumo.lock.process"
# The lease only has to outlast a renewal gap, not a whole promotion: a holder killed on another
# machine blocks promotions for at most this long.
DEFAULT_TTL_S = 300.0
RENEWALS_PER_TTL = 3  # renew every ttl/3: two renewals may fail (a slow server) before the lease lapses
RENEWER_JOIN_S = 5.0  # on release, how long to wait for a renewal call in flight


def fence_margin(ttl: float) -> float:
    """How long before its lease's expiry a holder stops writing: half a renewal interval (50 s by default).

    MLflow has no conditional write, so a check and the write after it are two calls; a write
    checked with this much lease left has that long to land before anyone may take the lock over.
    One failed renewal still leaves a third of the ttl, more than the margin.
    """
    return ttl / (2 * RENEWALS_PER_TTL) if ttl > 0 else 0.0


@dataclass(frozen=True)
class _Generation:
    """One registered model that stands for the lock: ``<lock>`` (generation 0) or ``<lock>.<n>``.

    Equal generations are the same one in the same lease: a later generation under the same name
    differs in owner or creation time, and a renewed one in its expiry (a contender that saw it
    abandoned must not take it over once its holder renewed it).
    """

    number: int
    name: str
    owner: str
    created: int
    expires: float
    process: str = field(compare=False)


@dataclass
class _Lease:
    """What a holder knows of the generation it holds."""

    client: Any
    model_name: str
    name: str
    token: str
    ttl: float
    lost: threading.Event = field(default_factory=threading.Event)

    @property
    def lock_name(self) -> str:
        return f"{self.model_name}{LOCK_SUFFIX}"

    def held(self, margin: float = 0.0) -> _Generation | None:
        """Our generation while it exists, is ours, and (with a ttl) expires more than ``margin`` s from now."""
        if self.lost.is_set():
            return None
        current = _read_generation(self.client, self.lock_name, self.name)
        ours = current is not None and current.owner == self.token and (
            self.ttl <= 0 or current.expires > time.time() + margin)
        return current if ours else None

    def still_held(self) -> bool:
        """True while our generation exists, is ours and (with a ttl) has not expired."""
        return self.held() is not None


class LockToken(str):
    """The holder's token (its generation's owner tag), able to check that the lock is still held."""

    _lease: _Lease | None = None

    def ensure_held(self) -> None:
        """Raise :class:`PromotionError` unless this holder still holds the lock (before a fenced write).

        Held means with at least :func:`fence_margin` of the lease left, so the write that follows
        lands before a contender may take the lock over.
        """
        lease = self._lease
        if lease is None or lease.held(fence_margin(lease.ttl)) is None:
            model = lease.model_name if lease else "the model"
            raise PromotionError(f"lost the promotion lock of {model}: its lease lapsed or another promotion "
                                 "took it over")


def generation_name(lock_name: str, number: int) -> str:
    """The registered-model name of lock generation ``number``: ``lock_name``, or ``<lock_name>.<n>`` for n > 0."""
    return lock_name if number == 0 else f"{lock_name}.{number}"


def _generation_number(lock_name: str, name: str) -> int | None:
    if name == lock_name:
        return 0
    match = re.fullmatch(re.escape(lock_name) + r"\.([1-9][0-9]*)", name)
    return int(match.group(1)) if match else None


def _as_generation(lock_name: str, model: Any) -> _Generation | None:
    number = _generation_number(lock_name, model.name)
    if number is None:
        return None
    tags = model.tags or {}
    try:
        expires = float(tags.get(LOCK_EXPIRES_TAG, "0"))
    except ValueError:
        expires = 0.0  # unreadable: treat as expired rather than block promotions forever
    return _Generation(number, model.name, tags.get(LOCK_OWNER_TAG, "?"), int(model.creation_timestamp or 0),
                       expires, tags.get(LOCK_PROCESS_TAG, ""))


def _generations(client: Any, lock_name: str) -> list[_Generation]:
    """Every existing generation of the lock, lowest first.

    MLflow loads tags with a second query, so a generation deleted in between reads as abandoned:
    harmless, it is gone, and a contender acting on it is caught by :func:`_confirmed`.
    """
    found: list[_Generation] = []
    page_token = None
    while True:
        # LIKE may match more (``_`` and ``%`` in a model name are wildcards): names are parsed exactly.
        quote = "'" if "'" not in lock_name else '"'
        page = client.search_registered_models(filter_string=f"name LIKE {quote}{lock_name}%{quote}",
                                               max_results=1000, page_token=page_token)
        found += [generation for model in page if (generation := _as_generation(lock_name, model))]
        page_token = page.token
        if not page_token:
            return sorted(found, key=lambda generation: generation.number)


def _read_generation(client: Any, lock_name: str, name: str) -> _Generation | None:
    model = unless(MISSING, lambda: client.get_registered_model(name))
    return None if model is None else _as_generation(lock_name, model)


def _process_id(pid: int) -> str | None:
    """``boot-id/pid-namespace/pid/start-time`` of a running process here; None if gone or not Linux.

    The start time tells a reused pid from the original process.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    start = stat.rpartition(")")[2].split()[19]  # field 22; the command name before ")" may hold spaces
    return f"{boot}/{namespace}/{pid}/{start}"


def _abandoned(holder: _Generation) -> str | None:
    """Why a generation may be taken over (expired, or its holder died here), else None."""
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


def _create(client: Any, lock_name: str, name: str, token: str, ttl: float, model_name: str) -> bool:
    """Create generation ``name`` as ours (an atomic insert); False when it exists and is someone else's."""
    # The store answers a lost insert race by reading the winner back, which reports
    # RESOURCE_DOES_NOT_EXIST when the winner has just deleted it again: lost all the same.
    if unless(EXISTS + MISSING, lambda: client.create_registered_model(
            name, tags={LOCK_OWNER_TAG: token, LOCK_EXPIRES_TAG: f"{time.time() + ttl:.3f}",
                        LOCK_PROCESS_TAG: _process_id(os.getpid()) or ""},
            description=f"Held while a promotion of {model_name} decides; deleted afterwards.")) is not None:
        return True
    current = _read_generation(client, lock_name, name)
    return current is not None and current.owner == token  # our insert landed but its reply was lost


def _delete(client: Any, name: str) -> None:
    unless(MISSING, lambda: client.delete_registered_model(name))


def _delete_if_ours(client: Any, lock_name: str, name: str, token: str, ttl: float) -> bool:
    """Delete generation ``name`` if it is ours with :func:`fence_margin` of its lease left; True if deleted.

    The registry deletes by name only. Once our lease lapsed, a contender may take over and move
    back to this very name between our read and our delete, so we would delete its lock: a lapsed
    generation is left alone (it is open to takeover already).
    """
    current = _read_generation(client, lock_name, name)
    if current is None or current.owner != token:
        return False
    if ttl > 0 and current.expires <= time.time() + fence_margin(ttl):
        log.warning("not deleting %s: its lease has (nearly) lapsed, so another promotion may be taking it over; "
                    "it expires on its own", name)
        return False
    _delete(client, name)
    return True


def _confirmed(client: Any, lock_name: str, mine: str, token: str, seen: list[_Generation]) -> bool:
    """True when ours exists and, besides it, only generations we saw abandoned before creating it.

    Catches a contender that acted on a stale view: it saw generation n abandoned, then paused
    while another took over, so the generation it creates is free but another live one exists.
    """
    now = _generations(client, lock_name)
    return any(generation.name == mine and generation.owner == token for generation in now) and all(
        generation in seen for generation in now if generation.name != mine)


def _take(
    client: Any, lock_name: str, token: str, ttl: float, model_name: str,
) -> tuple[str | None, _Generation | None]:
    """One attempt: ``(generation we now hold, None)``, ``(None, the live holder)``, or ``(None, None)`` after a lost race."""
    seen = _generations(client, lock_name)
    if live := [generation for generation in seen if _abandoned(generation) is None]:
        return None, live[-1]
    # Free, or every generation abandoned: claim the next number; only one contender can create it.
    mine = generation_name(lock_name, seen[-1].number + 1 if seen else 0)
    if not _create(client, lock_name, mine, token, ttl, model_name):
        return None, None
    try:
        if not _confirmed(client, lock_name, mine, token, seen):
            _delete_if_ours(client, lock_name, mine, token, ttl)
            return None, None
        for generation in seen:
            log.warning("taking over the promotion lock of %s left by %s (%s)", model_name, generation.owner,
                        _abandoned(generation) or "abandoned")
            _delete(client, generation.name)
        return _move_home(client, lock_name, mine, token, ttl, model_name), None
    except BaseException:
        _let_go(client, lock_name, token, ttl, mine, lock_name)  # a half-taken lock would block others for a ttl
        raise


def _let_go(client: Any, lock_name: str, token: str, ttl: float, *names: str) -> None:
    """Best effort: delete those of ``names`` that are ours (:func:`_delete_if_ours`); a failure is logged,
    never raised.

    Raising here would hide the error that ended the holder's work; a generation left behind expires.
    """
    for name in dict.fromkeys(names):
        try:
            _delete_if_ours(client, lock_name, name, token, ttl)
        except Exception:  # noqa: BLE001
            log.warning("could not delete %s; it expires on its own", name, exc_info=True)


def _move_home(client: Any, lock_name: str, mine: str, token: str, ttl: float, model_name: str) -> str:
    """After a takeover through generation n > 0, hold the plain lock name again; returns the name held.

    Operators and older tools look for ``<model>.promotion-lock``. Ours exists throughout (the
    plain name is created before generation n is deleted), so no contender sees the lock free.
    """
    if mine == lock_name or not _create(client, lock_name, lock_name, token, ttl, model_name):
        return mine  # a stale contender's doomed insert holds the plain name: keep generation n
    _delete(client, mine)
    return lock_name


def _renew(lease: _Lease) -> bool:
    """Push our generation's expiry ``ttl`` ahead; False when it is no longer ours to renew.

    An expired lease is not renewed: a contender may already be taking it over. Nor does a
    renewal that returns after the expiry it extended count: a contender may have seen the lease
    lapsed before the new expiry landed (and the tag write may even have landed on its lock).
    """
    from mlflow.exceptions import MlflowException

    current = lease.held()
    if current is None:
        return False
    try:
        lease.client.set_registered_model_tag(lease.name, LOCK_EXPIRES_TAG, f"{time.time() + lease.ttl:.3f}")
    except MlflowException as error:
        if error_code(error) == "RESOURCE_DOES_NOT_EXIST":
            return False  # deleted by a taker since the check: setting a tag never re-creates it
        raise
    return time.time() < current.expires


def _renew_until(stop: threading.Event, lease: _Lease) -> None:
    """Renew the lease every ttl/3 until ``stop`` is set or the lease is lost."""
    interval = lease.ttl / RENEWALS_PER_TTL
    due = time.monotonic() + interval
    while not stop.wait(max(0.0, due - time.monotonic())):
        # The next one is due an interval after this one was due, not after a slow call returns;
        # one that is late anyway goes at once, without a burst of catch-up renewals.
        due = max(due, time.monotonic()) + interval
        try:
            if not _renew(lease):
                lease.lost.set()
                log.error("lost the promotion lock of %s (%s): its lease lapsed or was taken over",
                          lease.model_name, lease.name)
                return
        except Exception:  # noqa: BLE001 - a transient server error: the next tick retries before expiry
            log.warning("could not renew the promotion lock of %s", lease.model_name, exc_info=True)


def _acquire(client: Any, model_name: str, token: str, ttl: float, timeout: float, poll: float) -> str:
    """Try until we hold a generation of the lock; returns its name."""
    lock_name = f"{model_name}{LOCK_SUFFIX}"
    deadline = time.monotonic() + timeout
    while True:
        held, holder = _take(client, lock_name, token, ttl, model_name)
        if held is not None:
            return held
        if time.monotonic() > deadline:
            owner = holder.owner if holder else "unknown"
            raise PromotionError(f"another promotion of {model_name} holds the registry lock ({owner}); "
                                 f"gave up after {timeout:.0f} s")
        time.sleep(poll * (0.5 + random.random()))  # jitter: contenders that backed off do not collide again


@contextmanager
def promotion_lock(
    client: Any, model_name: str, *, ttl: float = DEFAULT_TTL_S, timeout: float = 600.0, poll: float = 0.5,
) -> Iterator[LockToken]:
    """Hold the registry-wide promotion lock of ``model_name``; yields the holder's token.

    The lock is a registered model ``<model_name>.promotion-lock``: creating a registered model
    is an atomic insert in MLflow's store, so one of several concurrent creators wins, across
    processes and hosts. Tags record the owner, its process and an expiry that a background
    thread pushes ahead every ``ttl / 3``; ``ttl`` ≤ 0 means no lease and no renewal. An
    abandoned lock (expired, or its holder died on this machine) is taken over through the next
    generation ``<model_name>.promotion-lock.<n>``. ``token.ensure_held()`` raises once the lock
    is lost.

    Raises:
        PromotionError: the lock stayed held for ``timeout`` seconds (tries every ``poll`` s, jittered).
    """
    token = LockToken(f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}")
    lease = _Lease(client, model_name, _acquire(client, model_name, token, ttl, timeout, poll), token, ttl)
    token._lease = lease
    stop = threading.Event()
    renewer = None
    if ttl > 0:  # without a lease the lock is open to takeover at once, by design
        renewer = threading.Thread(target=_renew_until, args=(stop, lease), daemon=True,
                                   name=f"promotion-lock-renewer:{lease.name}")
        renewer.start()
    try:
        yield token
    finally:
        stop.set()
        if renewer is not None:
            renewer.join(RENEWER_JOIN_S)
        if lease.lost.is_set():  # its expiry may be a late renewal's, on a lock someone else now holds
            log.warning("not deleting %s: the lease was lost; it expires on its own", lease.name)
        else:
            _let_go(client, lease.lock_name, token, ttl, lease.name)

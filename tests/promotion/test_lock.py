"""The promotion lock against a real mlflow server: atomic takeover, lease renewal, crashed holders."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pneumo.errors import PromotionError
from pneumo.promotion import lock

WAIT = 20.0  # seconds any one step may take on a loaded 2-core machine before the test fails
READS = frozenset({"search_registered_models", "get_registered_model"})
WRITES = frozenset({"create_registered_model", "delete_registered_model", "set_registered_model_tag"})
ELSEWHERE = "another-boot-id/pid:[1]/1/1"  # a holder process on another machine: only its expiry frees it


class PausingClient:
    """An ``MlflowClient`` that stops before its ``pause_at``-th registry write after its first read.

    The first read is where a contender observes the lock; the write after it is its takeover
    step (the old code's delete of the stale lock, the new code's create of the next generation).
    Holding contenders there forces an interleaving that thread scheduling alone would rarely hit.
    """

    def __init__(self, client: Any, pause_at: int = 1) -> None:
        self._client = client
        self._pause_at = pause_at
        self._count = threading.Lock()
        self._writes = 0
        self._read_once = False
        self._resumed = threading.Event()
        self.paused = threading.Event()
        self.reads_after_resume = 0
        self.writes: list[tuple[str, str]] = []  # (method, registered-model name), in order

    def resume(self) -> None:
        """Let the paused write (and everything after it) go through."""
        self._resumed.set()

    def __getattr__(self, attribute: str) -> Any:
        method = getattr(self._client, attribute)
        if attribute in READS:
            return self._read(method)
        if attribute in WRITES:
            return self._write(attribute, method)
        return method

    def _read(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def read(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            with self._count:
                self._read_once = True
                if self._resumed.is_set():
                    self.reads_after_resume += 1
            return result
        return read

    def _write(self, attribute: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def write(*args: Any, **kwargs: Any) -> Any:
            with self._count:
                if self._read_once:
                    self._writes += 1
                pause = self._writes == self._pause_at and not self._resumed.is_set()
            if pause:
                self.paused.set()
                assert self._resumed.wait(WAIT), "never resumed"
            self.writes.append((attribute, args[0] if args else kwargs.get("name", "")))
            return method(*args, **kwargs)
        return write


class Occupancy:
    """Who is inside the critical section, and the most that ever were at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside: set[str] = set()
        self.entered: list[str] = []
        self.most = 0

    @contextmanager
    def hold(self, who: str) -> Iterator[None]:
        """Mark ``who`` inside for the duration of the block."""
        with self._lock:
            self.inside.add(who)
            self.entered.append(who)
            self.most = max(self.most, len(self.inside))
        try:
            yield
        finally:
            with self._lock:
                self.inside.discard(who)


class Worker(threading.Thread):
    """A daemon thread that keeps its target's exception for the test to raise."""

    def __init__(self, target: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self._target_fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test thread by finish()
            self.error = error

    def finish(self) -> None:
        """Join (bounded) and re-raise the target's exception."""
        self.join(WAIT)
        assert not self.is_alive(), "worker still running"
        if self.error is not None:
            raise self.error


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll ``condition`` every 20 ms until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def client(mlflow_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(mlflow_uri)


def abandoned_lock(client: Any, name: str, *, expires: float = 0.0) -> None:
    """The lock as a holder on another machine left it when it crashed."""
    client.create_registered_model(name + lock.LOCK_SUFFIX, tags={
        lock.LOCK_OWNER_TAG: "crashed", lock.LOCK_EXPIRES_TAG: f"{expires:.3f}", lock.LOCK_PROCESS_TAG: ELSEWHERE})


def generations(client: Any, name: str) -> dict[str, str]:
    """Existing lock generations of model ``name``: registered-model name → owner."""
    return {generation.name: generation.owner for generation in lock._generations(client, name + lock.LOCK_SUFFIX)}


def expiry(client: Any, name: str) -> float:
    return float(client.get_registered_model(name + lock.LOCK_SUFFIX).tags[lock.LOCK_EXPIRES_TAG])


def contender(client: Any, name: str, occupancy: Occupancy, who: str, leave: threading.Event | None = None,
              **options: Any) -> Worker:
    """A started worker that takes the lock, marks itself inside, and leaves when ``leave`` is set."""
    def run() -> None:
        with lock.promotion_lock(client, name, poll=0.05, timeout=WAIT, **options), occupancy.hold(who):
            if leave is not None:
                assert leave.wait(WAIT), f"{who} was never let out"
    worker = Worker(run)
    worker.start()
    return worker


def test_generation_names_round_trip():
    name = "pneumonia-classifier" + lock.LOCK_SUFFIX
    assert lock.generation_name(name, 0) == name
    assert lock.generation_name(name, 7) == name + ".7"
    assert [lock._generation_number(name, lock.generation_name(name, n)) for n in (0, 1, 12)] == [0, 1, 12]
    # Other models' locks, and names that only look alike, are no generation of this lock.
    assert lock._generation_number(name, name + ".07") is None
    assert lock._generation_number(name, name + ".x") is None
    assert lock._generation_number(name, "pneumonia-classifier2" + lock.LOCK_SUFFIX) is None


def test_a_contender_resuming_a_stale_takeover_backs_off(client, unique_name):
    """A and B both see the expired lock; A takes it over and holds; only then does B act on its stale view.

    With the old read/re-read/delete/create takeover, B deleted A's fresh lock, created its own
    and both held at once. Now B's insert of generation 1 succeeds (A has moved back to the
    plain name and deleted it), but B's confirmation finds A's live lock: B deletes its
    generation and waits for A.
    """
    name = unique_name("model")
    abandoned_lock(client, name)
    a, b = PausingClient(client), PausingClient(client)
    occupancy, a_leaves = Occupancy(), threading.Event()
    workers = [contender(a, name, occupancy, "A", a_leaves), contender(b, name, occupancy, "B")]
    try:
        assert a.paused.wait(WAIT) and b.paused.wait(WAIT), "both contenders observe the expired lock"
        a.resume()
        assert wait_until(lambda: "A" in occupancy.inside), "A takes the lock over"
        b.resume()
        # B either looks at the lock again and again (waiting: right) or gets in (wrong).
        assert wait_until(lambda: b.reads_after_resume >= 3 or "B" in occupancy.inside or not workers[1].is_alive())
        assert occupancy.entered == ["A"] and occupancy.most == 1, "B must not get the lock while A holds it"
        assert workers[1].is_alive(), "B waits for A"
        first = name + lock.LOCK_SUFFIX + ".1"
        assert b.writes[:2] == [("create_registered_model", first), ("delete_registered_model", first)]
    finally:
        a_leaves.set()
        for worker in workers:
            worker.finish()
    assert occupancy.entered == ["A", "B"] and occupancy.most == 1
    assert generations(client, name) == {}


def test_a_contender_resuming_while_the_next_generation_is_claimed_waits(client, unique_name):
    """A has created generation 1 and stops before clearing the expired one; B then tries to create 1 too."""
    name = unique_name("model")
    abandoned_lock(client, name)
    a, b = PausingClient(client, pause_at=2), PausingClient(client)
    occupancy, a_leaves = Occupancy(), threading.Event()
    # B observes first, so both see only the crashed lock; then A claims generation 1 and stops.
    workers = [contender(b, name, occupancy, "B")]
    try:
        assert b.paused.wait(WAIT)
        workers.append(contender(a, name, occupancy, "A", a_leaves))
        assert a.paused.wait(WAIT)
        # Both saw only the crashed lock; A alone created generation 1.
        claimed = generations(client, name)
        assert set(claimed) == {name + lock.LOCK_SUFFIX, name + lock.LOCK_SUFFIX + ".1"}
        assert claimed[name + lock.LOCK_SUFFIX] == "crashed"
        b.resume()
        assert wait_until(lambda: b.reads_after_resume >= 3 or "B" in occupancy.inside or not workers[0].is_alive())
        assert not occupancy.entered, "generation 1 is A's: B cannot take the lock"
        assert workers[0].is_alive(), "B waits for A"
        assert b.writes == [("create_registered_model", name + lock.LOCK_SUFFIX + ".1")]  # and lost
        a.resume()
        assert wait_until(lambda: "A" in occupancy.inside)
        assert occupancy.inside == {"A"}
    finally:
        a_leaves.set()
        for worker in workers:
            worker.finish()
    assert occupancy.entered == ["A", "B"] and occupancy.most == 1
    assert generations(client, name) == {}


def test_contenders_released_together_on_an_expired_lock_take_it_one_at_a_time(client, unique_name):
    name = unique_name("model")
    abandoned_lock(client, name)
    pausing = [PausingClient(client) for _ in range(3)]
    occupancy, leave = Occupancy(), threading.Event()
    workers = [contender(c, name, occupancy, who, leave) for c, who in zip(pausing, "ABC")]
    try:
        assert all(c.paused.wait(WAIT) for c in pausing)
        for c in pausing:
            c.resume()
        assert wait_until(lambda: bool(occupancy.inside))
        # The others keep looking (and waiting) while the winner holds.
        assert wait_until(lambda: sum(c.reads_after_resume >= 3 for c in pausing) >= 2
                          or len(occupancy.inside) > 1 or not all(worker.is_alive() for worker in workers))
        assert len(occupancy.entered) == 1 and occupancy.most == 1, "one holder at a time"
        assert all(worker.is_alive() for worker in workers)
    finally:
        leave.set()
        for worker in workers:
            worker.finish()
    assert sorted(occupancy.entered) == ["A", "B", "C"] and occupancy.most == 1
    assert generations(client, name) == {}


def test_a_renewing_holder_keeps_a_short_lease(client, unique_name):
    name = unique_name("model")
    ttl = 3.0  # renewed every second: a loaded machine may delay one renewal, not three
    with lock.promotion_lock(client, name, ttl=ttl) as token:
        first = expiry(client, name)
        started = time.monotonic()
        # Twice the ttl: without renewal the contender would take the lock over halfway.
        with (pytest.raises(PromotionError, match="holds the registry lock"),
              lock.promotion_lock(client, name, timeout=2 * ttl, poll=0.2)):
            pass
        assert time.monotonic() - started > 2 * ttl
        assert expiry(client, name) > first + ttl
        assert generations(client, name) == {name + lock.LOCK_SUFFIX: token}
        token.ensure_held()
    assert generations(client, name) == {}
    assert not [t for t in threading.enumerate() if t.name.startswith("promotion-lock-renewer")]


def test_a_crashed_holders_lock_is_taken_over_once_it_expires(client, unique_name):
    name = unique_name("model")
    expires = time.time() + 1.5
    abandoned_lock(client, name, expires=expires)
    with lock.promotion_lock(client, name, timeout=WAIT, poll=0.1) as token:
        assert time.time() >= expires, "taken over only once the lease lapsed"
        # Moved back to the plain name; the takeover generation and the crashed lock are gone.
        assert generations(client, name) == {name + lock.LOCK_SUFFIX: token}
    assert generations(client, name) == {}


def test_a_holder_that_stops_renewing_loses_the_lock_and_does_not_resurrect_it(client, unique_name, monkeypatch):
    name = unique_name("model")
    renew, thaw = lock._renew, threading.Event()
    renewed: list[bool] = []

    def frozen_renew(lease: Any) -> bool:
        """The holder's first renewal hangs (a stuck process) until the test thaws it."""
        if not renewed:
            assert thaw.wait(WAIT)
        renewed.append(outcome := renew(lease))
        return outcome

    monkeypatch.setattr(lock, "_renew", frozen_renew)
    holder = lock.promotion_lock(client, name, ttl=1.0)
    held = holder.__enter__()
    taker = lock.promotion_lock(client, name, ttl=60.0, timeout=WAIT, poll=0.1)
    try:
        took = taker.__enter__()  # waits for the frozen holder's lease to lapse
        mine = client.get_registered_model(name + lock.LOCK_SUFFIX).tags
        assert mine[lock.LOCK_OWNER_TAG] == took
        thaw.set()
        assert held._lease.lost.wait(WAIT), "the holder's renewal notices the takeover"
        assert renewed == [False]
        # Not renewed under the new holder, and the old holder knows it lost the lock.
        assert client.get_registered_model(name + lock.LOCK_SUFFIX).tags == mine
        with pytest.raises(PromotionError, match="lost the promotion lock"):
            held.ensure_held()
        holder.__exit__(None, None, None)  # the old holder's release leaves the new holder's lock alone
        assert generations(client, name) == {name + lock.LOCK_SUFFIX: took}
        took.ensure_held()
    finally:
        thaw.set()
        taker.__exit__(None, None, None)
    assert generations(client, name) == {}


def test_a_free_lock_is_taken_by_one_contender_at_a_time(client, unique_name):
    name = unique_name("model")
    occupancy = Occupancy()

    def take(who: str) -> None:
        with lock.promotion_lock(client, name, poll=0.05, timeout=WAIT), occupancy.hold(who):
            time.sleep(0.05)

    workers = [Worker(lambda who=who: take(who)) for who in "ABC"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.finish()
    assert sorted(occupancy.entered) == ["A", "B", "C"] and occupancy.most == 1
    assert generations(client, name) == {}


def test_a_holder_whose_lease_lapsed_leaves_the_takers_lock_alone_on_release(client, unique_name, monkeypatch):
    """The stalled holder's release reads its lapsed lock, then a takeover moves home, then its delete would land.

    Before the fix the release (read: ours; delete by name) deleted the taker's plain-name lock
    and a third contender found the lock free: two holders at once. Now a lapsed lease is never
    deleted by its holder, whatever happens between the read and the delete.
    """
    name = unique_name("model")
    monkeypatch.setattr(lock, "_renew_until", lambda stop, lease: None)  # the holder stalls: no renewal
    pausing = PausingClient(client, pause_at=0)  # no pause while acquiring
    holder = lock.promotion_lock(pausing, name, ttl=1.0)
    holder.__enter__()
    pausing.writes.clear()
    plain = name + lock.LOCK_SUFFIX
    assert wait_until(lambda: expiry(client, name) < time.time()), "the stalled holder's lease lapses"
    pausing._writes, pausing._pause_at = 0, 1  # pause at the release's first write (its delete)
    release = Worker(lambda: holder.__exit__(None, None, None))
    release.start()
    assert wait_until(lambda: pausing.paused.is_set() or not release.is_alive())
    taker = lock.promotion_lock(client, name, ttl=60.0, timeout=WAIT, poll=0.1)
    took = taker.__enter__()  # takes the lapsed lock over and moves back to the plain name
    try:
        pausing.resume()
        release.finish()
        assert generations(client, name) == {plain: took}, "the taker's lock survives the stale release"
        took.ensure_held()
        with pytest.raises(PromotionError, match="holds the registry lock"):
            with lock.promotion_lock(client, name, timeout=0.3, poll=0.1):
                pass
        assert ("delete_registered_model", plain) not in pausing.writes
    finally:
        taker.__exit__(None, None, None)
    assert generations(client, name) == {}

"""The on-disk cache folder: its state file, journal, lock, sweep, and the local-file MD5 memo.

Cache layout: ``CACHE/chest_xray/...`` mirrors the keys (so ``CACHE`` is a dataset root), and
``CACHE/.pneumo-cache/`` holds the state (ETag, size, MD5 and file stat per path), an append-only
journal of completed downloads, a lock file, the lock's holders and the temporary ``*.part`` files.
A file is trusted only if the state says so *and* its size, mtime, ctime and inode still match, or,
when any of them moved, its content still hashes to the recorded MD5: a killed sync, or a file
rewritten in place with its mtime put back (the kernel sets ctime), is never trusted. Writers hold
the lock file exclusively, readers (:func:`reading`) shared, each for at most
``PNEUMO_CACHE_LOCK_TIMEOUT`` seconds of waiting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo.data.storage.sources import unsafe_reason
from pneumo.errors import CacheLockTimeout, ConfigError, StorageError, redact

try:  # POSIX advisory lock: two syncs into one cache must not interleave, nor a sync and a reader.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

META_DIR = ".pneumo-cache"
STATE_VERSION = 1
_CHUNK = 1 << 20
_READERS = threading.local()  # per thread: {cache root: nesting depth} of storage.reading() blocks
LOCK_TIMEOUT_ENV = "PNEUMO_CACHE_LOCK_TIMEOUT"
# Long enough for a full-size sync (1.2 GB) or a small training to finish, short enough that
# `pneumo promote` behind a long training fails with a reason instead of waiting for ever.
DEFAULT_LOCK_TIMEOUT = 1800.0
_NOTE_EVERY = 60.0  # seconds between "still waiting" lines
log = logging.getLogger(__package__)


def cache_dir(home: Path, source: str) -> Path:
    """The cache folder of a source under ``home``: one per source, shared by the flow and ``pneumo promote``."""
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    return Path(home) / "cache" / digest


@dataclass
class _Entry:
    etag: str
    size: int
    md5: str  # the content's MD5, computed while downloading
    mtime_ns: int
    ctime_ns: int = 0  # 0: recorded by older code; the content is hashed once instead
    ino: int = 0

    @classmethod
    def of(cls, target: Path, etag: str, size: int, md5: str) -> _Entry:
        """The entry for the file just written at ``target``, with its stat now."""
        stat = target.stat()
        return cls(etag, size, md5, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)

    def same_file(self, stat: os.stat_result) -> bool:
        """Whether ``stat`` is the file this entry was recorded for, untouched since (mtime can be put
        back with ``utime``; ctime cannot, short of changing the clock)."""
        return (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino) == (
            self.size, self.mtime_ns, self.ctime_ns, self.ino)


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
        self._mutex = threading.Lock()
        self._checked_dirs: set[str] = set()

    @classmethod
    @contextlib.contextmanager
    def open(cls, root: Path | str) -> Iterator[_Cache]:
        """The cache at ``root`` under the exclusive lock: the only way to write into it."""
        root = _checked_root(root)
        if getattr(_READERS, "roots", {}).get(str(root.resolve())):
            # flock locks belong to open files, not threads: our own shared lock would block us forever.
            raise StorageError(f"cannot update the cache {root} while this thread holds it for reading; "
                               "leave the storage.reading() block first")
        cache = cls(root)
        cache.tmp.mkdir(parents=True, exist_ok=True)
        with _flocked(cache.meta / "lock", exclusive=True, purpose="updating"):
            for leftover in cache.tmp.iterdir():  # partial downloads of a killed run: never trusted
                leftover.unlink(missing_ok=True)
            cache._load()
            cache._journal = open(cache.meta / "journal.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            try:
                yield cache
            finally:
                cache._journal.close()

    @classmethod
    def snapshot(cls, root: Path) -> _Cache:
        """The cache's state, read-only; consistent only while a lock keeps writers out."""
        cache = cls(root)
        cache._load()
        return cache

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

    def trusted(self, path: str, etag: str, size: int, md5: str | None = None) -> _Entry | None:
        """The entry for ``path`` if the file on disk is the complete object with this ETag/size/MD5."""
        entry = self.entries.get(path)
        if entry is None or entry.size != size or entry.etag != etag:
            return None
        if md5 is not None and entry.md5 != md5:
            return None
        try:
            stat = (self.root / path).stat()
        except OSError:
            return None
        if stat.st_size != size:
            return None
        if entry.same_file(stat):
            return entry  # the cheap check: a stat, no read
        # Touched, copied, or rewritten in place: trusted only if the content is still what was
        # downloaded. Hashing 1.2 GB costs ~2 s, so only files whose stat moved are read.
        try:
            if _md5_file(self.root / path) != entry.md5:
                return None
        except OSError:
            return None
        fresh = _Entry(entry.etag, size, entry.md5, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
        if self._journal is not None:  # a writer: the next run takes the cheap check again
            self.record(path, fresh)
        return fresh

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
        for directory, _dirnames, filenames in os.walk(self.root, topdown=False):
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

        No folder on the way may be a symlink (checked once per folder), so a link planted in the
        cache cannot redirect writes outside it.
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


def _checked_root(root: Path | str) -> Path:
    """``root`` expanded, refused when it is a file or a non-empty folder that is not a pneumo cache."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise StorageError(f"cache {root} exists and is not a folder")
    if root.is_dir() and not (root / META_DIR).is_dir() and any(root.iterdir()):
        # We delete files that left the bucket: never do that in a folder we did not create.
        raise StorageError(f"cache folder {root} is not empty and is not a pneumo cache; use an empty or new folder")
    return root


def lock_timeout() -> float:
    """Seconds to wait for the cache lock (``PNEUMO_CACHE_LOCK_TIMEOUT``, default 1800; 0: do not wait).

    Read now, never at import. Raises ConfigError for anything but a finite number ≥ 0.
    """
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise ConfigError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds ≥ 0, got {raw!r}")
    return value


@contextlib.contextmanager
def _flocked(lock_path: Path, *, exclusive: bool, purpose: str) -> Iterator[None]:
    """Hold ``flock`` on ``lock_path``: exclusive for writers, shared for readers (POSIX only).

    Waits at most :func:`lock_timeout` seconds, logging who holds it, then raises CacheLockTimeout.
    While held, a file under ``holders/`` names this process, so a waiter can say whom it waits for.
    """
    with open(lock_path, "a+") as handle:  # closing the file releases the lock
        if fcntl is None:
            yield
            return
        _acquire(handle.fileno(), lock_path, exclusive)
        with _registered(lock_path.parent / "holders", purpose):
            yield


def _acquire(fd: int, lock_path: Path, exclusive: bool) -> None:
    """Take the lock, polling (flock has no timeout); a line naming the holders when it must wait."""
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    timeout, started, delay = lock_timeout(), time.monotonic(), 0.005
    next_note = started
    while True:
        try:
            fcntl.flock(fd, mode)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - started
        cache = lock_path.parent.parent
        if waited >= timeout:
            raise CacheLockTimeout(
                f"the cache {cache} is still held by {_holders(lock_path.parent / 'holders')} after {timeout:g} s; "
                f"wait for it to finish, or set {LOCK_TIMEOUT_ENV} (seconds) to wait longer")
        if time.monotonic() >= next_note:
            log.warning("waiting for the cache %s (held by %s) to %s; giving up after %g s (%s)", cache,
                        _holders(lock_path.parent / "holders"), "update it" if exclusive else "read it",
                        timeout, LOCK_TIMEOUT_ENV,
                        extra={"cache_lock": str(lock_path), "exclusive": exclusive, "waited": waited})
            next_note += _NOTE_EVERY
        time.sleep(min(delay, max(timeout - waited, 0.0)))
        delay = min(delay * 2, 0.25)


@contextlib.contextmanager
def _registered(folder: Path, purpose: str) -> Iterator[None]:
    """A file naming this holder while the block runs (best effort: it only informs waiters)."""
    me = folder / f"{os.getpid()}-{uuid.uuid4().hex}.json"
    record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
              "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": redact(" ".join(sys.argv))[:300]}
    with contextlib.suppress(OSError):
        folder.mkdir(exist_ok=True)
        me.write_text(json.dumps(record), encoding="utf-8")
    try:
        yield
    finally:
        me.unlink(missing_ok=True)


def _holders(folder: Path) -> str:
    """Who holds the lock, from the live holders' files (stale ones of killed processes are removed)."""
    names = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            item = json.loads(path.read_text(encoding="utf-8"))
            pid, host = int(item["pid"]), str(item["host"])
        except (OSError, ValueError, TypeError, KeyError):
            continue  # being written, or not ours
        if host == socket.gethostname() and not _alive(pid):
            path.unlink(missing_ok=True)
            continue
        names.append(f"pid {pid} on {host}, {item.get('purpose', '?')} since {item.get('since', '?')} "
                     f"(command {item.get('command', '')!r})")
    return "; ".join(names) if names else "another process"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def reading(cache_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold a cache for reading: no sync or materialize can change its files until the block exits.

    A shared lock: any number of readers (threads or processes on this machine) at once; a
    writer (:func:`~pneumo.data.storage.sync`, :func:`~pneumo.data.storage.materialize`) waits for every
    reader to leave, and a reader waits for a running writer to finish. It does not check that
    the files are the ones a manifest pins: :func:`~pneumo.data.storage.materialized` does that too.
    Inside the block this thread must not sync or materialize into the same cache (refused).
    The folder is created when missing; StorageError when it is a file or a foreign non-empty folder;
    CacheLockTimeout when a writer still holds it after ``PNEUMO_CACHE_LOCK_TIMEOUT`` seconds.
    """
    root = _checked_root(cache_dir)
    (root / META_DIR).mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    with _flocked(root / META_DIR / "lock", exclusive=False, purpose="reading"):
        held: dict[str, int] = _READERS.__dict__.setdefault("roots", {})
        held[key] = held.get(key, 0) + 1
        try:
            yield root
        finally:
            held[key] -= 1
            if not held[key]:
                del held[key]


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Md5Memo:
    """MD5s of local files keyed by their stat (size, mtime, ctime, inode): re-hashing 1.2 GB on every run
    is wasteful, and a rewrite that puts the mtime back still moves the ctime."""

    def __init__(self, cache_dir: str | os.PathLike[str] | None) -> None:
        self.file = Path(cache_dir).expanduser() / META_DIR / "local-md5.json" if cache_dir is not None else None
        self.items: dict[str, list[Any]] = {}
        self.lock = threading.Lock()
        if self.file is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                self.items = dict(json.loads(self.file.read_text(encoding="utf-8")))

    def md5(self, path: Path) -> tuple[int, str]:
        stat = path.stat()
        key = str(path.resolve())
        with self.lock:
            cached = self.items.get(key)
        now = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        if cached and cached[:-1] == now:  # older memos ([size, mtime, md5]) never match: hashed again
            return stat.st_size, str(cached[-1])
        md5 = _md5_file(path)
        with self.lock:
            self.items[key] = [*now, md5]
        return stat.st_size, md5

    def save(self) -> None:
        if self.file is None:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.file.with_name(f"{self.file.name}.{uuid.uuid4().hex}.tmp")
        temporary.write_text(json.dumps(self.items), encoding="utf-8")
        os.replace(temporary, self.file)

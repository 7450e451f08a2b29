"""The on-disk cache folder: its state file, journal, lock, sweep, and the local-file MD5 memo.

Cache layout: ``CACHE/chest_xray/...`` mirrors the keys (so ``CACHE`` is a dataset root), and
``CACHE/.pneumo-cache/`` holds the state (ETag, size, MD5, mtime per path), an append-only journal
of completed downloads, a lock file and the temporary ``*.part`` files. A file is trusted only if
the state says so *and* its size and mtime still match, so a killed sync never leaves a file a
later run would trust. Writers hold the lock file exclusively, readers (:func:`reading`) shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumo.data.storage.sources import unsafe_reason
from pneumo.errors import StorageError

try:  # POSIX advisory lock: two syncs into one cache must not interleave, nor a sync and a reader.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

META_DIR = ".pneumo-cache"
STATE_VERSION = 1
_CHUNK = 1 << 20
_READERS = threading.local()  # per thread: {cache root: nesting depth} of storage.reading() blocks


def cache_dir(home: Path, source: str) -> Path:
    """The cache folder of a source under ``home``: one per source, shared by the flow and ``pneumo promote``."""
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    return Path(home) / "cache" / digest


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
        with _flocked(cache.meta / "lock", exclusive=True):
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


@contextlib.contextmanager
def _flocked(lock_path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold ``flock`` on ``lock_path``: exclusive for writers, shared for readers (POSIX only)."""
    with open(lock_path, "a+") as handle:  # closing the file releases the lock
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


@contextlib.contextmanager
def reading(cache_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold a cache for reading: no sync or materialize can change its files until the block exits.

    A shared lock: any number of readers (threads or processes on this machine) at once; a
    writer (:func:`~pneumo.data.storage.sync`, :func:`~pneumo.data.storage.materialize`) waits for every
    reader to leave, and a reader waits for a running writer to finish. It does not check that
    the files are the ones a manifest pins: :func:`~pneumo.data.storage.materialized` does that too.
    Inside the block this thread must not sync or materialize into the same cache (refused).
    The folder is created when missing; StorageError when it is a file or a foreign non-empty folder.
    """
    root = _checked_root(cache_dir)
    (root / META_DIR).mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    with _flocked(root / META_DIR / "lock", exclusive=False):
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
    """MD5s of local files keyed by (size, mtime): re-hashing 1.2 GB on every run is wasteful."""

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

"""Thread-pool map for downloads, hashes and uploads: progress callbacks, first error cancels the rest."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any, TypeVar

DEFAULT_WORKERS = 16

ProgressFn = Callable[[int, int], None]
T = TypeVar("T")


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

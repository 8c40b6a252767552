"""Views made in worker processes, for builds that make many (issue #10).

Making a thread's public view (parsing its mail, redacting it, checking its attachments,
verifying DKIM) is most of a full build's time, and each view depends only on its own thread.
A build that must make many views (a full build, a new redaction rule, an upgrade) hands them
to a few forked processes, `[archive] workers` (0: min(2, the number of CPUs)).

What stays in the build's own process, so the guarantees do not move: reading the store (in the
build's one transaction: every view is made from the same snapshot, on SQLite and PostgreSQL
alike; the workers never open the database), writing every file through the Writer (the leak
check, the manifest and the owners), the thread cache, and the DKIM cache (a worker sends back
the answers it found, which are merged). The results are taken in the order the work was
given, so the output does not depend on which worker finished first.

A worker that dies (killed, out of memory) fails the build with `ViewWorkerError`: the build
then aborts as on any error, so nothing is published. Only a few batches are in flight at any
time, so memory stays bounded whatever the size of the site.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from mailflow.errors import MailflowError

# Fewer views than this are made in the build's own process: starting workers costs more
# than it saves, and the daemon's builds after a few messages stay single-process.
POOL_MIN = 200
BATCH = 8            # views per task: fewer round trips, still a fine-grained share
AHEAD = 3            # tasks in flight per worker


class ViewWorkerError(MailflowError):
    """A process making views stopped before it answered."""


def workers_for(settings: Any) -> int:
    """How many processes make views: `[archive] workers`, 0 (the default) meaning
    min(2, the number of CPUs)."""
    archive = getattr(settings, "archive", None)
    n = int(getattr(archive, "workers", 0) or 0)
    return n if n > 0 else min(2, os.cpu_count() or 1)


# The work function of the current pool, inherited by the forked workers (a closure cannot
# be pickled, and need not be: the workers are forks of the process that set it). One pool
# per process at a time: another build meanwhile (another site's, in a thread) makes its
# views in its own thread (`fallback`).
_WORK: Callable[[list[Any]], Any] | None = None
_BUSY = threading.Lock()


def _run(batch: list[Any]) -> Any:
    assert _WORK is not None, "a view worker started without its work"
    return _WORK(batch)


def in_workers(items: Iterable[Any], prepare: Callable[[Any], Any],
               work: Callable[[list[Any]], tuple[list[Any], Any]],
               merge: Callable[[Any], None], workers: int,
               fallback: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """`work`'s results for `items`, in order: `prepare(item)` runs here (reading the store),
    `work(batch of prepared)` in a worker, returning (one result per item, extra); `merge(extra)`
    runs here as each batch comes back, before its results are yielded. `fallback()`: the same
    results made here, when this process already has a pool running."""
    if not _BUSY.acquire(blocking=False):
        yield from fallback()
        return
    try:
        yield from _in_workers(items, prepare, work, merge, workers)
    finally:
        _BUSY.release()


def _in_workers(items: Iterable[Any], prepare: Callable[[Any], Any],
                work: Callable[[list[Any]], tuple[list[Any], Any]],
                merge: Callable[[Any], None], workers: int) -> Iterator[Any]:
    global _WORK
    batches = _batches(items)
    window: deque[Future[Any]] = deque()
    _WORK = work
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        def submit() -> None:
            batch = next(batches, None)
            if batch is not None:
                window.append(ex.submit(_run, [prepare(item) for item in batch]))

        for _ in range(workers * AHEAD):
            submit()
        while window:
            results, extra = window.popleft().result()
            submit()
            merge(extra)
            yield from results
    except BrokenProcessPool as exc:   # from a result or from the next submit
        raise ViewWorkerError(
            "archive: a process making views stopped (killed, or out of memory?); nothing "
            "was published. Set [archive] workers = 1 to build in one process.") from exc
    finally:
        _WORK = None
        ex.shutdown(wait=True, cancel_futures=True)


def _batches(items: Iterable[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch

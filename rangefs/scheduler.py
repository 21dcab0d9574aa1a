"""Background work of a cache, scheduled: index flushes, metadata saves, fill admission.

Shared by a mount (``objects.ObjectStore``) and a download (``download.py``):

- :func:`flush_periodically` persists indexes in batches (crash safety): every
  FLUSH_PERIOD seconds it flushes the caches whose oldest unclaimed block is
  FLUSH_INTERVAL old (``needs_flush``). A kill -9 loses the blocks written since the last
  flush, about fill rate x (FLUSH_INTERVAL + FLUSH_PERIOD) on a fast disk (20 kills during
  one copy fetched 1.00 x the object: tests/test_crash.py). A flush is one fdatasync plus
  an index write (~2 ms on an SSD); where fsyncs are slow the cache stretches the interval
  (``LocalDownloadCache.needs_flush``). A cache whose flush fails (a full disk) is tried
  again after FLUSH_RETRY_MIN seconds, doubling up to FLUSH_RETRY_MAX, one log line per
  failure; the other caches go on.
- :func:`save_metadata_periodically` writes the metadata table when it changed.
- :class:`FillQueue` admits whole-object fills: at most ``limit`` at once, the others
  wait in FIFO order (with 16 readers of 8 objects, filling all 8 at once kept the event
  loop saturated: one at a time, the p99 read latency went from 95 to 80 ms).

Trio thread only. Callers start these through ``tasks.Tasks`` (named, contained).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import trio

from .cachedir import META_SAVE_PERIOD, CacheDir, merge_meta_table
from .errors import RangefsError
from .tasks import contain

log = logging.getLogger(__name__)

FLUSH_PERIOD = 0.02  # seconds between checks for caches whose index needs persisting
FLUSH_INTERVAL = 0.02  # a new block is claimed by the index after at least this long
FLUSH_RETRY_MIN = 1.0  # seconds before a failed flush (e.g. a full disk) is tried again,
FLUSH_RETRY_MAX = 30.0  # ... doubling up to this


class Flushable(Protocol):
    """What the flusher needs of a cache (``LocalDownloadCache``)."""

    @property
    def closed(self) -> bool: ...
    @property
    def directory(self) -> Path: ...
    def needs_flush(self) -> bool: ...
    async def flush(self) -> None: ...


async def flush_periodically(caches: Callable[[], Iterable[Flushable]]) -> None:
    """Flush the caches that need it, every FLUSH_PERIOD seconds, until cancelled.

    ``caches()`` is asked each time (the open caches change). A failed flush (its blocks
    stay unclaimed, and are served meanwhile) is retried with backoff; never raises.
    """
    retry: dict[Flushable, tuple[float, float]] = {}  # cache -> (when, delay)
    while True:
        await trio.sleep(FLUSH_PERIOD)
        now = trio.current_time()
        for cache in caches():
            when, delay = retry.get(cache, (0.0, 0.0))
            if now < when or not cache.needs_flush():
                continue
            try:
                await cache.flush()
            except Exception as exc:  # one cache's failure never stops the others'
                delay = min(FLUSH_RETRY_MAX, max(FLUSH_RETRY_MIN, 2 * delay))
                retry[cache] = (trio.current_time() + delay, delay)
                if not isinstance(exc, RangefsError):
                    contain(f"index flush of {cache.directory}", exc)
                log.error("cannot persist the cache index (retrying in %g s): %s", delay, exc)
            else:
                if retry.pop(cache, None) is not None:
                    log.info("%s: the cache index is persisted again", cache.directory)
        for cache in [c for c in retry if c.closed]:
            del retry[cache]


async def save_metadata_periodically(cachedir: CacheDir) -> None:
    """Save the metadata table when it changed, at most every META_SAVE_PERIOD seconds,
    serialised and written in a worker thread (``CacheDir.close`` saves the last state).
    A failure is logged and tried again; never raises."""
    while True:
        await trio.sleep(META_SAVE_PERIOD)
        table = cachedir.meta_snapshot()
        if table is None:
            continue
        try:
            await trio.to_thread.run_sync(merge_meta_table, cachedir.root, table)
        except Exception as exc:  # a full disk, or a bug: tried again, never fatal
            if not isinstance(exc, OSError):
                contain("saving the metadata table", exc)
            cachedir.meta_changed(table)  # try again next period, and at close
            log.warning("cannot save the metadata table (sizes will be probed again on "
                        "the next mount): %s", exc)


T = TypeVar("T")


class FillQueue(Generic[T]):
    """Admission of whole-object fills: at most ``limit`` run; the rest wait in order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.waiting: collections.deque[T] = collections.deque()

    def admit(self) -> bool:
        """Count one more running fill if there is room; False: the caller must ``wait``."""
        if self.running >= self.limit:
            return False
        self.running += 1
        return True

    def wait(self, item: T) -> None:
        """``item`` waits for its turn (``ended`` hands it out)."""
        self.waiting.append(item)

    def force(self) -> None:
        """Count a fill that runs whatever the limit (policy ``all`` runs one at a time by
        itself; it still counts, so that others wait)."""
        self.running += 1

    def ended(self, start: Callable[[T], None]) -> None:
        """A running fill is over: ``start`` the waiting ones in order while there is room
        (``start`` calls ``admit``, or drops the item)."""
        self.running -= 1
        while self.waiting and self.running < self.limit:
            start(self.waiting.popleft())

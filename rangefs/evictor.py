"""Keeping a mount's cache within its budget: the eviction loop.

``budget.py`` keeps the books and names the least recently used victims; this module
acts on them, beside it. What it needs of an object is :class:`Evictable` (the store's
objects provide it): its open cache, whether a background task or an open is working on
it, and whether a read needs a range of blocks. It evicts in LRU order down to the
low-water mark, skipping (and counting as used now) what is needed; a victim whose cache
is closed is removed whole. Eviction on disk is ``LocalDownloadCache.evict`` (crash-safe
order: index first, then holes). A failure is logged and the extents kept; the loop goes
on. Trio thread; disk work in worker threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio

from .budget import Budget, Victim
from .cache import LocalDownloadCache
from .cachedir import CacheDir
from .errors import RangefsError
from .tasks import contain

log = logging.getLogger(__name__)

CHECK_PERIOD = 1.0  # seconds between looks at a budget that may shrink (a filling disk)


class Evictable(Protocol):
    """What the evictor needs of an object (``objects.MountedObject``)."""

    @property
    def name(self) -> str: ...
    def open_cache(self) -> LocalDownloadCache | None:
        """The cache of the current version, None if none is open (or it is stopped)."""
    def working(self) -> bool:
        """Being opened, filled or checked: none of it may be evicted now."""
    def needs(self, first: int, last: int) -> bool:
        """A read waits for or reads a block of ``first..last``."""
    def forget_closed(self) -> None:
        """Its closed cache's directory was removed."""


class Evictor:
    """The eviction loop of one cache directory (see the module docstring)."""

    def __init__(
        self, budget: Budget, cachedir: CacheDir, lookup: Callable[[str], Evictable | None]
    ) -> None:
        self.budget = budget
        self._cachedir = cachedir
        self._lookup = lookup
        self._wake = trio.Event()
        self._lock = trio.Lock()  # one eviction at a time: the loop's or evict_object's

    def wake(self) -> None:
        """The books went over the high-water mark: evict now. No await."""
        self._wake.set()

    async def run(self) -> None:
        """Scan the caches on disk once (a worker thread), then evict whenever the books
        go over the high-water mark. Runs until cancelled; never raises on a failed
        eviction."""
        budget = self.budget
        budget.load_closed(await trio.to_thread.run_sync(self._cachedir.usage))
        stuck = False
        while True:
            if budget.over():
                freed = await self.evict_down()
                if not freed and not stuck:
                    log.warning(
                        "the cache holds %d bytes, over its budget of %d, and nothing can be "
                        "evicted now (every cached block is being read, filled or checked)",
                        budget.used, budget.limit(),
                    )
                stuck = not freed
            with trio.move_on_after(CHECK_PERIOD):
                await self._wake.wait()
            self._wake = trio.Event()

    async def evict_object(self, key: str) -> int:
        """Evict every cached block of ``key`` that no read waits for or reads and that is
        not being opened, filled or checked (``rangefs evict``); bytes freed."""
        async with self._lock:
            budget = self.budget
            before = budget.used
            obj = self._lookup(key)
            if obj is not None and obj.open_cache() is not None:
                extents = budget.extents_of(key)
                if extents:
                    await self._evict_extents(Victim(key, extents))
            elif budget.closed_bytes(key) is not None:
                await self._remove_closed(key)
            return max(0, before - budget.used)

    async def evict_down(self) -> int:
        """Evict in LRU order until the books are at the low-water mark; bytes freed."""
        async with self._lock:
            return await self._evict_down()

    async def _evict_down(self) -> int:
        budget = self.budget
        freed = 0
        skipped = 0
        while budget.used > budget.low_water():
            victim = budget.oldest(budget.used - budget.low_water())
            if victim is None or skipped > budget.held_extents() + 1:
                break
            before = budget.used
            if victim.extents:
                if not await self._evict_extents(victim):
                    skipped += len(victim.extents)
            else:
                await self._remove_closed(victim.key)
            freed += max(0, before - budget.used)
        return freed

    async def _remove_closed(self, key: str) -> None:
        obj = self._lookup(key)
        if obj is not None and obj.open_cache() is not None:
            self.budget.forget_closed(key)  # opened again meanwhile: counted per extent
            return
        if not await trio.to_thread.run_sync(self._cachedir.remove, key):
            self.budget.forget_closed(key)  # another process has it open: its books
            return
        self.budget.removed(key)
        if obj is not None:
            obj.forget_closed()

    async def _evict_extents(self, victim: Victim) -> bool:
        """Evict ``victim``'s extents that nothing needs; False when all of them had to
        be skipped (they then count as used now)."""
        budget = self.budget
        obj = self._lookup(victim.key)
        cache = obj.open_cache() if obj is not None else None
        if obj is None or cache is None:
            budget.drop(victim.key)  # its cache was closed or dropped meanwhile
            return True
        if obj.working():
            budget.skip(victim.key, victim.extents)
            return False
        runs, evictable, needed = [], [], []
        for extent in victim.extents:
            first, last = budget.extent_blocks_range(extent)
            if obj.needs(first, last):
                needed.append(extent)
            else:
                runs.append((first, last))
                evictable.append(extent)
        budget.skip(victim.key, needed)
        if not runs:
            return False
        try:
            # asked again once the cache's lock is held: a read may have begun meanwhile
            blocks = await cache.evict(runs, lambda a, b: obj.working() or obj.needs(a, b))
        except RangefsError as exc:
            contain(f"eviction from {obj.name}", exc)
            budget.skip(victim.key, evictable)
            return False
        # an extent a read needed by the time the lock was held, or that a fetch stored
        # into again while its eviction was written out, keeps its blocks: it stays in
        # the books, as used now
        bitmap = cache.bitmap
        gone: list[int] = []
        kept: list[int] = []
        for extent in evictable:
            first, last = budget.extent_blocks_range(extent)
            (gone if bitmap.first_set(first, last + 1) is None else kept).append(extent)
        budget.evicted(victim.key, gone, blocks)
        budget.skip(victim.key, kept)
        return blocks > 0

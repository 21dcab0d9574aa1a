"""The space budget of a mount's cache: accounting, and which blocks to evict.

A mount caches blocks, not objects (DESIGN.md §6): data files are sparse, the space of the
cache is counted per stored block, and past the budget the least recently used runs of
blocks of any object, open or not, are evicted.

- **Limit**: the smaller of ``--cache-size`` and what the file system can give the cache
  while keeping ``--cache-min-free`` free (default 5 % of the file system, as
  mountpoint-s3 keeps): ``held + available - min_free``, from ``statvfs`` sampled at most
  every STATVFS_PERIOD seconds. Other programs filling the disk shrink it.
- **Unit**: an *extent* of EXTENT_BYTES (4 MiB, or one block when blocks are larger): a
  run of blocks of one object. LRU state per 64 KiB block would be millions of entries
  for a large cache; 4 MiB is the longest request a fill sends, a hole of 4 MiB frees real
  space on every file system, and the table holds one entry per extent that has a cached
  block, so memory follows the size of the cache, not of the objects (a 100 GiB cache:
  25,600 entries).
- **Order**: least recently used first; an extent is used when a block of it is stored or
  read. Caches not open in this process (from earlier mounts, or closed while idle) are
  accounted per object (their bytes on disk, last use = when they were closed or the
  directory's mtime) and evicted whole; the oldest of them and the oldest extent are
  compared by last use.
- **Hysteresis**: eviction starts when the cache holds more than ``limit - limit/32``
  and goes on down to ``limit - limit/16``, so it works in batches (one index write per
  object per batch). The cache stays within ``limit + EVICTION_MARGIN``: the margin is
  what arrives while a batch is written out, plus the index files.

What may be evicted is the owner's decision (``ObjectStore``: never an extent a read waits
for or reads, never an object being filled or checked); this module only keeps the books.
Trio thread only. Written here: no library keeps an LRU of block runs across files.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .ranges import ByteRangesTracker

log = logging.getLogger(__name__)

EXTENT_BYTES = 4 << 20
EVICTION_MARGIN = 64 << 20  # bytes the cache may exceed its limit by (see the docstring)
STATVFS_PERIOD = 0.1  # seconds between samples of the file system's free space
DEFAULT_MIN_FREE = "5%"


@dataclass(frozen=True)
class MinFree:
    """``--cache-min-free``: bytes, or a percentage of the cache's file system."""

    nbytes: int = 0
    percent: float = 0.0

    @classmethod
    def parse(cls, text: str) -> MinFree | None:
        """``5%`` / ``0.5%`` -> a percentage; None if ``text`` is not one (the caller then
        reads it as a size). ValueError for 100 % or more."""
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", text)
        if match is None:
            return None
        percent = float(match.group(1))
        if percent >= 100:
            raise ValueError(f"{text.strip()} is not less than 100%")
        return cls(percent=percent)

    def of(self, total: int) -> int:
        """Bytes to keep free on a file system of ``total`` bytes."""
        return max(self.nbytes, int(total * self.percent / 100))

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else f"{self.nbytes} bytes"


@dataclass(frozen=True)
class Victim:
    """What to evict next: a whole closed object (``extents`` empty), or extents of an
    object whose cache is open (extent numbers, oldest first)."""

    key: str
    extents: tuple[int, ...] = ()


class Budget:
    """The books of one cache directory (see the module docstring)."""

    def __init__(
        self, root: Path, block_size: int, cache_size: int | None, min_free: MinFree
    ) -> None:
        self.root = root
        self.block_size = block_size
        self.extent_blocks = max(1, EXTENT_BYTES // block_size)
        self.cache_size = cache_size
        self.min_free = min_free
        self.used = 0  # bytes held: blocks of open caches + closed objects on disk
        # (key, extent) -> last use (monotonic seconds), least recently used first
        self._extents: collections.OrderedDict[tuple[str, int], float] = (
            collections.OrderedDict()
        )
        self._open: dict[str, int] = {}  # key -> bytes of its open cache
        self._extents_of: dict[str, set[int]] = {}
        # closed caches on disk: key -> (bytes, last use), least recently used first
        self._closed: collections.OrderedDict[str, tuple[int, float]] = (
            collections.OrderedDict()
        )
        self._capacity: int | None = None  # used + available - min_free at the last sample
        self._sampled_at = -1.0
        self.evicted_bytes = 0  # since the start, for status and logs

    # -- the limit ------------------------------------------------------------------------

    def limit(self) -> int:
        """Bytes the cache may hold now. Samples statvfs at most every STATVFS_PERIOD."""
        now = time.monotonic()
        if self._capacity is None or now - self._sampled_at >= STATVFS_PERIOD:
            self._sampled_at = now
            try:
                vfs = os.statvfs(self.root)
            except OSError as exc:
                log.debug("statvfs of %s: %s", self.root, exc)
            else:
                total = vfs.f_blocks * vfs.f_frsize
                available = vfs.f_bavail * vfs.f_frsize
                self._capacity = self.used + available - self.min_free.of(total)
        limit = self._capacity if self._capacity is not None else 1 << 62
        if self.cache_size is not None:
            limit = min(limit, self.cache_size)
        return max(0, limit)

    def last_limit(self) -> int:
        """The limit as of the last statvfs sample, without sampling: for other threads
        (the metrics server) and status, which must not touch the books."""
        capacity = self._capacity
        limit = capacity if capacity is not None else 1 << 62
        if self.cache_size is not None:
            limit = min(limit, self.cache_size)
        return max(0, limit)

    def high_water(self) -> int:
        """Above this the evictor runs."""
        limit = self.limit()
        return limit - limit // 32

    def low_water(self) -> int:
        """The evictor goes down to this."""
        limit = self.limit()
        return limit - limit // 16

    def over(self) -> bool:
        return self.used > self.high_water()

    def fits(self, size: int) -> bool:
        """An object of ``size`` bytes can be held whole without evicting any of it."""
        return size <= self.low_water()

    # -- accounting -----------------------------------------------------------------------

    def load_closed(self, scanned: Iterable[tuple[float, int, str]]) -> None:
        """The caches found on disk at start: (last use as epoch seconds, bytes, key),
        oldest first (``CacheDir.usage``). Keys already opened are skipped."""
        offset = time.monotonic() - time.time()
        for when, nbytes, key in scanned:
            if key in self._open or key in self._closed:
                continue
            self._closed[key] = (nbytes, when + offset)
            self.used += nbytes

    def extents_with_blocks(self, bitmap: ByteRangesTracker) -> list[int]:
        """The extents of ``bitmap`` that hold a cached block, in order. Pure: a worker
        thread may call it on a bitmap nobody changes meanwhile (one step per extent)."""
        eb = self.extent_blocks
        out: list[int] = []
        block = bitmap.first_set(0)
        while block is not None:
            extent = block // eb
            out.append(extent)
            block = bitmap.first_set((extent + 1) * eb)
        return out

    def opened(self, key: str, extents: list[int], held: int) -> None:
        """``key``'s cache is open holding ``held`` bytes in ``extents``
        (``extents_with_blocks``): accounted per extent from now on, as old as the
        object's last use, so before newer ones."""
        nbytes, when = self._closed.pop(key, (0, time.monotonic()))
        self.used -= nbytes
        self.drop(key)
        for extent in reversed(extents):
            self._extents[(key, extent)] = when
            self._extents.move_to_end((key, extent), last=False)
        self._extents_of[key] = set(extents)
        self._open[key] = held
        self.used += held

    def stored(self, key: str, first: int, count: int) -> None:
        """``count`` blocks from ``first`` were stored in ``key``'s open cache."""
        nbytes = count * self.block_size
        self.used += nbytes
        self._open[key] = self._open.get(key, 0) + nbytes
        self.touched(key, first, first + count - 1, add=True)

    def touched(self, key: str, first: int, last: int, *, add: bool = False) -> None:
        """Blocks ``first..last`` of ``key`` were used now; ``add``: they are stored."""
        now = time.monotonic()
        eb = self.extent_blocks
        extents = self._extents_of.setdefault(key, set()) if add else self._extents_of.get(key)
        if extents is None:
            return
        table = self._extents
        for extent in range(first // eb, last // eb + 1):
            item = (key, extent)
            if item in table:
                table[item] = now
                table.move_to_end(item)
            elif add:
                table[item] = now
                extents.add(extent)

    def evicted(self, key: str, extents: Iterable[int], blocks: int) -> None:
        """``blocks`` blocks of ``extents`` of ``key`` were evicted (extents now empty)."""
        nbytes = blocks * self.block_size
        self.used -= nbytes
        self._open[key] = max(0, self._open.get(key, 0) - nbytes)
        self.evicted_bytes += nbytes
        own = self._extents_of.get(key, set())
        for extent in extents:
            self._extents.pop((key, extent), None)
            own.discard(extent)

    def closed(self, key: str, nbytes: int) -> None:
        """``key``'s cache was closed holding ``nbytes`` on disk (its blocks and index)."""
        last = max((self._extents.get((key, e), 0.0) for e in self._extents_of.get(key, ())),
                   default=time.monotonic())
        self.drop(key)
        self._closed[key] = (nbytes, last)
        self.used += nbytes  # appended as the newest: it was in use moments ago

    def drop(self, key: str) -> None:
        """Forget what ``key``'s open cache held (it was reset or closed)."""
        self.used -= self._open.pop(key, 0)
        for extent in self._extents_of.pop(key, ()):
            self._extents.pop((key, extent), None)

    def forget_closed(self, key: str) -> None:
        """``key``'s closed-cache entry is stale (it was opened again): drop it."""
        nbytes, _ = self._closed.pop(key, (0, 0.0))
        self.used -= nbytes

    def removed(self, key: str) -> None:
        """``key``'s closed cache directory was removed."""
        nbytes, _ = self._closed.pop(key, (0, 0.0))
        self.used -= nbytes
        self.evicted_bytes += nbytes

    # -- what to evict --------------------------------------------------------------------

    def oldest(self, need: int, batch: int = 64) -> Victim | None:
        """The next victim in LRU order: the oldest closed object if it is older than the
        oldest extent; else the oldest extents, as long as they are one object's and in
        a row in the LRU order (none newer than another object's), at most ``batch`` and
        no more than cover ``need`` bytes. None when nothing is held."""
        closed = next(iter(self._closed.items()), None)
        first = next(iter(self._extents.items()), None)
        if closed is not None and (first is None or closed[1][1] <= first[1]):
            return Victim(closed[0])
        if first is None:
            return None
        key = first[0][0]
        extent_bytes = self.extent_blocks * self.block_size
        oldest_closed = closed[1][1] if closed is not None else None
        extents: list[int] = []
        for (owner, extent), when in self._extents.items():
            if owner != key or (oldest_closed is not None and when > oldest_closed):
                break
            extents.append(extent)
            if len(extents) >= batch or len(extents) * extent_bytes >= need:
                break
        return Victim(key, tuple(extents))

    def skip(self, key: str, extents: Iterable[int]) -> None:
        """``extents`` of ``key`` may not be evicted now (in use): count them as used now."""
        now = time.monotonic()
        for extent in extents:
            item = (key, extent)
            if item in self._extents:
                self._extents[item] = now
                self._extents.move_to_end(item)

    def extent_blocks_range(self, extent: int) -> tuple[int, int]:
        """The first and last block index of ``extent``."""
        first = extent * self.extent_blocks
        return first, first + self.extent_blocks - 1

    def held_extents(self) -> int:
        return len(self._extents)

    def extents_of(self, key: str) -> tuple[int, ...]:
        """The extents of ``key``'s open cache that hold blocks, oldest first."""
        own = self._extents_of.get(key, set())
        return tuple(extent for (k, extent) in self._extents if k == key and extent in own)

    def closed_bytes(self, key: str) -> int | None:
        """Bytes of ``key``'s closed cache on disk; None if it has none."""
        entry = self._closed.get(key)
        return None if entry is None else entry[0]

"""The read-ahead policy of one reader (one open file handle): pure decisions, no I/O.

For each read of a handle, :meth:`ReadAhead.on_read` says what to do beside it:

- **Remote read-ahead.** Reads that continue where the last one ended are sequential;
  from the second one on, the blocks past the read are fetched in the background, a
  window that starts at FIRST_READAHEAD and doubles per sequential read up to
  MAX_READAHEAD. A read elsewhere resets it: a random reader fetches only what it reads.
  (The fetcher serves the windows of all readers in turn: ``ObjectFetcher.prefetch``.)
  A sequential reader is also what starts a whole-object fill under ``--prefetch open``;
  that decision, and the budget check, belong to the caller (``objects.py``).
- **Cache-file preload.** The cached bytes a sequential reader reads next are brought
  into the page cache by a worker thread, CACHE_READAHEAD ahead, topped up when half of
  it is consumed (the kernel's own read-ahead of one sequential stream gave 0.5-0.7 GB/s
  here; ``cache.preload`` 1.4-2.1 GB/s). ``cp``, ``cat`` and ``sha256sum`` begin with a
  read at offset 0: FIRST_PRELOAD is preloaded after it, before the reads show a pattern.

Sizes in bytes. Trio thread (or any single thread): no locking.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_READAHEAD = 32 << 20  # bytes a sequential reader's read-ahead grows to
FIRST_READAHEAD = 4 << 20  # read-ahead at the second sequential read, doubling from there
CACHE_READAHEAD = 64 << 20  # bytes of the cache file preloaded ahead of a sequential reader
FIRST_PRELOAD = 16 << 20  # preloaded after the first read of a handle when it is at offset 0


@dataclass(frozen=True)
class Plan:
    """What to do beside one read: ``preload`` the byte range ``[start, stop)`` of the
    cache file (None: nothing), and, when ``sequential``, fetch ``readahead`` bytes past
    the read in the background (or fill the whole object, by policy)."""

    preload: tuple[int, int] | None
    sequential: bool
    readahead: int


class ReadAhead:
    """The read-ahead state of one handle of an object of ``size`` bytes."""

    __slots__ = ("_next_offset", "_preloaded_to", "_readahead", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._next_offset = -1  # where a sequential reader reads next
        self._readahead = 0  # bytes of read-ahead, grows while reads stay sequential
        self._preloaded_to = 0  # the cache file is being preloaded up to here

    def on_read(self, offset: int, end: int) -> Plan:
        """A read of ``[offset, end)`` (``end`` clamped at EOF) is starting."""
        starts_at_zero = offset == 0 and self._next_offset < 0
        if offset == self._next_offset:
            self._readahead = min(MAX_READAHEAD, max(2 * self._readahead, FIRST_READAHEAD))
        else:
            self._readahead = 0
            self._preloaded_to = 0
        self._next_offset = end
        preload = None
        if starts_at_zero:
            preload = self._preload(end, end + FIRST_PRELOAD)
        if not self._readahead:
            return Plan(preload, False, 0)
        if self._preloaded_to < end + CACHE_READAHEAD // 2:
            preload = self._preload(max(end, self._preloaded_to), end + CACHE_READAHEAD)
        return Plan(preload, True, self._readahead)

    def _preload(self, start: int, stop: int) -> tuple[int, int] | None:
        self._preloaded_to = min(self._size, stop)
        return (start, self._preloaded_to) if self._preloaded_to > start else None

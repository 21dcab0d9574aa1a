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
- **A random reader of the whole file.** Some readers read everything, in no order: a
  program that maps the file and touches all of it (a model loader, a hash table), a
  tool walking a file's records by an index. Through ``mmap`` each page fault reaches
  FUSE as one read of the kernel's read-around window: 1 MiB (the mount's read-ahead)
  centred on the faulting page, or just that 4 KiB page under ``MADV_RANDOM``; one
  fault at a time per thread, each a round trip to the origin while it misses (a 256 MiB
  file took 7-21 × a cold ``cp``). :meth:`ReadAhead.on_read` says ``whole`` once the
  handle's non-sequential reads show all three of:

  - *coverage rising*: they made the mount fetch at least 1/WHOLE_FRACTION of the file,
    and at least WHOLE_MIN_FETCHED (the caller says how many bytes of each read's blocks
    were not cached): a few random reads of a small file fetch only their blocks;
  - *no locality*: those that fetched landed in at least MIN_REGIONS of the REGIONS equal
    parts of the file (a reader of one hot area, or of a few scattered records, stays in
    a few);
  - *mostly new*: at least half of them fetched (a reader that keeps coming back to
    what it read before finds it cached).

  The caller then fills the whole object in the background (``--prefetch open``, when it
  fits the cache budget), behind readers' own requests, so that later faults find their
  blocks cached. Bounds: a reader that reads only a part of a file makes the mount fetch
  at most WHOLE_FRACTION × what it fetched itself, and nothing more before it fetched
  WHOLE_MIN_FETCHED (a file of 4 GiB is filled after 64 MiB fetched by random reads,
  1,024 blocks of 64 KiB; the 200 random 4 KiB reads of the benchmark's scenario 4 fetch
  200; a 256 MiB file read through ``mmap`` is filled after 4 or 5 faults of 1 MiB, as is
  one whose reader reads 4 scattered MiB of it and stops); the state is a few integers.
  ``--prefetch none`` ignores it.

Sizes in bytes. Trio thread (or any single thread): no locking.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_READAHEAD = 32 << 20  # bytes a sequential reader's read-ahead grows to
FIRST_READAHEAD = 4 << 20  # read-ahead at the second sequential read, doubling from there
CACHE_READAHEAD = 64 << 20  # bytes of the cache file preloaded ahead of a sequential reader
FIRST_PRELOAD = 16 << 20  # preloaded after the first read of a handle when it is at offset 0
# a random reader is taken to read the whole file (see above) once its reads fetched
# 1/WHOLE_FRACTION of it and WHOLE_MIN_FETCHED bytes, landing in MIN_REGIONS of its REGIONS
# parts, half of them fetching
WHOLE_FRACTION = 64
WHOLE_MIN_FETCHED = 4 << 20
REGIONS = 64
MIN_REGIONS = 4


@dataclass(frozen=True)
class Plan:
    """What to do beside one read: ``preload`` the byte range ``[start, stop)`` of the
    cache file (None: nothing), and, when ``sequential``, fetch ``readahead`` bytes past
    the read in the background (or fill the whole object, by policy); ``whole``: the
    reader reads the whole file in no order (fill it, by policy)."""

    preload: tuple[int, int] | None
    sequential: bool
    readahead: int
    whole: bool = False


class ReadAhead:
    """The read-ahead state of one handle of an object of ``size`` bytes."""

    __slots__ = ("_fetched", "_fetching_reads", "_next_offset", "_preloaded_to",
                 "_random_reads", "_readahead", "_regions", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._next_offset = -1  # where a sequential reader reads next
        self._readahead = 0  # bytes of read-ahead, grows while reads stay sequential
        self._preloaded_to = 0  # the cache file is being preloaded up to here
        # the non-sequential reads: how many, how many fetched, bytes they fetched, and
        # the parts of the file those landed in (bit i: part i of REGIONS)
        self._random_reads = 0
        self._fetching_reads = 0
        self._fetched = 0
        self._regions = 0

    def on_read(self, offset: int, end: int, missing: int = 0) -> Plan:
        """A read of ``[offset, end)`` (``end`` clamped at EOF) is starting; ``missing``:
        bytes of its blocks that are not cached (this read makes the mount fetch them)."""
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
            return Plan(preload, False, 0, self._random(offset, missing))
        if self._preloaded_to < end + CACHE_READAHEAD // 2:
            preload = self._preload(max(end, self._preloaded_to), end + CACHE_READAHEAD)
        return Plan(preload, True, self._readahead)

    def _random(self, offset: int, missing: int) -> bool:
        """Count a non-sequential read; True once the reader looks like one that reads
        the whole file (see the module docstring)."""
        self._random_reads += 1
        if missing > 0:
            self._fetching_reads += 1
            self._fetched += missing
            self._regions |= 1 << min(REGIONS - 1, offset * REGIONS // max(1, self._size))
        return (self._fetched >= max(WHOLE_MIN_FETCHED, self._size / WHOLE_FRACTION)
                and self._regions.bit_count() >= MIN_REGIONS
                and 2 * self._fetching_reads >= self._random_reads)

    def _preload(self, start: int, stop: int) -> tuple[int, int] | None:
        self._preloaded_to = min(self._size, stop)
        return (start, self._preloaded_to) if self._preloaded_to > start else None

"""The local block cache of one remote object: ``LocalDownloadCache``.

Files, inside the object's directory (0700, created if missing; files 0600):

- ``data``: the object's bytes at their own offsets: preallocated to the object's size
  (``reserve=True``, for downloads: ``cachefiles.reserve_space``) or sparse
  (``reserve=False``, for mounts: blocks take space as they are written, and ``evict``
  gives the space of a run of blocks back).
- ``index`` (+ ``index.prev``, transient ``index.tmp``): which blocks are durable, plus the
  object's identity (URL, size, block size, ETag, Last-Modified) and a CRC32; the format is
  in ``cachefiles``.
- ``lock``: ``flock``-ed exclusively while the cache is open (another open of the same
  directory, in this process or another, gets ``CacheLocked``).

Contract. One owner: one process, one trio thread. ``write_at``/``write_block`` pwrite a
whole block and then set its bit (which fires ``bitmap.block_event`` and the tail notify):
from then on ``read_at`` serves it; ``write_blocks`` does the same for a run of blocks with
one ``pwritev``. Nothing is fsynced per block. ``flush()`` (called by the
owner when ``needs_flush()``, and at the end) takes a snapshot of the bitmap, fdatasyncs the
data file, then atomically writes the index with that snapshot — so the index only ever
claims blocks whose bytes were durable before the claim was written (DESIGN §2.2), and a
block set after the snapshot is claimed by the next flush. ``close()`` does a last flush
synchronously. A block that is already cached is never rewritten.

Eviction (``evict``, mounts): the blocks' bits are cleared, then — before any byte goes —
the data file is fdatasynced and an index that no longer claims them is written durably,
without ``index.prev`` (no older generation may claim them either); only then are holes
punched, under the write lock and only over blocks still clear (a block fetched again
meanwhile keeps its new bytes). A crash at any point leaves an index that claims only
blocks whose bytes are on disk. Readers of blocks being evicted are the caller's affair
(the mount never evicts a range that a read waits for or reads).

``open()`` resumes from ``index`` if it is valid and its identity equals the caller's; if it
is missing or corrupt (torn, bad CRC/magic/length) it falls back to ``index.prev`` (an
older, equally valid claim) and repairs ``index``; a corrupt or foreign (another URL, size,
block size or validator) index, or a data file of the wrong length, is logged as a WARNING
and the object starts over (index removed first, then the data file re-reserved).

What a crash (kill -9, power loss) leaves: a data file whose blocks set since the last flush
may or may not be on disk, and an index (or ``index.prev``) claiming only blocks that were
durable at its last flush. On re-open those unclaimed blocks are simply fetched again;
nothing claimed is fetched twice, and no block is claimed that is not durable.

Errors: misuse -> ``InvalidOffset`` / ``InvalidBlockSize``; reading a block that is not
cached -> ``UncachedRange``; use after ``close()`` -> ``CacheClosed``; OS errors ->
``InternalError`` (ENOSPC -> ``NotEnoughSpace``), raised ``from`` the OSError. A failed
fdatasync makes the cache unusable (every later read, write or flush raises
``InternalError``), since the kernel may have dropped the unsynced pages.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, Self

import trio

from rangefs import errors
from rangefs.cachefiles import (
    DEFAULT_HEADROOM,
    IndexRecord,
    ObjectIdentity,
    allocated_bytes,
    check_space,
    create_new_files_for_cache,
    create_sparse,
    ensure_private_dir,
    open_data_file,
    punch_hole,
    pwritev_all,
    read_index_record,
    reserve_space,
    start_writeback,
    write_index,
)
from rangefs.ranges import ByteRange, ByteRanges, block_span

__all__ = ["DATA_NAME", "INDEX_NAME", "LOCK_NAME", "DownloadCache", "LocalDownloadCache"]

log = logging.getLogger(__name__)

# The block map of an object is kept in memory (1 bit per block): at most this many bytes
# (2^31 blocks: 128 TiB in blocks of 64 KiB). A larger object needs larger blocks.
MAX_BITMAP_BYTES = 256 << 20

DATA_NAME = "data"
INDEX_NAME = "index"
LOCK_NAME = "lock"

Buffer = bytes | bytearray | memoryview

#: ``needs_flush`` waits at least this many times as long as the last index write took.
FLUSH_COST_FACTOR = 20


def _now() -> float:
    """trio's clock inside ``trio.run`` (so autojump clocks work), else time.monotonic."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


def _byte_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _os_error(what: str, exc: OSError) -> errors.RangefsError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.NotEnoughSpace(f"{what}: no space left: {exc}")
    return errors.InternalError(f"{what}: {exc}")


PRELOAD_CHUNK = 2 << 20  # bytes per read of preload(): the best of 1-8 MiB measured here
_DROP_BUFFER = 4096  # preload() reads every page of a chunk into this one buffer
assert PRELOAD_CHUNK // _DROP_BUFFER <= 1024  # IOV_MAX: one preadv() per chunk


class DownloadCache(Protocol):
    """What fetchers and readers need from a block cache (``LocalDownloadCache`` is one)."""

    @property
    def identity(self) -> ObjectIdentity: ...
    @property
    def size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def bitmap(self) -> ByteRanges: ...
    def cached_bytes_and_blocks(self) -> tuple[int, int]: ...
    def complete(self) -> bool: ...
    def is_cached(self, block: int) -> bool: ...
    def next_outstanding(self, start: int) -> tuple[int, ByteRange] | None: ...
    def next_cached(self, start: int) -> tuple[int, ByteRange] | None: ...
    def write_at(self, data: Buffer, offset: int) -> None: ...
    def write_block(self, index: int, data: Buffer) -> None: ...
    def write_blocks(self, first: int, parts: Sequence[Buffer]) -> int: ...
    def read_at(self, offset: int, size: int) -> bytes: ...
    def needs_flush(self) -> bool: ...
    async def flush(self) -> None: ...


class LocalDownloadCache:
    """The block cache of one object in one directory. Create with ``open()``.

    Called from one trio thread only; ``flush`` runs its blocking part in a worker thread,
    and a ``threading.Lock`` serialises that part with ``close``/``invalidate``.
    """

    def __init__(
        self,
        *,
        directory: Path,
        identity: ObjectIdentity,
        fd: int,
        lock_fd: int,
        bitmap: ByteRanges,
        generation: int,
        flush_blocks: int,
        flush_interval: float,
        headroom: int,
        reserve: bool = True,
    ) -> None:
        """Internal: use ``LocalDownloadCache.open``."""
        self._directory = directory
        self._data_path = directory / DATA_NAME
        self._index_path = directory / INDEX_NAME
        self._identity = identity
        self._fd = fd
        self._lock_fd = lock_fd
        self._bitmap = bitmap
        self._generation = generation
        self._flush_blocks = flush_blocks
        self._flush_interval = flush_interval
        # seconds the last index write took (its fsyncs; not the fdatasync of the data, whose
        # writeback grows with the blocks written and would feed back into the interval)
        self._flush_cost = 0.0
        self._headroom = headroom
        self._closed = False
        self._failed: errors.InternalError | None = None
        self._nowait = _RWF_NOWAIT != 0  # preadv(RWF_NOWAIT) works on this file system
        # blocks newly set since the last snapshot, and when the oldest of them was set
        self._dirty = 0
        self._dirty_since: float | None = None
        # count_set() of the bitmap that the index on disk holds (bits only grow between
        # persists, so a different count means unpersisted blocks)
        self._persisted_count = bitmap.count_set()
        self._epoch = 0  # bumped by invalidate(); a flush of an older epoch is dropped
        self._flush_lock = trio.Lock()
        self._persist_lock = threading.Lock()
        self._reserve = reserve
        # held around every pwrite-then-set-bit and around hole punching, so that a punch
        # never destroys a block written (and claimed) after the eviction cleared it
        self._write_lock = threading.Lock()
        #: called with (first block, count) after blocks were newly stored (trio thread)
        self.stored_listener: Callable[[int, int], None] | None = None
        #: bytes written after which the data file's dirty pages are handed to the disk
        #: (``start_writeback``); 0 leaves that to the kernel. Set by the owner after open.
        self.write_behind = 0
        self._unhanded = 0  # bytes written since the last start_writeback

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        identity: ObjectIdentity,
        *,
        flush_blocks: int = 512,
        flush_interval: float = 0.25,
        headroom: int = DEFAULT_HEADROOM,
        reserve: bool = True,
    ) -> Self:
        """Open (resume) or create the cache of ``identity`` in ``directory``. Blocking.

        See the module docstring for the resume / fall back / start over rules. Raises
        ``CacheLocked`` if the directory is already open, ``NotEnoughSpace`` (before
        anything is written) if a new object does not fit (``reserve``), ``InternalError``
        for OS errors. ``flush_blocks`` / ``flush_interval`` (seconds) drive
        ``needs_flush``. Without ``reserve`` the data file is sparse, and one left
        preallocated by an earlier version is made sparse where no block is cached.
        """
        if identity.bitmap_bytes > MAX_BITMAP_BYTES:
            raise errors.NotEnoughSpace(
                f"cannot cache {identity.size} bytes in blocks of {identity.block_size}: its "
                f"block map alone would take {identity.bitmap_bytes >> 20} MiB of memory; "
                "use a larger --block-size"
            )
        directory = Path(directory)
        ensure_private_dir(directory)
        lock_fd = _lock_directory(directory)
        try:
            return cls._open_locked(
                directory, identity, lock_fd, flush_blocks, flush_interval, headroom, reserve
            )
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(
        cls,
        directory: Path,
        identity: ObjectIdentity,
        lock_fd: int,
        flush_blocks: int,
        flush_interval: float,
        headroom: int,
        reserve: bool,
    ) -> Self:
        data_path = directory / DATA_NAME
        index_path = directory / INDEX_NAME
        record = _load_index(index_path, identity)
        fd = _open_matching_data(data_path, identity) if record is not None else None
        if fd is None or record is None:
            log.info("%s: starting a new cache of %d bytes", directory, identity.size)
            create_new_files_for_cache(
                data_path, index_path, identity, headroom=headroom, reserve=reserve
            )
            fd = open_data_file(data_path)
            record = IndexRecord(identity, bytes(identity.bitmap_bytes), 0)
        try:
            bitmap = ByteRanges.from_bytes(identity.size, identity.block_size, record.bitmap)
            cache = cls(
                directory=directory,
                identity=identity,
                fd=fd,
                lock_fd=lock_fd,
                bitmap=bitmap,
                generation=record.generation,
                flush_blocks=flush_blocks,
                flush_interval=flush_interval,
                headroom=headroom,
                reserve=reserve,
            )
        except BaseException:
            os.close(fd)
            raise
        if not reserve:
            cache._punch_uncached()
        log.debug(
            "%s: opened, %d of %d blocks cached", directory, bitmap.count_set(), bitmap.num_blocks
        )
        return cache

    # -- properties -------------------------------------------------------------------------

    @property
    def identity(self) -> ObjectIdentity:
        """The object version this cache holds."""
        return self._identity

    @property
    def size(self) -> int:
        """Object size in bytes."""
        return self._identity.size

    @property
    def block_size(self) -> int:
        """Block size in bytes."""
        return self._identity.block_size

    @property
    def num_blocks(self) -> int:
        """Number of blocks."""
        return self._bitmap.num_blocks

    @property
    def bitmap(self) -> ByteRanges:
        """The live bitmap, for queries and waiting (tail, block_event). Do not mutate it.
        ``invalidate`` with another size or block size replaces it with a new object."""
        return self._bitmap

    @property
    def directory(self) -> Path:
        """The object's cache directory."""
        return self._directory

    @property
    def data_path(self) -> Path:
        """The data file."""
        return self._data_path

    @property
    def index_path(self) -> Path:
        """The index file."""
        return self._index_path

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    # -- queries (work after close too) -------------------------------------------------

    def cached_bytes_and_blocks(self) -> tuple[int, int]:
        """Bytes (real block sizes) and blocks cached."""
        return self._bitmap.cached_bytes(), self._bitmap.count_set()

    def complete(self) -> bool:
        """True if every block is cached (always for a 0-byte object)."""
        return self._bitmap.complete()

    def is_cached(self, block: int) -> bool:
        """True if block ``block`` is cached (False out of range)."""
        return self._bitmap.is_block_set(block)

    def next_outstanding(self, start: int) -> tuple[int, ByteRange] | None:
        """``bitmap.next_clear(start)``: (index+1, range) of the next missing block."""
        return self._bitmap.next_clear(start)

    def next_cached(self, start: int) -> tuple[int, ByteRange] | None:
        """``bitmap.next_set(start)``: (index+1, range) of the next cached block."""
        return self._bitmap.next_set(start)

    # -- data -----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise errors.CacheClosed(f"cache {self._directory} is closed")
        if self._failed is not None:
            raise errors.InternalError(
                f"cache {self._directory} is unusable after an earlier error: {self._failed}"
            ) from self._failed

    def write_block(self, index: int, data: Buffer) -> None:
        """``write_at(data, index * block_size)``; an index out of range is InvalidOffset."""
        if not 0 <= index < self.num_blocks:
            self._check_usable()
            raise errors.InvalidOffset(
                f"block {index} out of range [0, {self.num_blocks}) for {self._directory}"
            )
        self.write_at(data, index * self.block_size)

    def write_at(self, data: Buffer, offset: int) -> None:
        """Store one whole block at ``offset`` and mark it cached. Sync, no fsync.

        Validation, in the seed's order: ``offset`` < 0, past the last block's offset, or not
        block-aligned -> ``InvalidOffset``; ``len(data)`` > block size -> ``InvalidBlockSize``;
        the last block must be exactly its (short) size, any other exactly the block size,
        else ``InvalidBlockSize``. A block already cached is left untouched. The bytes are
        written (whole buffer, retrying short writes) before the bit is set, so waiters woken
        by ``block_event`` can read them at once. ``data`` may be reused after the call.
        """
        self._check_usable()
        bs = self.block_size
        n = self.num_blocks
        last_offset = (n - 1) * bs
        if offset < 0 or n == 0 or offset > last_offset or offset % bs:
            raise errors.InvalidOffset(
                f"offset {offset} is not the start of a block of {self._directory} "
                f"(size {self.size}, block size {bs})"
            )
        view = _byte_view(data)
        length = len(view)
        if length > bs:
            raise errors.InvalidBlockSize(f"{length} bytes exceed the block size {bs}")
        want = self.size - last_offset if offset == last_offset else bs
        if length != want:
            raise errors.InvalidBlockSize(
                f"{length} bytes at offset {offset}: the block there is {want} bytes"
            )
        index = offset // bs
        if self._bitmap.is_block_set(index):
            return
        pos = offset
        with self._write_lock:
            try:
                while view:
                    written = os.pwrite(self._fd, view, pos)
                    if written <= 0:
                        raise errors.InternalError(
                            f"short write of block {index} of {self._directory}"
                        )
                    view = view[written:]
                    pos += written
            except OSError as exc:
                raise _os_error(f"writing block {index} of {self._directory}", exc) from exc
            self._bitmap.set_block(index)
        self._written(length)
        self._stored(index, 1, 1)

    def write_blocks(self, first: int, parts: Sequence[Buffer]) -> int:
        """Store consecutive whole blocks from block ``first`` on: their bytes are the
        concatenation of ``parts``. Returns how many blocks were written. Sync, no fsync.

        One ``pwritev`` for the run (a fetcher's chunk completes several blocks at once).
        The run must end at a block boundary or at the end of the object, else
        ``InvalidBlockSize``; ``first`` out of range is ``InvalidOffset``. Blocks already
        cached are left untouched (the run is then written block by block). All bytes are
        written before any bit is set. ``parts`` may be reused after the call.
        """
        self._check_usable()
        bs, n = self.block_size, self.num_blocks
        if not 0 <= first < n:
            raise errors.InvalidOffset(
                f"block {first} out of range [0, {n}) for {self._directory}"
            )
        views = [_byte_view(part) for part in parts]
        length = sum(len(view) for view in views)
        offset = first * bs
        end = offset + length
        if length == 0 or end > self.size or (end % bs and end != self.size):
            raise errors.InvalidBlockSize(
                f"{length} bytes at offset {offset} are not whole blocks of {self._directory} "
                f"(size {self.size}, block size {bs})"
            )
        count = -(-length // bs)
        bitmap = self._bitmap
        if bitmap.first_set(first, first + count) is not None:
            data = b"".join(views)
            written = 0
            for i in range(count):
                if not bitmap.is_block_set(first + i):
                    self.write_at(memoryview(data)[i * bs : (i + 1) * bs], offset + i * bs)
                    written += 1
            return written
        with self._write_lock:
            try:
                pwritev_all(self._fd, views, offset)
            except OSError as exc:
                raise _os_error(
                    f"writing blocks {first}..{first + count - 1} of {self._directory}", exc
                ) from exc
            for index in range(first, first + count):
                bitmap.set_block(index)
        self._written(length)
        self._stored(first, count, count)
        return count

    def adopt_blocks(self, first: int, count: int) -> int:
        """Claim blocks ``first..first+count-1`` that another process of this download (its
        helper, ``helper.py``) wrote into the data file: set their bits as ``write_blocks``
        does after its write, so that the next flush makes them durable (fdatasync covers
        every process's writes to the file) and claims them. The caller vouches that the
        bytes are there. Blocks already set are left; returns how many were newly set.
        ``InvalidOffset`` for a run outside the object."""
        self._check_usable()
        if count <= 0 or first < 0 or first + count > self.num_blocks:
            raise errors.InvalidOffset(
                f"blocks {first}..{first + count - 1} out of range [0, {self.num_blocks}) "
                f"for {self._directory}"
            )
        added = 0
        with self._write_lock:
            for index in range(first, first + count):
                if self._bitmap.set_block(index):
                    added += 1
        if added:
            self._stored(first, count, added)
        return added

    def _stored(self, first: int, count: int, added: int) -> None:
        """Bookkeeping after blocks ``first..first+count-1`` were stored, ``added`` of them
        newly set: the next flush claims them; the listener hears of them."""
        if self._dirty == 0:
            self._dirty_since = _now()
        self._dirty += added
        if self.stored_listener is not None:
            self.stored_listener(first, count)

    def _written(self, length: int) -> None:
        """Count ``length`` bytes just written; past ``write_behind``, start their writeback
        (on this thread: the call only queues the pages, unless the disk's queue is full)."""
        if not self.write_behind:
            return
        self._unhanded += length
        if self._unhanded >= self.write_behind:
            self._unhanded %= self.write_behind
            if not start_writeback(self._fd):
                self.write_behind = 0  # the file system cannot: leave it to the kernel

    def read_at(self, offset: int, size: int) -> bytes:
        """Return exactly ``size`` bytes at ``offset``, all from cached blocks. Sync.

        ``offset`` < 0 or >= object size -> ``InvalidOffset``; ``size`` < 0 or
        ``offset + size`` > object size -> ``InvalidBlockSize`` (no short reads: clamp at EOF
        before calling). Every block from the first to the last byte touched must be cached,
        else ``UncachedRange`` naming the first missing offset. ``size`` 0 gives b"".
        """
        if not self._check_read(offset, size):
            return b""
        return _pread_exactly(self._fd, offset, size, self._directory)

    async def read_at_async(self, offset: int, size: int) -> bytes:
        """:meth:`read_at` without holding the trio thread while the disk works.

        Same checks and errors as ``read_at`` (made on the trio thread). The bytes in the
        page cache are copied at once (``RWF_NOWAIT``); the rest is read in a worker thread
        from a duplicate of the data file descriptor, so a concurrent ``close()`` or
        ``invalidate()`` cannot make it read another file. The caller checks afterwards
        that the version it read is still current (the bytes are of the version that was
        current when this was called). Cancellation abandons the thread's result.
        """
        if not self._check_read(offset, size):
            return b""
        buf = bytearray(size)
        got = 0
        if self._nowait:
            try:
                got = os.preadv(self._fd, [buf], offset, _RWF_NOWAIT)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise errors.InternalError(
                        f"reading {size} bytes at {offset} of {self._directory}: {exc}"
                    ) from exc
                self._nowait = False  # e.g. tmpfs: every read goes to a worker thread
            if got == size:
                return buf  # type: ignore[return-value]  # read-only to callers, like bytes
        fd = os.dup(self._fd)
        directory = self._directory

        def rest() -> bytes:
            try:
                return _pread_exactly(fd, offset + got, size - got, directory)
            finally:
                os.close(fd)

        tail = await trio.to_thread.run_sync(rest, abandon_on_cancel=True)
        return bytes(memoryview(buf)[:got]) + tail if got else tail

    async def preload(self, offset: int, size: int) -> None:
        """Bring the cached blocks of ``[offset, offset+size)`` into the page cache, for a
        sequential reader's next reads. Stops at the first block not cached (those are
        being fetched and land in the page cache when written).

        A worker thread reads the range ``PRELOAD_CHUNK`` at a time from a duplicate
        descriptor with :func:`_read_and_drop`: from a cold page cache that keeps the disk
        busier than ``POSIX_FADV_WILLNEED`` (measured here on 256 MiB: 1.4-2.1 GB/s against
        1.0-1.4), and the first touch of every page is made here, not by the FUSE thread.
        Best effort: an OS error ends it quietly (a read that needs the bytes reports its
        own); it stops early once the cache is closed. Cancellation returns at once; the
        thread stops after the chunk it is reading."""
        if self._closed or self._fd < 0 or size <= 0:
            return
        end = min(offset + size, self.size)
        if end <= offset:
            return
        first, last = block_span(offset, end - offset, self.block_size)
        missing = self.bitmap.first_clear(first, last + 1)
        if missing is not None:
            end = min(end, missing * self.block_size)
        if end <= offset:
            return
        fd = os.dup(self._fd)
        stop = threading.Event()

        def preload_range() -> None:
            page = memoryview(bytearray(_DROP_BUFFER))
            try:
                at = offset
                while at < end and not self._closed and not stop.is_set():
                    got = _read_and_drop(fd, at, min(PRELOAD_CHUNK, end - at), page)
                    if got <= 0:
                        return
                    at += got
            except OSError:
                return
            finally:
                page.release()
                os.close(fd)

        try:
            await trio.to_thread.run_sync(preload_range, abandon_on_cancel=True)
        finally:
            stop.set()

    def _check_read(self, offset: int, size: int) -> bool:
        """The checks of :meth:`read_at`, raising its errors; False for ``size`` 0."""
        self._check_usable()
        if offset < 0 or offset >= self.size:
            raise errors.InvalidOffset(
                f"offset {offset} is outside {self._directory} (size {self.size})"
            )
        if size < 0 or offset + size > self.size:
            raise errors.InvalidBlockSize(
                f"{size} bytes at offset {offset} run past the end ({self.size})"
            )
        if size == 0:
            return False
        first, last = block_span(offset, size, self.block_size)
        missing = self._bitmap.first_clear(first, last + 1)
        if missing is not None:
            pos = max(offset, missing * self.block_size)
            raise errors.UncachedRange(f"offset {pos} is not cached ({self._directory})")
        return True

    # -- persistence --------------------------------------------------------------------

    def needs_flush(self) -> bool:
        """True if ``flush_blocks`` blocks were set since the last flush began, or the oldest
        of them is ``flush_interval`` seconds old — or ``FLUSH_COST_FACTOR`` times as old as
        the last index write took, if that is longer (a disk with slow fsyncs is not kept
        busy with index writes: at most about 1/FLUSH_COST_FACTOR of the time). False when
        closed or failed."""
        if self._closed or self._failed is not None or self._dirty == 0:
            return False
        if self._dirty >= self._flush_blocks:
            return True
        since = self._dirty_since
        wait = max(self._flush_interval, FLUSH_COST_FACTOR * self._flush_cost)
        return since is not None and _now() - since >= wait

    async def flush(self) -> None:
        """Make every block set before this call durable and claimed by the index.

        Snapshot the bitmap (no await before it), then in a worker thread: fdatasync the data
        file and atomically write the index with the snapshot. Bits set meanwhile are left for
        the next flush. Flushes are serialised; a no-op when nothing changed. Cancellation:
        the worker thread always runs to its end; a flush cancelled before it started leaves
        the blocks dirty. ``CacheClosed`` if closed on entry (a ``close()`` while waiting for
        another flush persists everything and makes this return quietly); ``InternalError``
        / ``NotEnoughSpace`` on I/O errors.
        """
        self._check_usable()
        async with self._flush_lock:
            if self._closed:
                return
            self._check_usable()
            count = self._bitmap.count_set()
            if count == self._persisted_count:
                self._dirty, self._dirty_since = 0, None
                return
            snapshot = self._bitmap.to_bytes()
            epoch = self._epoch
            dirty, since = self._dirty, self._dirty_since
            self._dirty, self._dirty_since = 0, None
            try:
                await trio.to_thread.run_sync(self._persist, snapshot, count, epoch)
            except BaseException:
                self._dirty += dirty
                if since is not None:
                    self._dirty_since = (
                        since if self._dirty_since is None else min(since, self._dirty_since)
                    )
                raise

    def _persist(self, snapshot: bytes, count: int, epoch: int) -> None:
        """fdatasync, then write the index with ``snapshot``. Any thread; takes the lock."""
        with self._persist_lock:
            if self._fd < 0 or epoch != self._epoch or count <= self._persisted_count:
                return  # closed / invalidated / superseded: a newer state was persisted
            self._persist_locked(snapshot, count)

    def _persist_locked(self, snapshot: bytes, count: int, *, keep_prev: bool = True) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            failure = errors.InternalError(f"fdatasync of {self._data_path} failed: {exc}")
            self._failed = failure
            log.error("%s: %s; the cache is unusable until re-opened", self._directory, failure)
            raise failure from exc
        started = time.monotonic()
        write_index(
            self._index_path,
            self._identity,
            snapshot,
            generation=self._generation + 1,
            keep_prev=keep_prev,
        )
        self._generation += 1
        self._persisted_count = count
        self._flush_cost = time.monotonic() - started
        log.debug(
            "%s: index generation %d claims %d blocks", self._directory, self._generation, count
        )

    async def evict(
        self,
        runs: Sequence[tuple[int, int]],
        needed: Callable[[int, int], bool] | None = None,
    ) -> int:
        """Drop the cached blocks of ``runs`` (inclusive block indices) but those of a run
        that ``needed(first, last)`` says a reader needs (asked once the flush lock is
        held, right before the bits are cleared: nothing can start reading them between
        the question and the clearing); returns how many blocks were dropped. Trio
        thread; the disk work runs in a worker thread (see "Eviction" in the module
        docstring for the order that makes it crash-safe). Errors as ``flush``; after a
        failed index write the bits stay cleared (the blocks are fetched again) and
        nothing is punched. Cancellation: the worker thread runs to its end.
        """
        self._check_usable()
        async with self._flush_lock:
            self._check_usable()
            bitmap = self._bitmap
            cleared: list[tuple[int, int]] = []
            for first, last in runs:
                if needed is not None and needed(first, last):
                    continue
                for index in range(max(0, first), min(last, bitmap.num_blocks - 1) + 1):
                    if bitmap.clear_block(index):
                        if cleared and cleared[-1][1] == index - 1:
                            cleared[-1] = (cleared[-1][0], index)
                        else:
                            cleared.append((index, index))
            if not cleared:
                return 0
            count = bitmap.count_set()
            snapshot = bitmap.to_bytes()
            epoch = self._epoch
            self._dirty, self._dirty_since = 0, None
            await trio.to_thread.run_sync(self._evict_on_disk, snapshot, count, epoch, cleared)
        return sum(last - first + 1 for first, last in cleared)

    def _evict_on_disk(
        self, snapshot: bytes, count: int, epoch: int, cleared: list[tuple[int, int]]
    ) -> None:
        """Worker thread: make the index stop claiming ``cleared`` durably, then punch."""
        with self._persist_lock:
            if self._fd < 0 or epoch != self._epoch:
                return  # closed or invalidated meanwhile: nothing of ours to punch
            self._persist_locked(snapshot, count, keep_prev=False)
            bs, size = self.block_size, self.size
            with self._write_lock:
                for first, last in cleared:
                    block = first
                    while block <= last:  # punch only the blocks still clear
                        start = self._bitmap.first_clear(block, last + 1)
                        if start is None:
                            break
                        end = self._bitmap.first_set(start, last + 1)
                        stop = last + 1 if end is None else end
                        try:
                            punch_hole(self._fd, start * bs, min(stop * bs, size) - start * bs)
                        except OSError as exc:
                            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                                log.warning("%s: cannot punch holes (%s): evicted blocks "
                                            "keep their space", self._directory, exc)
                                return
                            raise _os_error(f"punching a hole in {self._data_path}", exc) from exc
                        block = stop

    def _punch_uncached(self) -> None:
        """Give back the space of every block not cached (a data file preallocated by an
        earlier version, or left allocated by a crash mid-eviction). Blocking; at open."""
        if allocated_bytes(self._fd) <= self._bitmap.cached_bytes() + self.block_size:
            return
        bs, n, bitmap = self.block_size, self._bitmap.num_blocks, self._bitmap
        try:
            block = bitmap.first_clear(0)
            while block is not None:  # one step per run of clear blocks
                end = bitmap.first_set(block)
                stop = n if end is None else end
                punch_hole(self._fd, block * bs, min(stop * bs, self.size) - block * bs)
                block = None if end is None else bitmap.first_clear(end)
        except OSError as exc:
            log.info("%s: uncached space not given back: %s", self._directory, exc)
            return
        log.info("%s: gave back the space of uncached blocks (block size %d)", self._directory, bs)

    def invalidate(self, identity: ObjectIdentity) -> None:
        """Switch to another version of the object: every block becomes missing. Blocking.

        A new size is first checked against the free space: ``NotEnoughSpace`` then leaves
        the cache as it was. Otherwise the new all-clear index (without ``index.prev``) is
        written before the data file is touched; the data file is re-reserved if the size
        changed (else kept: its stale bytes are never claimed). The bitmap is ``reset()`` if
        size and block size are unchanged, else replaced. A later failure makes the cache
        unusable (close and re-open it).
        """
        self._check_usable()
        old = self._identity
        if identity.size != old.size and self._reserve:
            check_space(self._data_path, identity.size, headroom=self._headroom)
        with self._persist_lock:
            self._epoch += 1
            if (identity.size, identity.block_size) == (old.size, old.block_size):
                self._bitmap.reset()
            else:
                self._bitmap = ByteRanges(identity.size, identity.block_size)
            self._identity = identity
            self._dirty, self._dirty_since = 0, None
            try:
                write_index(
                    self._index_path,
                    identity,
                    self._bitmap.to_bytes(),
                    generation=self._generation + 1,
                    keep_prev=False,
                )
                self._generation += 1
                self._persisted_count = 0
                if identity.size != old.size:
                    os.close(self._fd)
                    self._fd = -1
                    if self._reserve:
                        reserve_space(self._data_path, identity.size, headroom=self._headroom)
                    else:
                        create_sparse(self._data_path, identity.size)
                    self._fd = open_data_file(self._data_path)
            except (OSError, errors.RangefsError) as exc:
                self._failed = errors.InternalError(f"invalidating {self._directory}: {exc}")
                if isinstance(exc, OSError):
                    raise _os_error(f"invalidating {self._directory}", exc) from exc
                raise
        log.info("%s: invalidated; now %s", self._directory, _describe(identity))

    def close(self) -> None:
        """Persist what is unpersisted (fdatasync + index, synchronously), close the files
        and release the lock. Idempotent. Raises ``InternalError`` / ``NotEnoughSpace`` if
        the final persist failed (the files are closed anyway)."""
        if self._closed:
            return
        self._closed = True
        with self._persist_lock:
            try:
                count = self._bitmap.count_set()
                if self._fd >= 0 and self._failed is None and count != self._persisted_count:
                    self._persist_locked(self._bitmap.to_bytes(), count)
            finally:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                if self._lock_fd >= 0:
                    os.close(self._lock_fd)
                    self._lock_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<LocalDownloadCache {self._directory} {self._bitmap.count_set()}/"
            f"{self._bitmap.num_blocks} blocks{' closed' if self._closed else ''}>"
        )


# -- helpers ------------------------------------------------------------------------------

# preadv flag: copy only what the page cache holds, never wait for the disk (Linux 4.14+)
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


def _read_and_drop(fd: int, offset: int, size: int, page: memoryview) -> int:
    """Read ``size`` bytes at ``offset`` of ``fd`` through the page cache, all into the one
    small buffer ``page`` (one iovec per page); the bytes read (0 at EOF). Any thread;
    OSError for a failed read. ``size`` is at most ``len(page) * IOV_MAX``.

    Every page is copied, so its first access by a CPU happens here: on the VM measured,
    the first access to a page the page cache has just been given costs up to 1.8 ms per
    MiB (the hypervisor maps guest memory on demand). ``sendfile()`` to ``/dev/null``
    read the pages without touching them and left that cost to the FUSE thread: re-reads
    after dropping the page cache then ran at 0.7-2.2 GB/s instead of 1.2-1.9 with this.
    The small buffer stays in the CPU cache: nothing but the page cache is written."""
    full, rest = divmod(size, len(page))
    buffers = [page] * full
    if rest:
        buffers.append(page[:rest])
    return os.preadv(fd, buffers, offset)


def _pread_exactly(fd: int, offset: int, size: int, directory: Path) -> bytes:
    """``size`` bytes at ``offset`` of ``fd``; a short file is InternalError. Any thread."""
    chunks: list[bytes] = []
    pos, remaining = offset, size
    try:
        while remaining:
            chunk = os.pread(fd, remaining, pos)
            if not chunk:
                raise errors.InternalError(
                    f"short read at offset {pos} of {directory}: unexpected EOF"
                )
            chunks.append(chunk)
            pos += len(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise errors.InternalError(
            f"reading {size} bytes at {offset} of {directory}: {exc}"
        ) from exc
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _describe(identity: ObjectIdentity) -> str:
    return (
        f"size {identity.size}, block size {identity.block_size}, "
        f"etag {identity.etag!r}, last-modified {identity.last_modified!r}"
    )


def _lock_directory(directory: Path) -> int:
    """Open and lock ``directory``'s lock file: its descriptor. The lock is the file the
    path names once locked (a lock taken on a file that :func:`remove_unused` unlinked
    in between is dropped and taken again on the new one)."""
    path = directory / LOCK_NAME
    for _ in range(8):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise errors.InternalError(f"cannot open lock file {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise errors.CacheLocked(
                f"{directory} is already open (in this or another process)"
            ) from exc
        except OSError as exc:
            os.close(fd)
            raise errors.InternalError(f"cannot lock {path}: {exc}") from exc
        if _same_file(fd, path):
            break
        os.close(fd)
    else:
        raise errors.CacheLocked(f"{directory} is being removed by another process")
    with contextlib.suppress(OSError):  # who holds it: other processes read through it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def remove_unused(directory: Path) -> bool:
    """Remove ``directory`` if it holds nothing but its lock file and no process holds the
    lock: what a download refused before its first write (no space, a failed probe)
    leaves. True if it is gone. Blocking; never raises for OS errors (False)."""
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = -1  # no lock file: rmdir below removes only an empty directory
    except OSError:
        return False
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _same_file(fd, path) or os.listdir(directory) != [LOCK_NAME]:
                return False
            os.unlink(path)  # under the lock: a process that opened it re-opens (above)
        os.rmdir(directory)
        return True
    except OSError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)


def lock_holder(directory: Path) -> int | None:
    """The PID written in ``directory``'s lock file by the process that opened it last
    (meaningful while the lock is held), None if there is none."""
    try:
        with open(directory / LOCK_NAME, "rb") as f:
            return int(f.read(32).strip() or b"0") or None
    except (OSError, ValueError):
        return None


def _load_index(index_path: Path, identity: ObjectIdentity) -> IndexRecord | None:
    """The index to resume from, or None to start over. Logs why."""
    prev_path = Path(f"{index_path}.prev")
    try:
        record = read_index_record(index_path)
    except FileNotFoundError:
        record = None
        reason = "missing"
    except errors.CacheCorrupt as exc:
        log.warning("%s; trying %s", exc, prev_path.name)
        record = None
        reason = "corrupt"
    if record is not None:
        if record.identity == identity:
            return record
        log.warning(
            "index %s belongs to another object or version (%s; wanted %s); starting over",
            index_path, _describe(record.identity), _describe(identity),
        )  # fmt: skip
        return None
    try:
        prev = read_index_record(prev_path)
    except FileNotFoundError:
        if reason == "corrupt":
            log.warning("no %s to fall back to; starting over", prev_path)
        return None
    except errors.CacheCorrupt as exc:
        log.warning("%s; starting over", exc)
        return None
    if prev.identity != identity:
        log.warning("%s belongs to another object or version; starting over", prev_path)
        return None
    log.warning(
        "index %s is %s; resuming from %s (%d blocks)",
        index_path, reason, prev_path.name, _count_bits(prev.bitmap),
    )  # fmt: skip
    # Repair: drop the bad index, then write a good one; index.prev stays valid throughout.
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(index_path)
    except OSError as exc:
        raise errors.InternalError(f"removing corrupt index {index_path}: {exc}") from exc
    write_index(index_path, identity, prev.bitmap, generation=prev.generation + 1)
    return IndexRecord(identity, prev.bitmap, prev.generation + 1)


def _count_bits(bitmap: bytes) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def _open_matching_data(data_path: Path, identity: ObjectIdentity) -> int | None:
    """The data file's fd if it exists with the object's exact size; else None (logged)."""
    try:
        fd = open_data_file(data_path)
    except FileNotFoundError:
        log.warning("data file %s is missing; starting over", data_path)
        return None
    try:
        actual = os.fstat(fd).st_size
    except OSError as exc:
        os.close(fd)
        raise errors.InternalError(f"cannot stat {data_path}: {exc}") from exc
    if actual != identity.size:
        os.close(fd)
        log.warning(
            "data file %s has %d bytes, expected %d; starting over",
            data_path, actual, identity.size,
        )  # fmt: skip
        return None
    return fd

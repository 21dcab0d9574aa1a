"""The remote objects of a mount: metadata, cache, fetcher and open handles.

One ``MountedObject`` per cache key (entries naming the same URL share it). Its life:

1. *Attributes*: from the list's ``size=N``, from the metadata table of an earlier
   mount, or from a probe (HEAD / ranged GET) with bounded concurrency, single flight.
2. *Open*: the first open of a mount opens the object's ``LocalDownloadCache`` and starts
   its ``ObjectFetcher`` in the store's nursery; remembered metadata is revalidated in the
   background (reads go on meanwhile: every range request carries the validator anyway).
3. *Version*: when the remote changes (a probe or a response shows another validator or
   size) the object's generation is bumped, its fetcher stopped, its cache invalidated and
   a new fetcher started. Handles of the old generation then fail every read with
   RemoteChanged (EIO); new opens read the new version with ``keep_cache`` off once, so
   the kernel drops pages of the old one. Never a mix of two versions.
4. *Idle*: a cache nobody uses (no handle, no fill, no digest check) is closed after
   IDLE_GRACE seconds, or at once beyond MAX_IDLE_CACHES, and opened again from its index
   on the next open; a fill that was waiting for its turn opens it again then.

The store owns every task (probes, fetchers, fills, preloads, digest checks, the index
flusher, the metadata saver, the idle closer, the evictor), started through
``tasks.Tasks`` (named, contained), and flushes every cache, shielded, when it is
cancelled. Its objects tell the evictor (``evictor.py``, acting on the books of
``budget.py``) what it may not evict: blocks that a read waits for or reads
(``_Version.pin``), objects being opened, filled or checked. Policies live beside it:
read-ahead in ``readahead.py``, flush and fill scheduling in ``scheduler.py``. Everything
here runs on the trio thread.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

import trio
import trio.lowlevel

from .budget import Budget, MinFree
from .cache import LocalDownloadCache
from .cachedir import CacheDir, ObjectMeta, cache_key
from .cachefiles import ObjectIdentity
from .digests import Digest, hash_file, parse_digest
from .errors import (
    CacheLocked,
    DigestMismatch,
    PermanentError,
    RangefsError,
    ReadTimeout,
    RemoteChanged,
    RetriesExhausted,
    SourceError,
)
from .evictor import Evictor
from .fetcher import ObjectFetcher, retry_transient
from .guest import GuestHandle, owner_of
from .mirrors import MirroredReader, agreeing_mirrors
from .ranges import block_span
from .ratecontrol import BackoffPolicy, Limiter
from .readahead import ReadAhead
from .redact import redact_url
from .scheduler import (  # noqa: F401 - FLUSH_PERIOD re-exported
    FLUSH_INTERVAL,
    FLUSH_PERIOD,
    FillQueue,
    flush_periodically,
    save_metadata_periodically,
)
from .settings import Prefetch
from .source import HttpOptions, HttpSession, Reader, RemoteInfo
from .stats import MountStats
from .tasks import Tasks, contain
from .urlcommand import DEFAULT_TIMEOUT, FreshUrl, UrlCommand
from .urllist import Entry

log = logging.getLogger(__name__)

# re-exported: the index flush policy lives in scheduler.py
# whole-object fills (--prefetch open) running at once; the objects read sequentially
# meanwhile wait in order, and their readers get read-ahead. With 16 readers of 8 objects,
# filling all 8 at once kept the event loop saturated: one at a time, the p99 read latency
# went from 95 to 80 ms (medians of 12) for 18 % less aggregate throughput (README
# "Performance").
CONCURRENT_FILLS = 1
# readers' own requests get this many slots per background slot (--concurrency): when many
# readers miss at once (16 readers starting together split their reads into 64 requests),
# their requests do not queue behind each other
DEMAND_SLOTS_PER_FILL_SLOT = 2
# Caches of objects nobody uses are closed (files, lock, fetcher) after this many seconds
# (an open/close loop on one file keeps its cache), or at once, oldest first, when more
# than MAX_IDLE_CACHES are open: the mount's descriptors are bounded by the files open,
# not by the files ever read (each open cache holds 2: the data file and its lock).
IDLE_GRACE = 5.0
MAX_IDLE_CACHES = 64
IDLE_CHECK_PERIOD = 1.0


@dataclass(frozen=True)
class StoreConfig:
    """Everything the object layer needs; sizes in bytes, times in seconds."""

    cache_dir: Path
    block_size: int = 64 << 10
    concurrency: int = 32  # parallel requests for background fill (over all objects)
    max_rate: float | None = None  # bytes/s over all objects; None = unlimited
    prefetch: Prefetch = Prefetch.OPEN
    read_timeout: float = 60.0  # a read() waits at most this long for its blocks, then EIO
    http: HttpOptions = field(default_factory=HttpOptions)
    cache_size: int | None = None  # budget for the cache directory; None = no fixed size
    cache_min_free: MinFree = field(default_factory=lambda: MinFree(percent=5.0))
    probe_concurrency: int = 64
    probe_at_mount: bool = True  # learn every entry's size in the background from mount time
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    # prints a fresh URL for an expired one (--url-command; an entry's url-command= wins)
    url_command: UrlCommand | None = None


@dataclass(frozen=True)
class ObjectAttrs:
    """What `stat` shows: size in bytes, mtime in epoch seconds."""

    size: int
    mtime: float


def _span(blocks: tuple[int, int]) -> tuple[int, int]:
    """Inclusive (first, last) block indices -> the (start, stop) of a bitmap search."""
    return blocks[0], blocks[1] + 1


def _info_from_meta(url: str, meta: ObjectMeta) -> RemoteInfo:
    digest = None
    if meta.digest:
        try:
            digest = parse_digest(meta.digest)
        except ValueError:
            digest = None
    return RemoteInfo(
        url=url,
        size=meta.size,
        etag=meta.etag,
        last_modified=meta.last_modified,
        mtime=meta.mtime,
        accept_ranges=meta.accept_ranges,
        digest=digest,
    )


def _same_version(a: RemoteInfo, b: RemoteInfo) -> bool:
    """Two probes name the same version: equal size, and no validator that differs."""
    if a.size != b.size:
        return False
    if a.etag and b.etag:
        return a.etag == b.etag
    if a.last_modified and b.last_modified:
        return a.last_modified == b.last_modified
    return True


class _Version:
    """One version of an object's bytes: its cache and fetcher, and the fetcher's scope."""

    def __init__(self, generation: int, info: RemoteInfo, cache: LocalDownloadCache,
                 fetcher: ObjectFetcher) -> None:
        self.generation = generation
        self.info = info
        self.cache = cache
        self.fetcher = fetcher
        self.scopes: list[trio.CancelScope] = []  # of the fetcher and of each fill
        self.stopped = False
        self.filling = False  # a whole-object fill runs
        self.fill_done = False  # a whole-object fill ran (once per version)
        self.fill_queued = False  # waiting for its turn to be filled
        self.verifying = False  # a digest check was started (once per version)
        self.busy = 0  # background tasks working on it now (fill, digest check)
        # block ranges (first, last) that reads wait for or read now: never evicted
        self.reading: dict[int, tuple[int, int]] = {}
        self._next_read = 0

    def pin(self, first: int, last: int) -> int:
        """Keep blocks ``first..last`` from eviction until ``unpin`` of the returned id."""
        self._next_read += 1
        self.reading[self._next_read] = (first, last)
        return self._next_read

    def unpin(self, token: int) -> None:
        self.reading.pop(token, None)

    def pinned(self, first: int, last: int) -> bool:
        """A read waits for or reads a block of ``first..last``."""
        return any(a <= last and first <= b for a, b in self.reading.values())

    def stop(self) -> None:
        """Stop this version's fetcher and fill now; no block is written after this."""
        self.stopped = True
        self.fetcher.stop()
        for scope in self.scopes:
            scope.cancel()

    def new_scope(self) -> trio.CancelScope:
        """A cancel scope that stop() cancels (already cancelled if stopped)."""
        scope = trio.CancelScope()
        if self.stopped:
            scope.cancel()
        self.scopes.append(scope)
        return scope

    async def run_fetcher(self, *, task_status: trio.TaskStatus[None]) -> None:
        with self.new_scope():
            await self.fetcher.run(task_status=task_status)


class Handle(Protocol):
    """What the FUSE layer uses of an open file: an :class:`ObjectHandle`, or a
    :class:`~rangefs.guest.GuestHandle` when another process owns the object's cache."""

    keep_cache: bool

    async def read(self, offset: int, size: int) -> bytes: ...

    def release(self) -> None: ...


class ObjectHandle:
    """One open() of an object. Called from the trio thread only."""

    def __init__(self, obj: MountedObject, version: _Version, *, keep_cache: bool) -> None:
        self._obj = obj
        self._version = version
        self.keep_cache = keep_cache
        self._policy = ReadAhead(version.cache.size)

    async def read(self, offset: int, size: int) -> bytes:
        """Return the bytes [offset, offset+size) clamped at EOF (b"" at or past EOF).

        Waits for missing blocks at most ``read_timeout`` seconds (then ReadTimeout).
        Raises only RangefsError subclasses; cancellation leaves shared fetches running.
        """
        version = self._version
        obj = self._obj
        obj.check_generation(version)
        cache = version.cache
        end = min(offset + size, cache.size)
        if size <= 0 or offset >= end:
            return b""
        first, last = block_span(offset, end - offset, cache.block_size)
        # read-ahead and fill first: their flights start while this read waits for its own
        self._read_ahead(offset, end, first, last)
        token = version.pin(first, last)  # none of its blocks is evicted until it is done
        started = trio.current_time()
        cached = True
        failed = True
        try:
            cached = await self._ensure(version, offset, end, first, last)
            data = await cache.read_at_async(offset, end - offset)
            obj.check_generation(version)  # the disk read may have overlapped a version change
            failed = False
        finally:
            version.unpin(token)
            obj.store.stats.read_done(end - offset, trio.current_time() - started,
                                      cached=cached, failed=failed)
        return data

    @property
    def version(self) -> _Version:
        """The version this handle reads."""
        return self._version

    async def hold(self, offset: int, size: int) -> tuple[_Version, int, int, bool] | None:
        """What :meth:`read` does up to reading the data, for another rangefs process that
        reads this object through this one (``mountctl.hold``): read-ahead, the blocks of
        ``[offset, offset+size)`` cached and pinned. Returns (version, pin token, end of
        the range clamped at EOF, whether it was all cached already), None at or past
        EOF; the caller unpins. Same errors."""
        version = self._version
        self._obj.check_generation(version)
        end = min(offset + size, version.cache.size)
        if size <= 0 or offset >= end:
            return None
        first, last = block_span(offset, end - offset, version.cache.block_size)
        self._read_ahead(offset, end, first, last)
        token = version.pin(first, last)
        try:
            cached = await self._ensure(version, offset, end, first, last)
        except BaseException:
            version.unpin(token)
            raise
        return version, token, end, cached

    async def _ensure(self, version: _Version, offset: int, end: int, first: int,
                      last: int) -> bool:
        """Wait until blocks ``first..last`` (pinned by the caller) are cached, at most
        ``read_timeout`` seconds (then ReadTimeout); True if they already were."""
        obj = self._obj
        cache = version.cache
        if cache.bitmap.first_clear(first, last + 1) is None:
            obj.store.budget.touched(obj.key, first, last)
            return True
        with trio.move_on_after(obj.store.config.read_timeout) as scope:
            await version.fetcher.fetch(first, last)
        if scope.cancelled_caught:
            raise ReadTimeout(
                f"{obj.name} [{offset}:{end - 1}]: no data after "
                f"{obj.store.config.read_timeout:g} s"
            )
        obj.check_generation(version)
        if cache.complete():  # the reads themselves completed it: verify it now
            obj.start_verify(version)
        return False

    def _read_ahead(self, offset: int, end: int, first: int, last: int) -> None:
        """Act on the read-ahead policy (``readahead.py``) for a read of ``[offset, end)``
        of blocks ``first..last``: preload the cache file; for a sequential reader start
        the object's whole fill (``--prefetch open``, when it fits the budget) or else
        background read-ahead past the read; for a random reader that the policy takes
        to read the whole file, that same fill (``--prefetch open`` only). No await."""
        version = self._version
        bitmap = version.cache.bitmap
        missing = 0
        if bitmap.first_clear(first, last + 1) is not None:
            missing = version.cache.block_size * sum(
                not bitmap.is_block_set(b) for b in range(first, last + 1))
        plan = self._policy.on_read(offset, end, missing)
        if plan.preload is not None:
            start, stop = plan.preload
            self._obj.store.tasks.start(
                f"preload of {self._obj.name}", version.cache.preload, start, stop - start
            )
        if plan.whole and self._obj.store.config.prefetch is Prefetch.OPEN:
            if not (version.filling or version.fill_done or version.fill_queued):
                log.info("%s: read all over: filling it whole", self._obj.name)
            self._obj.start_fill(version)  # once per version; checks the budget
        if not plan.sequential or version.filling:
            return
        if self._obj.store.config.prefetch is Prefetch.OPEN:
            self._obj.start_fill(version)
            if version.filling:
                return
        bs = version.cache.block_size
        version.fetcher.prefetch(last + 1, last + plan.readahead // bs)

    def release(self) -> None:
        """The file handle was closed."""
        self._obj.opened -= 1
        if self._obj.opened == 0:
            self._obj.store.idle(self._obj)


class MountedObject:
    """One remote object (one cache key); entries naming the same URL share it."""

    def __init__(self, store: ObjectStore, key: str, entry: Entry) -> None:
        self.store = store
        self.key = key
        self.entry = entry
        self._name: str | None = None
        self.opened = 0
        self.guests = 0  # of the open handles, those reading through another process
        self._owner_pid = 0  # the process they read through (for status)
        self._meta: ObjectMeta | None = None
        self._meta_loaded = False
        self._info: RemoteInfo | None = None  # what this mount knows of the remote
        self._validated = False  # _info came from a probe of this mount
        # created on first use: a list of 100k entries must mount fast
        self._probe_lock_: trio.Lock | None = None
        self._open_lock_: trio.Lock | None = None
        self._version: _Version | None = None
        self._generation = 0
        self._keep_cache = True  # False once after a version change
        self._verified: str | None = None  # "ok" / "mismatch" once a digest was checked
        self._failed: RangefsError | None = None  # a digest mismatch: reads fail
        # the last version's info and (bytes, blocks) cached, once its idle cache was closed
        self._closed: tuple[RemoteInfo, int, int] | None = None
        self._fresh: FreshUrl | None = None  # the current URL, with a URL command

    @property
    def fresh(self) -> FreshUrl | None:
        """The object's current URL when a command refreshes it (``urlcommand.py``), made
        on first use; None without a command (requests then go to the entry's URL)."""
        if self._fresh is None:
            entry = self.entry
            command = self.store.config.url_command
            if entry.url_command is not None:
                timeout = command.timeout if command is not None else DEFAULT_TIMEOUT
                command = UrlCommand(entry.url_command, shell=False, timeout=timeout)
            if command is not None:
                self._fresh = FreshUrl(entry.url, command, path=str(entry.path), name=self.name)
        return self._fresh

    @property
    def name(self) -> str:
        """The URL without credentials, for logs, errors and xattrs."""
        if self._name is None:
            self._name = redact_url(self.entry.url)
        return self._name

    @property
    def _probe_lock(self) -> trio.Lock:
        if self._probe_lock_ is None:
            self._probe_lock_ = trio.Lock()
        return self._probe_lock_

    @property
    def _open_lock(self) -> trio.Lock:
        if self._open_lock_ is None:
            self._open_lock_ = trio.Lock()
        return self._open_lock_

    # -- attributes ---------------------------------------------------------------------

    def _remembered(self) -> ObjectMeta | None:
        if not self._meta_loaded:
            self._meta = self.store.cachedir.load_meta(self.key)
            self._meta_loaded = True
        return self._meta

    def attrs_nowait(self) -> ObjectAttrs | None:
        """Attributes known without the network (probed, remembered, or size=N), else None.
        A listing that gives another size than the last probe is newer than it: its size
        is shown until the probe it caused (``listing_changed``) says otherwise."""
        info = self._info
        entry = self.entry
        if info is not None and not (entry.listed and not self._validated
                                     and entry.size is not None and entry.size != info.size):
            return ObjectAttrs(info.size, info.mtime or self.store.started)
        meta = self._remembered()
        if meta is not None and (entry.size is None or entry.size == meta.size):
            return ObjectAttrs(meta.size, meta.mtime or self.store.started)
        if entry.size is not None:
            return ObjectAttrs(entry.size, entry.mtime or self.store.started)
        return None

    async def attrs(self) -> ObjectAttrs:
        """Attributes, probing the remote (bounded concurrency) when unknown. SourceError."""
        known = self.attrs_nowait()
        if known is not None:
            return known
        info = await self.probe()
        return ObjectAttrs(info.size, info.mtime or self.store.started)

    async def probe(self) -> RemoteInfo:
        """Probe the remote once per mount (single flight); remembers the answer."""
        async with self._probe_lock:
            if self._validated and self._info is not None:
                return self._info
            async with self.store.probe_slots:
                info = await retry_transient(
                    lambda: self.store.session.probe(self.entry.url, fresh=self.fresh),
                    self.store.config.backoff,
                    self.name,
                    stats=self.store.stats,
                )
            if self.entry.size is not None and info.size != self.entry.size \
                    and not self.entry.listed:
                raise PermanentError(
                    f"{self.name}: the server says {info.size} bytes, the URL list says "
                    f"size={self.entry.size}"
                )
            self._validated = True
            self._remember(info)
            return info

    def listing_changed(self, entry: Entry) -> None:
        """A listing now says ``entry`` of this object (another size or time): show
        that until the object is probed again, which its next open does. No await."""
        self.entry = entry
        self._validated = False
        if self._version is None:
            self._info = None
        elif self._version.info.size != entry.size and entry.size is not None:
            self._start_revalidation()

    def _remember(self, info: RemoteInfo) -> None:
        self._info = info
        meta = ObjectMeta(
            url=self.name,
            size=info.size,
            etag=info.etag,
            last_modified=info.last_modified,
            mtime=info.mtime,
            accept_ranges=info.accept_ranges,
            digest=str(info.digest) if info.digest is not None else None,
        )
        if meta != self._meta:
            self._meta = meta
            self._meta_loaded = True
            self.store.cachedir.save_meta(self.key, meta)

    def _cached(self) -> tuple[int, int]:
        """(bytes, blocks) of the object in the local cache now, as far as this mount knows
        (an object whose cache was never opened in this mount counts 0)."""
        if self._version is not None:
            return self._version.cache.cached_bytes_and_blocks()
        if self._closed is not None:
            return self._closed[1], self._closed[2]
        return 0, 0

    def cached_bytes(self) -> int:
        """Bytes of the object that are in the local cache now (for st_blocks)."""
        return self._cached()[0]

    def expected_digest(self) -> Digest | None:
        """The digest from the URL list, else the server's."""
        if self.entry.digest is not None:
            return self.entry.digest
        return self._info.digest if self._info is not None else None

    def xattrs(self) -> dict[str, bytes]:
        """user.rangefs.* names -> values (url redacted)."""
        out = {"user.rangefs.url": self.name.encode()}
        attrs = self.attrs_nowait()
        bs = self.store.config.block_size
        if attrs is not None:
            total = math.ceil(attrs.size / bs)
            cached = self._cached()[1]
            out["user.rangefs.size"] = str(attrs.size).encode()
            out["user.rangefs.blocks_total"] = str(total).encode()
            out["user.rangefs.blocks_cached"] = str(cached).encode()
            out["user.rangefs.complete"] = b"1" if cached == total else b"0"
        out["user.rangefs.block_size"] = str(bs).encode()
        etag = self._info.etag if self._info is not None else None
        out["user.rangefs.etag"] = (etag or "").encode()
        out["user.rangefs.verified"] = (self._verified or "unknown").encode()
        return out

    # -- open and versions --------------------------------------------------------------

    async def open(self) -> Handle:
        """Open for reading: probe or revalidate, open the cache, start fill per policy.
        When another rangefs process has this object's cache open (a mount sharing the
        cache directory), a :class:`~rangefs.guest.GuestHandle` that reads through it."""
        if self._failed is not None:
            raise self._failed
        version = self._version
        if version is not None and self.entry.listed and not self._validated \
                and self.entry.size not in (None, version.info.size):
            await self._revalidate()  # a listing says it changed: open the new version
        async with self._open_lock:
            try:
                version = await self._ensure_version()
            except CacheLocked:
                guest = self._guest()
                if guest is None:
                    raise
                self.opened += 1
                self.guests += 1
                return guest
            self.store.touch(self)
            keep = self._keep_cache
            self._keep_cache = True
        self.opened += 1
        return ObjectHandle(self, version, keep_cache=keep)

    def _guest(self) -> GuestHandle | None:
        """A handle reading through the process that owns this object's cache, or None
        if no other process does (the lock is ours, or its holder is unknown)."""
        owner = owner_of(self.store.cachedir.object_dir(self.key))
        if owner is None or self._info is None:
            return None
        log.info("%s: its cache is open in process %d: reading through it", self.name, owner)
        self._owner_pid = owner
        return GuestHandle(self, self._info, owner)

    async def open_again(self, guest: GuestHandle) -> Handle:
        """For a guest whose owner went away: open the object again (here, or through
        its next owner); the guest's own opening is given back by the guest itself."""
        return await self.open()

    def guest_released(self) -> None:
        """A guest handle was closed."""
        self.guests -= 1
        self.opened -= 1
        if self.opened == 0:
            self.store.idle(self)

    async def export_handle(self) -> ObjectHandle:
        """An ObjectHandle of this process's own cache (for ``mountctl.hold``);
        CacheLocked if another process owns it (no reading through a third)."""
        handle = await self.open()
        if isinstance(handle, ObjectHandle):
            return handle
        handle.release()
        raise CacheLocked(f"{self.name}: its cache is open in another process")

    async def export(self) -> tuple[_Version, Callable[[], None]] | None:
        """Open the cache as a reader would and pin every block of the current version, for
        another process to copy (``mountctl.export``): the version and the function that
        releases it (no await; call it once). None if reads of this object fail."""
        if self._failed is not None:
            return None
        try:
            handle = await self.export_handle()
        except CacheLocked:
            return None
        version = handle._version
        token = version.pin(0, max(0, version.cache.num_blocks - 1))

        def release() -> None:
            version.unpin(token)
            handle.release()

        return version, release

    async def _ensure_version(self) -> _Version:
        if self._version is not None:
            return self._version
        if self._info is None:
            meta = self._remembered()
            if meta is not None and (self.entry.size is None or self.entry.size == meta.size):
                self._info = _info_from_meta(self.entry.url, meta)
                self._start_revalidation()
            else:
                await self.probe()
        assert self._info is not None
        return await self._start_version(self._info)

    async def _start_version(self, info: RemoteInfo) -> _Version:
        config = self.store.config
        reader = await self._reader(info)  # before the cache is opened: see open_cache
        identity = ObjectIdentity(
            url=self.name,
            size=info.size,
            block_size=config.block_size,
            etag=info.etag,
            last_modified=info.last_modified,
        )
        directory = self.store.cachedir.object_dir(self.key)
        budget = self.store.budget
        if self._version is None:
            # a worker thread: creating the files and their directory (fsyncs), and the
            # extents that hold blocks (one step per extent), would hold every other
            # reader of the mount. Not abandoned on cancellation: the opened cache is
            # owned by the version below before the next checkpoint. The open lock keeps
            # the evictor away from this directory. The data file is sparse: a mount
            # caches blocks, not objects, so an object larger than the disk opens.
            def open_cache() -> tuple[LocalDownloadCache, list[int]]:
                cache = LocalDownloadCache.open(
                    directory, identity, flush_interval=FLUSH_INTERVAL, reserve=False
                )
                return cache, budget.extents_with_blocks(cache.bitmap)

            cache, extents = await trio.to_thread.run_sync(open_cache)
            budget.opened(self.key, extents, cache.bitmap.count_set() * config.block_size)
            cache.stored_listener = functools.partial(self.store.stored, self.key)
        else:
            cache = self._version.cache
            cache.invalidate(identity)
            budget.drop(self.key)
            budget.opened(self.key, [], 0)
        # a cache closed while idle and opened again: the same version keeps its digest check
        closed, self._closed = self._closed, None
        if closed is None or not _same_version(closed[0], info):
            self._verified = None
        self._generation += 1
        fetcher = ObjectFetcher(
            cache,
            reader,
            limiter=self.store.limiter,
            backoff=config.backoff,
            demand_slots=self.store.demand_slots,
            fill_slots=self.store.fill_slots,
            on_remote_changed=self._on_remote_changed,
            mount_stats=self.store.stats,
        )
        version = _Version(self._generation, info, cache, fetcher)
        self._version = version
        self.store._active[self.key] = self
        await self.store.tasks.start_and_wait(
            f"fetcher of {self.name}", version.run_fetcher,
            on_error=lambda exc: self._fetcher_failed(version),
        )
        if cache.complete():
            self.start_verify(version)
        return version

    async def _reader(self, info: RemoteInfo) -> Reader:
        """The reader of version ``info``: of the entry's URL, and of its mirrors that
        serve the same version (probed now; see ``mirrors.py``)."""
        session = self.store.session
        reader = session.reader(self.entry.url, info, self.fresh)
        if not self.entry.mirrors:
            return reader
        agreeing = await agreeing_mirrors(session, self.name, info, self.entry.mirrors)
        if agreeing:
            log.info("%s: reading from %d mirror(s) as well", self.name, len(agreeing))
        return MirroredReader([reader, *(session.reader(url, mirror_info)
                                         for url, mirror_info in agreeing)])

    def check_generation(self, version: _Version) -> None:
        """Raise RemoteChanged if ``version`` is no longer the object's current one."""
        if self._failed is not None:
            raise self._failed
        if self._version is not version:
            raise RemoteChanged(f"{self.name}: the remote object changed while open; reopen it")

    def _on_remote_changed(self, exc: RemoteChanged) -> None:
        self._validated = False
        self._start_revalidation()

    def _fetcher_failed(self, version: _Version) -> None:
        """The fetcher of ``version`` died (a bug, logged): drop the version; its handles
        fail their reads, the next open starts afresh."""
        if self._version is version:
            self._drop_version(RuntimeError("fetcher failed"))

    def _start_revalidation(self) -> None:
        self.store.tasks.start(
            f"revalidation of {self.name}", self._revalidate, on_error=self._drop_version
        )

    def _drop_version(self, exc: BaseException) -> None:
        """Background work on the current version failed in a way that leaves its cache in
        doubt (e.g. the new version's cache could not be set up): stop and close it. Open
        handles of it fail their reads (RemoteChanged: reopen); the next open starts
        afresh. Trio thread; no await."""
        version = self._version
        if version is None:
            return
        version.stop()
        self._version = None
        self.store._active.pop(self.key, None)
        self.store.budget.closed(self.key, version.cache.bitmap.cached_bytes())
        try:
            version.cache.close()
        except RangefsError as close_exc:
            contain(f"closing the cache of {self.name}", close_exc)

    async def _revalidate(self) -> None:
        """Probe again; switch to the new version if the remote changed. A failure of the
        probe is logged and the cache served; any other failure (setting up the new
        version's cache) is left to the task's error boundary (``_drop_version``)."""
        try:
            self._validated = False
            info = await self.probe()
        except (SourceError, RetriesExhausted) as exc:
            log.info("%s: revalidation failed (serving the cache): %s", self.name, exc)
            return
        async with self._open_lock:
            version = self._version
            if version is None or (
                _same_version(version.info, info) and version.fetcher.healthy()
            ):
                return
            log.warning(
                "%s: the remote object changed (size %d -> %d, etag %s -> %s); "
                "dropping its cached blocks",
                self.name, version.info.size, info.size, version.info.etag, info.etag,
            )
            version.stop()
            self._keep_cache = False
            self.store.invalidate_kernel_cache(self)
            await self._start_version(info)

    def state(self) -> tuple[int | None, int, str, str]:
        """For status: (size or None if not yet known, bytes cached, state, reason). The
        state is ``failed`` (reason: why), ``verified`` (complete, digest checked),
        ``verifying`` (complete, digest not yet checked), ``complete`` (no digest known),
        ``filling``, ``reading`` (open, not filling) or ``idle``."""
        attrs = self.attrs_nowait()
        size = attrs.size if attrs is not None else None
        cached = self.cached_bytes()
        version = self._version
        if self._failed is not None:
            return size, cached, "failed", str(self._failed)
        if version is None and self.guests > 0:
            on_disk = self.store.budget.closed_bytes(self.key) or 0
            return (size, min(on_disk, size if size is not None else on_disk), "reading",
                    f"through process {self._owner_pid}, which has its cache open")
        if version is None and self._closed is None:
            # cached by an earlier mount and not opened in this one: what it holds on disk
            # (blocks and index), an estimate; its state stays idle until it is opened
            on_disk = self.store.budget.closed_bytes(self.key) or 0
            return size, min(on_disk, size if size is not None else on_disk), "idle", ""
        if size is not None and cached >= size:
            if self._verified == "ok":
                return size, cached, "verified", ""
            checking = self._verified is None and self.expected_digest() is not None
            return size, cached, ("verifying" if checking else "complete"), ""
        if version is not None and version.filling and not version.stopped:
            return size, cached, "filling", ""
        if self.opened > 0:
            return size, cached, "reading", ""
        return size, cached, "idle", ""

    def in_use(self) -> bool:
        """Open by a handle, or being opened, filled or checked (``working``)."""
        return self.opened > 0 or self.working()

    async def close_idle(self) -> bool:
        """Close the cache of an object not in use (``in_use``): stop its fetcher (a queued
        fill is dropped), persist its index in a worker thread, close its files. False if
        it is in use (now, or again once the flush is done). The next open re-opens it."""
        version = self._version
        if version is None or self.in_use():
            return version is None
        version.stop()
        await version.cache.flush()
        if self._version is not version or self.in_use():
            # opened again meanwhile: it gets a fresh version (the stopped one is dropped)
            if self._version is version:
                self._version = None
                self.store._active.pop(self.key, None)
                self.store.budget.closed(self.key, version.cache.bitmap.cached_bytes())
                version.cache.close()
            return False
        self._version = None
        self.store._active.pop(self.key, None)
        self._closed = (version.info, *version.cache.cached_bytes_and_blocks())
        self.store.budget.closed(self.key, self._closed[1])
        version.cache.close()
        return True

    # -- what the evictor asks (evictor.Evictable) ---------------------------------------

    def open_cache(self) -> LocalDownloadCache | None:
        """The current version's cache, None if none is open or it is stopped."""
        version = self._version
        return None if version is None or version.stopped else version.cache

    def working(self) -> bool:
        """Being opened, filled or checked."""
        version = self._version
        return (version is not None and version.busy > 0) or (
            self._open_lock_ is not None and self._open_lock_.locked()
        )

    def needs(self, first: int, last: int) -> bool:
        """A read of the current version waits for or reads a block of ``first..last``."""
        version = self._version
        return version is not None and version.pinned(first, last)

    def closed_while_idle(self, version: _Version) -> bool:
        """``version`` was current when its cache was closed for being idle, and the
        object has not been opened again since."""
        closed = self._closed
        return (self._version is None and closed is not None
                and _same_version(closed[0], version.info))

    async def _fill_reopened(self) -> None:
        """A queued fill's turn came after its cache was closed: open it and fill it. The
        caller counted the fill in ``store.fills``; this gives it back."""
        try:
            async with self._open_lock:
                version = await self._ensure_version()
        except BaseException:
            self.store.fill_ended()
            raise
        if (version.filling or version.fill_done or version.cache.complete()
                or not self.store.budget.fits(version.info.size)):
            self.store.fill_ended()
            self.store.idle(self)
            return
        version.filling = True
        await self._fill(version)

    def forget_closed(self) -> None:
        """The closed cache's directory was evicted: nothing of it is cached any more."""
        self._closed = None

    async def fill_completely(self) -> None:
        """Open the object's cache and fill it now (policy 'all'); verify when complete."""
        async with self._open_lock:
            version = await self._ensure_version()
        if version.cache.complete():
            await self._verify(version)
        elif not self.store.budget.fits(version.info.size):
            log.info("%s: not prefetched: the object (%d bytes) does not fit the cache "
                     "budget (%d bytes now)", self.name, version.info.size,
                     self.store.budget.limit())
        elif not version.filling:
            version.filling = True
            self.store.fills.force()  # one fill at a time, this one included
            await self._fill(version)

    def start_fill(self, version: _Version) -> None:
        """Fill every outstanding block in the background, once per version: now if fewer
        than CONCURRENT_FILLS fills run, else when its turn comes (``filling`` stays False
        until then, so its readers keep their read-ahead). No await."""
        if version.filling or version.fill_done or version.stopped or version.cache.complete():
            return
        store = self.store
        if not store.budget.fits(version.info.size):
            version.fill_done = True  # once per version: its readers get read-ahead
            log.info(
                "%s: not filling it whole: the object (%d bytes) does not fit the cache "
                "budget (%d bytes now); readers get read-ahead", self.name, version.info.size,
                store.budget.limit(),
            )
            return
        if not store.fills.admit():  # _fill gives the admission back, whatever happens
            if not version.fill_queued:
                version.fill_queued = True
                store.fills.wait((self, version))
            return
        version.filling = True
        store.tasks.start(f"fill of {self.name}", self._fill, version,
                          on_error=lambda exc: self._fill_failed(version))

    def start_verify(self, version: _Version) -> None:
        """Check the digest of a complete version in the background, once."""
        if not version.verifying and self.expected_digest() is not None:
            version.verifying = True
            self.store.tasks.start(f"digest check of {self.name}", self._verify, version,
                                   on_error=lambda exc: self._verify_failed(version))

    def _fill_failed(self, version: _Version) -> None:
        version.filling = False  # a later sequential read may start it again
        version.fill_done = False

    def _verify_failed(self, version: _Version) -> None:
        version.verifying = False  # checked again at the next open of the complete object

    @contextlib.contextmanager
    def _working_on(self, version: _Version) -> Iterator[None]:
        """A background task works on ``version`` (it is neither evicted nor closed as
        idle meanwhile); afterwards the object may be idle."""
        version.busy += 1
        try:
            yield
        finally:
            version.busy -= 1
            self.store.idle(self)

    async def _fill(self, version: _Version) -> None:
        """Fill ``version``; the caller counted it in ``store.fills``, which this
        gives back (and so lets the next waiting fill start), whatever happens."""
        with self._working_on(version):
            try:
                with version.new_scope():
                    await version.fetcher.fill(self.store.config.concurrency)
            except RangefsError as exc:
                log.warning("%s: background fill stopped: %s", self.name, exc)
                version.filling = False
                return
            finally:
                self.store.fill_ended()
            version.filling = False
            version.fill_done = True
            if version.cache.complete() and self._version is version:
                self.start_verify(version)

    async def _verify(self, version: _Version) -> None:
        """Hash a complete object once; a mismatch drops the cache and fails reads."""
        with self._working_on(version):
            await self._verify_working(version)

    async def _verify_working(self, version: _Version) -> None:
        digest = self.expected_digest()
        if digest is None or self._verified is not None:
            return
        if not version.cache.complete():  # evicted meanwhile: checked when complete again
            version.verifying = False
            return
        await version.cache.flush()
        data_path = self.store.cachedir.object_dir(self.key) / "data"
        actual = await hash_file(data_path, digest.algorithm)
        if actual == digest.expected:
            self._verified = "ok"
            log.info("%s: %s verified", self.name, digest.algorithm)
            return
        self._verified = "mismatch"
        self._failed = DigestMismatch(
            f"{self.name}: {digest.algorithm} is {actual.hex()}, expected {digest.hex}"
        )
        log.error("%s", self._failed)
        version.stop()
        version.cache.invalidate(version.cache.identity)


class ObjectStore:
    """Owns the HTTP session, every object's cache and fetcher, and their tasks."""

    def __init__(self, entries: Sequence[Entry], config: StoreConfig) -> None:
        self.config = config
        self.started = time.time()
        self.stats = MountStats()  # the mount's counters (status, metrics)
        self.limiter = Limiter(bytes_per_second=config.max_rate)
        # whole-object fills: running (start_fill, fill_completely) and waiting
        self.fills: FillQueue[tuple[MountedObject, _Version]] = FillQueue(CONCURRENT_FILLS)
        self.demand_slots = trio.CapacityLimiter(
            max(4, DEMAND_SLOTS_PER_FILL_SLOT * config.concurrency)
        )
        self.fill_slots = trio.CapacityLimiter(max(1, config.concurrency))
        self.probe_slots = trio.CapacityLimiter(max(1, config.probe_concurrency))
        self._objects: dict[str, MountedObject] = {}
        self._by_entry: dict[Entry, MountedObject] = {}
        self._budget: Budget | None = None
        self._evictor: Evictor | None = None
        # the objects with an open cache (the flusher looks at these only, many times a
        # second: a list of 100k URLs must not cost 100k checks per tick)
        self._active: dict[str, MountedObject] = {}
        for entry in entries:
            if entry.listing:  # a directory: its files are added as they are listed
                continue
            key = cache_key(entry.url)
            obj = self._objects.get(key)
            if obj is None:
                obj = self._objects[key] = MountedObject(self, key, entry)
            self._by_entry[entry] = obj
        self._cachedir: CacheDir | None = None
        self._session: HttpSession | None = None
        self._nursery: trio.Nursery | None = None
        self._tasks: Tasks | None = None
        # objects with an open cache that nobody uses, oldest first: key -> since when
        self._idle: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._idle_overflow = trio.Event()
        # objects whose kernel pages must go (a new version): the FUSE layer drains it
        self._changed_send, self.changed = trio.open_memory_channel[MountedObject](math.inf)

    @property
    def cachedir(self) -> CacheDir:
        assert self._cachedir is not None, "ObjectStore.run() is not running"
        return self._cachedir

    @property
    def session(self) -> HttpSession:
        assert self._session is not None, "ObjectStore.run() is not running"
        return self._session

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "ObjectStore.run() is not running"
        return self._nursery

    @property
    def budget(self) -> Budget:
        """The space books of the cache directory (see ``budget.py``)."""
        assert self._budget is not None, "ObjectStore.run() is not running"
        return self._budget

    @property
    def evictor(self) -> Evictor:
        """The eviction loop of the cache directory (see ``evictor.py``)."""
        assert self._evictor is not None, "ObjectStore.run() is not running"
        return self._evictor

    def stored(self, key: str, first: int, count: int) -> None:
        """A cache stored ``count`` blocks from ``first`` (its ``stored_listener``)."""
        budget = self.budget
        budget.stored(key, first, count)
        if budget.used > budget.high_water() and self._evictor is not None:
            self._evictor.wake()

    @property
    def tasks(self) -> Tasks:
        """The starter of every background task of the store (named, contained)."""
        assert self._tasks is not None, "ObjectStore.run() is not running"
        return self._tasks

    def idle(self, obj: MountedObject) -> None:
        """``obj`` may have become unused (a handle closed, a fill or check ended): its
        cache is closed after IDLE_GRACE seconds, or sooner when too many are idle. No
        await; call from the trio thread."""
        if obj._version is None or obj.in_use():
            return
        self._idle[obj.key] = trio.current_time()
        self._idle.move_to_end(obj.key)
        if len(self._idle) > MAX_IDLE_CACHES:
            self._idle_overflow.set()

    async def _idle_closer(self) -> None:
        """Close the caches of unused objects: those idle for IDLE_GRACE seconds, and the
        oldest beyond MAX_IDLE_CACHES at once. A failure to close one is logged and the
        others go on."""
        while True:
            with trio.move_on_after(IDLE_CHECK_PERIOD):
                await self._idle_overflow.wait()
            self._idle_overflow = trio.Event()
            now = trio.current_time()
            while self._idle:
                key, since = next(iter(self._idle.items()))
                if now - since < IDLE_GRACE and len(self._idle) <= MAX_IDLE_CACHES:
                    break
                del self._idle[key]
                obj = self._objects[key]
                try:
                    await obj.close_idle()
                except RangefsError as exc:
                    contain(f"closing the idle cache of {obj.name}", exc)

    def open_caches(self) -> int:
        """Objects whose cache is open now (any thread may ask)."""
        return len(self._active)

    def by_key(self, key: str) -> MountedObject | None:
        """The object of cache key ``key`` in this mount's list, if any."""
        return self._objects.get(key)

    def adopt(self, url: str) -> MountedObject:
        """The object at ``url``, made for another process that reads it through this one
        (it is not in this mount's list; it never appears in the tree). Probed on open."""
        key = cache_key(url)
        obj = self._objects.get(key)
        if obj is None:
            entry = Entry(url=url, path=PurePosixPath("-"), digest=None, size=None, line=0)
            obj = self._objects[key] = MountedObject(self, key, entry)
        return obj

    def get(self, entry: Entry) -> MountedObject:
        """The object for an entry of the list, or of a listing (made on first use)."""
        obj = self._by_entry.get(entry)
        if obj is None:
            key = cache_key(entry.url)
            obj = self._objects.get(key)
            if obj is None:
                obj = self._objects[key] = MountedObject(self, key, entry)
            self._by_entry[entry] = obj
        return obj

    def objects(self) -> list[MountedObject]:
        """Every object, once each."""
        return list(self._objects.values())

    def touch(self, obj: MountedObject) -> None:
        """``obj`` was opened: it goes last in the eviction order (on disk and in memory)."""
        self._idle.pop(obj.key, None)
        self.cachedir.touch(obj.key)

    def invalidate_kernel_cache(self, obj: MountedObject) -> None:
        """The kernel must drop its pages of ``obj`` (another version): queued on
        ``changed``, which the FUSE layer consumes (``RangeOperations.invalidate_changed``).
        No await."""
        self._changed_send.send_nowait(obj)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started()`` once objects can be served.

        On cancellation every cache index is flushed (shielded) before returning.
        Raises CacheLocked/UsageError when the cache directory is unusable (before started()).
        """
        self._cachedir = CacheDir.open(self.config.cache_dir)
        self._budget = Budget(
            self._cachedir.root, self.config.block_size, self.config.cache_size,
            self.config.cache_min_free,
        )
        try:
            async with HttpSession(self.config.http, stats=self.stats) as session:
                self._session = session
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        tasks = self._tasks = Tasks(nursery)
                        tasks.start("index flusher", flush_periodically, self._caches)
                        tasks.start("metadata saver", save_metadata_periodically,
                                    self._cachedir)
                        tasks.start("idle cache closer", self._idle_closer)
                        self._evictor = Evictor(self._budget, self._cachedir,
                                                self._objects.get)
                        tasks.start("evictor", self._evictor.run)
                        if self.config.prefetch is Prefetch.ALL:
                            tasks.start("prefetch of every object", self._prefetch_all)
                        elif self.config.probe_at_mount:
                            tasks.start("probes at mount", self._probe_all)
                        task_status.started()
                        await trio.sleep_forever()
                finally:
                    self._nursery = None
                    self._tasks = None
                    with trio.CancelScope(shield=True):
                        await self._close_caches()
        finally:
            self._session = None
            self._cachedir.close()

    def _caches(self) -> list[LocalDownloadCache]:
        return [o._version.cache for o in self._active.values() if o._version is not None]

    async def _close_caches(self) -> None:
        for cache in self._caches():
            try:
                cache.close()
            except RangefsError as exc:
                log.error("cannot close the cache: %s", exc)

    async def _probe_all(self) -> None:
        """Learn every object's attributes in the background, from mount time, so that
        `ls -l` and first opens do not wait for a probe each. Remembered metadata is loaded
        from the cache directory; the rest is probed with the store's probe slots (shared
        with lookups, which therefore never wait behind more than those). Failures are
        left for the lookup of that entry to report."""
        # One task walks the list (the known ones cost no task switch: a remount of 10,000
        # entries must not keep ~100 tasks runnable while `ls -l` waits for FUSE replies);
        # the unknown ones go to the workers.
        send, receive = trio.open_memory_channel[MountedObject](0)

        async def worker(objects: trio.MemoryReceiveChannel[MountedObject]) -> None:
            async with objects:
                async for obj in objects:
                    try:
                        await obj.probe()
                    except RangefsError as exc:  # once per entry; its lookups say EIO
                        log.warning("%s: probe at mount failed: %s", obj.name, exc)
                    except Exception as exc:  # a bug: logged, the other probes go on
                        contain(f"probe of {obj.name}", exc)

        async with trio.open_nursery() as nursery:
            async with receive:
                # fewer workers than probe slots: a lookup never queues behind this
                for _ in range(max(1, self.config.probe_concurrency * 3 // 4)):
                    nursery.start_soon(worker, receive.clone())
            async with send:
                for i, obj in enumerate(self.objects()):
                    if obj.attrs_nowait() is None:
                        await send.send(obj)
                    elif i % 1024 == 0:
                        await trio.lowlevel.checkpoint()

    @property
    def fills_running(self) -> int:
        """Whole-object fills running now."""
        return self.fills.running

    @property
    def fills_waiting(self) -> collections.deque[tuple[MountedObject, _Version]]:
        """Whole-object fills waiting for their turn, in order."""
        return self.fills.waiting

    def fill_ended(self) -> None:
        """A fill counted in ``fills`` is over: start the next ones waiting whose version
        is still current. No await."""
        self.fills.ended(self._start_waiting_fill)

    def _start_waiting_fill(self, item: tuple[MountedObject, _Version]) -> None:
        obj, version = item
        version.fill_queued = False
        if self._nursery is None:
            return
        if obj._version is version:
            obj.start_fill(version)
        elif obj.closed_while_idle(version):
            # its cache was closed while it waited (nobody had it open): open it again
            # for its turn, so that waiting fills hold no descriptors
            self.fills.force()  # _fill_reopened gives it back
            self.tasks.start(f"fill of {obj.name}", obj._fill_reopened)

    async def _prefetch_all(self) -> None:
        """Policy 'all': open and fill every object of the list, one after another."""
        for obj in self.objects():
            try:
                await obj.fill_completely()
            except Exception as exc:  # one object's failure never stops the others'
                contain(f"prefetch of {obj.name}", exc)

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

Everything here runs on the trio thread. The store owns every task (probes, fetchers,
fills, the index flusher) and flushes every cache, shielded, when it is cancelled.
"""

from __future__ import annotations

import collections
import enum
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
import trio.lowlevel

from .cache import LocalDownloadCache
from .cachedir import (
    META_SAVE_PERIOD,
    CacheDir,
    ObjectMeta,
    UsageTable,
    cache_key,
    write_meta_table,
)
from .cachefiles import ObjectIdentity
from .digests import Digest, hash_file, parse_digest
from .errors import (
    DigestMismatch,
    NotEnoughSpace,
    PermanentError,
    RangefsError,
    ReadTimeout,
    RemoteChanged,
    RetriesExhausted,
    SourceError,
)
from .fetcher import ObjectFetcher, retry_transient
from .ranges import block_span
from .ratecontrol import BackoffPolicy, Limiter
from .redact import redact_url
from .source import HttpOptions, HttpSession, RemoteInfo
from .urllist import Entry

log = logging.getLogger(__name__)

# Index persistence (crash safety). A kill -9 loses the blocks written since the last
# flush, about fill rate x (FLUSH_INTERVAL + FLUSH_PERIOD) on a fast disk (20 kills during
# one copy fetched 1.00 x the object: tests/test_crash.py). A flush is one fdatasync plus
# an index write (~2 ms on an SSD) and happens only for caches with new blocks; where
# fsyncs are slow the cache stretches the interval to FLUSH_COST_FACTOR times its last
# index write (LocalDownloadCache.needs_flush).
FLUSH_PERIOD = 0.02  # seconds between checks for caches whose index needs persisting
FLUSH_INTERVAL = 0.02  # a new block is claimed by the index after at least this long
FLUSH_RETRY_MIN = 1.0  # seconds before a failed flush (e.g. a full disk) is tried again,
FLUSH_RETRY_MAX = 30.0  # ... doubling up to this
MAX_READAHEAD = 32 << 20  # bytes a sequential reader's read-ahead grows to
FIRST_READAHEAD = 4 << 20  # read-ahead at the second sequential read, doubling from there
CACHE_READAHEAD = 64 << 20  # bytes of the cache file preloaded ahead of a sequential reader
FIRST_PRELOAD = 16 << 20  # preloaded after the first read of a handle when it is at offset 0
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


class Prefetch(enum.Enum):
    """Background fill policy: which objects are filled without a reader asking."""

    OPEN = "open"  # an opened object read sequentially is filled completely (default)
    NONE = "none"  # only what readers ask for (plus sequential read-ahead)
    ALL = "all"  # every object of the list, from mount time


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
    cache_size: int | None = None  # budget for the cache directory; None = unlimited
    probe_concurrency: int = 64
    probe_at_mount: bool = True  # learn every entry's size in the background from mount time
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)


@dataclass(frozen=True)
class ObjectAttrs:
    """What `stat` shows: size in bytes, mtime in epoch seconds."""

    size: int
    mtime: float


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
        self.filling = False
        self.fill_queued = False  # waiting for its turn to be filled
        self.verifying = False  # a digest check was started

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


class ObjectHandle:
    """One open() of an object. Called from the trio thread only."""

    def __init__(self, obj: MountedObject, version: _Version, *, keep_cache: bool) -> None:
        self._obj = obj
        self._version = version
        self.keep_cache = keep_cache
        self._next_offset = -1  # where a sequential reader reads next
        self._readahead = 0  # bytes of read-ahead, grows while reads stay sequential
        self._preloaded_to = 0  # the cache file is being preloaded up to here

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
        self._read_ahead(offset, end, last)
        if cache.bitmap.first_clear(first, last + 1) is not None:
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
        data = await cache.read_at_async(offset, end - offset)
        obj.check_generation(version)  # the disk read may have overlapped a version change
        return data

    def _read_ahead(self, offset: int, end: int, last: int) -> None:
        """Grow read-ahead while reads are sequential; start background flights for it.

        The second sequential read of a handle also starts the object's background fill
        under ``--prefetch open``: a random reader fetches only the blocks it reads."""
        starts_at_zero = offset == 0 and self._next_offset < 0
        if offset == self._next_offset:
            self._readahead = min(MAX_READAHEAD, max(2 * self._readahead, FIRST_READAHEAD))
        else:
            self._readahead = 0
            self._preloaded_to = 0
        self._next_offset = end
        version = self._version
        # the cache file: bring what this reader reads next into the page cache, well
        # ahead (the kernel's own read-ahead of one sequential stream gave 0.5-0.7 GB/s
        # here; cache.preload 1.4-2.1 GB/s). cp, cat and sha256sum begin with a read at
        # offset 0: a little is preloaded before the reads show a pattern (16 MiB of disk
        # reads for a random reader that starts there; nothing for blocks not cached).
        if starts_at_zero:
            self._preload(end, end + FIRST_PRELOAD)
        if not self._readahead:
            return
        if self._preloaded_to < end + CACHE_READAHEAD // 2:
            self._preload(max(end, self._preloaded_to), end + CACHE_READAHEAD)
        if version.filling:
            return
        if self._obj.store.config.prefetch is Prefetch.OPEN:
            self._obj.start_fill(version)
            if version.filling:
                return
        bs = version.cache.block_size
        version.fetcher.prefetch(last + 1, last + self._readahead // bs)

    def _preload(self, start: int, stop: int) -> None:
        """Preload ``[start, stop)`` of the cache file (clamped at its end) in the store's
        nursery; the handle's preload then reaches ``stop``."""
        cache = self._version.cache
        self._preloaded_to = min(cache.size, stop)
        if self._preloaded_to > start:
            self._obj.store.nursery.start_soon(cache.preload, start, self._preloaded_to - start)

    def release(self) -> None:
        """The file handle was closed."""
        self._obj.opened -= 1


class MountedObject:
    """One remote object (one cache key); entries naming the same URL share it."""

    def __init__(self, store: ObjectStore, key: str, entry: Entry) -> None:
        self.store = store
        self.key = key
        self.entry = entry
        self._name: str | None = None
        self.opened = 0
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
        """Attributes known without the network (probed, remembered, or size=N), else None."""
        info = self._info
        if info is not None:
            return ObjectAttrs(info.size, info.mtime or self.store.started)
        meta = self._remembered()
        if meta is not None and (self.entry.size is None or self.entry.size == meta.size):
            return ObjectAttrs(meta.size, meta.mtime or self.store.started)
        if self.entry.size is not None:
            return ObjectAttrs(self.entry.size, self.store.started)
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
                    lambda: self.store.session.probe(self.entry.url),
                    self.store.config.backoff,
                    self.name,
                )
            if self.entry.size is not None and info.size != self.entry.size:
                raise PermanentError(
                    f"{self.name}: the server says {info.size} bytes, the URL list says "
                    f"size={self.entry.size}"
                )
            self._validated = True
            self._remember(info)
            return info

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

    def cached_bytes(self) -> int:
        """Bytes of the object that are in the local cache now (for st_blocks)."""
        if self._version is None:
            return 0
        return self._version.cache.cached_bytes_and_blocks()[0]

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
            cached = 0
            if self._version is not None:
                cached = self._version.cache.cached_bytes_and_blocks()[1]
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

    async def open(self) -> ObjectHandle:
        """Open for reading: probe or revalidate, open the cache, start fill per policy."""
        if self._failed is not None:
            raise self._failed
        async with self._open_lock:
            version = await self._ensure_version()
            self.store.touch(self)
            keep = self._keep_cache
            self._keep_cache = True
        self.opened += 1
        return ObjectHandle(self, version, keep_cache=keep)

    async def _ensure_version(self) -> _Version:
        if self._version is not None:
            return self._version
        if self._info is None:
            meta = self._remembered()
            if meta is not None and (self.entry.size is None or self.entry.size == meta.size):
                self._info = _info_from_meta(self.entry.url, meta)
                self.store.nursery.start_soon(self._revalidate)
            else:
                await self.probe()
        assert self._info is not None
        return await self._start_version(self._info)

    async def _start_version(self, info: RemoteInfo) -> _Version:
        config = self.store.config
        identity = ObjectIdentity(
            url=self.name,
            size=info.size,
            block_size=config.block_size,
            etag=info.etag,
            last_modified=info.last_modified,
        )
        directory = self.store.cachedir.object_dir(self.key)
        if self._version is None:
            async with self.store.room_lock:  # no eviction between the check and the open
                await self.store.make_room(self, info.size)
                # a worker thread: reserving a new object's space (fallocate, fsync of the
                # file and its directory) took 86 ms for 40 GiB here, and every other
                # reader of the mount would wait that long. Not abandoned on cancellation:
                # the opened cache is owned by the version below before the next
                # checkpoint. The open lock keeps eviction away from this directory.
                cache = await trio.to_thread.run_sync(
                    functools.partial(
                        LocalDownloadCache.open, directory, identity,
                        flush_interval=FLUSH_INTERVAL,
                    )
                )
                self.store.account(self, info.size)
        else:
            cache = self._version.cache
            cache.invalidate(identity)
            self.store.account(self, info.size)
        self._generation += 1
        fetcher = ObjectFetcher(
            cache,
            self.store.session.reader(self.entry.url, info),
            limiter=self.store.limiter,
            backoff=config.backoff,
            demand_slots=self.store.demand_slots,
            fill_slots=self.store.fill_slots,
            on_remote_changed=self._on_remote_changed,
        )
        version = _Version(self._generation, info, cache, fetcher)
        self._version = version
        self.store._active[self.key] = self
        self._verified = None
        await self.store.nursery.start(version.run_fetcher)
        if cache.complete():
            self.start_verify(version)
        return version

    def check_generation(self, version: _Version) -> None:
        """Raise RemoteChanged if ``version`` is no longer the object's current one."""
        if self._failed is not None:
            raise self._failed
        if self._version is not version:
            raise RemoteChanged(f"{self.name}: the remote object changed while open; reopen it")

    def _on_remote_changed(self, exc: RemoteChanged) -> None:
        self._validated = False
        self.store.nursery.start_soon(self._revalidate)

    async def _revalidate(self) -> None:
        """Probe again; switch to the new version if the remote changed. Never raises."""
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

    def evict(self) -> bool:
        """Close the cache of an object nobody has open, so its directory can go."""
        version = self._version
        if self.opened > 0 or (self._open_lock_ is not None and self._open_lock_.locked()):
            return False
        if version is not None:
            version.stop()
            version.cache.close()
            self._version = None
            self.store._active.pop(self.key, None)
        return True

    async def fill_completely(self) -> None:
        """Open the object's cache and fill it now (policy 'all'); verify when complete."""
        async with self._open_lock:
            version = await self._ensure_version()
        if version.cache.complete():
            await self._verify(version)
        elif not version.filling:
            version.filling = True
            self.store.fills_running += 1  # one fill at a time, this one included
            await self._fill(version)

    def start_fill(self, version: _Version) -> None:
        """Fill every outstanding block in the background, once per version: now if fewer
        than CONCURRENT_FILLS fills run, else when its turn comes (``filling`` stays False
        until then, so its readers keep their read-ahead). No await."""
        if version.filling or version.stopped or version.cache.complete():
            return
        store = self.store
        if store.fills_running >= CONCURRENT_FILLS:
            if not version.fill_queued:
                version.fill_queued = True
                store.fills_waiting.append((self, version))
            return
        version.filling = True
        store.fills_running += 1  # _fill gives it back, whatever happens
        store.nursery.start_soon(self._fill, version)

    def start_verify(self, version: _Version) -> None:
        """Check the digest of a complete version in the background, once."""
        if not version.verifying and self.expected_digest() is not None:
            version.verifying = True
            self.store.nursery.start_soon(self._verify, version)

    async def _fill(self, version: _Version) -> None:
        """Fill ``version``; the caller counted it in ``store.fills_running``, which this
        gives back (and so lets the next waiting fill start), whatever happens."""
        try:
            with version.new_scope():
                await version.fetcher.fill(self.store.config.concurrency)
        except RangefsError as exc:
            log.warning("%s: background fill stopped: %s", self.name, exc)
            version.filling = False
            return
        finally:
            self.store.fill_ended()
        if version.cache.complete() and self._version is version:
            self.start_verify(version)

    async def _verify(self, version: _Version) -> None:
        """Hash a complete object once; a mismatch drops the cache and fails reads."""
        digest = self.expected_digest()
        if digest is None or self._verified is not None:
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
        self.limiter = Limiter(bytes_per_second=config.max_rate)
        self.fills_running = 0  # whole-object fills started by MountedObject.start_fill
        self.fills_waiting: collections.deque[tuple[MountedObject, _Version]] = (
            collections.deque()
        )
        self.demand_slots = trio.CapacityLimiter(
            max(4, DEMAND_SLOTS_PER_FILL_SLOT * config.concurrency)
        )
        self.fill_slots = trio.CapacityLimiter(max(1, config.concurrency))
        self.probe_slots = trio.CapacityLimiter(max(1, config.probe_concurrency))
        self._objects: dict[str, MountedObject] = {}
        self._by_entry: dict[Entry, MountedObject] = {}
        # --cache-size: bytes per object directory, built by the first make_room
        self._usage: UsageTable | None = None
        self.room_lock = trio.Lock()
        # the objects with an open cache (the flusher looks at these only, many times a
        # second: a list of 100k URLs must not cost 100k checks per tick)
        self._active: dict[str, MountedObject] = {}
        for entry in entries:
            key = cache_key(entry.url)
            obj = self._objects.get(key)
            if obj is None:
                obj = self._objects[key] = MountedObject(self, key, entry)
            self._by_entry[entry] = obj
        self._cachedir: CacheDir | None = None
        self._session: HttpSession | None = None
        self._nursery: trio.Nursery | None = None
        # set by the FUSE layer: drops the kernel's cached pages of an object
        self.kernel_invalidator: Callable[[MountedObject], None] | None = None

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

    def get(self, entry: Entry) -> MountedObject:
        """The object for an entry of the list."""
        return self._by_entry[entry]

    def objects(self) -> list[MountedObject]:
        """Every object, once each."""
        return list(self._objects.values())

    async def make_room(self, obj: MountedObject, size: int) -> None:
        """Keep the cache directory within --cache-size: evict least recently used objects
        that nobody has open until ``size`` more bytes fit. NotEnoughSpace if they can't.

        The caller holds ``room_lock`` until it has accounted its object (``account``).
        The directories are scanned once per mount, in a worker thread (0.37 s for 10,000
        here, which every first open paid on the event loop before); from then on the
        table is kept in memory. Evicted directories are removed in a worker thread."""
        budget = self.config.cache_size
        if budget is None:
            return
        if size > budget:
            raise NotEnoughSpace(
                f"{obj.name} has {size} bytes, more than --cache-size {budget}; raise it"
            )
        if self._usage is None:
            self._usage = UsageTable(await trio.to_thread.run_sync(self.cachedir.usage))
        usage = self._usage
        total = usage.total - usage.bytes_of(obj.key)
        for key in usage.oldest_first():
            if total + size <= budget:
                return
            if key == obj.key:
                continue
            other = self._objects.get(key)
            if other is not None and not other.evict():
                continue
            await trio.to_thread.run_sync(self.cachedir.remove, key)
            total -= usage.pop(key)
        if total + size > budget:
            raise NotEnoughSpace(
                f"{obj.name}: {size} bytes do not fit in --cache-size {budget} next to the "
                "objects that are open; raise it or close files"
            )

    def account(self, obj: MountedObject, size: int) -> None:
        """``obj`` now has a cache of an object of ``size`` bytes (its space is reserved
        up front): count that many bytes for it, as its most recent use."""
        if self._usage is not None:
            self._usage.set(obj.key, size)

    def touch(self, obj: MountedObject) -> None:
        """``obj`` was opened: it goes last in the eviction order (on disk and in memory)."""
        self.cachedir.touch(obj.key)
        if self._usage is not None:
            self._usage.touch(obj.key)

    def invalidate_kernel_cache(self, obj: MountedObject) -> None:
        """Hook for the FUSE layer: drop the kernel's pages of ``obj`` (set by ops)."""
        hook = self.kernel_invalidator
        if hook is not None:
            hook(obj)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started()`` once objects can be served.

        On cancellation every cache index is flushed (shielded) before returning.
        Raises CacheLocked/UsageError when the cache directory is unusable (before started()).
        """
        self._cachedir = CacheDir.open(self.config.cache_dir)
        try:
            async with HttpSession(self.config.http) as session:
                self._session = session
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        nursery.start_soon(self._flusher)
                        nursery.start_soon(self._meta_saver)
                        if self.config.prefetch is Prefetch.ALL:
                            nursery.start_soon(self._prefetch_all)
                        elif self.config.probe_at_mount:
                            nursery.start_soon(self._probe_all)
                        task_status.started()
                        await trio.sleep_forever()
                finally:
                    self._nursery = None
                    with trio.CancelScope(shield=True):
                        await self._close_caches()
        finally:
            self._session = None
            self._cachedir.close()

    def _caches(self) -> list[LocalDownloadCache]:
        return [o._version.cache for o in self._active.values() if o._version is not None]

    async def _flusher(self) -> None:
        """Persist indexes in batches: several times a second, only caches that need it.

        A cache whose flush failed (a full disk: the index cannot be written; its blocks
        stay unclaimed, and are served meanwhile) is retried after FLUSH_RETRY_MIN seconds,
        doubling up to FLUSH_RETRY_MAX, with one log line per failure.
        """
        retry: dict[LocalDownloadCache, tuple[float, float]] = {}  # cache -> (when, delay)
        while True:
            await trio.sleep(FLUSH_PERIOD)
            now = trio.current_time()
            for cache in self._caches():
                when, delay = retry.get(cache, (0.0, 0.0))
                if now < when or not cache.needs_flush():
                    continue
                try:
                    await cache.flush()
                except RangefsError as exc:
                    delay = min(FLUSH_RETRY_MAX, max(FLUSH_RETRY_MIN, 2 * delay))
                    retry[cache] = (trio.current_time() + delay, delay)
                    log.error("cannot persist the cache index (retrying in %g s): %s",
                              delay, exc)
                else:
                    if retry.pop(cache, None) is not None:
                        log.info("%s: the cache index is persisted again", cache.directory)
            for cache in [c for c in retry if c.closed]:
                del retry[cache]

    async def _meta_saver(self) -> None:
        """Save the metadata table when it changed, at most every META_SAVE_PERIOD seconds,
        serialised and written in a worker thread (CacheDir.close saves the last state)."""
        while True:
            await trio.sleep(META_SAVE_PERIOD)
            table = self.cachedir.meta_snapshot()
            if table is None:
                continue
            try:
                await trio.to_thread.run_sync(write_meta_table, self.cachedir.root, table)
            except OSError as exc:
                self.cachedir.meta_changed()  # try again next period, and at close
                log.warning("cannot save the metadata table (sizes will be probed again on "
                            "the next mount): %s", exc)

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
                    except RangefsError as exc:
                        log.info("%s: probe at mount failed: %s", obj.name, exc)

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

    def fill_ended(self) -> None:
        """A fill started by ``start_fill`` is over: start the next one waiting whose
        version is still current. No await."""
        self.fills_running -= 1
        while self.fills_waiting and self.fills_running < CONCURRENT_FILLS:
            obj, version = self.fills_waiting.popleft()
            version.fill_queued = False
            if obj._version is version and self._nursery is not None:
                obj.start_fill(version)

    async def _prefetch_all(self) -> None:
        """Policy 'all': open and fill every object of the list, one after another."""
        for obj in self.objects():
            try:
                await obj.fill_completely()
            except RangefsError as exc:
                log.warning("%s: prefetch failed: %s", obj.name, exc)

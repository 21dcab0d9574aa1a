"""Downloaders: fill a cache completely (CachingDownloader) or stream bytes in order
(StreamingDownloader), and the two jobs the CLI runs on them: ``download_file`` and
``cat_url``.

Both downloaders run on the trio thread and own every task they start: when ``run`` /
``stream`` returns or raises, nothing of theirs is left running. Errors are the
``rangefs.errors`` classes; trio exception groups never leave this module.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import trio

from .cache import Buffer, LocalDownloadCache
from .cachefiles import ObjectIdentity
from .digests import Digest, Hasher, hash_file
from .errors import (
    DigestMismatch,
    InternalError,
    NotEnoughSpace,
    RangefsError,
    RemoteChanged,
    RetriesExhausted,
    TransientError,
    UsageError,
)
from .fasthttp import BULK_RECEIVE_SIZE, receive_size
from .fetcher import ObjectFetcher, retry_transient
from .ranges import ByteRange, ByteRanges, num_blocks, range_for_index
from .ratecontrol import BackoffPolicy, ConcurrencyController, ConcurrencyPlan, Limiter
from .redact import redact_url
from .scheduler import FLUSH_INTERVAL, flush_periodically
from .sharing import CopyingReader, copy_from_mounts, export_from_mounts
from .source import HttpOptions, HttpSession, Reader
from .urlcommand import FreshUrl, UrlCommand
from .urllist import default_name

if TYPE_CHECKING:
    from .helper import Helper, HelperJob

log = logging.getLogger(__name__)



# -- caching downloader -------------------------------------------------------------------


@dataclass
class DownloadStats:
    """Counters of one CachingDownloader.run; none ever decreases. Bytes are object bytes."""

    download_size: int = 0  # the object's size
    download_blocks: int = 0  # the object's blocks
    cached_bytes: int = 0  # in the cache now (found at start plus downloaded)
    cached_blocks: int = 0
    found_cached_bytes: int = 0  # already cached when run() started
    downloaded_bytes: int = 0  # body bytes received (whole blocks and partial ones)
    downloaded_blocks: int = 0  # blocks written by this run
    requests: int = 0
    retries: int = 0
    errors: int = 0
    iterations: int = 0  # passes over the outstanding blocks
    duration: float = 0.0  # seconds


@dataclass(frozen=True)
class DownloadStatus:
    """How a run ended. ``resumable``: running again later may finish the job."""

    complete: bool
    resumable: bool
    error: RangefsError | None
    stats: DownloadStats


def _resumable(error: RangefsError) -> bool:
    return isinstance(error, RetriesExhausted | TransientError)


class CachingDownloader:
    """Fetch every outstanding block of ``cache`` from ``reader``.

    ``concurrency`` parallel range requests of up to ``request_bytes`` each, or, with a
    ``controller``, as many as it chooses by measuring (at most its plan's maximum, which
    then replaces ``concurrency``); transient failures retried per ``backoff``; with
    ``wait_for_completion`` failed passes are repeated (at most ``max_passes``,
    ``pass_delay`` seconds apart, doubling) until the cache is complete. ``progress`` is
    called with a stats snapshot at most every ``progress_interval`` seconds and once at
    the end. Local I/O and cache errors stop at
    once (not resumable); so does a changed remote.
    """

    def __init__(
        self,
        cache: LocalDownloadCache,
        reader: Reader,
        *,
        concurrency: int = 16,
        limiter: Limiter | None = None,
        backoff: BackoffPolicy | None = None,
        request_bytes: int = 8 << 20,
        wait_for_completion: bool = False,
        max_passes: int = 5,
        pass_delay: float = 1.0,
        progress: Callable[[DownloadStats], None] | None = None,
        progress_interval: float = 0.5,
        controller: ConcurrencyController | None = None,
    ) -> None:
        if reader.info.size != cache.size:
            raise InternalError(
                f"cache size {cache.size} does not match the object's size {reader.info.size}"
            )
        self.cache = cache
        self.reader = reader
        self.controller = controller
        self.concurrency = controller.plan.maximum if controller else max(1, concurrency)
        self.limiter = limiter or Limiter()
        self.backoff = backoff or BackoffPolicy()
        self.request_bytes = request_bytes
        self.wait_for_completion = wait_for_completion
        self.max_passes = max(1, max_passes)
        self.pass_delay = pass_delay
        self.progress = progress
        self.progress_interval = progress_interval
        self.stats = DownloadStats()

    def _snapshot(self, fetcher: ObjectFetcher, found: int, start: float) -> DownloadStats:
        cached_bytes, cached_blocks = self.cache.cached_bytes_and_blocks()
        fs = fetcher.stats
        return replace(
            self.stats,
            cached_bytes=cached_bytes,
            cached_blocks=cached_blocks,
            downloaded_bytes=fs.bytes_received,
            downloaded_blocks=fs.blocks_written,
            requests=fs.requests,
            retries=fs.retries,
            errors=fs.errors,
            duration=trio.current_time() - start,
            found_cached_bytes=found,
        )

    async def run(self) -> DownloadStatus:
        """Download until complete, or until an error ends the job; never raises
        RangefsError (it is in the status). The cache index is flushed before returning."""
        start = trio.current_time()
        found = self.cache.cached_bytes_and_blocks()[0]
        self.stats.download_size = self.cache.size
        self.stats.download_blocks = self.cache.num_blocks
        fetcher = ObjectFetcher(
            self.cache,
            self.reader,
            limiter=self.limiter,
            backoff=self.backoff,
            demand_slots=trio.CapacityLimiter(self.concurrency),
            fill_slots=(self.controller.slots if self.controller is not None
                        else trio.CapacityLimiter(self.concurrency)),
            fill_request_bytes=self.request_bytes,
        )
        error: RangefsError | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            # the mount's flusher: batches, and backoff when the index cannot be written
            # (the download then fails at its final flush if the disk stays full)
            nursery.start_soon(flush_periodically, lambda: [self.cache])
            if self.progress is not None:
                nursery.start_soon(self._report, fetcher, found, start)
            if self.controller is not None:
                stats = fetcher.stats
                nursery.start_soon(self.controller.run, lambda: (stats.bytes_received,
                                                                 stats.errors))
            delay = self.pass_delay
            while not self.cache.complete():
                self.stats.iterations += 1
                error = None
                try:
                    await fetcher.fill(self.concurrency)
                except RangefsError as exc:
                    error = exc
                if self.cache.needs_flush():
                    await self.cache.flush()
                if error is None or not self.wait_for_completion or not _resumable(error):
                    break
                if self.stats.iterations >= self.max_passes:
                    break
                log.info("%s: pass %d failed (%s); next pass in %.1f s",
                         self.reader.name, self.stats.iterations, error, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 60.0)
            nursery.cancel_scope.cancel()
        await self.cache.flush()
        self.stats = self._snapshot(fetcher, found, start)
        if self.progress is not None:
            self.progress(self.stats)
        complete = self.cache.complete()
        if complete:
            error = None
        return DownloadStatus(
            complete=complete,
            resumable=error is not None and _resumable(error),
            error=error,
            stats=self.stats,
        )

    async def _report(self, fetcher: ObjectFetcher, found: int, start: float) -> None:
        assert self.progress is not None
        while True:
            await trio.sleep(self.progress_interval)
            self.progress(self._snapshot(fetcher, found, start))


# -- streaming downloader -----------------------------------------------------------------


@dataclass
class StreamingStats:
    """Counters of one StreamingDownloader.stream. ``out_of_order``: blocks that arrived
    before an earlier block; ``max_buffered``: most blocks waiting for delivery at once."""

    streamed_bytes: int = 0
    streamed_blocks: int = 0
    requests: int = 0
    retries: int = 0
    out_of_order: int = 0
    max_buffered: int = 0


class StreamingDownloader:
    """Concurrent range requests delivered in order, as a stream of chunks.

    At most ``window`` blocks are requested or buffered at once (bounded memory:
    window x block_size). The digest, when given, is checked after the last byte and a
    mismatch raises DigestMismatch (the consumer has seen the bytes by then: it must not
    trust them until ``stream`` returns). A sink that raises, or a caller that is
    cancelled, cancels every request; a block that fails after its retries raises its
    error after the blocks before it were delivered. Servers without Range support are
    read with one sequential request.
    """

    def __init__(
        self,
        reader: Reader,
        *,
        block_size: int = 4 << 20,
        concurrency: int = 8,
        window: int | None = None,
        limiter: Limiter | None = None,
        backoff: BackoffPolicy | None = None,
        digest: Digest | None = None,
    ) -> None:
        self.reader = reader
        self.block_size = block_size
        self.concurrency = max(1, concurrency)
        self.window = max(self.concurrency, window or 2 * self.concurrency)
        self.limiter = limiter or Limiter()
        self.backoff = backoff or BackoffPolicy()
        self.digest = digest
        self.stats = StreamingStats()

    async def stream(self, sink: Callable[[bytes], Awaitable[None]]) -> None:
        """Call ``sink`` with the object's bytes, in order, until the end. See the class."""
        size = self.reader.info.size
        hasher = Hasher(self.digest) if self.digest is not None else None

        async def deliver(data: bytes) -> None:
            if hasher is not None:
                hasher.update(data)
            self.stats.streamed_bytes += len(data)
            await sink(data)

        try:
            if size > 0 and not self.reader.info.accept_ranges:
                await self._stream_whole(deliver)
            elif size > 0:
                await self._stream_blocks(deliver)
        except BaseExceptionGroup as group:
            raise _single(group) from None
        if hasher is not None:
            hasher.verify()

    async def _stream_whole(self, deliver: Callable[[bytes], Awaitable[None]]) -> None:
        self.stats.requests += 1
        async with self.reader.open_range(ByteRange(0, self.reader.info.size - 1)) as body:
            async for chunk in body:
                await self.limiter.wait_bytes(len(chunk))
                await deliver(chunk)
        self.stats.streamed_blocks = 1

    async def _stream_blocks(self, deliver: Callable[[bytes], Awaitable[None]]) -> None:
        size, bs = self.reader.info.size, self.block_size
        total = num_blocks(size, bs)
        ready: dict[int, bytes] = {}
        arrived = trio.Event()
        slots = trio.Semaphore(self.window)
        next_to_request = 0
        next_to_deliver = 0

        async def worker() -> None:
            nonlocal next_to_request, arrived
            while next_to_request < total:
                await slots.acquire()
                if next_to_request >= total:
                    slots.release()
                    return
                index = next_to_request
                next_to_request += 1
                data = await self._fetch_block(index)
                if index != next_to_deliver:
                    self.stats.out_of_order += 1
                ready[index] = data
                self.stats.max_buffered = max(self.stats.max_buffered, len(ready))
                arrived.set()
                arrived = trio.Event()

        async with trio.open_nursery() as nursery:
            for _ in range(self.concurrency):
                nursery.start_soon(worker)
            while next_to_deliver < total:
                data_or_none = ready.pop(next_to_deliver, None)
                if data_or_none is None:
                    await arrived.wait()
                    continue
                next_to_deliver += 1
                slots.release()
                self.stats.streamed_blocks += 1
                await deliver(data_or_none)

    async def _fetch_block(self, index: int) -> bytes:
        size, bs = self.reader.info.size, self.block_size
        rng = range_for_index(index, size, bs)
        backoff = self.backoff.new()
        while True:
            await self.limiter.wait_request()
            self.stats.requests += 1
            parts: list[bytes] = []
            got = 0
            try:
                async with self.reader.open_range(rng) as body:
                    async for chunk in body:
                        await self.limiter.wait_bytes(len(chunk))
                        parts.append(chunk)
                        got += len(chunk)
                if got != rng.size:
                    raise TransientError(f"{self.reader.name} {rng}: body ended early")
                return b"".join(parts)
            except TransientError as exc:
                if await backoff.wait(exc):
                    raise RetriesExhausted(
                        f"{self.reader.name} {rng}: gave up after {backoff.retries} retries: {exc}"
                    ) from exc
                self.stats.retries += 1


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one meaningful error of a trio exception group (first RangefsError, else first)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, RangefsError):
            return leaf
    return leaves[0]


# -- the CLI's jobs -------------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadOptions:
    """Options of ``rangefs download`` / ``rangefs cat``; bytes and seconds."""

    block_size: int = 1 << 20
    # download: the most requests at once (None: DOWNLOAD_MAX_CONCURRENCY), below which it
    # chooses the count by measuring; cat: requests at once (None: CAT_CONCURRENCY)
    concurrency: int | None = None
    max_rate: float | None = None
    http: HttpOptions = field(default_factory=HttpOptions)
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    digest: Digest | None = None  # expected digest (e.g. --sha256); else the server's
    force: bool = False  # overwrite an existing DEST
    max_passes: int = 5  # passes over the outstanding blocks before giving up
    pass_delay: float = 1.0  # seconds before the second pass; doubles, at most 60
    from_mounts: bool = True  # copy what rangefs mounts cached first (sharing.py)
    url_command: UrlCommand | None = None  # prints a fresh URL for an expired one


@dataclass(frozen=True)
class DownloadResult:
    """What download_file did: the file, its size, how much came from the network."""

    dest: Path
    size: int
    downloaded_bytes: int
    found_cached_bytes: int  # resumed from an earlier run of the same download
    verified: Digest | None
    seconds: float
    copied_bytes: int = 0  # copied out of the cache of a rangefs mount (sharing.py)


DOWNLOAD_MAX_CONCURRENCY = 64  # requests at once a download may grow to (--concurrency)
CAT_CONCURRENCY = 16  # cat's requests at once (its reorder window holds 2 x as many blocks)
DOWNLOAD_REQUEST_BYTES = 8 << 20  # the largest request of a download
RUNS_PER_STREAM = 2  # a download's requests are small enough for this many per stream
# A download hands its written bytes to the disk every this many (cache.write_behind): its
# last fdatasync then waits for a few MiB, not for everything written since the previous
# flush (256 MiB on the bench's fast link: ~50 ms -> ~5 ms from the last block written to
# the end of the download), and its dirty memory stays small however large the object.
WRITE_BEHIND_BYTES = 8 << 20


def download_request_bytes(size: int, block_size: int, streams: int) -> int:
    """Bytes per request of a download of ``size`` bytes: at most DOWNLOAD_REQUEST_BYTES,
    small enough that ``streams`` requests at once have RUNS_PER_STREAM each to do (a
    256 MiB object over 64 streams: 2 MiB), never under one block."""
    share = size // max(1, streams * RUNS_PER_STREAM)
    return max(block_size, min(DOWNLOAD_REQUEST_BYTES, share // block_size * block_size))


HELPER_MIN_BYTES = 64 << 20  # missing bytes from which a download's helper takes half


def _helper_share(cache: LocalDownloadCache) -> tuple[tuple[int, int], ...]:
    """The runs (inclusive block indices) of the missing blocks' second half, by count;
    () when less than HELPER_MIN_BYTES is missing."""
    bitmap = cache.bitmap
    if cache.size - bitmap.cached_bytes() < HELPER_MIN_BYTES:
        return ()
    missing: list[tuple[int, int]] = []  # runs of missing blocks
    block = bitmap.first_clear(0)
    while block is not None:
        end = bitmap.first_set(block)
        missing.append((block, (cache.num_blocks if end is None else end) - 1))
        block = None if end is None else bitmap.first_clear(end)
    total = sum(last - first + 1 for first, last in missing)
    skip = total - total // 2
    share: list[tuple[int, int]] = []
    for first, last in missing:
        if skip > last - first:
            skip -= last - first + 1
            continue
        share.append((first + skip, last))
        skip = 0
    return tuple(share)


class _Share:
    """This process's view of its cache while a helper fetches ``taken``: those blocks
    count as cached here, so the fetcher leaves them; the rest goes to the cache (writes,
    flushes and what the progress shows). Trio thread."""

    def __init__(self, cache: LocalDownloadCache, taken: tuple[tuple[int, int], ...]) -> None:
        self._cache = cache
        self.bitmap = ByteRanges.from_bytes(cache.size, cache.block_size,
                                            cache.bitmap.to_bytes())
        for first, last in taken:
            for index in range(first, last + 1):
                self.bitmap.set_block(index)

    size = property(lambda self: self._cache.size)
    block_size = property(lambda self: self._cache.block_size)
    num_blocks = property(lambda self: self._cache.num_blocks)
    closed = property(lambda self: self._cache.closed)
    directory = property(lambda self: self._cache.directory)

    def cached_bytes_and_blocks(self) -> tuple[int, int]:
        return self._cache.cached_bytes_and_blocks()

    def needs_flush(self) -> bool:
        return self._cache.needs_flush()

    async def flush(self) -> None:
        await self._cache.flush()

    def complete(self) -> bool:
        return self.bitmap.complete()

    def write_blocks(self, first: int, parts: Sequence[Buffer]) -> int:
        count = self._cache.write_blocks(first, parts)
        for index in range(first, first + -(-sum(len(memoryview(p)) for p in parts)
                                             // self._cache.block_size)):
            self.bitmap.set_block(index)
        return count


async def _download_with_helper(cache: LocalDownloadCache, helper: Helper, job: HelperJob,
                                mine: CachingDownloader) -> DownloadStatus:
    """Run ``mine`` (on a _Share of ``cache``) while ``helper`` does ``job``, claiming the
    blocks it reports; both end before this returns. The status: ``mine``'s, its
    downloaded bytes with the helper's, complete only if ``cache`` is."""
    helped = 0
    ours = {block for first, last in job.runs for block in range(first, last + 1)}

    def adopt(first: int, count: int) -> None:
        nonlocal helped
        if not all(block in ours for block in range(first, first + count)):
            raise InternalError(f"the download helper reported blocks {first}..."
                                f"{first + count - 1}, not all of them in its job")
        cache.adopt_blocks(first, count)
        helped += sum(range_for_index(i, cache.size, cache.block_size).size
                      for i in range(first, first + count))

    code = 0
    async with trio.open_nursery() as nursery:
        async def run_helper() -> None:
            nonlocal code
            code = await helper.run_job(job, adopt)

        nursery.start_soon(run_helper)
        status = await mine.run()
    log.info("%s: the helper process (pid %d) fetched %d bytes and ended with status %d",
             redact_url(job.url), helper.pid, helped, code)
    stats = replace(status.stats, downloaded_bytes=status.stats.downloaded_bytes + helped)
    complete = cache.complete()
    return replace(status, complete=complete, stats=stats,
                   error=None if complete else status.error)


def partial_dir(dest: Path) -> Path:
    """Where download_file keeps the resumable cache of ``dest``."""
    return dest.with_name(dest.name + ".rangefs-part")


async def download_file(
    url: str,
    dest: Path,
    options: DownloadOptions,
    *,
    progress: Callable[[DownloadStats], None] | None = None,
    helper: Helper | None = None,
) -> DownloadResult:
    """Download ``url`` to ``dest``: parallel, resumable, verified.

    ``helper`` (forked by the caller before trio.run; closed here, used or not) fetches
    half of what is missing in a second process when that is at least HELPER_MIN_BYTES.

    The blocks are kept in ``DEST.rangefs-part/`` until the object is complete and its
    digest (given, or the server's) matches; then the data is fsynced and renamed to
    ``dest`` and the partial directory removed. ``dest`` never holds partial or wrong bytes.
    A rerun after a failure or a kill resumes from the blocks already there.
    """
    started = time.monotonic()
    name = redact_url(url)
    if dest.exists() and not options.force:
        raise UsageError(f"{dest} exists; remove it or pass --force")
    if dest.is_dir():
        raise UsageError(f"{dest} is a directory; give a file name")
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent} does not exist; create it first")
    part = partial_dir(dest)
    fresh = _fresh(url, options, str(dest), name)
    with receive_size(BULK_RECEIVE_SIZE):  # the session's transport reads 512 KiB at once
        session = HttpSession(options.http)
    async with session:
        info = await retry_transient(lambda: session.probe(url, fresh=fresh), options.backoff,
                                     name)
        identity = ObjectIdentity(
            url=name, size=info.size, block_size=options.block_size,
            etag=info.etag, last_modified=info.last_modified,
        )
        try:
            cache = LocalDownloadCache.open(part, identity, flush_interval=FLUSH_INTERVAL)
        except NotEnoughSpace as exc:
            raise NotEnoughSpace(f"{exc}; free some space there or give a DEST on a larger "
                                 "file system") from exc
        cache.write_behind = WRITE_BEHIND_BYTES
        try:
            copied = 0
            if options.from_mounts and not cache.complete():
                copied = await trio.to_thread.run_sync(copy_from_mounts, url, info, cache)
            streams = options.concurrency or DOWNLOAD_MAX_CONCURRENCY
            request_bytes = download_request_bytes(info.size, options.block_size, streams)

            def downloader(on: LocalDownloadCache, most: int, rate: float | None,
                           ) -> CachingDownloader:
                return CachingDownloader(
                    on,
                    session.reader(url, info, fresh),
                    controller=ConcurrencyController(ConcurrencyPlan(
                        initial=min(ConcurrencyPlan.initial, most), maximum=most)),
                    request_bytes=request_bytes,
                    limiter=Limiter(bytes_per_second=rate),
                    backoff=options.backoff,
                    wait_for_completion=True,
                    max_passes=options.max_passes,
                    pass_delay=options.pass_delay,
                    progress=progress,
                )

            taken = _helper_share(cache) if helper is not None and streams >= 2 else ()
            if helper is None or not taken:
                status = await downloader(cache, streams, options.max_rate).run()
            else:
                # the helper fetches ``taken``, this process the rest; then this process
                # fetches whatever is left (what a failed or slow-to-fail helper did not do)
                from .helper import HelperJob  # (helper.py imports this module)

                half = None if options.max_rate is None else options.max_rate / 2
                job = HelperJob(url=url, info=info, data=part / "data",
                                block_size=options.block_size, runs=taken,
                                streams=streams // 2, request_bytes=request_bytes,
                                max_rate=half)
                # (a _Share is the part of a cache that CachingDownloader uses)
                share = cast(LocalDownloadCache, _Share(cache, taken))
                mine = downloader(share, streams - streams // 2, half)
                status = await _download_with_helper(cache, helper, job, mine)
                if not cache.complete():
                    rest = await downloader(cache, streams, options.max_rate).run()
                    status = replace(rest, stats=replace(
                        rest.stats, found_cached_bytes=status.stats.found_cached_bytes,
                        downloaded_bytes=(rest.stats.downloaded_bytes
                                          + status.stats.downloaded_bytes)))
        finally:
            if helper is not None:
                helper.close()
            cache.close()
    if not status.complete:
        assert status.error is not None
        hint = "; run the same command again to resume" if status.resumable else ""
        if isinstance(status.error, RemoteChanged):
            hint = "; run the same command again to start over with the new version"
        raise type(status.error)(f"{status.error}{hint}") from status.error
    digest = options.digest or info.digest
    data = part / "data"
    if digest is not None:
        actual = await hash_file(data, digest.algorithm)
        if actual != digest.expected:
            shutil.rmtree(part, ignore_errors=True)
            raise DigestMismatch(
                f"{name}: {digest.algorithm} is {actual.hex()}, expected {digest.hex}; "
                "the partial download was removed"
            )
    try:
        await trio.to_thread.run_sync(_fsync_path, data)
        os.replace(data, dest)
        await trio.to_thread.run_sync(_fsync_path, dest.parent)
    except OSError as exc:
        raise InternalError(f"cannot move the download into place at {dest}: {exc}") from exc
    shutil.rmtree(part, ignore_errors=True)
    return DownloadResult(
        dest=dest,
        size=info.size,
        downloaded_bytes=status.stats.downloaded_bytes,
        found_cached_bytes=status.stats.found_cached_bytes - copied,
        copied_bytes=copied,
        verified=digest,
        seconds=time.monotonic() - started,
    )


def _fresh(url: str, options: DownloadOptions, path: str, name: str) -> FreshUrl | None:
    """The job's current URL when ``options`` has a URL command (``path``: RANGEFS_PATH)."""
    if options.url_command is None:
        return None
    return FreshUrl(url, options.url_command, path=path, name=name)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def cat_url(url: str, out_fd: int, options: DownloadOptions) -> int:
    """Stream ``url`` to the file descriptor ``out_fd`` in order; returns the byte count.

    Raises DigestMismatch after the last byte when a known digest does not match (the
    bytes were written: the caller must report the failure with a non-zero exit).
    """
    name = redact_url(url)
    fresh = _fresh(url, options, default_name(url)[0] or "", name)
    async with HttpSession(options.http) as session:
        info = await retry_transient(
            lambda: session.probe(url, fresh=fresh), options.backoff, name
        )
        reader: Reader = session.reader(url, info, fresh)
        copying: CopyingReader | None = None
        if options.from_mounts:
            exported = await trio.to_thread.run_sync(export_from_mounts, url, info)
            if exported is not None:
                reader = copying = CopyingReader(reader, exported)
        downloader = StreamingDownloader(
            reader,
            block_size=max(options.block_size, 1 << 20),
            concurrency=options.concurrency or CAT_CONCURRENCY,
            limiter=Limiter(bytes_per_second=options.max_rate),
            backoff=options.backoff,
            digest=options.digest or info.digest,
        )

        async def write(data: bytes) -> None:
            await trio.to_thread.run_sync(_write_all, out_fd, data)

        try:
            await downloader.stream(write)
        finally:
            if copying is not None:
                copying.close()
                log.info("%s: %d bytes copied from a mount's cache", redact_url(url),
                         copying.copied)
        return info.size


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BrokenPipeError as exc:
            raise InternalError("the output was closed (broken pipe)") from exc
        view = view[n:]

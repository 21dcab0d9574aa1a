"""Demand-first, single-flight block fetcher for one object.

An ``ObjectFetcher`` moves blocks of one remote object into its ``LocalDownloadCache``.
Readers call :meth:`ObjectFetcher.fetch` for the blocks they wait for; background fill
calls :meth:`ObjectFetcher.fill` (or :meth:`prefetch` for read-ahead). Both end up in
*flights*: one HTTP range request (plus its retries) for a run of adjacent blocks.

Concurrency protocol (everything runs on the one trio thread):

- ``_inflight`` maps every block some flight is fetching to that flight. Blocks are put
  there synchronously, BEFORE the first ``await`` of whoever created the flight, and
  removed when the block is written or the flight ends. A block is therefore requested by
  at most one request at a time (single flight), however many readers wait for it.
- Flights run in the fetcher's own nursery (started by :meth:`run`), never in a reader's
  task: a reader that is cancelled or times out leaves the flight running for the others.
- Demand flights take a slot of ``demand_slots``, background flights a slot of
  ``fill_slots``: a reader never queues behind background fill (demand first). Background
  work (fill, read-ahead) takes its slot BEFORE it registers blocks, so a reader never
  waits on a background flight that has no connection yet: it starts its own.
- Background requests are short just past a reader and grow with the distance from the
  nearest reader behind them (to ``fill_request_bytes``; the last ``READERS_TRACKED``
  reader positions of the object count): a reader that catches up with the fill waits for
  a few short requests in parallel, not for the middle of one long stream. Read-ahead
  keeps one window per sequential reader and serves the windows in turn.
- Bodies are streamed: the whole blocks a chunk completes are written to the cache as soon
  as it arrives (one ``pwritev`` of views of the received chunks: a block's partial start
  is kept as a view of the chunk that brought it, not copied), which sets
  their bits; a waiter sleeps until the flight is past the last block it
  needs from that flight (one wake-up per read, not one per block).
- A transient failure is retried with backoff from the first block not yet written; the
  server's Retry-After holds every request of the object until it has passed. A flight
  that gives up stores its error and frees its remaining blocks; its waiters raise it, and
  the next reader starts a new flight.
- A server that ignores Range (two refusals in a row, or no ``Accept-Ranges`` at the probe)
  puts the object in sequential mode: one whole-object stream writes every missing block as
  it passes and readers wait for its front. From then on no range request is started (not
  by retries, read-ahead or fill): each would only bring the whole object again.

What a crash leaves on disk: blocks written since the cache's last flush are not claimed
by the index (see cache.py) and are fetched again; a partly received block is never written.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from .cache import LocalDownloadCache
from .errors import (
    CacheError,
    InternalError,
    RangefsError,
    RangeNotSupported,
    RemoteChanged,
    RetriesExhausted,
    SourceError,
    TransientError,
    Unreachable,
)
from .ranges import ByteRange, range_for_index
from .ratecontrol import BackoffPolicy, Limiter
from .source import Reader
from .stats import MountStats

log = logging.getLogger(__name__)

T = TypeVar("T")

# Smallest run a reader's request is split at: a 1 MiB read is fetched by 4 requests in
# parallel (30 ms + 16 ms at 16 MiB/s per connection, instead of 30 ms + 64 ms).
DEFAULT_DEMAND_REQUEST_BYTES = 256 << 10
DEMAND_SPLIT = 4  # most requests one reader's wait is split into (larger runs beyond)
DEFAULT_FILL_REQUEST_BYTES = 4 << 20  # largest run one background request asks for
# One-off requests (probes, cat, download) retry a host that cannot be reached (no such
# name, connection refused) this often, at most this many seconds apart: a bad URL fails
# within a second or two, not after the full backoff (8 retries, ~30 s).
UNREACHABLE_RETRIES = 2
UNREACHABLE_DELAY = 0.5
PREFETCH_WORKERS = 8  # read-ahead requests of one object at a time (32 MiB in 4 MiB runs)
READERS_TRACKED = 16  # reader positions (and read-ahead windows) one object remembers
PENDING_VIEWS = 64  # received pieces of one partial block kept before they are joined


class _Window:
    """The read-ahead window of one sequential reader: blocks ``next..last`` to consider."""

    __slots__ = ("last", "next")

    def __init__(self, first: int, last: int) -> None:
        self.next = first
        self.last = last


@dataclass
class FetchStats:
    """Counters of one fetcher; they never decrease. Bytes are body bytes received."""

    requests: int = 0
    retries: int = 0
    errors: int = 0
    bytes_received: int = 0
    blocks_written: int = 0


class _Flight:
    """One run of adjacent blocks [first, last] being fetched by one request at a time."""

    __slots__ = (
        "_waiters",
        "demand",
        "ended",
        "error",
        "last",
        "next_block",
        "sequential",
    )

    def __init__(self, first: int, last: int, *, demand: bool, sequential: bool = False) -> None:
        self.last = last
        self.sequential = sequential  # one whole-object GET; writes every missing block
        self.next_block = first  # the first block of the run not yet written
        self.demand = demand
        self.error: RangefsError | None = None
        self.ended = False
        self._waiters: list[tuple[int, trio.Event]] = []  # (block, event): wake past block

    @property
    def done(self) -> bool:
        return self.ended or self.next_block > self.last or self.error is not None

    async def wait_past(self, block: int) -> None:
        """Return once ``next_block > block`` or the flight is done (then look again)."""
        if self.next_block > block or self.done:
            return
        event = trio.Event()
        self._waiters.append((block, event))
        await event.wait()

    def advance(self, next_block: int) -> None:
        """Blocks before ``next_block`` are written: wake the waiters that are satisfied."""
        self.next_block = next_block
        if self._waiters:
            keep = []
            for block, event in self._waiters:
                if block < next_block:
                    event.set()
                else:
                    keep.append((block, event))
            self._waiters = keep

    def end(self) -> None:
        """The flight's task is over: wake everyone."""
        self.ended = True
        for _, event in self._waiters:
            event.set()
        self._waiters = []


class ObjectFetcher:
    """Fetches blocks of one object into its cache; see the module docstring for the rules.

    ``demand_slots`` and ``fill_slots`` may be shared between the fetchers of a mount, to
    bound connections overall. ``on_remote_changed`` is called (once per detection) when a
    response shows that the remote is another version than the cache's.
    """

    def __init__(
        self,
        cache: LocalDownloadCache,
        reader: Reader,
        *,
        limiter: Limiter,
        backoff: BackoffPolicy,
        demand_slots: trio.CapacityLimiter,
        fill_slots: trio.CapacityLimiter,
        demand_request_bytes: int = DEFAULT_DEMAND_REQUEST_BYTES,
        fill_request_bytes: int = DEFAULT_FILL_REQUEST_BYTES,
        on_remote_changed: Callable[[RemoteChanged], None] | None = None,
        mount_stats: MountStats | None = None,
    ) -> None:
        self.cache = cache
        self.reader = reader
        self.stats = FetchStats()
        self._mount_stats = mount_stats  # its retries are counted there too
        self._limiter = limiter
        self._backoff = backoff
        self._demand_slots = demand_slots
        self._fill_slots = fill_slots
        bs = cache.block_size
        self._demand_run = max(1, demand_request_bytes // bs)
        self._fill_run = max(1, fill_request_bytes // bs)
        self._on_remote_changed = on_remote_changed
        self._inflight: dict[int, _Flight] = {}
        self._hold_until = 0.0  # trio time before which no request of this object starts
        self._cursor = 0  # where background fill looks first: just past the latest demand
        # where readers are (just past a read, or where their read-ahead starts), oldest
        # first: background runs grow with the distance from the nearest one behind them
        self._fronts: list[int] = []
        self._nursery: trio.Nursery | None = None
        self._stopped = False  # set by stop(): no block may be written any more
        self._fatal: RangefsError | None = None  # set when the remote changed
        # Sequential mode, for servers without Range support: one whole-object stream writes
        # every missing block as it passes; readers wait for the front to reach theirs.
        self._sequential = not reader.info.accept_ranges
        self._seq_flight: _Flight | None = None
        self._range_refusals = 0  # consecutive answers that ignored Range
        self._windows: list[_Window] = []  # read-ahead: one per sequential reader
        self._prefetch_workers = 0

    # -- lifetime ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the flights' nursery until cancelled. Call with ``await nursery.start(...)``."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._stopped = True
            self._nursery = None
            for flight in set(self._inflight.values()):
                self._end_flight(flight, InternalError("fetcher stopped"))

    def stop(self) -> None:
        """Write no more blocks, from now on (synchronously), and end every flight.

        Call before the cache is invalidated: a flight task that was already woken with a
        chunk of the old version could otherwise write it before it sees a cancellation.
        """
        self._stopped = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def healthy(self) -> bool:
        """False once a response showed that the remote is another version."""
        return self._fatal is None

    # -- demand --------------------------------------------------------------------------

    async def fetch(self, first: int, last: int) -> None:
        """Return once blocks ``first..last`` (inclusive indices) are all cached.

        Missing blocks not already in flight are requested at once with demand priority,
        adjacent ones coalesced. Raises the error of a flight that gave up (RetriesExhausted,
        PermanentError, RemoteChanged, InternalError...). Cancelling the caller does not
        cancel any flight. Callers bound the wait themselves (trio.fail_after).
        """
        bitmap = self.cache.bitmap
        self._cursor = last + 1
        self._note_front(last + 1)
        block = first
        while True:
            next_missing = bitmap.first_clear(block, last + 1)
            if next_missing is None:
                return
            block = next_missing
            if self._fatal is not None:
                raise self._fatal
            if self._sequential:
                flight = self._sequential_flight()
            else:
                self._start_demand_flights(block, last)
                flight = self._inflight[block]
            # wait until the flight is past every block of ours it carries (it writes them
            # in order), then look again from the first missing one
            await flight.wait_past(min(last, flight.last))
            if not bitmap.is_block_set(block) and flight.error is not None:
                if self._handed_to_stream(flight.error):
                    continue  # the object is read by one stream now: wait for that
                raise flight.error
            # else: the block is here, or its flight stopped without it: look again

    def prefetch(self, first: int, last: int) -> None:
        """Start background flights for the missing, idle blocks of ``first..last``.

        Does not wait; read-ahead for sequential readers. Safe to call often. In sequential
        mode it does nothing: the one stream already writes every block ahead of its front,
        and a range request would only bring another whole-object answer.
        """
        last = min(last, self.cache.num_blocks - 1)
        if first > last or self._nursery is None or self._sequential:
            return
        self._note_front(first)
        for window in self._windows:
            if window.next <= first <= window.last + 1 or first <= window.next <= last + 1:
                # the same reader's window, moved on: nothing before ``first`` is wanted
                window.next = max(window.next, first)
                window.last = max(window.last, last)
                break
        else:
            self._windows.append(_Window(first, last))
            if len(self._windows) > READERS_TRACKED:
                del self._windows[0]
        if self._prefetch_workers < PREFETCH_WORKERS:
            self._prefetch_workers += 1
            self._nursery.start_soon(self._prefetch_worker)

    async def _prefetch_worker(self) -> None:
        """Read-ahead: with a fill slot held, fetch idle runs of the windows in turn."""
        try:
            while True:
                async with self._fill_slots:
                    claim = None if self._sequential else self._claim_prefetch_run()
                    if claim is None:
                        return
                    flight = self._register(*claim, demand=False)
                    await self._run_flight(flight, slot_held=True)
        finally:
            self._prefetch_workers -= 1

    def _claim_prefetch_run(self) -> tuple[int, int] | None:
        """The next idle run of the first window that has one (it then goes last, so that
        readers take turns); windows with nothing left are dropped. No await."""
        windows = self._windows
        while windows:
            window = windows[0]
            stop = window.last + 1
            block = self._first_idle(window.next, stop)
            if block is None:
                del windows[0]
                continue
            end = self._idle_run(block, stop)
            window.next = end + 1
            windows.append(windows.pop(0))
            return block, end
        return None

    # -- background fill -----------------------------------------------------------------

    async def fill(self, concurrency: int) -> None:
        """Fetch every outstanding block with ``concurrency`` parallel requests.

        Starts just after the latest demand read and wraps around. Returns when the cache
        is complete; raises the first error that made a flight give up (after the other
        workers finished their current flight). Cancellation stops it cleanly.
        """
        errors: list[RangefsError] = []

        async def worker() -> None:
            while not errors:
                if self._sequential:
                    await self._follow_sequential(errors)
                    return
                flight: _Flight | None = None
                async with self._fill_slots:
                    # slot first, then claim: no await between the claim and the flight
                    run = self._claim_fill_run()
                    if run is not None:
                        flight = self._register(run[0], run[1], demand=False)
                        await self._run_flight(flight, slot_held=True)
                if flight is None:
                    if self.cache.complete():
                        return
                    # every missing block is in someone else's flight: wait for one to end
                    # (only an ending flight can leave blocks for others; waking on every
                    # block written would make idle workers spin)
                    flight = next(iter(self._inflight.values()), None)
                    if flight is None:
                        return
                    await flight.wait_past(flight.last)
                    continue
                if flight.error is not None and not self._handed_to_stream(flight.error):
                    errors.append(flight.error)

        async with trio.open_nursery() as nursery:
            for _ in range(max(1, concurrency)):
                nursery.start_soon(worker)
        if errors:
            raise errors[0]

    # -- internals -----------------------------------------------------------------------

    def _handed_to_stream(self, error: RangefsError) -> bool:
        """True if a range flight ended because the object is now read by one stream."""
        return isinstance(error, RangeNotSupported) and self._sequential

    def _sequential_flight(self) -> _Flight:
        """The running whole-object stream, started if there is none. No await."""
        assert self._nursery is not None, "fetcher.run() is not running"
        flight = self._seq_flight
        if flight is None or flight.done:
            flight = _Flight(0, self.cache.num_blocks - 1, demand=True, sequential=True)
            self._seq_flight = flight
            self._nursery.start_soon(self._run_flight, flight)
        return flight

    async def _follow_sequential(self, errors: list[RangefsError]) -> None:
        """Background fill in sequential mode: wait for the stream, restart it if it failed."""
        while not self.cache.complete():
            flight = self._sequential_flight()
            while not flight.done:
                await flight.wait_past(flight.last)
            if flight.error is not None and not self.cache.complete():
                errors.append(flight.error)
                return

    def _enter_sequential(self) -> None:
        if not self._sequential:
            self._sequential = True
            log.warning("%s: the server ignores Range requests; reading the object with one "
                        "sequential stream from now on", self.reader.name)

    def _claim_fill_run(self) -> tuple[int, int] | None:
        """The next run of missing, idle blocks from the cursor (wrapping), or None."""
        n = self.cache.num_blocks
        for start, stop in ((self._cursor, n), (0, min(self._cursor, n))):
            block = self._first_idle(start, stop)
            if block is not None:
                end = self._idle_run(block, stop)
                self._cursor = end + 1
                return block, end
        return None

    def _idle_run(self, block: int, stop: int) -> int:
        """The last block of the background run that starts at idle ``block``: idle blocks
        before ``stop``, at most ``_run_at(block)`` of them."""
        limit = min(stop, block + self._run_at(block))
        end = block
        while end + 1 < limit and self._idle(end + 1):
            end += 1
        return end

    def _note_front(self, front: int) -> None:
        """A reader is at ``front`` (a block index). A front up to one fill run behind it is
        taken to be the same reader, moved on; the oldest are forgotten beyond
        ``READERS_TRACKED``."""
        fronts = [f for f in self._fronts if not f <= front <= f + self._fill_run]
        fronts.append(front)
        if len(fronts) > READERS_TRACKED:
            del fronts[0]
        self._fronts = fronts

    def _run_at(self, block: int) -> int:
        """Most blocks one background request starting at ``block`` may ask for: small
        just past a reader's front (the nearest one at or before ``block``), growing with
        the distance from it up to the fill run. A reader that catches up with the fill
        then waits for several short requests in parallel, not for the first megabytes of
        one long stream (16 MiB/s per connection: the 3rd MiB of a 4 MiB request comes
        190 ms after it started). Each reader of an object counts: with one front for all,
        the blocks just past one reader were asked for in whole fill runs while another
        reader had read last."""
        distance = min((block - f for f in self._fronts if f <= block), default=None)
        if distance is None:
            return self._fill_run
        return min(self._fill_run, max(self._demand_run, distance))

    def _first_idle(self, start: int, stop: int) -> int | None:
        """The first missing block in [start, stop) that no flight carries, or None.
        Skips a whole flight at a time (its blocks not yet written are contiguous)."""
        bitmap = self.cache.bitmap
        block = bitmap.first_clear(start, stop) if start < stop else None
        while block is not None:
            flight = self._inflight.get(block)
            if flight is None:
                return block
            after = max(block, flight.last) + 1
            block = bitmap.first_clear(after, stop) if after < stop else None
        return None

    def _idle(self, block: int) -> bool:
        return not self.cache.bitmap.is_block_set(block) and block not in self._inflight

    def _start_demand_flights(self, first: int, last: int) -> None:
        """Register and start demand flights for the idle missing blocks of first..last.
        No await: the blocks are registered before anyone else can look."""
        assert self._nursery is not None, "fetcher.run() is not running"
        # a read is split into at most DEMAND_SPLIT parallel requests of >= _demand_run blocks
        run = max(self._demand_run, -(-(last - first + 1) // DEMAND_SPLIT))
        block = self._first_idle(first, last + 1)
        while block is not None:
            end = block
            while end < last and end - block + 1 < run and self._idle(end + 1):
                end += 1
            flight = self._register(block, end, demand=True)
            self._nursery.start_soon(self._run_flight, flight)
            block = self._first_idle(end + 1, last + 1) if end < last else None

    def _register(self, first: int, last: int, *, demand: bool) -> _Flight:
        flight = _Flight(first, last, demand=demand)
        for block in range(first, last + 1):
            self._inflight[block] = flight
        return flight

    def _end_flight(self, flight: _Flight, error: RangefsError | None) -> None:
        for block in range(flight.next_block, flight.last + 1):
            if self._inflight.get(block) is flight:
                del self._inflight[block]
        if error is not None and flight.next_block <= flight.last:
            flight.error = error
        flight.end()

    async def _run_flight(self, flight: _Flight, *, slot_held: bool = False) -> None:
        """Fetch the flight's blocks, retrying transient failures; never raises.

        ``slot_held``: the caller already holds the flight's slot (background work takes
        its slot BEFORE it registers blocks, so no reader waits on a flight that has no
        connection yet)."""
        slots = self._demand_slots if flight.demand else self._fill_slots
        backoff = self._backoff.new()
        error: RangefsError | None = None
        try:
            async with contextlib.nullcontext() if slot_held else slots:
                while flight.next_block <= flight.last:
                    if self._fatal is not None:
                        error = self._fatal
                        break
                    if self._sequential and not flight.sequential:
                        # another flight found that the server ignores Range: no more range
                        # requests (each would bring the whole object); the stream takes over
                        error = RangeNotSupported(
                            f"{self.reader.name} {self._range(flight)}: the server ignores "
                            "Range; left to the sequential stream"
                        )
                        break
                    try:
                        await self._request(flight)
                    except (TransientError, RangeNotSupported) as caught:
                        self.stats.errors += 1
                        if isinstance(caught, RangeNotSupported):
                            self._range_refusals += 1
                            if self._range_refusals >= 2 or flight.sequential:
                                # twice in a row: not a fluke, the server ignores Range
                                self._enter_sequential()
                                error = caught
                                break
                            exc = TransientError(str(caught))
                        else:
                            exc = caught
                        if exc.retry_after is not None:
                            hold = min(exc.retry_after, self._backoff.retry_after_cap)
                            self._hold_until = max(self._hold_until, trio.current_time() + hold)
                        delay = backoff.delay_for(exc)
                        if delay is None:
                            error = RetriesExhausted(
                                f"{self.reader.name} {self._range(flight)}: gave up after "
                                f"{backoff.retries} retries: {exc}"
                            )
                            error.__cause__ = exc
                            log.warning("%s", error)
                            break
                        log.info("%s %s: %s; retrying in %.2f s",
                                 self.reader.name, self._range(flight), exc, delay)
                        self.stats.retries += 1
                        if self._mount_stats is not None:
                            self._mount_stats.retries += 1
                        await trio.sleep(delay)
                        backoff.retries += 1
                    except RemoteChanged as exc:
                        self.stats.errors += 1
                        error = exc
                        self._remote_changed(exc)
                        break
                    except SourceError as exc:
                        self.stats.errors += 1
                        error = exc
                        log.warning("%s %s: %s", self.reader.name, self._range(flight), exc)
                        break
                    except CacheError as exc:
                        error = exc
                        log.error("%s %s: cache: %s", self.reader.name, self._range(flight), exc)
                        break
                    except OSError as exc:
                        error = InternalError(f"{self.reader.name}: local I/O error: {exc}")
                        error.__cause__ = exc
                        log.error("%s", error)
                        break
        finally:
            if flight.next_block <= flight.last and error is None:
                error = InternalError(f"{self.reader.name}: fetch of {self._range(flight)} stopped")
            self._end_flight(flight, error)

    def _range(self, flight: _Flight) -> ByteRange:
        size, bs = self.cache.size, self.cache.block_size
        return ByteRange(
            range_for_index(flight.next_block, size, bs).start,
            range_for_index(flight.last, size, bs).end,
        )

    async def _request(self, flight: _Flight) -> None:
        """One range request for the flight's unwritten blocks; writes whole blocks."""
        now = trio.current_time()
        if self._hold_until > now:
            await trio.sleep_until(self._hold_until)
        await self._limiter.wait_request()
        if self._sequential and not flight.sequential:
            return  # the mode changed while this waited: _run_flight ends the flight
        cache = self.cache
        size, bs = cache.size, cache.block_size
        if flight.sequential:
            rng = ByteRange(0, size - 1)
            flight.next_block = 0  # without Range, every attempt starts at byte 0
        else:
            rng = self._range(flight)
        self.stats.requests += 1
        block = flight.next_block  # the first block not yet written
        end = min((flight.last + 1) * bs, size)  # the flight's bytes end here (exclusive)
        # the received start of ``block``, short of a whole block: views of the received
        # chunks themselves (immutable bytes; anything else is copied once), not a copy
        pending: list[memoryview] = []
        staged = 0  # bytes in pending
        pace = self._limiter.bytes_per_second is not None
        async with self.reader.open_range(rng) as body:
            self._range_refusals = 0  # the answer passed its checks
            async for chunk in body:
                if pace:
                    await self._limiter.wait_bytes(len(chunk))
                self.stats.bytes_received += len(chunk)
                if type(chunk) is not bytes:
                    chunk = bytes(chunk)  # a view must not change under us
                view = memoryview(chunk)[: end - block * bs - staged]  # nothing past the run
                have = staged + len(view)
                if block * bs + have == end:
                    whole, take = flight.last + 1 - block, len(view)
                else:
                    whole = have // bs
                    take = whole * bs - staged
                if whole == 0:
                    if len(pending) >= PENDING_VIEWS:  # many small chunks: one piece
                        pending = [memoryview(b"".join(pending))]
                    pending.append(view)
                    staged = have
                    continue
                if self._stopped:
                    raise InternalError(f"{self.reader.name}: fetcher stopped")
                pending.append(view[:take])
                self.stats.blocks_written += cache.write_blocks(block, pending)
                inflight = self._inflight
                for done in range(block, block + whole):
                    if inflight.get(done) is flight:
                        del inflight[done]
                block += whole
                flight.advance(block)
                if block > flight.last:
                    return
                staged = len(view) - take
                pending = [view[take:]] if staged else []
        if flight.next_block <= flight.last:
            raise TransientError(f"{self.reader.name} {rng}: body ended early")

    def _remote_changed(self, exc: RemoteChanged) -> None:
        if self._fatal is None:
            self._fatal = exc
            log.warning("%s: the remote object changed: %s", self.reader.name, exc)
            if self._on_remote_changed is not None:
                self._on_remote_changed(exc)


async def retry_transient(
    call: Callable[[], Awaitable[T]],
    policy: BackoffPolicy,
    what: str,
    *,
    stats: MountStats | None = None,
) -> T:
    """Await ``call()`` until it does not raise TransientError, backing off per ``policy``
    (each retry counted in ``stats`` when given).

    Gives up with RetriesExhausted (cause: the last error) when the policy says so; other
    errors pass through at once. For one-off requests such as probes.
    """
    backoff = policy.new()
    unreachable = 0
    while True:
        try:
            return await call()
        except TransientError as exc:
            delay = backoff.delay_for(exc)
            if isinstance(exc, Unreachable):
                unreachable += 1
                if unreachable > UNREACHABLE_RETRIES:
                    delay = None
                elif delay is not None:
                    delay = min(delay, UNREACHABLE_DELAY)
            if delay is None:
                raise RetriesExhausted(
                    f"{what}: gave up after {backoff.retries} retries: {exc}"
                ) from exc
            log.info("%s: %s; retrying in %.2f s", what, exc, delay)
            if stats is not None:
                stats.retries += 1
            await trio.sleep(delay)
            backoff.retries += 1

"""ObjectFetcher: single flight, coalescing, demand first, retries, fill (no sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from rangefs.cache import LocalDownloadCache
from rangefs.cachefiles import ObjectIdentity
from rangefs.errors import (
    PermanentError,
    RangeNotSupported,
    RemoteChanged,
    RetriesExhausted,
    TransientError,
)
from rangefs.fetcher import ObjectFetcher
from rangefs.ranges import ByteRange
from rangefs.ratecontrol import BackoffPolicy, Limiter
from tests.content import check
from tests.fakereader import FakeReader, ShortBody

BS = 4096


def make_cache(tmp_path: Path, size: int, bs: int = BS) -> LocalDownloadCache:
    identity = ObjectIdentity(url="fake://obj", size=size, block_size=bs, etag='"v1"',
                              last_modified=None)
    return LocalDownloadCache.open(tmp_path / "obj", identity)


class Harness:
    def __init__(self, cache: LocalDownloadCache, reader: FakeReader, fetcher: ObjectFetcher,
                 changed: list[RemoteChanged]) -> None:
        self.cache = cache
        self.reader = reader
        self.fetcher = fetcher
        self.changed = changed


@pytest.fixture
async def harness(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    params = getattr(request, "param", {})
    size = params.get("size", 100 * BS + 123)
    cache = make_cache(tmp_path, size)
    reader = FakeReader("obj", size)
    changed: list[RemoteChanged] = []
    fetcher = ObjectFetcher(
        cache,
        reader,
        limiter=Limiter(),
        backoff=BackoffPolicy(initial=0.1, maximum=1.0, steps=params.get("steps", 4)),
        demand_slots=trio.CapacityLimiter(4),
        fill_slots=trio.CapacityLimiter(params.get("fill_slots", 4)),
        demand_request_bytes=params.get("demand_request_bytes", 16 * BS),
        fill_request_bytes=params.get("fill_request_bytes", 8 * BS),
        on_remote_changed=changed.append,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        yield Harness(cache, reader, fetcher, changed)
        nursery.cancel_scope.cancel()
    cache.close()


def check_cached(h: Harness, first: int, last: int) -> None:
    bs = h.cache.block_size
    start = first * bs
    end = min((last + 1) * bs, h.cache.size)
    check("obj", start, h.cache.read_at(start, end - start))


async def test_fetch_coalesces_adjacent_missing_blocks(harness: Harness) -> None:
    await harness.fetcher.fetch(3, 10)
    assert [(r.start, r.end) for r in harness.reader.requests] == [(3 * BS, 11 * BS - 1)]
    check_cached(harness, 3, 10)
    assert not harness.cache.is_cached(2) and not harness.cache.is_cached(11)


async def test_fetch_splits_runs_at_the_demand_limit(harness: Harness) -> None:
    await harness.fetcher.fetch(0, 39)
    assert sorted(r.size for r in harness.reader.requests) == [8 * BS, 16 * BS, 16 * BS]
    check_cached(harness, 0, 39)


async def test_fetch_asks_only_for_missing_blocks(harness: Harness) -> None:
    await harness.fetcher.fetch(5, 5)
    await harness.fetcher.fetch(7, 7)
    harness.reader.requests.clear()
    await harness.fetcher.fetch(4, 8)
    assert sorted((r.start, r.end) for r in harness.reader.requests) == [
        (4 * BS, 5 * BS - 1), (6 * BS, 7 * BS - 1), (8 * BS, 9 * BS - 1)]
    check_cached(harness, 4, 8)


async def test_last_partial_block(harness: Harness) -> None:
    last = harness.cache.num_blocks - 1
    await harness.fetcher.fetch(last - 1, last)
    check_cached(harness, last - 1, last)
    assert harness.reader.requests[-1].end == harness.cache.size - 1


@pytest.mark.parametrize("chunk", [1, 1000, BS, BS + 1, 3 * BS + 7, 64 << 10])
async def test_chunks_of_any_size_write_whole_blocks_once(tmp_path: Path, chunk: int) -> None:
    """However the body is cut, each block is written once, whole, with its own bytes, up
    to the object's short last block."""
    size = 20 * BS + 123
    cache = make_cache(tmp_path, size)
    reader = FakeReader("obj", size, chunk=chunk)
    fetcher = ObjectFetcher(cache, reader, limiter=Limiter(), backoff=BackoffPolicy(),
                            demand_slots=trio.CapacityLimiter(2),
                            fill_slots=trio.CapacityLimiter(2), demand_request_bytes=size)
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        await fetcher.fetch(2, 6)
        await fetcher.fetch(0, cache.num_blocks - 1)
        nursery.cancel_scope.cancel()
    assert cache.complete() and fetcher.stats.blocks_written == cache.num_blocks
    assert fetcher.stats.bytes_received == size
    check("obj", 0, cache.read_at(0, size))
    cache.close()


async def test_single_flight_for_many_readers(harness: Harness) -> None:
    harness.reader.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(harness.fetcher.fetch, 10, 12)
        await trio.testing.wait_all_tasks_blocked()
        harness.reader.gate.set()
    assert len(harness.reader.requests) == 1
    check_cached(harness, 10, 12)


async def test_a_reader_that_gives_up_does_not_cancel_the_flight(harness: Harness) -> None:
    harness.reader.gate = trio.Event()
    with trio.move_on_after(0.05):
        await harness.fetcher.fetch(20, 21)
    assert not harness.cache.is_cached(20)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.fetcher.fetch, 20, 21)
        await trio.testing.wait_all_tasks_blocked()
        harness.reader.gate.set()
    assert len(harness.reader.requests) == 1
    check_cached(harness, 20, 21)


async def test_transient_errors_are_retried(harness: Harness, autojump_clock: object) -> None:
    harness.reader.faults = [TransientError("503"), TransientError("reset", retry_after=2.0)]
    start = trio.current_time()
    await harness.fetcher.fetch(0, 1)
    assert len(harness.reader.requests) == 3
    assert harness.fetcher.stats.retries == 2
    assert trio.current_time() - start >= 2.0  # Retry-After honoured
    check_cached(harness, 0, 1)


async def test_retry_resumes_after_the_last_whole_block(harness: Harness) -> None:
    harness.reader.faults = [ShortBody(after=2 * BS + 100)]
    await harness.fetcher.fetch(0, 4)
    assert [(r.start, r.end) for r in harness.reader.requests] == [
        (0, 5 * BS - 1), (2 * BS, 5 * BS - 1)]
    check_cached(harness, 0, 4)


@pytest.mark.parametrize("harness", [{"steps": 2}], indirect=True)
async def test_retries_exhausted(harness: Harness, autojump_clock: object) -> None:
    harness.reader.faults = [TransientError("503")] * 10
    with pytest.raises(RetriesExhausted):
        await harness.fetcher.fetch(0, 0)
    assert len(harness.reader.requests) == 3
    harness.reader.faults = []
    await harness.fetcher.fetch(0, 0)  # a later reader starts a new flight
    check_cached(harness, 0, 0)


async def test_permanent_error_is_not_retried(harness: Harness) -> None:
    harness.reader.faults = [PermanentError("404", status=404)]
    with pytest.raises(PermanentError):
        await harness.fetcher.fetch(0, 0)
    assert len(harness.reader.requests) == 1


async def test_remote_changed_stops_the_object(harness: Harness) -> None:
    harness.reader.faults = [RemoteChanged("etag differs")]
    with pytest.raises(RemoteChanged):
        await harness.fetcher.fetch(0, 0)
    assert len(harness.changed) == 1
    with pytest.raises(RemoteChanged):
        await harness.fetcher.fetch(1, 1)
    assert len(harness.reader.requests) == 1
    assert not harness.fetcher.healthy()


async def test_fill_fetches_every_block_once(harness: Harness) -> None:
    await harness.fetcher.fetch(50, 52)
    await harness.fetcher.fill(4)
    assert harness.cache.complete()
    assert harness.reader.bytes_requested() == harness.cache.size
    check_cached(harness, 0, harness.cache.num_blocks - 1)


@pytest.mark.parametrize(
    "harness", [{"demand_request_bytes": 2 * BS, "fill_request_bytes": 16 * BS}], indirect=True
)
async def test_fill_requests_grow_with_the_distance_from_the_reader(harness: Harness) -> None:
    """Short requests just past the latest read (a reader that catches up waits for several
    in parallel), growing to the fill run farther away; the rest wraps around."""
    await harness.fetcher.fetch(9, 9)
    harness.reader.requests.clear()
    await harness.fetcher.fill(1)
    runs = [(r.start // BS, r.size // BS) for r in harness.reader.requests]
    assert runs[:7] == [(10, 2), (12, 2), (14, 4), (18, 8), (26, 16), (42, 16), (58, 16)]
    assert runs[-1] == (0, 9)  # before the reader: full-size runs
    assert harness.reader.bytes_requested() == harness.cache.size - BS
    check_cached(harness, 0, harness.cache.num_blocks - 1)


@pytest.mark.parametrize("harness", [{"demand_request_bytes": 2 * BS,
                                      "fill_request_bytes": 8 * BS}], indirect=True)
async def test_each_reader_of_an_object_gets_its_own_read_ahead(harness: Harness) -> None:
    """Two sequential readers of one object, far apart: the read-ahead of each is fetched
    (the second used to replace the first's window), in runs that start short just past
    each reader (not in whole fill runs because the other one had read last)."""
    await harness.fetcher.fetch(9, 9)  # reader A, now at block 10
    await harness.fetcher.fetch(59, 59)  # reader B, now at block 60
    harness.reader.requests.clear()
    harness.fetcher.prefetch(10, 25)
    harness.fetcher.prefetch(60, 75)
    with trio.fail_after(5):
        await trio.testing.wait_all_tasks_blocked()
    runs = sorted((r.start // BS, r.size // BS) for r in harness.reader.requests)
    assert runs == [(10, 2), (12, 2), (14, 4), (18, 8), (60, 2), (62, 2), (64, 4), (68, 8)]
    check_cached(harness, 10, 25)
    check_cached(harness, 60, 75)


@pytest.mark.parametrize("harness", [{"fill_slots": 1}], indirect=True)
async def test_demand_does_not_wait_behind_fill(harness: Harness) -> None:
    harness.reader.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.fetcher.fill, 1)
        await trio.testing.wait_all_tasks_blocked()
        # the only fill slot is busy on a held flight; a reader elsewhere is served anyway
        fill_request = harness.reader.requests[0]
        harness.reader.gate = None
        await harness.fetcher.fetch(90, 90)
        assert harness.cache.is_cached(90)
        assert fill_request.start // BS != 90
        nursery.cancel_scope.cancel()


async def test_prefetch_starts_background_flights(harness: Harness) -> None:
    harness.fetcher.prefetch(30, 45)
    await harness.fetcher.fetch(30, 45)
    assert harness.reader.bytes_requested() == 16 * BS
    check_cached(harness, 30, 45)


@pytest.mark.parametrize("harness", [{"size": 0}], indirect=True)
async def test_empty_object(harness: Harness) -> None:
    await harness.fetcher.fill(2)
    assert harness.cache.complete()
    assert harness.reader.requests == []


async def test_one_ignored_range_is_retried(harness: Harness) -> None:
    harness.reader.faults = [RangeNotSupported("200 to a range request")]
    await harness.fetcher.fetch(5, 6)
    assert len(harness.reader.requests) == 2
    assert all(r.size == 2 * BS for r in harness.reader.requests)
    check_cached(harness, 5, 6)


async def test_a_server_that_keeps_ignoring_range_is_read_sequentially(
    harness: Harness,
) -> None:
    harness.reader.faults = [RangeNotSupported("200"), RangeNotSupported("200")]
    await harness.fetcher.fetch(40, 41)  # waits for the stream's front to pass block 41
    assert harness.reader.requests[-1] == ByteRange(0, harness.cache.size - 1)
    check_cached(harness, 40, 41)
    await harness.fetcher.fill(4)
    assert harness.cache.complete()
    check_cached(harness, 0, harness.cache.num_blocks - 1)
    assert sum(1 for r in harness.reader.requests if r.start == 0 and r.size > BS) == 1


async def test_no_accept_ranges_starts_in_sequential_mode(tmp_path: Path) -> None:
    size = 10 * BS + 5
    cache = make_cache(tmp_path, size)
    reader = FakeReader("obj", size)
    reader.info = replace(reader.info, accept_ranges=False)
    reader.faults = [ShortBody(after=3 * BS + 7)]  # the first stream breaks: start over
    fetcher = ObjectFetcher(cache, reader, limiter=Limiter(), backoff=BackoffPolicy(initial=0.01),
                            demand_slots=trio.CapacityLimiter(2),
                            fill_slots=trio.CapacityLimiter(2))
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        await fetcher.fetch(9, 10)
        await fetcher.fill(2)
        nursery.cancel_scope.cancel()
    assert cache.complete()
    assert reader.requests == [ByteRange(0, size - 1)] * 2
    check("obj", 0, cache.read_at(0, size))
    cache.close()


@pytest.mark.parametrize("harness", [{"fill_slots": 1}], indirect=True)
async def test_queued_background_work_never_holds_blocks_a_reader_needs(
    harness: Harness,
) -> None:
    """Background work waiting for a slot has claimed nothing: a reader whose block a
    queued fill worker or read-ahead would take next starts its own request at once."""
    harness.reader.gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.fetcher.fill, 4)  # would start at block 0
        harness.fetcher.prefetch(60, 70)  # would start at block 60
        await trio.testing.wait_all_tasks_blocked()
        assert len(harness.reader.requests) == 1  # one slot: one background request
        held = harness.reader.requests[0].start // BS
        queued = 0 if held == 60 else 60
        harness.reader.gate = None  # the held flight stays held; new requests flow
        with trio.fail_after(5):
            await harness.fetcher.fetch(queued, queued)
        check_cached(harness, queued, queued)
        assert not harness.cache.is_cached(held)
        nursery.cancel_scope.cancel()

"""CachingDownloader and StreamingDownloader on an in-memory reader (no sockets)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from rangefs.cache import LocalDownloadCache
from rangefs.cachefiles import ObjectIdentity
from rangefs.digests import Digest
from rangefs.download import CachingDownloader, DownloadStats, StreamingDownloader
from rangefs.errors import DigestMismatch, PermanentError, RetriesExhausted, TransientError
from rangefs.ratecontrol import BackoffPolicy
from tests.content import check, digest_of
from tests.fakereader import FakeReader

FAST = BackoffPolicy(initial=0.01, maximum=0.05, steps=3)


def open_cache(tmp_path: Path, size: int, bs: int) -> LocalDownloadCache:
    identity = ObjectIdentity(url="fake://obj", size=size, block_size=bs, etag='"v1"',
                              last_modified=None)
    return LocalDownloadCache.open(tmp_path / "c", identity)


def read_all(cache: LocalDownloadCache) -> bytes:
    return cache.read_at(0, cache.size) if cache.size else b""


# The seed's stress shape: 7000 bytes in blocks of 64 (110 blocks, the last 24 bytes).
@pytest.mark.parametrize("concurrency", [1, 10, 100])
async def test_caching_downloader_completes(tmp_path: Path, concurrency: int) -> None:
    cache = open_cache(tmp_path, 7000, 64)
    reader = FakeReader("obj", 7000)
    seen: list[DownloadStats] = []
    status = await CachingDownloader(
        cache, reader, concurrency=concurrency, backoff=FAST, request_bytes=640,
        progress=seen.append, progress_interval=0.001,
    ).run()
    assert status.complete and status.error is None and not status.resumable
    check("obj", 0, read_all(cache))
    assert status.stats.downloaded_blocks == 110
    assert status.stats.downloaded_bytes == 7000 == reader.bytes_requested()
    assert status.stats.cached_bytes == 7000 and status.stats.iterations == 1
    # counters never decrease from one snapshot to the next
    for a, b in itertools.pairwise(seen):
        assert b.cached_bytes >= a.cached_bytes and b.downloaded_bytes >= a.downloaded_bytes
    cache.close()


async def test_complete_cache_needs_no_request(tmp_path: Path) -> None:
    cache = open_cache(tmp_path, 7000, 64)
    await CachingDownloader(cache, FakeReader("obj", 7000), backoff=FAST).run()
    cache.close()
    cache = open_cache(tmp_path, 7000, 64)
    reader = FakeReader("obj", 7000)
    status = await CachingDownloader(cache, reader, backoff=FAST).run()
    assert status.complete and reader.requests == []
    assert status.stats.found_cached_bytes == 7000 and status.stats.downloaded_bytes == 0
    cache.close()


async def test_permanent_failure_is_not_resumable(tmp_path: Path) -> None:
    cache = open_cache(tmp_path, 7000, 64)
    reader = FakeReader("obj", 7000)
    reader.faults = [PermanentError("404", status=404)] * 200
    status = await CachingDownloader(cache, reader, concurrency=1, backoff=FAST,
                                     wait_for_completion=True).run()
    assert not status.complete and not status.resumable
    assert isinstance(status.error, PermanentError)
    assert status.stats.iterations == 1
    cache.close()


async def test_passes_resume_after_transient_failures(tmp_path: Path) -> None:
    cache = open_cache(tmp_path, 7000, 64)
    reader = FakeReader("obj", 7000)
    # the first flight gives up (4 tries); a later pass finishes the job
    reader.faults = [TransientError("503")] * 4
    status = await CachingDownloader(
        cache, reader, concurrency=1, backoff=FAST, request_bytes=640,
        wait_for_completion=True, pass_delay=0.01,
    ).run()
    assert status.complete, status
    assert status.stats.iterations == 2
    check("obj", 0, read_all(cache))
    cache.close()


async def test_without_wait_for_completion_a_failed_pass_is_resumable(tmp_path: Path) -> None:
    cache = open_cache(tmp_path, 7000, 64)
    reader = FakeReader("obj", 7000)
    reader.faults = [TransientError("503")] * 4
    status = await CachingDownloader(cache, reader, concurrency=1, backoff=FAST,
                                     request_bytes=640).run()
    assert not status.complete and status.resumable
    assert isinstance(status.error, RetriesExhausted)
    cache.close()


async def test_streaming_in_order_with_digest() -> None:
    size = 1000 * 64 + 17
    reader = FakeReader("obj", size)
    digest = Digest("sha256", digest_of("obj", size, "sha256"))
    out = bytearray()

    async def sink(data: bytes) -> None:
        out.extend(data)

    downloader = StreamingDownloader(reader, block_size=640, concurrency=8, digest=digest)
    await downloader.stream(sink)
    assert len(out) == size
    check("obj", 0, out)
    assert downloader.stats.streamed_bytes == size
    assert downloader.stats.max_buffered <= downloader.window


async def test_streaming_out_of_order_is_counted_and_bounded() -> None:
    size = 64 * 64
    reader = FakeReader("obj", size)
    reader.faults = [TransientError("slow first block")]  # block 0 arrives last of its wave
    out = bytearray()

    async def sink(data: bytes) -> None:
        out.extend(data)

    downloader = StreamingDownloader(reader, block_size=64, concurrency=4, window=4,
                                     backoff=FAST)
    await downloader.stream(sink)
    check("obj", 0, out)
    assert downloader.stats.out_of_order >= 1
    assert downloader.stats.max_buffered <= 4


async def test_streaming_digest_mismatch() -> None:
    reader = FakeReader("obj", 5000)
    wrong = Digest("sha256", bytes(32))

    async def sink(data: bytes) -> None:
        pass

    with pytest.raises(DigestMismatch):
        await StreamingDownloader(reader, block_size=1024, digest=wrong).stream(sink)


async def test_streaming_error_after_the_gap() -> None:
    reader = FakeReader("obj", 10 * 1024)
    out = bytearray()

    async def sink(data: bytes) -> None:
        out.extend(data)

    reader.faults = [None, None, PermanentError("gone", status=410)] + [None] * 20
    with pytest.raises(PermanentError):
        await StreamingDownloader(reader, block_size=1024, concurrency=1,
                                  backoff=FAST).stream(sink)
    assert len(out) == 2 * 1024
    check("obj", 0, out)


async def test_a_consumer_that_stops_cancels_every_request() -> None:
    reader = FakeReader("obj", 100 * 1024)

    class Stop(Exception):
        pass

    async def sink(data: bytes) -> None:
        raise Stop

    with pytest.raises(Stop):
        await StreamingDownloader(reader, block_size=1024, concurrency=8).stream(sink)
    await trio.lowlevel.checkpoint()
    assert reader.open_bodies == 0

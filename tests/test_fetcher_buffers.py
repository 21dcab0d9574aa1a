"""ObjectFetcher keeps a block's partial start as views of the received chunks (no copy):
a reader whose chunks are not immutable bytes must not change what is written."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from rangefs.cache import LocalDownloadCache
from rangefs.cachefiles import ObjectIdentity
from rangefs.fetcher import ObjectFetcher
from rangefs.ranges import ByteRange
from rangefs.ratecontrol import BackoffPolicy, Limiter
from tests.content import check, content
from tests.fakereader import FakeReader

BS = 4096


class ReusingReader(FakeReader):
    """Yields every chunk in ONE bytearray, overwritten for the next chunk (what a reader
    that receives into its own buffer does)."""

    @asynccontextmanager
    async def open_range(self, rng: ByteRange) -> AsyncIterator[AsyncIterator[bytes]]:
        self.requests.append(rng)
        buf = bytearray(self.chunk)

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            while sent < rng.size:
                await trio.lowlevel.checkpoint()
                n = min(self.chunk, rng.size - sent)
                buf[:n] = content(self.key, rng.start + sent, n)
                yield memoryview(buf)[:n]  # type: ignore[misc]
                buf[:] = b"\xee" * len(buf)  # the next chunk overwrites it
                sent += n

        yield body()


async def test_reused_chunk_buffers_are_copied_not_viewed(tmp_path: Path) -> None:
    size = 20 * BS + 123
    identity = ObjectIdentity(url="fake://obj", size=size, block_size=BS, etag='"v1"',
                              last_modified=None)
    cache = LocalDownloadCache.open(tmp_path / "obj", identity)
    reader = ReusingReader("obj", size, chunk=BS // 3 + 5)  # never block-aligned
    fetcher = ObjectFetcher(cache, reader, limiter=Limiter(), backoff=BackoffPolicy(),
                            demand_slots=trio.CapacityLimiter(2),
                            fill_slots=trio.CapacityLimiter(2), demand_request_bytes=size)
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        await fetcher.fetch(0, cache.num_blocks - 1)
        nursery.cancel_scope.cancel()
    assert cache.complete()
    check("obj", 0, cache.read_at(0, size))
    cache.close()

"""An in-memory Reader for fetcher/downloader unit tests: no sockets, faults as data."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
import trio.lowlevel

from rangefs.ranges import ByteRange
from rangefs.source import RemoteInfo
from tests.content import content


@dataclass
class ShortBody:
    """Fault: the body stops after ``after`` bytes (the reader sees a short body)."""

    after: int


Fault = BaseException | ShortBody | None


class FakeReader:
    """Serves ``content(key, ...)``; each request consumes one entry of ``faults``.

    ``gate``: while it is not set, bodies wait before each chunk (to hold flights open).
    ``requests`` records every requested range, in order.
    """

    def __init__(self, key: str, size: int, *, chunk: int = 64 << 10) -> None:
        self.key = key
        self.name = f"fake://{key}"
        self.info = RemoteInfo(
            url=self.name,
            size=size,
            etag='"v1"',
            last_modified=None,
            mtime=None,
            accept_ranges=True,
            digest=None,
        )
        self.chunk = chunk
        self.faults: list[Fault] = []
        self.requests: list[ByteRange] = []
        self.gate: trio.Event | None = None
        self.open_bodies = 0

    @asynccontextmanager
    async def open_range(self, rng: ByteRange) -> AsyncIterator[AsyncIterator[bytes]]:
        self.requests.append(rng)
        fault = self.faults.pop(0) if self.faults else None
        await trio.lowlevel.checkpoint()
        if isinstance(fault, BaseException):
            raise fault
        limit = rng.size if not isinstance(fault, ShortBody) else min(fault.after, rng.size)

        async def body() -> AsyncIterator[bytes]:
            sent = 0
            while sent < limit:
                if self.gate is not None:
                    await self.gate.wait()
                await trio.lowlevel.checkpoint()
                n = min(self.chunk, limit - sent)
                yield content(self.key, rng.start + sent, n)
                sent += n

        self.open_bodies += 1
        try:
            yield body()
        finally:
            self.open_bodies -= 1

    def bytes_requested(self) -> int:
        return sum(r.size for r in self.requests)

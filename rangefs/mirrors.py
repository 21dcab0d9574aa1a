"""Mirrors: several URLs of one object (``mirror=URL`` in the URL list, issue 19).

:func:`agreeing_mirrors` probes the mirrors of an entry and keeps those that serve the
same version as the entry's URL: the same size, and the same strong ETag (or, when no
ETag is given, the same Last-Modified). A mirror that disagrees, or cannot be probed, is
left out with one warning. :class:`MirroredReader` is then the object's reader (the
:class:`~rangefs.source.Reader` the fetcher uses): it sends each range request to the
next healthy mirror in turn, so background fill spreads over all of them; a mirror whose
request fails (an error status, a transport error, a stall past the read timeout, a body
cut short) is left alone for :data:`COOL_DOWN` seconds and the failure is raised as
transient, so the fetcher's next try (after its first, short backoff) goes to another
mirror. A mirror that answers
with another version is left out for good. Only when every mirror is down does a failure
pass through as it is.

Trio thread only, like the readers it wraps.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final

import trio

from .errors import RemoteChanged, SourceError, TransientError
from .ranges import ByteRange
from .redact import redact_url
from .source import HttpSession, Reader, RemoteInfo, other_version

log = logging.getLogger(__name__)

COOL_DOWN: Final = 30.0
"""Seconds a mirror whose request failed gets no request (unless every mirror failed)."""


async def agreeing_mirrors(
    session: HttpSession, name: str, info: RemoteInfo, mirrors: Sequence[str]
) -> list[tuple[str, RemoteInfo]]:
    """(URL, what its probe said) of each mirror that serves version ``info``; probed at
    once, each with one request; the others are logged (warning) and left out."""
    found: list[tuple[str, RemoteInfo] | None] = [None] * len(mirrors)

    async def probe(i: int, url: str) -> None:
        try:
            mirror_info = await session.probe(url)
        except SourceError as exc:
            log.warning("%s: mirror %s left out: %s", name, redact_url(url), exc)
            return
        why = other_version(info, mirror_info.size, mirror_info.etag,
                            mirror_info.last_modified, strong=True)
        if why is not None:
            log.warning("%s: mirror %s left out: %s", name, redact_url(url), why)
            return
        found[i] = (url, mirror_info)

    async with trio.open_nursery() as nursery:
        for i, url in enumerate(mirrors):
            nursery.start_soon(probe, i, url)
    return [m for m in found if m is not None]


class MirroredReader:
    """A :class:`~rangefs.source.Reader` over one object's URL and its agreeing mirrors
    (see the module docstring). ``readers[0]`` is the entry's own URL: its ``name`` and
    ``info`` are the reader's."""

    def __init__(self, readers: Sequence[Reader]) -> None:
        if not readers:
            raise ValueError("a mirrored reader needs at least one reader")
        self.name = readers[0].name
        self.info = readers[0].info
        self._readers = list(readers)
        self._down_until = [0.0] * len(readers)
        self._gone = [False] * len(readers)  # served another version: never again
        self._next = 0
        self.requests = [0] * len(readers)  # per reader, for tests and logs

    def _pick(self) -> int:
        """The next healthy reader in turn; if none is, the one that comes back first."""
        now = trio.current_time()
        n = len(self._readers)
        for step in range(n):
            i = (self._next + step) % n
            if not self._gone[i] and self._down_until[i] <= now:
                self._next = (i + 1) % n
                return i
        candidates = [i for i in range(n) if not self._gone[i]] or [0]
        return min(candidates, key=lambda i: self._down_until[i])

    def _others_up(self, i: int) -> bool:
        now = trio.current_time()
        return any(not self._gone[j] and self._down_until[j] <= now
                   for j in range(len(self._readers)) if j != i)

    @asynccontextmanager
    async def open_range(self, rng: ByteRange) -> AsyncIterator[AsyncIterator[bytes]]:
        i = self._pick()
        reader = self._readers[i]
        self.requests[i] += 1
        try:
            async with reader.open_range(rng) as body:
                yield body
        except RemoteChanged as exc:
            if i == 0:
                raise  # the entry's own URL changed: the object did
            self._gone[i] = True
            log.warning("%s: mirror %s left out: it now serves another version (%s)",
                        self.name, reader.name, exc)
            raise TransientError(f"{reader.name}: another version") from exc
        except SourceError as exc:
            if not self._others_up(i):
                raise  # no mirror to go to: the failure as it is
            self._down_until[i] = trio.current_time() + COOL_DOWN
            log.info("%s: mirror %s failed (%s); the next tries go to the others for %g s",
                     self.name, reader.name, exc, COOL_DOWN)
            raise TransientError(f"{reader.name} {rng}: {exc}") from exc

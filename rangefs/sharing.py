"""``rangefs download`` and ``rangefs cat`` use what the rangefs mounts of this machine
already cached instead of fetching it again (issue 18, one cache for many processes: the
side of the processes that are not mounts).

Before fetching, the download asks each rangefs mount of this user (its control socket,
``control.py``) to ``export`` the object (``mountctl.py``): a mount that holds blocks of it
answers with its data file, the validators of its version and the runs of cached blocks,
and keeps every block of that version pinned (never evicted) until the connection closes.
The first mount with blocks of the version the download probed (same size, and the
same strong ETag, or no ETag and the same Last-Modified) is used: a download copies each
of its own blocks that those runs cover whole into its partial directory and fetches the
rest as usual; ``cat`` reads each range those runs cover from the mount's file
(:class:`CopyingReader`) and the others from the network. The copy reads the mount's data
file: a block the mount marks cached was written before its bit was set, and the page
cache is one for every process, so no half-written block can be copied.

Blocking (sockets, preads): run it in a worker thread before the download starts. A mount
that cannot help (none of the object, another version, no answer within a few seconds) is
skipped with one info line; nothing here fails the download.
"""

from __future__ import annotations

import bisect
import logging
import os
import stat
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from .cache import LocalDownloadCache
from .control import Client, ControlError, MountInfo, find_mounts
from .ranges import ByteRange
from .redact import redact_url
from .source import Reader, RemoteInfo, other_version

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 10.0
"""Seconds a mount may take to answer ``export`` (it may reopen the object's cache)."""
XATTR_TIMEOUT = 2.0
"""Seconds a mount may take to name its control socket."""


class Exported:
    """The cached blocks of one object that a mount exported, pinned there while this is
    open (its control connection stays open): the mount's data file, open read-only, and
    the byte intervals it covers. :meth:`close` releases the pin."""

    def __init__(self, client: Client, answer: dict[str, Any], size: int) -> None:
        self._client = client
        mbs = int(answer["block_size"])
        self.covered = sorted((int(a) * mbs, min(size, (int(b) + 1) * mbs))
                              for a, b in answer["runs"])
        self.bytes = sum(end - start for start, end in self.covered)
        self.fd = os.open(answer["data"], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size < size:
            os.close(self.fd)
            raise ValueError(f"{answer['data']} is not a data file of this user")

    def covers(self, start: int, end: int) -> bool:
        """Bytes ``start..end-1`` are all in one exported interval."""
        i = bisect.bisect_right(self.covered, (start, 1 << 63)) - 1
        return i >= 0 and self.covered[i][0] <= start and end <= self.covered[i][1]

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start..end-1`` (covered) of the mount's data file. Blocking."""
        data = os.pread(self.fd, end - start, start)
        if len(data) != end - start:
            raise ValueError("short read of a mount's data file")
        return data

    def close(self) -> None:
        os.close(self.fd)
        self._client.close()


def export_from_mounts(
    url: str, info: RemoteInfo, mounts: Sequence[MountInfo] | None = None
) -> Exported | None:
    """The first mount's export of version ``info`` of ``url`` with any block of it, or
    None (blocking; never raises for a mount that cannot help)."""
    try:
        candidates = list(mounts) if mounts is not None else find_mounts()
    except OSError as exc:
        log.debug("cannot list the mounts: %s", exc)
        return None
    uid = os.getuid()
    for mount in candidates:
        if uid != 0 and mount.uid not in (None, uid):
            continue
        client: Client | None = None
        try:
            client = Client(mount.control_socket(XATTR_TIMEOUT), ANSWER_TIMEOUT)
            answer = client.request("export", url=url)
            if not answer.get("found"):
                continue
            why = other_version(info, answer.get("size"), answer.get("etag"),
                                answer.get("last_modified"), strong=True)
            if why is not None:
                log.info("%s: the copy cached by the mount at %s is not used: %s",
                         redact_url(url), mount.mountpoint, why)
                continue
            exported = Exported(client, answer, info.size)
            client = None  # the export owns it now
            if exported.bytes:
                log.info("%s: %d bytes cached by the mount at %s", redact_url(url),
                         exported.bytes, mount.mountpoint)
                return exported
            exported.close()
        except (ControlError, OSError, ValueError, KeyError, TypeError) as exc:
            log.info("%s: nothing used from the mount at %s: %s", redact_url(url),
                     mount.mountpoint, exc)
        finally:
            if client is not None:
                client.close()
    return None


def copy_from_mounts(
    url: str, info: RemoteInfo, cache: LocalDownloadCache,
    mounts: Sequence[MountInfo] | None = None,
) -> int:
    """Copy into ``cache`` every block of it that a rangefs mount has cached of version
    ``info`` of ``url``; the bytes copied. Blocking; never raises for a mount that cannot
    help."""
    exported = export_from_mounts(url, info, mounts)
    if exported is None:
        return 0
    try:
        size, dbs = cache.size, cache.block_size
        copied = 0
        for index in range(cache.num_blocks):
            start, end = index * dbs, min(size, (index + 1) * dbs)
            if not cache.is_cached(index) and exported.covers(start, end):
                cache.write_blocks(index, [exported.read(start, end)])
                copied += end - start
        return copied
    except (OSError, ValueError) as exc:
        log.info("%s: copying from a mount stopped: %s", redact_url(url), exc)
        return 0
    finally:
        exported.close()


class CopyingReader:
    """A :class:`~rangefs.source.Reader` that answers ranges an :class:`Exported` covers
    from the mount's data file (in a worker thread) and every other range from
    ``reader``; for ``rangefs cat``. Owns ``exported``: :meth:`close` it."""

    def __init__(self, reader: Reader, exported: Exported) -> None:
        self.name = reader.name
        self.info = reader.info
        self._reader = reader
        self._exported = exported
        self.copied = 0  # bytes answered from the mount

    @asynccontextmanager
    async def open_range(self, rng: ByteRange) -> AsyncIterator[AsyncIterator[bytes]]:
        start, end = rng.start, rng.end + 1
        if not self._exported.covers(start, end):
            async with self._reader.open_range(rng) as body:
                yield body
            return
        data = await trio.to_thread.run_sync(self._exported.read, start, end)
        self.copied += len(data)
        yield _once(data)

    def close(self) -> None:
        self._exported.close()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data

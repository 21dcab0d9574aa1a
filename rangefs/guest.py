"""Reading an object whose cache another rangefs process owns (mounts sharing one cache
directory, issue 18).

An object's cache is open in one process at a time (the flock of its directory, which
holds that process's PID). A mount that opens an object another process owns gets a
:class:`GuestHandle`: each read asks the owner, on its control socket, to ``hold`` the
range (``mountctl.py``: fetched if missing, with the owner's read-ahead, and pinned so that
nothing evicts it), reads those bytes from the owner's data file, and lets go
(``unhold``). The owner answers only once every block of the range is cached, and the page
cache is one for all processes, so a half-written block is never read; the owner checks
nothing of the guest but the URL, so the guest checks the owner's version (size and
validators) against its own on every answer. A block is fetched once for the machine.

When the owner goes away (unmounted, killed), its lock is free: the guest opens the cache
itself and goes on locally (:meth:`MountedObject.open` again), within the same read.

Trio thread only. Connections to the owner: one per concurrent read of the handle, kept
while the handle is open (each carries the owner's handle of the object: closing them
lets the owner close its cache when idle).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import errors
from .cache import lock_holder
from .control import AsyncClient, ControlError, socket_path
from .source import RemoteInfo, other_version

if TYPE_CHECKING:
    from .objects import Handle, MountedObject

log = logging.getLogger(__name__)

_GONE = (OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError, ValueError)
MAX_OWNER_CHANGES = 3
"""A read follows at most this many changes of owner before it fails (EIO)."""


class OwnerGone(Exception):
    """The process that owned the object's cache did not answer: try again."""


class GuestHandle:
    """One open() of an object whose cache another process owns (see the module doc)."""

    def __init__(self, obj: MountedObject, info: RemoteInfo, owner: int) -> None:
        self._obj = obj
        self._info = info
        self._owner = owner
        self.keep_cache = True
        self._idle: list[AsyncClient] = []
        self._fd: int | None = None  # the owner's data file
        self._fd_path: str | None = None
        self._local: Handle | None = None
        self._closed = False

    @property
    def owner(self) -> int:
        return self._owner

    async def read(self, offset: int, size: int) -> bytes:
        """The bytes [offset, offset+size) clamped at EOF; RangefsError as ObjectHandle."""
        for _ in range(MAX_OWNER_CHANGES):
            if self._local is not None:
                return await self._local.read(offset, size)
            started = trio.current_time()
            failed = True
            try:
                data = await self._read_through_owner(offset, size)
                failed = False
                return data
            except OwnerGone as exc:
                failed = False  # tried again below
                log.info("%s: process %d stopped serving it (%s); opening it here",
                         self._obj.name, self._owner, exc)
                await self._drop_connections()
                self._local = await self._obj.open_again(self)
            finally:
                if failed:
                    self._obj.store.stats.read_done(size, trio.current_time() - started,
                                                    cached=True, failed=True)
        raise errors.InternalError(f"{self._obj.name}: its cache changed owner "
                                   f"{MAX_OWNER_CHANGES} times during one read")

    async def _read_through_owner(self, offset: int, size: int) -> bytes:
        started = trio.current_time()
        client = await self._connection()
        try:
            answer = await client.request("hold", url=self._obj.entry.url, offset=offset,
                                          size=size)
        except ControlError as exc:
            self._idle.append(client)
            raise _error_of(str(exc)) from exc
        except _GONE as exc:
            await client.aclose()
            raise OwnerGone(str(exc) or type(exc).__name__) from exc
        try:
            self._check_version(answer)
            if answer.get("eof"):
                return b""
            end = int(answer["end"])
            fd = self._data_fd(str(answer["data"]))
            data = await trio.to_thread.run_sync(os.pread, fd, end - offset, offset)
            if len(data) != end - offset:
                raise errors.InternalError(f"{self._obj.name}: short read of the shared cache")
            await client.request("unhold")
            self._obj.store.stats.read_done(len(data), trio.current_time() - started,
                                            cached=bool(answer.get("cached")), failed=False)
        except _GONE as exc:
            await client.aclose()
            raise OwnerGone(str(exc) or type(exc).__name__) from exc
        except BaseException:
            await client.aclose()
            raise
        self._idle.append(client)
        return data

    def _check_version(self, answer: dict[str, Any]) -> None:
        # the owner probed the same URL: a weak ETag it agrees on is as good as ours
        if other_version(self._info, answer.get("size"), answer.get("etag"),
                         answer.get("last_modified"), strong=False) is not None:
            raise errors.RemoteChanged(
                f"{self._obj.name}: process {self._owner}, which holds its cache, has "
                "another version of it; reopen the file")

    async def _connection(self) -> AsyncClient:
        if self._idle:
            return self._idle.pop()
        path = socket_path(self._obj.store.cachedir.root, self._owner)
        try:
            return await AsyncClient.connect(path)
        except OSError as exc:
            raise OwnerGone(f"cannot reach {path}: {exc.strerror or exc}") from exc

    def _data_fd(self, path: str) -> int:
        expected = os.fspath(self._obj.store.cachedir.object_dir(self._obj.key) / "data")
        if path != expected:
            raise errors.InternalError(f"{self._obj.name}: the owner named {path}, not "
                                       f"{expected}")
        if self._fd is None or self._fd_path != path:
            self._close_fd()
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            self._fd_path = path
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def _drop_connections(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            await client.aclose()
        self._close_fd()  # the next owner's data file may be another inode

    def release(self) -> None:
        """The file handle was closed. No await: connections close in the background."""
        if self._closed:
            return
        self._closed = True
        self._close_fd()
        idle, self._idle = self._idle, []
        if idle:
            self._obj.store.tasks.start("closing connections to a cache owner",
                                        _close_all, idle)
        local, self._local = self._local, None
        if local is not None:
            local.release()
        self._obj.guest_released()


async def _close_all(clients: list[AsyncClient]) -> None:
    for client in clients:
        await client.aclose()


def owner_of(directory: Path) -> int | None:
    """The PID of the process that holds the cache of ``directory`` open, or None."""
    pid = lock_holder(directory)
    return None if pid is None or pid == os.getpid() else pid


def _error_of(message: str) -> errors.RangefsError:
    """The owner's one-line error as the RangefsError it names (``Name: text``)."""
    name, sep, text = message.partition(": ")
    cls = getattr(errors, name, None) if sep else None
    if isinstance(cls, type) and issubclass(cls, errors.RangefsError):
        try:
            return cls(text)
        except TypeError:  # a class that needs more arguments
            pass
    return errors.TransientError(message)

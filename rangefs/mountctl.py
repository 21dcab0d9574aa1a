"""The commands a mount answers on its control socket (``control.py``): one handler each.

``status``   the mount (mount point, URL list, cache directory, budget and use), its
             counters (``stats.py``) with the current origin rate, and with ``files`` or
             ``paths`` the state of files: size, bytes cached, state and why.
``prefetch`` ``paths`` (files or directories, recursively): fill each file's cache whole,
             at background priority, one file after another (behind reads);
             answers at once with the files taken; progress is read with ``status``.
``evict``    ``paths``: drop their cached blocks, except blocks a read waits for or reads
             and objects being opened, filled or checked; answers with the bytes freed.
``refresh``  ``paths``: list the listed directories named (a file: its directory; another
             directory: the listed ones under it) again now; answers with what changed.

Paths are relative to the mount's root ('' or '.' is the root). Every handler runs on the
trio thread. Only listings wait for the network: ``refresh``, and ``prefetch``/``evict``
of paths in listed directories not listed yet (``status`` shows what is listed already).
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from .cachedir import cache_key
from .control import ControlError, Handlers, Session
from .errors import RangefsError
from .listings import Listings
from .objects import MountedObject, ObjectHandle, ObjectStore
from .tree import DirNode, FileNode, Node, Tree

log = logging.getLogger(__name__)

RATE_WINDOW = 5.0
"""Seconds over which status's current origin rate is averaged."""
MAX_FILES = 100_000
"""Most files one status or prefetch answer lists."""
EXPORT_OPEN_TIMEOUT = 10.0
"""Seconds ``export`` may take to open an object's cache (it may revalidate)."""
MAX_RUNS = 1_000_000
"""Most runs of cached blocks one ``export`` answer lists."""
REFRESH_SETTLE = 10.0
"""Seconds ``refresh`` waits for the kernel to forget changed names before it answers."""
YIELD_EVERY = 256
"""A long listing lets other tasks (reads) run after this many files."""


class MountControl:
    """The handlers of one mount; :meth:`sample_rate` is its one background task."""

    def __init__(self, *, mountpoint: Path, urllist: str, tree: Tree, store: ObjectStore,
                 listings: Listings,
                 forgotten: Callable[[], Awaitable[None]] | None = None) -> None:
        self._mountpoint = mountpoint
        self._urllist = urllist
        self._tree = tree
        self._store = store
        self._listings = listings
        self._forgotten = forgotten  # waits until the kernel forgot the names listings changed
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=16)
        self._queued: set[str] = set()  # keys of prefetches not yet finished
        self._queue: collections.deque[MountedObject] = collections.deque()
        self._worker = False  # the prefetch worker runs

    @property
    def handlers(self) -> Handlers:
        return {"status": self.status, "prefetch": self.prefetch, "evict": self.evict,
                "export": self.export, "hold": self.hold, "unhold": self.unhold,
                "refresh": self.refresh}

    async def sample_rate(self) -> None:
        """Record the origin byte count every second (for status's current rate); runs
        until cancelled."""
        while True:
            self._samples.append((trio.current_time(), self._store.stats.bytes_fetched))
            await trio.sleep(1.0)

    def _rate(self) -> float:
        """Origin bytes per second over the last RATE_WINDOW seconds (0 before 1 s)."""
        now, current = trio.current_time(), self._store.stats.bytes_fetched
        for when, count in self._samples:
            if now - when <= RATE_WINDOW + 0.5:
                return (current - count) / max(now - when, 1e-3) if now - when >= 0.5 else 0.0
        return 0.0

    # -- paths ----------------------------------------------------------------------------

    async def _node(self, path: str, *, listing: bool) -> Node:
        """The node at ``path``; with ``listing``, the listed directories on the way are
        listed as a lookup would (ControlError if that fails)."""
        try:
            node = await self._listings.resolve(path) if listing else self._tree.find(path)
        except RangefsError as exc:
            raise ControlError(f"{path}: {exc}") from exc
        if node is None:
            raise ControlError(f"{path}: no such file in the mount")
        return node

    async def _files(self, paths: list[str], *,
                     listing: bool = False) -> list[tuple[str, MountedObject]]:
        """(path, object) of every file named or under a directory named, once each (at
        most MAX_FILES). With ``listing``, listed directories under them are listed as
        they are reached; without, only what is listed already is seen."""
        seen: set[int] = set()
        out: list[tuple[str, MountedObject]] = []
        for path in paths:
            stack = [await self._node(path, listing=listing)]
            while stack:
                node = stack.pop()
                if isinstance(node, FileNode):
                    if node.inode not in seen:
                        seen.add(node.inode)
                        if len(out) >= MAX_FILES:
                            raise ControlError(f"more than {MAX_FILES} files: name a "
                                               "smaller directory")
                        out.append((self._tree.path(node.inode).as_posix(),
                                    self._store.get(node.entry)))
                        if len(out) % YIELD_EVERY == 0:
                            await trio.lowlevel.checkpoint()  # reads go on meanwhile
                    continue
                if listing and not self._listings.fresh(node):
                    try:
                        await self._listings.ensure(node)
                    except RangefsError as exc:
                        raise ControlError(f"{self._tree.path(node.inode)}: {exc}") from exc
                children = self._tree.children(node.inode)
                stack.extend(child for _, child in reversed(children))
        return out

    @staticmethod
    def _paths(req: Mapping[str, Any]) -> list[str]:
        paths = req.get("paths", [])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ControlError('"paths" must be a list of paths inside the mount')
        return paths or [""]

    # -- commands -------------------------------------------------------------------------

    async def status(self, req: Mapping[str, Any], session: Session) -> dict[str, Any]:
        store = self._store
        budget = store.budget
        snap = store.stats.snapshot()
        out: dict[str, Any] = {
            "mount": {
                "mountpoint": os.fspath(self._mountpoint),
                "urllist": self._urllist,
                "cache_dir": os.fspath(store.cachedir.root),
                "pid": os.getpid(),
                "entries": len(self._tree.files()),
            },
            "cache": {
                "used": budget.used,
                "limit": budget.last_limit(),
                "cache_size": budget.cache_size,
                "min_free": str(budget.min_free),
                "evicted": budget.evicted_bytes,
            },
            "stats": {**snap.as_json(), "rate": self._rate()},
        }
        if req.get("files") or req.get("paths"):
            files = []
            for i, (path, obj) in enumerate(await self._files(self._paths(req))):
                if i % YIELD_EVERY == YIELD_EVERY - 1:
                    await trio.lowlevel.checkpoint()  # reads go on during a long listing
                files.append(self._file(path, obj))
            out["files"] = files
        return out

    def _file(self, path: str, obj: MountedObject) -> dict[str, Any]:
        size, cached, state, reason = obj.state()
        if state in ("idle", "reading") and obj.key in self._queued:
            state = "queued"
        return {"path": path, "url": obj.name, "size": size, "cached": cached,
                "state": state, "reason": reason}

    async def _prefetch_worker(self) -> None:
        """Fill the queued objects one after another (one open cache at a time: a
        directory of 50,000 files costs two descriptors, not 100,000); an object's
        failure is logged and the next one goes on."""
        try:
            while self._queue:
                obj = self._queue.popleft()
                try:
                    await obj.fill_completely()
                except RangefsError as exc:
                    log.warning("prefetch of %s failed: %s", obj.name, exc)
                finally:
                    self._queued.discard(obj.key)
        finally:
            self._worker = False

    async def prefetch(self, req: Mapping[str, Any], session: Session) -> dict[str, Any]:
        store = self._store
        files = []
        for path, obj in await self._files(self._paths(req), listing=True):
            state = obj.state()[2]
            if state not in ("complete", "verified", "failed") and obj.key not in self._queued:
                self._queued.add(obj.key)
                self._queue.append(obj)
            files.append(self._file(path, obj))
        if self._queue and not self._worker:
            self._worker = True
            store.tasks.start("prefetch", self._prefetch_worker)
        return {"files": files, "limit": store.budget.last_limit()}

    async def evict(self, req: Mapping[str, Any], session: Session) -> dict[str, Any]:
        freed = 0
        kept: list[str] = []
        files = 0
        evictor = self._store.evictor
        for path, obj in await self._files(self._paths(req), listing=True):
            files += 1
            freed += await evictor.evict_object(obj.key)
            if obj.cached_bytes() > 0:
                kept.append(path)
        return {"files": files, "freed": freed, "kept": kept}

    async def refresh(self, req: Mapping[str, Any], session: Session) -> dict[str, Any]:
        """List again, now, the listed directories that ``paths`` name (see the module
        docstring): for each, its path, entries, and names added, removed and changed, or
        the error that kept it from being listed."""
        directories: list[DirNode] = []
        for path in self._paths(req):
            node = await self._node(path, listing=True)
            if isinstance(node, FileNode):
                parent = self._tree.node(node.parent)
                assert isinstance(parent, DirNode)
                if parent.listing is None:
                    raise ControlError(f"{path}: no listed directory there: it is an entry "
                                       "of the URL list")
                node = parent
            pending = [node]
            while pending:  # the listed directories nearest to it, itself included
                directory = pending.pop()
                if directory.listing is not None:
                    if directory not in directories:
                        directories.append(directory)
                    continue
                pending.extend(child for _, child in self._tree.children(directory.inode)
                               if isinstance(child, DirNode))
        if not directories:
            raise ControlError("no listed directory there: only directories whose list "
                               "entry ends with '/' are listed from the server")
        out = []
        for directory in directories:
            row: dict[str, Any] = {"path": self._tree.path(directory.inode).as_posix()}
            try:
                changes = await self._listings.refresh(directory)
            except RangefsError as exc:
                row["error"] = str(exc)
            else:
                row.update(entries=len(self._tree.children(directory.inode)),
                           added=changes.added, removed=len(changes.removed),
                           changed=len(changes.replaced))
            out.append(row)
        if self._forgotten is not None:
            with trio.move_on_after(REFRESH_SETTLE):
                await self._forgotten()
        return {"directories": out}

    async def export(self, req: Mapping[str, Any], session: Session) -> dict[str, Any]:
        """The cached blocks of the object at ``url``, for another rangefs process on this
        machine to copy (``sharing.py``): the data file, the version's validators and the
        runs of cached blocks. Those blocks stay pinned (never evicted) until the client's
        connection closes. ``{"found": false}`` if this mount has none of it."""
        url = req.get("url")
        if not isinstance(url, str):
            raise ControlError('"url" must be a string')
        obj = self._store.by_key(cache_key(url))
        if obj is None or obj.state()[1] == 0:
            return {"found": False}
        with trio.move_on_after(EXPORT_OPEN_TIMEOUT):
            exported = await obj.export()
            if exported is None:
                return {"found": False}
            version, release = exported
            session.on_close(release)
            cache = version.cache
            info = version.info
            return {"found": True, "data": os.fspath(cache.data_path), "size": info.size,
                    "etag": info.etag, "last_modified": info.last_modified,
                    "block_size": cache.block_size, "runs": _runs(cache.bitmap, cache.num_blocks)}
        return {"found": False}


    async def hold(self, req: Mapping[str, Any], session: Session) -> dict[str, Any]:
        """For another mount sharing the cache directory that reads ``url`` through this
        one (``guest.py``): the blocks of ``[offset, offset+size)`` cached (fetched now if
        missing, bounded by the read timeout) and pinned until ``unhold`` or the end of the
        connection; answers the data file, the end of the range clamped at EOF (or
        ``eof``) and the version's validators. One hold per connection at a time."""
        url, offset, size = req.get("url"), req.get("offset"), req.get("size")
        if not isinstance(url, str) or not isinstance(offset, int) or not isinstance(size, int):
            raise ControlError('hold needs "url", "offset" and "size"')
        self._release_hold(session)
        handles: dict[str, ObjectHandle] = session.state.setdefault("handles", {})
        key = cache_key(url)
        handle = handles.get(key)
        try:
            if handle is None:
                obj = self._store.by_key(key) or self._store.adopt(url)
                handle = await obj.export_handle()
                handles[key] = handle
                session.on_close(handle.release)
                if len(handles) == 1:  # unpinned before the handles are released
                    session.on_close(lambda: self._release_hold(session))
            held = await handle.hold(offset, size)
        except RangefsError as exc:
            raise ControlError(f"{type(exc).__name__}: {exc}") from exc
        version = handle.version
        info = version.info
        out: dict[str, Any] = {"size": info.size, "etag": info.etag,
                               "last_modified": info.last_modified}
        if held is None:
            return {**out, "eof": True}
        version, token, end, cached = held
        session.state["held"] = (version, token)
        return {**out, "data": os.fspath(version.cache.data_path), "end": end,
                "cached": cached}

    async def unhold(self, req: Mapping[str, Any], session: Session) -> dict[str, Any]:
        self._release_hold(session)
        return {}

    @staticmethod
    def _release_hold(session: Session) -> None:
        held = session.state.pop("held", None)
        if held is not None:
            version, token = held
            version.unpin(token)


def _runs(bitmap: Any, nblocks: int) -> list[list[int]]:
    """[first, last] of every run of cached blocks (at most MAX_RUNS runs)."""
    runs: list[list[int]] = []
    start = 0
    while start < nblocks and len(runs) < MAX_RUNS:
        first = bitmap.first_set(start, nblocks)
        if first is None:
            break
        end = bitmap.first_clear(first, nblocks)
        last = (nblocks if end is None else end) - 1
        runs.append([first, last])
        start = last + 1
    return runs

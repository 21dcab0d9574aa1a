"""The FUSE request handlers: a read-only view of a Tree over an ObjectStore.

This is the ONLY module that raises ``pyfuse3.FUSEError``. Every handler runs its body
under :meth:`RangeOperations._guard`, which translates errors once, with one table
(:data:`ERRNO_TABLE`), and logs one line per failure naming the object (URL redacted), the
byte range and the cause. Any exception that is not a ``RangefsError`` is a bug: it is
logged at ERROR with its traceback (message starts with ``BUG in FUSE handler``) and the
request fails with EIO, so the mount stays up but tests that check logs fail loudly.

Concurrency: pyfuse3 runs each request as a trio task, so reads of one handle may overlap.
Handlers are called from the trio thread only. The tree changes only where a listing
changes it (``listings.py``, on this thread, between two awaits); lookup and opendir of a
listed directory first have it listed (:meth:`Listings.ensure`, bounded by the read
timeout). The only mutable state here is the file-handle table, changed without an await
between check and update.
Cancellation (at unmount) passes through untouched: ``trio.Cancelled`` is not an Exception.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NewType

import pyfuse3
import trio

from .control import XATTR as CONTROL_XATTR
from .errors import (
    CacheError,
    InternalError,
    NotEnoughSpace,
    PermanentError,
    RangefsError,
    ReadTimeout,
    RemoteChanged,
    RetriesExhausted,
    SourceError,
    UsageError,
)
from .listings import Listings
from .objects import Handle, MountedObject, ObjectAttrs, ObjectStore
from .recording import Recorder
from .redact import redact_url
from .tree import ROOT_INODE, DirNode, FileNode, InodeNo, Node, Tree

log = logging.getLogger(__name__)

FileHandle = NewType("FileHandle", int)
"""An open() of a file, handed to the kernel; maps to one ObjectHandle."""

DirHandle = NewType("DirHandle", int)
"""An opendir(); the directory's inode number."""

# One table, most specific class first: the first isinstance match wins.
ERRNO_TABLE: tuple[tuple[type[RangefsError], int], ...] = (
    (ReadTimeout, errno.EIO),
    (RetriesExhausted, errno.EIO),
    (PermanentError, errno.EIO),  # 404 too: ENOENT comes only from the tree
    (RemoteChanged, errno.EIO),
    (SourceError, errno.EIO),
    (NotEnoughSpace, errno.ENOSPC),
    (CacheError, errno.EIO),
    (InternalError, errno.EIO),
    (UsageError, errno.EINVAL),
    (RangefsError, errno.EIO),
)

XATTR_PREFIX = "user.rangefs."
FILE_MODE = stat.S_IFREG | 0o444
DIR_MODE = stat.S_IFDIR | 0o555
NAME_MAX = 255

# Names and directories never change while mounted; sizes change only when a remote
# changes (then the object layer asks for invalidation) and st_blocks grows while the
# cache fills, so file attributes are re-read every 3 seconds (long enough for `ls -l` of
# 10,000 entries to use what readdir gave, without a GETATTR per entry once they expire).
ENTRY_TIMEOUT = 300.0
DIR_ATTR_TIMEOUT = 300.0
FILE_ATTR_TIMEOUT = 3.0
UNKNOWN_ATTR_TIMEOUT = 0.0  # attributes we could not get: ask again on the next stat

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT
_READDIR_BATCH = 32  # attributes fetched concurrently per readdir batch


def errno_for(exc: RangefsError) -> int:
    """The errno a FUSE request fails with for ``exc`` (see :data:`ERRNO_TABLE`)."""
    for cls, code in ERRNO_TABLE:
        if isinstance(exc, cls):
            return code
    return errno.EIO  # unreachable: RangefsError is the last row


def _cause(exc: BaseException) -> str:
    """``Class: message`` of ``exc`` plus its direct cause, for one log line."""
    text = f"{type(exc).__name__}: {exc}"
    if exc.__cause__ is not None:
        text += f" (caused by {type(exc.__cause__).__name__}: {exc.__cause__})"
    return text


IO_SIZE = 1 << 20  # st_blksize at least: cp, cat and tar read this much per call


class RangeOperations(pyfuse3.Operations):
    """pyfuse3 handlers for one mount. Created and called on the trio thread only.

    No request waits for the network longer than the store's ``read_timeout``: reads are
    bounded by the object layer, probes (lookup/getattr/readdir/open) here.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        tree: Tree,
        store: ObjectStore,
        *,
        uid: int | None = None,
        gid: int | None = None,
        block_size: int = 1 << 20,
        listings: Listings | None = None,
    ) -> None:
        self._tree = tree
        self._store = store
        self._listings = listings if listings is not None else Listings(tree, store)
        self._listings.on_change = self.forget_names  # the kernel forgets changed names
        self._forget: collections.deque[tuple[InodeNo, str]] = collections.deque()
        self._forget_queued = 0  # names ever queued ...
        self._forget_done = 0  # ... and forgotten
        self._forget_wake = trio.Event()
        self._forget_progress = trio.Event()
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._block_size = block_size
        # st_blksize: the I/O size tools such as cp use; large, whatever the block size
        self._io_size = max(block_size, IO_SIZE)
        self._timeout = store.config.read_timeout
        self._mount_time_ns = time.time_ns()
        self._handles: dict[FileHandle, tuple[Handle, str]] = {}  # handle, redacted URL
        self._next_fh = 1
        # the mount's control socket, named by the root's user.rangefs.control (set by
        # the mount once it listens)
        self.control_socket: str | None = None
        # --record: what reads touch first (set by the mount before it serves requests)
        self.recorder: Recorder | None = None
        self._paths: dict[FileHandle, str] = {}  # for the recorder: the path of each handle

    # -- error translation -------------------------------------------------------------

    @contextmanager
    def _guard(self, op: str, what: str = "", byte_range: str = "") -> Iterator[None]:
        """Run a handler body; let FUSEError through, translate everything else once.

        ``what`` names the object (redacted URL) or path, ``byte_range`` is '[a:b]' or ''.
        """
        try:
            yield
        except pyfuse3.FUSEError:
            raise
        except RangefsError as exc:
            code = errno_for(exc)
            log.warning(
                "%s %s%s failed with %s: %s",
                op,
                what or "-",
                f" {byte_range}" if byte_range else "",
                errno.errorcode.get(code, str(code)),
                _cause(exc),
            )
            raise pyfuse3.FUSEError(code) from exc
        except Exception as exc:
            log.exception(
                "BUG in FUSE handler %s %s%s: unexpected %s",
                op,
                what or "-",
                f" {byte_range}" if byte_range else "",
                type(exc).__name__,
            )
            raise pyfuse3.FUSEError(errno.EIO) from exc

    def _node(self, inode: int) -> Node:
        """The tree node of ``inode``; ENOENT for an inode the tree does not know."""
        try:
            return self._tree.node(InodeNo(inode))
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _object(self, node: FileNode) -> MountedObject:
        return self._store.get(node.entry)

    @staticmethod
    def _describe(node: Node) -> str:
        if isinstance(node, FileNode):
            return redact_url(node.entry.url)
        if node.listing is not None:
            return f"directory {node.name or '/'} ({redact_url(node.listing.url)})"
        return f"directory {node.name or '/'}"

    # -- attributes --------------------------------------------------------------------

    def _entry_timeout(self, listed: bool) -> float:
        """How long the kernel may keep a name: names a listing gave, no longer than the
        listing is used (then the next look reaches the mount, which lists again)."""
        return min(ENTRY_TIMEOUT, self._listings.ttl) if listed else ENTRY_TIMEOUT

    def _dir_attrs(self, node: DirNode) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_mode = DIR_MODE
        attr.st_nlink = self._tree.links(node.inode)
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_size = 0
        attr.st_blksize = self._io_size
        attr.st_blocks = 0
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._mount_time_ns
        attr.entry_timeout = self._entry_timeout(node.listing is not None)
        attr.attr_timeout = DIR_ATTR_TIMEOUT
        return attr

    def _file_attrs(
        self, node: FileNode, obj: MountedObject, attrs: ObjectAttrs | None
    ) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.inode
        attr.st_mode = FILE_MODE
        attr.st_nlink = 1
        attr.st_uid = self._uid
        attr.st_gid = self._gid
        attr.st_blksize = self._io_size
        attr.entry_timeout = self._entry_timeout(node.entry.listed)
        if attrs is None:  # unknown (a probe failed during readdir): stat asks again
            attr.st_size = 0
            attr.st_blocks = 0
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._mount_time_ns
            attr.attr_timeout = UNKNOWN_ATTR_TIMEOUT
            attr.entry_timeout = UNKNOWN_ATTR_TIMEOUT
            return attr
        attr.st_size = attrs.size
        attr.st_blocks = (obj.cached_bytes() + 511) // 512
        mtime_ns = int(attrs.mtime * 1_000_000_000)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime_ns
        attr.attr_timeout = FILE_ATTR_TIMEOUT
        return attr

    async def _attrs_of(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of any node; may probe the remote (caller guards errors)."""
        if isinstance(node, DirNode):
            return self._dir_attrs(node)
        obj = self._object(node)
        attrs = obj.attrs_nowait()
        if attrs is None:
            attrs = await self._probe_attrs(obj)
        return self._file_attrs(node, obj, attrs)

    async def _probe_attrs(self, obj: MountedObject) -> ObjectAttrs:
        """``obj.attrs()`` (a probe), bounded by the read timeout like every network wait
        of a FUSE request: ReadTimeout past it (the probe is cancelled)."""
        with trio.move_on_after(self._timeout):
            return await obj.attrs()
        raise ReadTimeout(f"no answer from the server after {self._timeout:g} s")

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if not isinstance(parent, DirNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not self._listings.fresh(parent):
            with self._guard("lookup", self._describe(parent)):
                await self._listings.ensure(parent)
        node = self._tree.lookup(parent.inode, os.fsdecode(name))  # '.' and '..' too
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        with self._guard("lookup", self._describe(node)):
            return await self._attrs_of(node)

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        with self._guard("getattr", self._describe(node)):
            return await self._attrs_of(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Nothing to do: every inode lives as long as the mount."""

    # -- directories -------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not isinstance(node, DirNode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if not self._listings.fresh(node):
            with self._guard("opendir", self._describe(node)):
                await self._listings.ensure(node)
        return DirHandle(node.inode)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries from index ``start_id`` on; the next_id of entry i is i+1.

        Attributes of a batch of entries are fetched concurrently (the object layer bounds
        probes); an entry whose attributes fail is still listed, with attributes that the
        kernel asks for again on the next stat (which then fails with the mapped errno).
        In a listed directory, files whose size the listing did not give are not probed:
        they get attributes that the kernel asks for again when something stats them (no
        HEAD per file for an ``ls``).
        """
        node = self._node(fh)
        probe = not (isinstance(node, DirNode) and node.listing is not None)
        children = self._tree.children(InodeNo(fh))
        index = start_id
        while index < len(children):
            batch = children[index : index + _READDIR_BATCH]
            attrs = await self._batch_attrs([node for _, node in batch], probe=probe)
            for (name, _), attr in zip(batch, attrs, strict=True):
                if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, index + 1):
                    return
                index += 1

    async def _batch_attrs(self, nodes: list[Node], *,
                           probe: bool = True) -> list[pyfuse3.EntryAttributes]:
        results: list[pyfuse3.EntryAttributes | None] = [None] * len(nodes)

        async def one(i: int, node: FileNode, obj: MountedObject) -> None:
            try:
                with self._guard("readdir", self._describe(node)):
                    results[i] = self._file_attrs(node, obj, await self._probe_attrs(obj))
            except pyfuse3.FUSEError:
                results[i] = self._file_attrs(node, obj, None)

        with self._guard("readdir"):
            async with trio.open_nursery() as nursery:
                for i, node in enumerate(nodes):
                    if isinstance(node, DirNode):
                        results[i] = self._dir_attrs(node)
                        continue
                    obj = self._object(node)
                    known = obj.attrs_nowait()
                    if known is not None or not probe:
                        results[i] = self._file_attrs(node, obj, known)
                    else:
                        nursery.start_soon(one, i, node, obj)
        out = [attr for attr in results if attr is not None]
        assert len(out) == len(nodes)
        return out

    async def releasedir(self, fh: int) -> None:
        """Nothing to release: a directory handle is its inode."""

    # -- files -------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, DirNode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        name = self._describe(node)
        with self._guard("open", name):
            handle = await self._open(self._object(node))
        # No await between allocating and registering the handle.
        fh = FileHandle(self._next_fh)
        self._next_fh += 1
        self._handles[fh] = (handle, name)
        if self.recorder is not None:
            self._paths[fh] = self._tree.path(node.inode).as_posix()
        return pyfuse3.FileInfo(fh=fh, keep_cache=handle.keep_cache)

    async def _open(self, obj: MountedObject) -> Handle:
        """``obj.open()`` (may probe), bounded by the read timeout: ReadTimeout past it."""
        with trio.move_on_after(self._timeout):
            return await obj.open()
        raise ReadTimeout(f"no answer from the server after {self._timeout:g} s")

    def _handle(self, fh: int) -> tuple[Handle, str]:
        try:
            return self._handles[FileHandle(fh)]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle, name = self._handle(fh)
        with self._guard("read", name, f"[{off}:{off + size - 1}]"):
            data = await handle.read(off, size)
        if self.recorder is not None and data:
            path = self._paths.get(FileHandle(fh))
            if path is not None:
                self.recorder.touch(path, off, len(data))
        return data

    async def flush(self, fh: int) -> None:
        """close() of one descriptor: nothing is buffered, nothing to do."""
        self._handle(fh)

    async def release(self, fh: int) -> None:
        found = self._handles.pop(FileHandle(fh), None)
        self._paths.pop(FileHandle(fh), None)
        if found is None:
            return
        handle, name = found
        with self._guard("release", name):
            handle.release()

    async def fsync(self, fh: int, datasync: bool) -> None:
        """Nothing was written: succeed."""

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Nothing was written: succeed."""

    # -- extended attributes -----------------------------------------------------------

    def _xattrs(self, inode: int, op: str) -> dict[str, bytes]:
        node = self._node(inode)
        if isinstance(node, DirNode):
            if node.inode == ROOT_INODE and self.control_socket is not None:
                return {CONTROL_XATTR: os.fsencode(self.control_socket)}
            return {}
        with self._guard(op, self._describe(node)):
            return self._object(node).xattrs()

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            # security.*, system.* (ACLs), trusted.*: not supported here. ls -l asks every
            # file for security.selinux and system.posix_acl_access; EOPNOTSUPP (not
            # ENODATA) tells it the whole file system has none, so it stops asking.
            self._node(inode)
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if not name.startswith(b"user.rangefs."):
            self._node(inode)
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        values = self._xattrs(inode, "getxattr")
        try:
            return values[os.fsdecode(name)]
        except KeyError:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return [os.fsencode(name) for name in self._xattrs(inode, "listxattr")]

    # -- file system -------------------------------------------------------------------

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """Sizes known without the network; nothing is free (read-only)."""
        total = 0
        files = 0
        with self._guard("statfs"):
            for node in self._tree.files():
                files += 1
                attrs = self._object(node).attrs_nowait()
                if attrs is not None:
                    total += attrs.size
        data = pyfuse3.StatvfsData()
        data.f_bsize = self._block_size
        data.f_frsize = 512
        data.f_blocks = (total + 511) // 512
        data.f_bfree = 0
        data.f_bavail = 0
        data.f_files = files
        data.f_ffree = 0
        data.f_favail = 0
        data.f_namemax = NAME_MAX
        return data

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        """Only used without default_permissions: anything but write is allowed."""
        self._node(inode)
        return not mode & os.W_OK

    # -- everything that would change the file system: EROFS ---------------------------

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    # -- for the object layer and the listings -----------------------------------------

    def forget_names(self, parent: InodeNo, names: list[str]) -> None:
        """The kernel must forget ``names`` of directory ``parent`` (a listing removed or
        changed them, or made them stale). Queued for :meth:`forget_queued`: no await, so
        no deadlock with a lookup that waits for the listing that called this."""
        self._forget.extend((parent, name) for name in names)
        self._forget_queued += len(names)
        self._forget_wake.set()

    async def forgotten(self) -> None:
        """Wait until the kernel has forgotten every name queued so far (``rangefs
        refresh`` answers after that: the next look reaches the mount)."""
        target = self._forget_queued
        while self._forget_done < target:
            await self._forget_progress.wait()

    async def forget_queued(self) -> None:
        """Tell the kernel to forget the queued names, in a worker thread (the call
        blocks while a request on that directory is in flight), until cancelled. Started
        by mount.py once the FUSE session runs."""
        while True:
            await self._forget_wake.wait()
            self._forget_wake = trio.Event()
            while self._forget:
                batch = [self._forget.popleft() for _ in range(min(256, len(self._forget)))]
                await trio.to_thread.run_sync(_invalidate_entries, batch)
                self._forget_done += len(batch)
                self._forget_progress.set()
                self._forget_progress = trio.Event()

    async def invalidate_changed(self, changed: trio.MemoryReceiveChannel[MountedObject]) -> None:
        """Drop the kernel's attributes and page cache of every file showing an object that
        ``changed`` names (``ObjectStore.changed``: a remote changed), until cancelled.

        Started by mount.py once the FUSE session runs. The kernel call runs in a worker
        thread: it waits for page locks that a read in flight through this very loop may
        hold (a deadlock if done inline)."""
        async for obj in changed:
            inodes = [node.inode for node in self._tree.files()
                      if self._store.get(node.entry) is obj]
            if inodes:
                await trio.to_thread.run_sync(_invalidate_inodes, inodes)
                log.info("%s: the kernel dropped its pages and attributes of %d file(s)",
                         obj.name, len(inodes))


def _invalidate_entries(entries: list[tuple[InodeNo, str]]) -> None:
    """Worker thread: tell the kernel to forget the names ``entries`` (parent, name)."""
    for parent, name in entries:
        try:
            pyfuse3.invalidate_entry(parent, os.fsencode(name))
        except OSError as exc:  # ENOENT: the kernel does not know the name
            log.debug("invalidate_entry(%d, %r): %s", parent, name, exc)


def _invalidate_inodes(inodes: list[InodeNo]) -> None:
    """Worker thread: tell the kernel to forget the attributes and pages of ``inodes``."""
    for inode in inodes:
        try:
            pyfuse3.invalidate_inode(inode, attr_only=False)
        except OSError as exc:  # ENOENT: the kernel does not know the inode
            log.debug("invalidate_inode(%d): %s", inode, exc)

"""The cache's files on disk: space reservation, the index format, atomic index persistence.

Everything here is synchronous and blocking (fsync, fallocate): trio callers run it in a
worker thread (``trio.to_thread.run_sync``) unless they accept blocking the event loop.
Files are created with mode 0600 (``os.open(..., 0o600)``, no chmod window).

Index file format (version 1)::

    b"RANGEFS-INDEX 1\\n"
    one line of compact ASCII JSON, then b"\\n":
        {"url": str, "size": int, "block_size": int, "etag": str|null,
         "last_modified": str|null, "generation": int, "bitmap_bytes": int}
    the packed block bitmap (``ByteRangesTracker.to_bytes()``, ceil(blocks/8) bytes)
    CRC32 of everything above, 4 bytes big-endian

``read_index`` checks the length, the CRC, the magic, the JSON, the bitmap length and that
no bit past the last block is set; any failure is ``CacheCorrupt``. ``generation`` counts
index writes of one object (informational; callers pass it in).

The identity's URL is written in clear: callers must pass a URL without credentials
(userinfo or secret query values), see DESIGN.md §2.10.

Persistence and crashes: ``write_index(path, ...)`` writes ``path.tmp``, fsyncs it, renames
the current ``path`` to ``path.prev``, renames ``path.tmp`` to ``path`` and fsyncs the
directory. A crash therefore leaves some of: a valid ``path``; a valid ``path.prev`` (the
previous write); a stale or torn ``path.tmp`` (ignored, overwritten next time). Between the
two renames only ``path.prev`` exists, so readers must fall back to ``path.prev`` when
``path`` is missing or corrupt. With ``keep_prev=False`` the old ``path.prev`` is removed
before the rename, so no index of an older version survives.

Sparse data files and holes: a mount caches blocks, not objects, so its data files are
created sparse (``create_sparse``, ``reserve=False``: nothing allocated up front) and an
evicted run of blocks gives its space back with ``punch_hole`` (``fallocate`` with
``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE``, through ctypes: the os module has no
fallocate with flags). ``rangefs download`` keeps reserving (``reserve_space``).

Write-behind: ``start_writeback`` (``sync_file_range``, through ctypes too) hands a file's
dirty pages to the disk without waiting, so that a later fdatasync has little left to wait
for and dirty memory stays small while a large object is written.

``create_new_files_for_cache`` removes the old index (and ``.prev``/``.tmp``) *before* it
touches the data file, so a crash can never leave an old index claiming blocks of a
truncated or re-allocated data file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import stat
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rangefs import errors
from rangefs.ranges import ByteRangesTracker, num_blocks

__all__ = [
    "DEFAULT_HEADROOM",
    "HEADROOM_FRACTION",
    "INDEX_MAGIC",
    "IndexRecord",
    "ObjectIdentity",
    "allocated_bytes",
    "cache_files_exist",
    "check_space",
    "create_new_files_for_cache",
    "create_sparse",
    "ensure_private_dir",
    "fsync_dir",
    "open_cache_files",
    "open_data_file",
    "punch_hole",
    "pwritev_all",
    "read_index",
    "read_index_record",
    "remove_index_files",
    "reserve_space",
    "start_writeback",
    "write_index",
]

log = logging.getLogger(__name__)

INDEX_MAGIC = b"RANGEFS-INDEX 1\n"
#: Free space that ``reserve_space`` leaves on the filesystem beyond the object (bytes).
DEFAULT_HEADROOM = 16 * 1024 * 1024
#: ... but at most this fraction of the filesystem's size (a 64 MiB filesystem: 4 MiB).
HEADROOM_FRACTION = 16
#: ``reserve_space`` allocates in chunks of this many bytes, reporting progress after each.
RESERVE_CHUNK = 256 * 1024 * 1024

_FILE_MODE = 0o600
# Never follow a symlink planted where a cache file should be.
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}
_CRC_LEN = 4

StrPath = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class ObjectIdentity:
    """Which remote object (and which version of it) a cache holds.

    ``url`` must carry no credentials (it is stored in clear); ``size`` in bytes (>= 0);
    ``block_size`` in bytes (> 0); ``etag`` / ``last_modified`` are the validators as the
    server sent them, or None. Two identities are the same object version iff equal.
    """

    url: str
    size: int
    block_size: int
    etag: str | None
    last_modified: str | None

    def __post_init__(self) -> None:
        num_blocks(self.size, self.block_size)  # ValueError for a bad geometry

    @property
    def num_blocks(self) -> int:
        """Number of blocks of the object."""
        return num_blocks(self.size, self.block_size)

    @property
    def bitmap_bytes(self) -> int:
        """Length in bytes of the packed bitmap for this object."""
        return (self.num_blocks + 7) >> 3


@dataclass(frozen=True, slots=True)
class IndexRecord:
    """What an index file holds."""

    identity: ObjectIdentity
    bitmap: bytes
    generation: int


def _prev_path(path: StrPath) -> str:
    return os.fspath(path) + ".prev"


def _tmp_path(path: StrPath) -> str:
    return os.fspath(path) + ".tmp"


def _os_error(what: str, exc: OSError) -> errors.RangefsError:
    """Translate an OSError from an I/O path: ENOSPC/EDQUOT -> NotEnoughSpace, else internal."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.NotEnoughSpace(f"{what}: no space left: {exc}")
    return errors.InternalError(f"{what}: {exc}")


def fsync_dir(directory: StrPath) -> None:
    """fsync a directory so that renames / creations in it are durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _allocated_bytes(path: StrPath) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0
    return st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0


def check_space(path: StrPath, size: int, *, headroom: int = DEFAULT_HEADROOM) -> None:
    """Raise ``NotEnoughSpace`` (naming both sizes) unless the filesystem of ``path`` has
    ``size + headroom`` bytes free, counting what ``path`` already occupies as free (it is
    about to be replaced). The headroom is at most 1/``HEADROOM_FRACTION`` of the
    filesystem's size, so that a small filesystem still holds small objects. Size 0 always
    fits. ``InternalError`` if statvfs fails."""
    if size <= 0:
        return
    path = os.fspath(path)
    try:
        vfs = os.statvfs(os.path.dirname(path) or ".")
        free = vfs.f_bavail * vfs.f_frsize + _allocated_bytes(path)
    except OSError as exc:
        raise errors.InternalError(f"cannot check free space for {path}: {exc}") from exc
    total = getattr(vfs, "f_blocks", 0) * vfs.f_frsize  # 0 where a statvfs lacks it
    if total > 0:
        headroom = min(headroom, total // HEADROOM_FRACTION)
    if free < size + headroom:
        raise errors.NotEnoughSpace(
            f"not enough space to cache {size} bytes in {path}: only {free} bytes free "
            f"(need {size} + {headroom} headroom)"
        )


def reserve_space(
    path: StrPath,
    size: int,
    *,
    progress: Callable[[int], None] | None = None,
    headroom: int = DEFAULT_HEADROOM,
) -> None:
    """Create (or truncate) ``path`` (mode 0600) and allocate ``size`` bytes to it. Blocking.

    1. ``statvfs`` of the directory: the free space (plus what ``path`` already occupies) must
       be at least ``size + headroom`` for ``size > 0``, else ``NotEnoughSpace`` naming both
       sizes — before anything is created or written.
    2. ``posix_fallocate`` in chunks of ``RESERVE_CHUNK``; where the filesystem lacks it
       (EOPNOTSUPP/EINVAL/ENOSYS) a sparse ``ftruncate`` instead. Size 0 gives an empty file.
    3. fsync the file and its directory, then check that ``st_size == size``.

    ``progress(n)`` is called with the bytes reserved so far (non-decreasing), last with
    ``size`` on success; it is not called after a failure. Errors: ``NotEnoughSpace`` (also
    for ENOSPC during allocation), ``InternalError`` for other OS errors; ValueError for a
    negative size.
    """
    if size < 0:
        raise ValueError(f"size must not be negative, not {size}")
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    check_space(path, size, headroom=headroom)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, _FILE_MODE)
    except OSError as exc:
        raise _os_error(f"reserving space for {path}", exc) from exc
    try:
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, _FILE_MODE)  # an older file with a looser mode
            done = 0
            sparse = False
            while done < size:
                step = min(RESERVE_CHUNK, size - done)
                try:
                    os.posix_fallocate(fd, done, step)
                except OSError as exc:
                    if exc.errno not in _NO_FALLOCATE:
                        raise
                    log.debug("fallocate unsupported for %s (%s); sparse file", path, exc)
                    sparse = True
                    break
                done += step
                if progress is not None and done < size:
                    progress(done)
            if sparse:
                os.ftruncate(fd, size)
            os.fsync(fd)
            actual = os.fstat(fd).st_size
        finally:
            os.close(fd)
        fsync_dir(directory)
    except OSError as exc:
        raise _os_error(f"reserving {size} bytes for {path}", exc) from exc
    if actual != size:
        raise errors.InternalError(f"reserved {path}: size is {actual}, expected {size}")
    if progress is not None:
        progress(size)


# -- the index ----------------------------------------------------------------------------


def _encode_index(identity: ObjectIdentity, bitmap: bytes, generation: int) -> bytes:
    header = {
        "url": identity.url,
        "size": identity.size,
        "block_size": identity.block_size,
        "etag": identity.etag,
        "last_modified": identity.last_modified,
        "generation": generation,
        "bitmap_bytes": len(bitmap),
    }
    body = INDEX_MAGIC + json.dumps(header, separators=(",", ":")).encode("ascii") + b"\n"
    body += bitmap
    return body + zlib.crc32(body).to_bytes(_CRC_LEN, "big")


def _decode_index(path: str, blob: bytes) -> IndexRecord:
    def corrupt(reason: str) -> errors.CacheCorrupt:
        return errors.CacheCorrupt(f"index {path}: {reason}")

    if len(blob) < len(INDEX_MAGIC) + _CRC_LEN:
        raise corrupt(f"too short ({len(blob)} bytes)")
    body, crc = blob[:-_CRC_LEN], blob[-_CRC_LEN:]
    if not body.startswith(INDEX_MAGIC):
        raise corrupt("bad magic (not a rangefs index, or another version)")
    if zlib.crc32(body).to_bytes(_CRC_LEN, "big") != crc:
        raise corrupt("checksum mismatch (torn or damaged)")
    eol = body.find(b"\n", len(INDEX_MAGIC))
    if eol < 0:
        raise corrupt("no header line")
    try:
        header: Any = json.loads(body[len(INDEX_MAGIC) : eol])
    except ValueError as exc:
        raise corrupt(f"bad header: {exc}") from exc
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")

    def field(name: str, kind: type, nullable: bool = False) -> Any:
        value = header.get(name)
        if value is None and nullable:
            return None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise corrupt(f"header field {name!r} is missing or not {kind.__name__}")
        return value

    try:
        identity = ObjectIdentity(
            url=field("url", str),
            size=field("size", int),
            block_size=field("block_size", int),
            etag=field("etag", str, nullable=True),
            last_modified=field("last_modified", str, nullable=True),
        )
    except ValueError as exc:
        raise corrupt(str(exc)) from exc
    generation = field("generation", int)
    bitmap = body[eol + 1 :]
    if field("bitmap_bytes", int) != len(bitmap) or len(bitmap) != identity.bitmap_bytes:
        raise corrupt(
            f"bitmap has {len(bitmap)} bytes, expected {identity.bitmap_bytes} "
            f"for size {identity.size}, block size {identity.block_size}"
        )
    try:
        ByteRangesTracker.from_bytes(identity.size, identity.block_size, bitmap)
    except ValueError as exc:
        raise corrupt(str(exc)) from exc
    return IndexRecord(identity, bytes(bitmap), generation)


def read_index_record(path: StrPath) -> IndexRecord:
    """Read and validate an index. FileNotFoundError if it does not exist; ``CacheCorrupt``
    for anything torn, damaged or malformed; ``InternalError`` for other OS errors."""
    p = os.fspath(path)
    try:
        with os.fdopen(os.open(p, os.O_RDONLY | _NOFOLLOW), "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        raise
    except IsADirectoryError as exc:
        raise errors.CacheCorrupt(f"index {p} is a directory") from exc
    except OSError as exc:
        raise errors.InternalError(f"failed to read index file {p}: {exc}") from exc
    return _decode_index(p, blob)


def read_index(path: StrPath) -> tuple[ObjectIdentity, bytes]:
    """``read_index_record`` as ``(identity, bitmap bytes)``."""
    rec = read_index_record(path)
    return rec.identity, rec.bitmap


def write_index(
    path: StrPath,
    identity: ObjectIdentity,
    bitmap_bytes: bytes,
    *,
    generation: int = 0,
    keep_prev: bool = True,
) -> None:
    """Atomically replace the index at ``path``. Blocking (fsyncs).

    Writes ``path.tmp`` (0600) and fsyncs it; then either moves the current ``path`` to
    ``path.prev`` (``keep_prev``) or removes ``path.prev``; renames ``path.tmp`` to ``path``;
    fsyncs the directory. The caller must have made the data the bitmap claims durable first.
    ValueError if the bitmap does not fit the identity; ``NotEnoughSpace`` on ENOSPC,
    ``InternalError`` on other OS errors (``path`` is then left as it was or as ``.prev``).
    """
    if len(bitmap_bytes) != identity.bitmap_bytes:
        raise ValueError(
            f"bitmap of {len(bitmap_bytes)} bytes, expected {identity.bitmap_bytes}"
        )
    p = os.fspath(path)
    tmp, prev = _tmp_path(p), _prev_path(p)
    blob = _encode_index(identity, bytes(bitmap_bytes), generation)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, _FILE_MODE)
        try:
            view = memoryview(blob)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            if keep_prev:
                os.replace(p, prev)
            else:
                os.unlink(prev)
        os.replace(tmp, p)
        fsync_dir(os.path.dirname(p) or ".")
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _os_error(f"writing index {p}", exc) from exc


def remove_index_files(index_path: StrPath) -> None:
    """Remove ``index_path`` and its ``.prev`` and ``.tmp`` siblings (missing ones are fine),
    then fsync the directory. ``InternalError`` on other OS errors."""
    p = os.fspath(index_path)
    try:
        for name in (p, _prev_path(p), _tmp_path(p)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        fsync_dir(os.path.dirname(p) or ".")
    except OSError as exc:
        raise errors.InternalError(f"removing index {p}: {exc}") from exc


# -- the pair of files --------------------------------------------------------------------


def create_new_files_for_cache(
    data_path: StrPath,
    index_path: StrPath,
    identity: ObjectIdentity,
    *,
    progress: Callable[[int], None] | None = None,
    headroom: int = DEFAULT_HEADROOM,
    reserve: bool = True,
) -> None:
    """Start an object's cache from scratch. Blocking.

    Removes the old index files first (so no index outlives its data), reserves
    ``identity.size`` bytes for the data file (``reserve_space``; ``NotEnoughSpace`` before
    anything is written) or, without ``reserve``, creates it sparse (``create_sparse``),
    then writes an all-clear index (generation 0). ValueError for an empty file name.
    """
    if not os.fspath(data_path) or not os.fspath(index_path):
        raise ValueError("filename cannot be empty")
    if os.path.isdir(data_path):
        raise errors.InternalError(f"failed to create cache file {data_path}: is a directory")
    remove_index_files(index_path)
    if reserve:
        reserve_space(data_path, identity.size, progress=progress, headroom=headroom)
    else:
        create_sparse(data_path, identity.size)
    write_index(index_path, identity, bytes(identity.bitmap_bytes), keep_prev=False)


def create_sparse(path: StrPath, size: int) -> None:
    """Create (or truncate) ``path`` (0600) as a sparse file of ``size`` bytes: nothing is
    allocated; blocks take space as they are written. fsyncs the file and its directory.
    Blocking. ``InternalError``/``NotEnoughSpace`` on OS errors."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, _FILE_MODE)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, _FILE_MODE)
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(path) or ".")
    except OSError as exc:
        if exc.errno in (errno.EFBIG, errno.EINVAL):
            raise errors.NotEnoughSpace(
                f"cannot cache {size} bytes in {path}: larger than the largest file its "
                f"file system allows ({exc.strerror})"
            ) from exc
        raise _os_error(f"creating the sparse file {path}", exc) from exc


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_SYNC_FILE_RANGE_WRITE = 0x02
_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_uint]
        _libc = libc
    return _libc


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` of the file ``fd`` (reads give zeros; the
    size is kept). Blocking; thread-safe. OSError (EOPNOTSUPP where the file system cannot
    punch holes)."""
    if length <= 0:
        return
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _load_libc().fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def start_writeback(fd: int) -> bool:
    """Start writing every dirty page of the file ``fd`` to its disk, without waiting for
    the writes (``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE`` over the whole file: it
    blocks only while the disk's queue is full). Not a durability step: fdatasync still
    is. False where the kernel or the file system cannot do it (stop calling it for that
    file); any other error is left to the next fdatasync, which reports it."""
    if _load_libc().sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0:
        return True
    return ctypes.get_errno() not in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP)


def pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write every byte of ``views`` at ``offset`` of ``fd``, retrying short writes.
    OSError. Any thread."""
    views = [view for view in views if view]
    while views:
        written = os.pwritev(fd, views, offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            del views[0]
        if written:
            views[0] = views[0][written:]


def allocated_bytes(fd: int) -> int:
    """Bytes the file ``fd`` occupies on disk (``st_blocks`` x 512)."""
    return os.fstat(fd).st_blocks * 512


def open_data_file(data_path: StrPath) -> int:
    """Open the data file read-write; returns the fd (close-on-exec).

    FileNotFoundError if missing; ``InternalError`` ("failed to open cache file") otherwise
    (a directory, permissions, ...).
    """
    p = os.fspath(data_path)
    try:
        fd = os.open(p, os.O_RDWR | _NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise errors.InternalError(f"failed to open cache file {p}: {exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise errors.InternalError(f"failed to open cache file {p}: {exc}") from exc
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise errors.InternalError(f"failed to open cache file {p}: not a regular file")
    return fd


def open_cache_files(data_path: StrPath, index_path: StrPath) -> tuple[int, IndexRecord]:
    """Open the data file (fd, read-write) and read the index.

    FileNotFoundError if either is missing; ``CacheCorrupt`` for a bad index (the fd is then
    closed); ``InternalError`` for other failures. ``index.prev`` is not consulted here;
    ``LocalDownloadCache.open`` does that.
    """
    fd = open_data_file(data_path)
    try:
        return fd, read_index_record(index_path)
    except BaseException:
        os.close(fd)
        raise


def cache_files_exist(data_path: StrPath, index_path: StrPath) -> tuple[bool, bool]:
    """``(data exists, index exists)``. ``InternalError`` for stat errors other than ENOENT."""
    result = []
    for p in (data_path, index_path):
        try:
            os.stat(p)
        except FileNotFoundError:
            result.append(False)
        except OSError as exc:
            raise errors.InternalError(f"cannot stat {os.fspath(p)}: {exc}") from exc
        else:
            result.append(True)
    return result[0], result[1]


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` (and parents) if missing; make it mode 0700.

    Refuses (CacheError) a symlink, or a directory another user owns: whoever controls the
    directory could plant links that make rangefs overwrite their targets.
    ``InternalError`` on OS errors."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
        if stat.S_ISLNK(st.st_mode):
            raise errors.CacheError(f"cache directory {directory} is a symlink; refusing it")
        if not stat.S_ISDIR(st.st_mode):
            raise errors.InternalError(f"cache directory {directory} is not a directory")
        if st.st_uid != os.geteuid():
            raise errors.CacheError(
                f"cache directory {directory} belongs to uid {st.st_uid}; refusing it"
            )
        if st.st_mode & 0o077:
            os.chmod(directory, 0o700)
    except OSError as exc:
        raise errors.InternalError(f"cannot create cache directory {directory}: {exc}") from exc

"""Tests for rangefs.cache.LocalDownloadCache (seed scenarios C, D, E; crash safety)."""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from rangefs import cache as cache_mod
from rangefs import errors
from rangefs.cache import LocalDownloadCache
from rangefs.cachefiles import (
    ObjectIdentity,
    create_new_files_for_cache,
    read_index,
    read_index_record,
    write_index,
)
from rangefs.ranges import ByteRange, ByteRangesTracker, range_for_index

URL = "https://example.org/obj.bin"


def ident(size: int, bs: int, **kw: Any) -> ObjectIdentity:
    fields: dict[str, Any] = {
        "url": URL,
        "size": size,
        "block_size": bs,
        "etag": '"e1"',
        "last_modified": "Sat, 01 Jan 2028 00:00:00 GMT",
    }
    fields.update(kw)
    return ObjectIdentity(**fields)


def content(offset: int, length: int, salt: int = 0) -> bytes:
    """Fixture bytes: the big-endian word at p (p % 4 == 0) holds p ^ salt."""
    start = offset - offset % 4
    words = b"".join(
        ((p ^ salt) & 0xFFFFFFFF).to_bytes(4, "big") for p in range(start, offset + length, 4)
    )
    return words[offset - start : offset - start + length]


def block_bytes(c: LocalDownloadCache, i: int, salt: int = 0) -> bytes:
    r = range_for_index(i, c.size, c.block_size)
    return content(r.start, r.size, salt)


def fill(c: LocalDownloadCache, blocks: list[int] | range, salt: int = 0) -> None:
    for i in blocks:
        c.write_block(i, block_bytes(c, i, salt))


def claimed(directory: Path) -> list[int]:
    identity, bits = read_index(directory / "index")
    t = ByteRangesTracker.from_bytes(identity.size, identity.block_size, bits)
    return [r.start // identity.block_size for r in t.all_set()]


def simulate_kill(c: LocalDownloadCache) -> None:
    """What kill -9 does to an open cache: the fds close, nothing is persisted."""
    os.close(c._fd)
    os.close(c._lock_fd)
    c._fd = c._lock_fd = -1
    c._closed = True


@pytest.fixture
def obj_dir(tmp_path: Path) -> Path:
    return tmp_path / "objects" / "k1"


# --------------------------------------------------------------------------------------
# Opening


def test_open_creates_private_files(obj_dir: Path) -> None:
    with LocalDownloadCache.open(obj_dir, ident(1036, 128)) as c:
        assert (c.size, c.block_size, c.num_blocks) == (1036, 128, 9)
        assert c.identity == ident(1036, 128)
        assert c.cached_bytes_and_blocks() == (0, 0)
        assert not c.complete()
        assert c.data_path == obj_dir / "data" and c.index_path == obj_dir / "index"
    assert stat.S_IMODE(os.stat(obj_dir).st_mode) == 0o700
    for name in ("data", "index", "lock"):
        assert stat.S_IMODE(os.stat(obj_dir / name).st_mode) == 0o600
    assert os.stat(obj_dir / "data").st_size == 1036
    assert claimed(obj_dir) == []


def test_open_tightens_directory_mode(obj_dir: Path) -> None:
    obj_dir.mkdir(parents=True, mode=0o755)
    os.chmod(obj_dir, 0o755)
    LocalDownloadCache.open(obj_dir, ident(10, 4)).close()
    assert stat.S_IMODE(os.stat(obj_dir).st_mode) == 0o700


def test_open_resumes_from_external_index(obj_dir: Path) -> None:
    """Seed C12: block 1 set in the index from outside; exactly [128:255] is cached."""
    obj_dir.mkdir(parents=True)
    identity = ident(1036, 128)
    create_new_files_for_cache(obj_dir / "data", obj_dir / "index", identity)
    write_index(obj_dir / "index", identity, b"\x02\x00")
    with LocalDownloadCache.open(obj_dir, identity) as c:
        assert list(c.bitmap.all_set()) == [ByteRange(128, 255)]
        assert c.cached_bytes_and_blocks() == (128, 1)


def test_open_twice_is_locked(obj_dir: Path) -> None:
    c = LocalDownloadCache.open(obj_dir, ident(100, 10))
    with pytest.raises(errors.CacheLocked):
        LocalDownloadCache.open(obj_dir, ident(100, 10))
    c.close()
    LocalDownloadCache.open(obj_dir, ident(100, 10)).close()


def test_open_not_enough_space_writes_nothing(obj_dir: Path) -> None:
    with pytest.raises(errors.NotEnoughSpace):
        LocalDownloadCache.open(obj_dir, ident(10**15, 1 << 20))
    assert sorted(p.name for p in obj_dir.iterdir()) == ["lock"]
    assert cache_mod.remove_unused(obj_dir)
    assert not obj_dir.exists()
    assert cache_mod.remove_unused(obj_dir) is False  # gone: nothing to remove


def test_remove_unused_keeps_a_directory_in_use_or_with_blocks(obj_dir: Path) -> None:
    identity = ident(100, 10)
    c = LocalDownloadCache.open(obj_dir, identity)
    assert not cache_mod.remove_unused(obj_dir)  # its lock is held
    c.close()
    assert not cache_mod.remove_unused(obj_dir)  # it holds data and an index
    assert sorted(p.name for p in obj_dir.iterdir()) == ["data", "index", "lock"]
    LocalDownloadCache.open(obj_dir, identity).close()


def test_a_lock_taken_on_a_removed_lock_file_is_taken_again(
    obj_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that opened the lock file just before remove_unused unlinked it must not
    hold a lock on the unlinked file (a third process would lock the new one)."""
    obj_dir.mkdir(mode=0o700, parents=True)
    (obj_dir / "lock").touch(mode=0o600)
    real_flock = cache_mod.fcntl.flock
    calls = []

    def flock_after_a_removal(fd: int, op: int) -> None:
        if not calls:  # between this open and its lock, another process removes the file
            os.unlink(obj_dir / "lock")
            (obj_dir / "lock").touch(mode=0o600)
        calls.append(fd)
        real_flock(fd, op)

    monkeypatch.setattr(cache_mod.fcntl, "flock", flock_after_a_removal)
    with LocalDownloadCache.open(obj_dir, ident(100, 10)) as c:
        held = os.fstat(c._lock_fd)
        named = os.stat(obj_dir / "lock")
        assert (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    assert len(calls) == 2
    LocalDownloadCache.open(obj_dir, ident(100, 10)).close()  # the lock was released


def test_zero_byte_object(obj_dir: Path) -> None:
    identity = ident(0, 64)
    with LocalDownloadCache.open(obj_dir, identity) as c:
        assert c.complete() and c.num_blocks == 0
        assert c.cached_bytes_and_blocks() == (0, 0)
        assert c.next_outstanding(0) is None and c.next_cached(0) is None
        assert c.bitmap.tail() is None
        with pytest.raises(errors.InvalidOffset):
            c.write_at(b"", 0)
        with pytest.raises(errors.InvalidOffset):
            c.write_block(0, b"")
        with pytest.raises(errors.InvalidOffset):
            c.read_at(0, 0)  # seed: offset >= size; the FUSE layer answers EOF itself
        assert not c.needs_flush()
    assert os.stat(obj_dir / "data").st_size == 0
    assert read_index(obj_dir / "index") == (identity, b"")
    with LocalDownloadCache.open(obj_dir, identity) as c:
        assert c.complete()


# --------------------------------------------------------------------------------------
# Round trip, iterators, close (seed C13-C15)


async def test_roundtrip_and_flush_point(obj_dir: Path) -> None:
    c = LocalDownloadCache.open(obj_dir, ident(256, 64))
    fill(c, [1])
    assert c.read_at(64, 64) == content(64, 64)
    assert c.is_cached(1) and not c.is_cached(0) and not c.is_cached(99)
    assert claimed(obj_dir) == []  # not claimed before the flush ...
    await c.flush()
    assert claimed(obj_dir) == [1]  # ... and claimed after it
    with pytest.raises(errors.UncachedRange, match="offset 0 is not cached"):
        c.read_at(0, 64)
    with pytest.raises(errors.InvalidOffset):
        c.write_at(bytes(64), 256)
    with pytest.raises(errors.InvalidBlockSize):
        c.write_at(bytes(63), 64)
    c.close()


def test_iterators(obj_dir: Path) -> None:
    with LocalDownloadCache.open(obj_dir, ident(256, 64)) as c:
        fill(c, [0, 2])
        assert list(c.bitmap.all_set()) == [ByteRange(0, 63), ByteRange(128, 191)]
        assert list(c.bitmap.all_clear()) == [ByteRange(64, 127), ByteRange(192, 255)]
        assert c.next_outstanding(0) == (2, ByteRange(64, 127))
        assert c.next_cached(1) == (3, ByteRange(128, 191))
    with LocalDownloadCache.open(obj_dir.with_name("k2"), ident(128, 64)) as c:
        fill(c, [0, 1])
        assert c.next_outstanding(0) is None and c.complete()


async def test_close_is_idempotent_and_final(obj_dir: Path) -> None:
    c = LocalDownloadCache.open(obj_dir, ident(130, 64))
    fill(c, [0])
    c.close()
    c.close()
    assert c.closed
    assert claimed(obj_dir) == [0]  # close persisted it
    with pytest.raises(errors.CacheClosed):
        c.write_block(1, bytes(64))
    with pytest.raises(errors.CacheClosed, match="closed"):
        c.read_at(0, 64)
    with pytest.raises(errors.CacheClosed):
        await c.flush()
    with pytest.raises(errors.CacheClosed):
        c.invalidate(ident(130, 64, etag='"e2"'))
    assert c.cached_bytes_and_blocks() == (64, 1)  # queries still answer
    assert not c.needs_flush()


def test_rewriting_a_cached_block_leaves_it(obj_dir: Path) -> None:
    with LocalDownloadCache.open(obj_dir, ident(256, 64)) as c:
        fill(c, [2])
        c.write_block(2, bytes(64))  # ignored: cached blocks are never overwritten
        assert c.read_at(128, 64) == content(128, 64)
        assert c.cached_bytes_and_blocks() == (64, 1)


def test_write_accepts_buffers(obj_dir: Path) -> None:
    with LocalDownloadCache.open(obj_dir, ident(24, 8)) as c:
        buf = bytearray(content(0, 8))
        c.write_block(0, buf)
        buf[:] = bytes(8)  # the caller may reuse its buffer
        c.write_block(1, memoryview(bytearray(content(8, 16)))[:8])
        c.write_at(memoryview(content(16, 8)), 16)
        assert c.read_at(0, 24) == content(0, 24)


# --------------------------------------------------------------------------------------
# D. Write validation (size 130, bs 64: blocks of 64, 64 and 2)


@pytest.mark.parametrize(
    ("length", "offset", "expected"),
    [
        (64, -1, errors.InvalidOffset),
        (2, 130, errors.InvalidOffset),
        (64, 1, errors.InvalidOffset),
        (64, 192, errors.InvalidOffset),
        (63, 0, errors.InvalidBlockSize),
        (65, 0, errors.InvalidBlockSize),
        (64, 128, errors.InvalidBlockSize),
        (1, 128, errors.InvalidBlockSize),
        (2, 128, None),
        (64, 64, None),
    ],
)
def test_write_validation(
    obj_dir: Path, length: int, offset: int, expected: type[Exception] | None
) -> None:
    with LocalDownloadCache.open(obj_dir, ident(130, 64)) as c:
        if expected is None:
            c.write_at(content(offset, length), offset)
            assert c.read_at(offset, length) == content(offset, length)
            assert c.cached_bytes_and_blocks() == (length, 1)
        else:
            with pytest.raises(expected):
                c.write_at(bytes(length), offset)
            assert c.cached_bytes_and_blocks() == (0, 0)
    with LocalDownloadCache.open(obj_dir, ident(130, 64)) as c:
        with pytest.raises(errors.InvalidOffset):
            c.write_block(3, bytes(2))
        with pytest.raises(errors.InvalidOffset):
            c.write_block(-1, bytes(64))


def test_write_smaller_than_block_file(obj_dir: Path) -> None:
    with LocalDownloadCache.open(obj_dir, ident(32, 64)) as c:
        with pytest.raises(errors.InvalidBlockSize):
            c.write_at(bytes(31), 0)
        with pytest.raises(errors.InvalidOffset):
            c.write_at(bytes(32), 32)
        c.write_at(content(0, 32), 0)
        assert c.complete() and c.cached_bytes_and_blocks() == (32, 1)


def test_write_exact_block_size_file(obj_dir: Path) -> None:
    with LocalDownloadCache.open(obj_dir, ident(128, 64)) as c:
        c.write_at(content(0, 64), 0)
        c.write_at(content(64, 64), 64)
        assert c.complete() and c.cached_bytes_and_blocks() == (128, 2)


def test_write_blocks_stores_a_run_from_parts(obj_dir: Path) -> None:
    """Size 130, bs 64: a run of blocks 0..2 (the last one 2 bytes) from odd pieces."""
    with LocalDownloadCache.open(obj_dir, ident(130, 64)) as c:
        ev = c.bitmap.block_event(2)
        data = content(0, 130)
        assert c.write_blocks(0, [data[:7], memoryview(data)[7:100], bytearray(data[100:])]) == 3
        assert c.complete() and ev.is_set()
        assert c.read_at(0, 130) == data


def test_write_behind_hands_every_write_behind_bytes_to_the_disk(
    obj_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_behind = 3 blocks: the writeback of the data file is started each time the
    bytes written pass another 3 blocks (write_block and write_blocks alike), never with
    write_behind 0; a file system that cannot (start_writeback False) turns it off. The
    bytes are the same either way."""
    calls: list[int] = []
    answer = [True]

    def recorder(fd: int) -> bool:
        assert fd == c._fd
        calls.append(c.bitmap.count_set())
        return answer[0]

    monkeypatch.setattr(cache_mod, "start_writeback", recorder)
    with LocalDownloadCache.open(obj_dir, ident(64 * 20, 64)) as c:
        fill(c, range(4))
        assert calls == []  # write_behind 0: left to the kernel
        c.write_behind = 3 * 64
        fill(c, range(4, 7))
        assert calls == [7]
        data = content(7 * 64, 5 * 64)
        assert c.write_blocks(7, [data]) == 5
        assert calls == [7, 12]
        answer[0] = False  # 2 blocks over: the next one passes 3 more
        fill(c, range(12, 15))
        assert calls == [7, 12, 13] and c.write_behind == 0
        fill(c, range(15, 20))
        assert calls == [7, 12, 13]
        assert c.complete() and c.read_at(0, 64 * 20) == content(0, 64 * 20)


def test_start_writeback_on_real_files(tmp_path: Path) -> None:
    """sync_file_range on a file of this machine's disk works; on a pipe it cannot (the
    caller then stops asking)."""
    from rangefs.cachefiles import start_writeback

    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"x" * (1 << 20), 0)
        assert start_writeback(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        assert not start_writeback(w)
    finally:
        os.close(r)
        os.close(w)


def test_write_blocks_leaves_cached_blocks_alone(obj_dir: Path) -> None:
    with LocalDownloadCache.open(obj_dir, ident(256, 64)) as c:
        fill(c, [1], salt=1)
        assert c.write_blocks(0, [content(0, 64), content(64, 128)]) == 2
        assert c.read_at(64, 64) == block_bytes(c, 1, 1)  # the cached block kept its bytes
        assert c.read_at(0, 64) == content(0, 64) and c.read_at(128, 64) == content(128, 64)
        assert c.cached_bytes_and_blocks() == (192, 3)


@pytest.mark.parametrize(
    ("first", "length", "expected"),
    [
        (-1, 64, errors.InvalidOffset),
        (3, 2, errors.InvalidOffset),
        (0, 0, errors.InvalidBlockSize),
        (0, 63, errors.InvalidBlockSize),
        (0, 100, errors.InvalidBlockSize),
        (1, 67, errors.InvalidBlockSize),
        (1, 65, errors.InvalidBlockSize),
        (1, 66, None),
        (0, 128, None),
    ],
)
def test_write_blocks_validation(
    obj_dir: Path, first: int, length: int, expected: type[Exception] | None
) -> None:
    """Size 130, bs 64: blocks of 64, 64 and 2 bytes."""
    with LocalDownloadCache.open(obj_dir, ident(130, 64)) as c:
        data = content(first * 64, length) if first >= 0 else bytes(length)
        if expected is None:
            assert c.write_blocks(first, [data]) == -(-length // 64)
            assert c.read_at(first * 64, length) == data
        else:
            with pytest.raises(expected):
                c.write_blocks(first, [data])
            assert c.cached_bytes_and_blocks() == (0, 0)


def test_write_blocks_completes_short_writes_and_reports_errors(
    obj_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwritev
    calls = []

    def dribble(fd: int, buffers: Any, pos: int) -> int:
        calls.append(pos)
        return real(fd, [bytes(buffers[0][:5])], pos)

    with LocalDownloadCache.open(obj_dir, ident(256, 64)) as c:
        monkeypatch.setattr(os, "pwritev", dribble)
        data = content(64, 128)
        assert c.write_blocks(1, [data[:3], data[3:]]) == 2
        assert c.read_at(64, 128) == data
        assert len(calls) == 1 + 25  # 3 bytes, then 125 in pieces of 5

        def full(fd: int, buffers: Any, pos: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwritev", full)
        with pytest.raises(errors.NotEnoughSpace):
            c.write_blocks(3, [content(192, 64)])
        monkeypatch.setattr(os, "pwritev", lambda fd, buffers, pos: 0)
        with pytest.raises(errors.InternalError):
            c.write_blocks(3, [content(192, 64)])
        assert not c.is_cached(3) and not c.is_cached(0)


# --------------------------------------------------------------------------------------
# E. Read validation


@pytest.fixture
def sparse57(obj_dir: Path) -> Any:
    """Size 57, bs 8; blocks 1, 3, 4, 6, 7 cached (block 7 is 1 byte)."""
    with LocalDownloadCache.open(obj_dir, ident(57, 8)) as c:
        fill(c, [1, 3, 4, 6, 7])
        yield c


@pytest.mark.parametrize(
    ("offset", "length"),
    [(8, 8), (24, 8), (32, 8), (48, 8), (24, 16), (24, 12), (24, 15), (48, 9), (50, 7)],
)
def test_read_exact(sparse57: LocalDownloadCache, offset: int, length: int) -> None:
    assert sparse57.read_at(offset, length) == content(offset, length)


@pytest.mark.parametrize(("offset", "length"), [(0, 8), (7, 8), (8, 9), (24, 17)])
def test_read_uncached(sparse57: LocalDownloadCache, offset: int, length: int) -> None:
    with pytest.raises(errors.UncachedRange):
        sparse57.read_at(offset, length)


def test_read_mid_block_checks_last_block(obj_dir: Path) -> None:
    """The seed's bug (W4): 8 bytes at 12 with bs 8 touch block 2 too."""
    with LocalDownloadCache.open(obj_dir, ident(64, 8)) as c:
        fill(c, [1])
        with pytest.raises(errors.UncachedRange, match="offset 16 is not cached"):
            c.read_at(12, 8)
        assert c.read_at(12, 4) == content(12, 4)
        fill(c, [2])
        assert c.read_at(12, 8) == content(12, 8)


def test_read_validation_130(obj_dir: Path) -> None:
    with LocalDownloadCache.open(obj_dir, ident(130, 64)) as c:
        fill(c, [0])
        for off in (-1, 130):
            with pytest.raises(errors.InvalidOffset):
                c.read_at(off, 1)
        with pytest.raises(errors.InvalidBlockSize):
            c.read_at(128, 64)  # past EOF: the FUSE layer clamps to 2 bytes
        with pytest.raises(errors.InvalidBlockSize):
            c.read_at(0, -1)
        with pytest.raises(errors.UncachedRange):
            c.read_at(64, 66)
        assert c.read_at(5, 0) == b""


def test_read_arbitrary_ranges(obj_dir: Path) -> None:
    """Seed E21: size 266, bs 64."""
    rng = random.Random(7)
    with LocalDownloadCache.open(obj_dir, ident(266, 64)) as c:
        fill(c, [0, 1, 4])
        with pytest.raises(errors.UncachedRange):
            c.read_at(192, 74)
        for _ in range(300):
            off = rng.randrange(266)
            length = rng.randint(1, 266 - off)
            first, last = off // 64, (off + length - 1) // 64
            if all(c.is_cached(b) for b in range(first, last + 1)):
                assert c.read_at(off, length) == content(off, length)
            else:
                with pytest.raises(errors.UncachedRange):
                    c.read_at(off, length)
        fill(c, [3])
        assert c.read_at(192, 74) == content(192, 74)


def test_short_read_is_internal(obj_dir: Path) -> None:
    with LocalDownloadCache.open(obj_dir, ident(130, 64)) as c:
        fill(c, [0, 1])
        os.truncate(obj_dir / "data", 100)  # damaged behind our back
        with pytest.raises(errors.InternalError, match="short read"):
            c.read_at(64, 64)


# --------------------------------------------------------------------------------------
# Write-path faults (seed D18)


def test_write_error_is_internal_and_not_cached(
    obj_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalDownloadCache.open(obj_dir, ident(256, 64)) as c:
        ev = c.bitmap.block_event(1)

        def broken(fd: int, data: Any, pos: int) -> int:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(os, "pwrite", broken)
        with pytest.raises(errors.InternalError) as info:
            c.write_block(1, bytes(64))
        assert isinstance(info.value.__cause__, OSError)
        assert not c.is_cached(1) and not ev.is_set()

        def full(fd: int, data: Any, pos: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(errors.NotEnoughSpace):
            c.write_block(1, bytes(64))

        monkeypatch.setattr(os, "pwrite", lambda fd, data, pos: 0)
        with pytest.raises(errors.InternalError, match="short write"):
            c.write_block(1, bytes(64))
        assert not c.is_cached(1)
        monkeypatch.undo()


def test_short_writes_are_completed(obj_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    calls = []

    def dribble(fd: int, data: Any, pos: int) -> int:
        calls.append(pos)
        return real(fd, bytes(data[:5]), pos)

    with LocalDownloadCache.open(obj_dir, ident(256, 64)) as c:
        monkeypatch.setattr(os, "pwrite", dribble)
        fill(c, [1])
        monkeypatch.undo()
        assert c.read_at(64, 64) == content(64, 64)
    assert len(calls) == 13


async def test_fdatasync_failure_poisons(obj_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = LocalDownloadCache.open(obj_dir, ident(256, 64))
    fill(c, [0])
    await c.flush()
    fill(c, [1])

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(errors.InternalError, match="fdatasync"):
        await c.flush()
    monkeypatch.undo()
    assert claimed(obj_dir) == [0]  # block 1 never claimed
    with pytest.raises(errors.InternalError):
        c.read_at(0, 64)  # not even earlier blocks: the cache is unusable
    with pytest.raises(errors.InternalError):
        c.write_block(2, block_bytes(c, 2))
    with pytest.raises(errors.InternalError):
        await c.flush()
    assert not c.needs_flush()
    c.close()  # closes without claiming anything more
    assert claimed(obj_dir) == [0]
    with LocalDownloadCache.open(obj_dir, ident(256, 64)) as c2:
        assert c2.read_at(0, 64) == content(0, 64)
        assert not c2.is_cached(1)


async def test_index_write_failure_keeps_blocks_dirty(
    obj_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = LocalDownloadCache.open(obj_dir, ident(256, 64), flush_blocks=1)
    fill(c, [2])

    def broken(*args: Any, **kwargs: Any) -> None:
        raise errors.NotEnoughSpace("writing index: no space left")

    monkeypatch.setattr(cache_mod, "write_index", broken)
    with pytest.raises(errors.NotEnoughSpace):
        await c.flush()
    assert claimed(obj_dir) == []
    assert c.needs_flush()  # the block is still waiting to be claimed
    assert c.read_at(128, 64) == content(128, 64)  # the data itself is fine
    monkeypatch.undo()
    await c.flush()
    assert claimed(obj_dir) == [2]
    assert not c.needs_flush()
    c.close()


# --------------------------------------------------------------------------------------
# Flush policy and ordering


async def test_needs_flush_by_count(obj_dir: Path) -> None:
    with LocalDownloadCache.open(obj_dir, ident(640, 64), flush_blocks=3) as c:
        assert not c.needs_flush()
        fill(c, [0, 1])
        assert not c.needs_flush()
        fill(c, [1])  # already cached: not dirty again
        assert not c.needs_flush()
        fill(c, [5])
        assert c.needs_flush()
        await c.flush()
        assert not c.needs_flush()


async def test_needs_flush_by_age(obj_dir: Path, autojump_clock: Any) -> None:
    with LocalDownloadCache.open(obj_dir, ident(640, 64), flush_interval=2.0) as c:
        fill(c, [0])
        await trio.sleep(1.5)
        fill(c, [1])
        assert not c.needs_flush()
        await trio.sleep(0.6)
        assert c.needs_flush()  # the oldest dirty block is 2.1 s old


async def test_flush_noop_when_clean(obj_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fdatasync
    with LocalDownloadCache.open(obj_dir, ident(256, 64)) as c:
        monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd) or real(fd))
        await c.flush()
        assert calls == []
        fill(c, [0])
        await c.flush()
        await c.flush()
        assert len(calls) == 1
        generation = read_index_record(obj_dir / "index").generation
    assert read_index_record(obj_dir / "index").generation == generation  # close: clean


async def test_flush_snapshot_precedes_fdatasync(
    obj_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bits set while fdatasync runs are not claimed by that flush; the order is
    fdatasync, then the index."""
    events: list[str] = []
    gate = threading.Event()
    entered = threading.Event()
    real_sync = os.fdatasync
    real_write_index = cache_mod.write_index

    def slow_sync(fd: int) -> None:
        events.append("fdatasync")
        entered.set()
        assert gate.wait(5)
        real_sync(fd)

    def logged_write_index(*args: Any, **kwargs: Any) -> None:
        events.append("write_index")
        real_write_index(*args, **kwargs)

    monkeypatch.setattr(os, "fdatasync", slow_sync)
    monkeypatch.setattr(cache_mod, "write_index", logged_write_index)
    c = LocalDownloadCache.open(obj_dir, ident(640, 64))
    fill(c, [0, 1])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.flush)
        await trio.to_thread.run_sync(entered.wait, 5)
        fill(c, [5])  # lands while the data file is being synced
        gate.set()
    assert events == ["fdatasync", "write_index"]
    assert claimed(obj_dir) == [0, 1]
    assert c.needs_flush() is False  # 1 dirty block, young
    assert c._dirty == 1
    await c.flush()
    assert claimed(obj_dir) == [0, 1, 5]
    c.close()


async def test_flushes_are_serialised(obj_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    active = 0
    peak = 0
    lock = threading.Lock()
    real = os.fdatasync

    def counting(fd: int) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        threading.Event().wait(0.01)
        real(fd)
        with lock:
            active -= 1

    monkeypatch.setattr(os, "fdatasync", counting)
    c = LocalDownloadCache.open(obj_dir, ident(64 * 20, 64))
    async with trio.open_nursery() as nursery:
        for i in range(20):
            fill(c, [i])
            nursery.start_soon(c.flush)
            await trio.lowlevel.checkpoint()
    assert peak == 1
    assert claimed(obj_dir) == list(range(20))
    c.close()


async def test_close_during_flush(obj_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    entered = threading.Event()
    real = os.fdatasync

    def slow_sync(fd: int) -> None:
        entered.set()
        assert gate.wait(5)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_sync)
    c = LocalDownloadCache.open(obj_dir, ident(640, 64))
    fill(c, [0])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.flush)
        await trio.to_thread.run_sync(entered.wait, 5)
        fill(c, [1])
        threading.Timer(0.05, gate.set).start()
        c.close()  # waits for the flush's worker thread, then persists block 1 too
    assert claimed(obj_dir) == [0, 1]


async def test_cancelled_flush(obj_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = LocalDownloadCache.open(obj_dir, ident(640, 64), flush_blocks=1)
    fill(c, [0])
    with trio.CancelScope() as scope:
        scope.cancel()
        await c.flush()
    assert claimed(obj_dir) == []
    assert c.needs_flush()
    await c.flush()
    assert claimed(obj_dir) == [0]
    c.close()


# --------------------------------------------------------------------------------------
# Waiting on blocks through the cache


async def test_block_event_and_tail_from_writes(obj_dir: Path) -> None:
    with LocalDownloadCache.open(obj_dir, ident(256, 64)) as c:
        got: list[bytes] = []

        async def reader() -> None:
            await c.bitmap.block_event(2).wait()
            got.append(c.read_at(128, 64))  # readable as soon as the event fires

        with trio.fail_after(1):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.sleep(0.01)
                fill(c, [0])
                assert await c.bitmap.wait_tail(-1) == ByteRange(0, 63)
                fill(c, [2])
        assert got == [content(128, 64)]
        fill(c, [1, 3])
        assert await c.bitmap.wait_tail(63) == ByteRange(0, 255)


# --------------------------------------------------------------------------------------
# Crash safety and corrupt indexes


async def _prepare_history(obj_dir: Path, identity: ObjectIdentity) -> None:
    """index.prev claims {0,1}; index claims {0,1,2}; block 3 written, never claimed."""
    c = LocalDownloadCache.open(obj_dir, identity)
    fill(c, [0, 1])
    await c.flush()
    fill(c, [2])
    await c.flush()
    fill(c, [3])
    simulate_kill(c)


async def test_simulated_kill_claims_only_flushed(obj_dir: Path) -> None:
    identity = ident(512, 64)
    await _prepare_history(obj_dir, identity)
    with LocalDownloadCache.open(obj_dir, identity) as c:
        assert [r.start // 64 for r in c.bitmap.all_set()] == [0, 1, 2]
        assert c.read_at(0, 192) == content(0, 192)
        with pytest.raises(errors.UncachedRange):
            c.read_at(192, 64)


KILL_SCRIPT = """
import os, signal, sys, trio
from pathlib import Path
from rangefs.cache import LocalDownloadCache
from rangefs.cachefiles import ObjectIdentity

async def main():
    c = LocalDownloadCache.open(Path(sys.argv[1]), ObjectIdentity(
        "https://example.org/obj.bin", 640, 64, '"e1"', None))
    for i in range(10):
        c.write_block(i, bytes([i + 1]) * 64)
        if i == 5:
            await c.flush()
    os.kill(os.getpid(), signal.SIGKILL)

trio.run(main)
"""


def test_real_kill(obj_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(obj_dir)], env=env, capture_output=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    identity = ident(640, 64, last_modified=None)
    with LocalDownloadCache.open(obj_dir, identity) as c:  # the lock died with the process
        assert [r.start // 64 for r in c.bitmap.all_set()] == list(range(6))
        for i in range(6):
            assert c.read_at(i * 64, 64) == bytes([i + 1]) * 64


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "missing"])
async def test_bad_index_falls_back_to_prev(
    obj_dir: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    identity = ident(512, 64)
    await _prepare_history(obj_dir, identity)
    index = obj_dir / "index"
    blob = index.read_bytes()
    if damage == "truncate":
        index.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":
        index.write_bytes(blob[:30] + bytes([blob[30] ^ 1]) + blob[31:])
    elif damage == "garbage":
        index.write_bytes(b"\x00" * 4096)
    else:
        index.unlink()  # a crash between write_index's two renames
    caplog.set_level(logging.WARNING, logger="rangefs.cache")
    with LocalDownloadCache.open(obj_dir, identity) as c:
        assert [r.start // 64 for r in c.bitmap.all_set()] == [0, 1]
        assert c.read_at(0, 128) == content(0, 128)
    assert any(
        r.levelno == logging.WARNING and "index.prev" in r.getMessage() for r in caplog.records
    )
    # the index was repaired and the .prev kept
    assert claimed(obj_dir) == [0, 1]
    read_index(obj_dir / "index.prev")


async def test_bad_index_and_bad_prev_start_over(
    obj_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    identity = ident(512, 64)
    await _prepare_history(obj_dir, identity)
    (obj_dir / "index").write_bytes(b"torn")
    (obj_dir / "index.prev").write_bytes(b"torn too")
    caplog.set_level(logging.WARNING, logger="rangefs.cache")
    with LocalDownloadCache.open(obj_dir, identity) as c:
        assert c.cached_bytes_and_blocks() == (0, 0)
        with pytest.raises(errors.UncachedRange):
            c.read_at(0, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checksum" in m or "short" in m or "magic" in m for m in warnings)
    assert any("starting over" in m for m in warnings)
    assert not (obj_dir / "index.prev").exists()
    assert claimed(obj_dir) == []


@pytest.mark.parametrize(
    "change",
    [
        {"url": "https://example.org/other.bin"},
        {"etag": '"e2"'},
        {"etag": None},
        {"last_modified": "Sun, 02 Jan 2028 00:00:00 GMT"},
        {"size": 513},
        {"block_size": 32},
    ],
)
async def test_foreign_index_starts_over(
    obj_dir: Path, caplog: pytest.LogCaptureFixture, change: dict[str, Any]
) -> None:
    await _prepare_history(obj_dir, ident(512, 64))
    fields = {"size": 512, "bs": 64}
    if "size" in change:
        fields["size"] = change.pop("size")
    if "block_size" in change:
        fields["bs"] = change.pop("block_size")
    other = ident(fields["size"], fields["bs"], **change)
    caplog.set_level(logging.WARNING, logger="rangefs.cache")
    with LocalDownloadCache.open(obj_dir, other) as c:
        assert c.cached_bytes_and_blocks() == (0, 0)
        assert c.identity == other
    assert any(
        r.levelno == logging.WARNING and "another object or version" in r.getMessage()
        for r in caplog.records
    )
    assert read_index(obj_dir / "index")[0] == other
    assert not (obj_dir / "index.prev").exists()  # the old version's index is gone
    assert os.stat(obj_dir / "data").st_size == other.size
    # and the old version does not come back either
    with LocalDownloadCache.open(obj_dir, ident(512, 64)) as c:
        assert c.cached_bytes_and_blocks() == (0, 0)


async def test_data_file_wrong_length_starts_over(
    obj_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    identity = ident(512, 64)
    await _prepare_history(obj_dir, identity)
    os.truncate(obj_dir / "data", 100)
    caplog.set_level(logging.WARNING, logger="rangefs.cache")
    with LocalDownloadCache.open(obj_dir, identity) as c:
        assert c.cached_bytes_and_blocks() == (0, 0)
    assert any("expected 512" in r.getMessage() for r in caplog.records)
    (obj_dir / "data").unlink()
    with LocalDownloadCache.open(obj_dir, identity) as c:
        assert c.cached_bytes_and_blocks() == (0, 0)
    assert any("missing" in r.getMessage() for r in caplog.records)


def test_fresh_open_logs_no_warning(obj_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    LocalDownloadCache.open(obj_dir, ident(512, 64)).close()
    LocalDownloadCache.open(obj_dir, ident(512, 64)).close()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_random_crash_model(tmp_path: Path) -> None:
    """Random writes, flushes, clean closes and kills; after every re-open the claimed set
    holds every flushed block, only written blocks, and every claimed byte is right."""
    rng = random.Random(99)
    for round_ in range(15):
        obj = tmp_path / f"o{round_}"
        size = rng.randint(1, 3000)
        bs = rng.choice([1, 7, 64, 100])
        identity = ident(size, bs)
        n = identity.num_blocks
        written: set[int] = set()
        flushed: set[int] = set()
        for _session in range(4):
            c = LocalDownloadCache.open(obj, identity, flush_blocks=5)
            have = {r.start // bs for r in c.bitmap.all_set()}
            assert flushed <= have <= written
            for i in have:
                assert c.read_at(i * bs, range_for_index(i, size, bs).size) == block_bytes(c, i)
            written = set(have)
            flushed = set(have)
            for _ in range(rng.randint(0, 30)):
                i = rng.randrange(n)
                fill(c, [i])
                written.add(i)
                if c.needs_flush() or rng.random() < 0.1:
                    await c.flush()
                    flushed = set(written)
            if rng.random() < 0.5:
                c.close()
                flushed = set(written)
            else:
                simulate_kill(c)


# --------------------------------------------------------------------------------------
# invalidate


async def test_invalidate_same_geometry(obj_dir: Path) -> None:
    c = LocalDownloadCache.open(obj_dir, ident(256, 64))
    bitmap = c.bitmap
    fill(c, [0, 1, 2])
    await c.flush()
    fill(c, [3])
    waiting = bitmap.block_event(1)  # a reader could wait across the switch
    new = ident(256, 64, etag='"e2"')
    c.invalidate(new)
    assert c.bitmap is bitmap and bitmap.count_set() == 0
    assert c.identity == new
    assert read_index(obj_dir / "index") == (new, b"\x00")
    assert not (obj_dir / "index.prev").exists()
    with pytest.raises(errors.UncachedRange):
        c.read_at(0, 1)
    fill(c, [1], salt=0x5A5A)
    assert waiting.is_set()
    assert c.read_at(64, 64) == content(64, 64, salt=0x5A5A)
    await c.flush()
    c.close()
    with LocalDownloadCache.open(obj_dir, new) as c2:
        assert [r.start for r in c2.bitmap.all_set()] == [64]


async def test_invalidate_new_size(obj_dir: Path) -> None:
    c = LocalDownloadCache.open(obj_dir, ident(256, 64))
    fill(c, [0, 1])
    await c.flush()
    new = ident(300, 64, etag='"e2"')
    c.invalidate(new)
    assert c.num_blocks == 5 and c.bitmap.num_blocks == 5
    assert os.stat(obj_dir / "data").st_size == 300
    fill(c, [4])
    assert c.read_at(256, 44) == content(256, 44)
    c.close()
    assert claimed(obj_dir) == [4]
    with LocalDownloadCache.open(obj_dir, ident(256, 64)) as c2:  # the old version: foreign
        assert c2.cached_bytes_and_blocks() == (0, 0)


async def test_invalidate_drops_inflight_flush(
    obj_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flush snapshot of the old version must never be written under the new identity."""
    c = LocalDownloadCache.open(obj_dir, ident(256, 64))
    fill(c, [0, 1])
    real_persist = c._persist
    new = ident(256, 64, etag='"e2"')

    def persist_after_invalidate(snapshot: bytes, count: int, epoch: int) -> None:
        trio.from_thread.run_sync(c.invalidate, new)
        real_persist(snapshot, count, epoch)

    monkeypatch.setattr(c, "_persist", persist_after_invalidate)
    await c.flush()
    assert read_index(obj_dir / "index") == (new, b"\x00")
    c.close()
    assert claimed(obj_dir) == []


def test_invalidate_without_space_changes_nothing(obj_dir: Path) -> None:
    c = LocalDownloadCache.open(obj_dir, ident(256, 64))
    fill(c, [0])
    with pytest.raises(errors.NotEnoughSpace):
        c.invalidate(ident(10**15, 1 << 20))
    assert c.identity == ident(256, 64)
    assert c.read_at(0, 64) == content(0, 64)
    c.close()
    assert claimed(obj_dir) == [0]


def test_invalidate_failure_makes_cache_unusable(
    obj_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = LocalDownloadCache.open(obj_dir, ident(256, 64))
    fill(c, [0])

    def broken(*args: Any, **kwargs: Any) -> None:
        raise errors.InternalError("reserving: I/O error")

    monkeypatch.setattr(cache_mod, "reserve_space", broken)
    with pytest.raises(errors.InternalError):
        c.invalidate(ident(300, 64, etag='"e2"'))
    with pytest.raises(errors.InternalError, match="unusable"):
        c.read_at(0, 1)
    with pytest.raises(errors.InternalError):
        c.write_block(1, bytes(64))
    c.close()
    monkeypatch.undo()
    assert read_index(obj_dir / "index")[0] == ident(300, 64, etag='"e2"')
    with LocalDownloadCache.open(obj_dir, ident(256, 64)) as c2:
        assert c2.cached_bytes_and_blocks() == (0, 0)  # its index names the new version
    with LocalDownloadCache.open(obj_dir, ident(300, 64, etag='"e2"')) as c3:
        assert c3.cached_bytes_and_blocks() == (0, 0)  # wrong data length: started over


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
async def test_read_at_async_gives_read_at_bytes(tmp_path: Path, where: str) -> None:
    """From the page cache (RWF_NOWAIT), from a worker thread after the page cache was
    dropped, and on tmpfs, where RWF_NOWAIT is refused: the same bytes and errors as
    read_at."""
    if where == "tmpfs":
        shm = Path("/dev/shm")
        assert shm.is_dir(), "this machine has no /dev/shm"
        directory = shm / f"rangefs-test-{os.getpid()}-{random.randrange(1 << 30)}"
    else:
        directory = tmp_path / "obj"
    size, bs = 10 * 4096 + 17, 4096
    try:
        c = LocalDownloadCache.open(directory, ident(size, bs))
        fill(c, range(c.num_blocks))
        expected = c.read_at(0, size)
        for offset, length in [(0, size), (5, 4096), (4095, 2), (size - 1, 1), (8192, 0)]:
            assert await c.read_at_async(offset, length) == expected[offset:offset + length]
        fd = os.open(directory / "data", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert await c.read_at_async(0, size) == expected
        c.invalidate(ident(size, bs, etag='"v2"'))
        with pytest.raises(errors.UncachedRange):
            await c.read_at_async(0, 10)
        with pytest.raises(errors.InvalidOffset):
            await c.read_at_async(size, 1)
        c.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _in_page_cache(path: Path, offset: int, size: int) -> bool:
    """Whether [offset, offset+size) of the file is in the page cache (an RWF_NOWAIT read)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # this look reads nothing ahead
        return os.preadv(fd, [bytearray(size)], offset, os.RWF_NOWAIT) == size
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    best, kind = "", ""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            point = fields.split()[4].replace("\\040", " ")
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, rest.split()[0]
    return kind


@pytest.fixture
def disk_path(tmp_path: Path) -> Iterator[Path]:
    """A private directory on a file system whose page cache can be dropped: tmp_path,
    unless it is a tmpfs (its pages are its storage: DONTNEED keeps them), then one in
    /var/tmp or in the repository. Fails, never skips, if there is none."""
    if _fs_type(tmp_path) not in ("tmpfs", "ramfs"):
        yield tmp_path
        return
    for base in (Path("/var/tmp"), Path(__file__).resolve().parent.parent):
        if base.is_dir() and _fs_type(base) not in ("tmpfs", "ramfs"):
            path = Path(tempfile.mkdtemp(prefix="rangefs-test-", dir=base))
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)
            return
    pytest.fail("no disk-backed directory for a page-cache test (tmp_path is a tmpfs)")


async def test_preload_reads_cached_blocks_into_the_page_cache(
    disk_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """preload() brings the cached blocks of a range into the page cache, reading up to
    the first block that is not cached, every page into one small buffer (a read, not
    sendfile: the first touch of each page is the preload's); after close() it reads
    nothing."""
    bs = 1 << 20
    size = 16 * bs
    directory = disk_path / "obj"
    c = LocalDownloadCache.open(directory, ident(size, bs))
    fill(c, [0, 1, *range(3, 16)])  # block 2 missing
    await c.flush()  # clean pages: the kernel can drop them
    data = directory / "data"
    fd = os.open(data, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert not _in_page_cache(data, 8 * bs, 4 * bs), "the page cache was not dropped"
    await c.preload(8 * bs, 4 * bs)
    assert _in_page_cache(data, 8 * bs, 4 * bs)
    assert await c.read_at_async(8 * bs, 4 * bs) == c.read_at(8 * bs, 4 * bs)

    reads: list[tuple[int, int]] = []
    buffer_sizes: set[int] = set()
    real_preadv = os.preadv

    def recording_preadv(fd: int, buffers: list[Any], offset: int, *flags: int) -> int:
        got = real_preadv(fd, buffers, offset, *flags)
        reads.append((offset, got))
        buffer_sizes.update(len(b) for b in buffers)
        return got

    monkeypatch.setattr(os, "preadv", recording_preadv)
    await c.preload(0, size)  # the kernel's read-ahead makes residency no proof here
    assert reads and reads[0][0] == 0
    assert sum(n for _, n in reads) == 2 * bs  # blocks 0 and 1: up to the gap
    assert max(buffer_sizes) <= 4096  # every page read into one small buffer: no big copy
    reads.clear()
    await c.preload(3 * bs + 5, 100)  # a part of one block: that part
    assert reads == [(3 * bs + 5, 100)]
    reads.clear()
    await c.preload(size, bs)  # at the end: nothing, no error
    assert reads == []
    c.close()
    await c.preload(0, size)  # closed: nothing, no error
    assert reads == []


async def test_cancelled_preload_returns_at_once_and_its_thread_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unmount cancels preloads: it must not wait for tens of MiB of disk reads. The
    disk here answers only when the test opens a gate: the cancelled preload returns while
    its thread is still inside its first read (16 chunks of 2 MiB to go), and once that
    read ends the thread stops (it closes its descriptor) without starting another."""
    bs = 1 << 20
    c = LocalDownloadCache.open(tmp_path / "obj", ident(32 * bs, bs))
    fill(c, range(32))
    reads: list[int] = []
    reading = threading.Event()  # the preload thread is inside a disk read
    gate = threading.Event()  # the disk answers
    ended = threading.Event()  # the preload thread closed its descriptor: it is done
    readers: set[int] = set()
    real_preadv, real_close = os.preadv, os.close

    def gated_preadv(fd: int, buffers: list[Any], offset: int, *flags: int) -> int:
        readers.add(threading.get_ident())
        reads.append(offset)
        reading.set()
        gate.wait(60)  # a hang guard only: the test opens the gate
        return real_preadv(fd, buffers, offset, *flags)

    def recording_close(fd: int) -> None:
        real_close(fd)
        if threading.get_ident() in readers:
            ended.set()

    async def until(event: threading.Event) -> None:
        while not event.is_set():  # noqa: ASYNC110 - a thread's event
            await trio.sleep(0.001)

    monkeypatch.setattr(os, "preadv", gated_preadv)
    monkeypatch.setattr(os, "close", recording_close)
    cancel = trio.CancelScope()
    returned = trio.Event()

    async def preload() -> None:
        with cancel:
            await c.preload(0, 32 * bs)
        returned.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(preload)
        try:
            with trio.fail_after(20):  # hang guards
                await until(reading)
                cancel.cancel()
                await returned.wait()  # with the disk still blocked
                assert reads == [0] and not ended.is_set()
                gate.set()
                await until(ended)  # the chunk in progress ends
            assert reads == [0], reads  # and no other started
        finally:
            gate.set()
    c.close()

"""Tests for rangefs.cachefiles: reserve_space, the index format, atomic persistence (seed C)."""

from __future__ import annotations

import errno
import json
import os
import stat
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rangefs import cachefiles, errors
from rangefs.cachefiles import (
    INDEX_MAGIC,
    ObjectIdentity,
    cache_files_exist,
    create_new_files_for_cache,
    open_cache_files,
    read_index,
    read_index_record,
    reserve_space,
    write_index,
)
from rangefs.ranges import ByteRangesTracker

MiB = 1024 * 1024


def ident(size: int = 1036, bs: int = 128, **kw: Any) -> ObjectIdentity:
    fields: dict[str, Any] = {
        "url": "https://example.org/a.bin",
        "size": size,
        "block_size": bs,
        "etag": '"v1"',
        "last_modified": "Sat, 01 Jan 2028 00:00:00 GMT",
    }
    fields.update(kw)
    return ObjectIdentity(**fields)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------------------
# ObjectIdentity


def test_identity_geometry() -> None:
    i = ident(1036, 128)
    assert i.num_blocks == 9 and i.bitmap_bytes == 2
    assert ident(0, 128).bitmap_bytes == 0
    with pytest.raises(ValueError):
        ident(10, 0)
    with pytest.raises(ValueError):
        ident(-1, 10)
    assert ident() == ident()
    assert ident(etag='"v2"') != ident()


# --------------------------------------------------------------------------------------
# reserve_space (seed C16)


def test_reserve_exact_size_and_progress(tmp_path: Path) -> None:
    path = tmp_path / "data"
    seen: list[int] = []
    size = 10 * MiB + 33
    reserve_space(path, size, progress=seen.append)
    assert os.stat(path).st_size == size
    assert mode_of(path) == 0o600
    assert seen and seen[-1] == size
    assert seen == sorted(seen)


def test_reserve_progress_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cachefiles, "RESERVE_CHUNK", 4096)
    seen: list[int] = []
    reserve_space(tmp_path / "data", 3 * 4096 + 5, progress=seen.append)
    assert seen == [4096, 8192, 12288, 12293]


def test_reserve_size_zero(tmp_path: Path) -> None:
    seen: list[int] = []
    reserve_space(tmp_path / "empty", 0, progress=seen.append)
    assert os.stat(tmp_path / "empty").st_size == 0
    assert seen == [0]


def test_reserve_truncates_and_tightens_mode(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"x" * 5000)
    os.chmod(path, 0o644)
    reserve_space(path, 100)
    assert path.read_bytes() == bytes(100)
    assert mode_of(path) == 0o600


def test_reserve_not_enough_space_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "data"
    seen: list[int] = []
    petabyte = 10**15
    with pytest.raises(errors.NotEnoughSpace) as info:
        reserve_space(path, petabyte, progress=seen.append)
    assert str(petabyte) in str(info.value)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    # the message names the free space too (within what changed meanwhile)
    numbers = [int(w) for w in str(info.value).replace("(", " ").split() if w.isdigit()]
    assert any(abs(n - free) < 64 * MiB for n in numbers)
    assert not path.exists()
    assert seen == []


def test_reserve_headroom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = SimpleNamespace(f_bavail=100, f_frsize=4096)  # 409600 bytes free
    monkeypatch.setattr(os, "statvfs", lambda _p: fake)
    with pytest.raises(errors.NotEnoughSpace, match="409600"):
        reserve_space(tmp_path / "d", 400_000, headroom=10_000)
    reserve_space(tmp_path / "d", 400_000, headroom=9_600)
    assert os.stat(tmp_path / "d").st_size == 400_000
    # the file's own allocation counts as free when it is re-reserved
    allocated = os.stat(tmp_path / "d").st_blocks * 512
    reserve_space(tmp_path / "d", 400_000 + allocated // 2, headroom=9_600)


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL])
def test_reserve_sparse_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def no_fallocate(fd: int, offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    seen: list[int] = []
    reserve_space(tmp_path / "data", 5 * MiB + 1, progress=seen.append)
    st = os.stat(tmp_path / "data")
    assert st.st_size == 5 * MiB + 1
    assert st.st_blocks * 512 < MiB  # sparse
    assert seen[-1] == 5 * MiB + 1


@pytest.mark.parametrize(
    ("code", "exc"), [(errno.ENOSPC, errors.NotEnoughSpace), (errno.EIO, errors.InternalError)]
)
def test_reserve_fallocate_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, exc: type[Exception]
) -> None:
    def failing(fd: int, offset: int, length: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", failing)
    seen: list[int] = []
    with pytest.raises(exc) as info:
        reserve_space(tmp_path / "data", 1000, progress=seen.append)
    assert isinstance(info.value.__cause__, OSError)
    assert seen == []


def test_reserve_rejects_negative_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        reserve_space(tmp_path / "d", -1)
    with pytest.raises(errors.InternalError):
        reserve_space(tmp_path / "no" / "such" / "d", 10)


# --------------------------------------------------------------------------------------
# The index format


def test_index_roundtrip_and_layout(tmp_path: Path) -> None:
    path = tmp_path / "index"
    identity = ident()
    bits = ByteRangesTracker(1036, 128)
    bits.set_block(1)
    bits.set_block(8)
    write_index(path, identity, bits.to_bytes(), generation=7)
    assert mode_of(path) == 0o600
    blob = path.read_bytes()
    assert blob.startswith(INDEX_MAGIC) and INDEX_MAGIC == b"RANGEFS-INDEX 1\n"
    header_line, rest = blob[len(INDEX_MAGIC) :].split(b"\n", 1)
    header = json.loads(header_line)
    assert header == {
        "url": identity.url,
        "size": 1036,
        "block_size": 128,
        "etag": '"v1"',
        "last_modified": identity.last_modified,
        "generation": 7,
        "bitmap_bytes": 2,
    }
    assert rest[:-4] == b"\x02\x01"
    assert rest[-4:] == zlib.crc32(blob[:-4]).to_bytes(4, "big")
    got_identity, got_bits = read_index(path)
    assert got_identity == identity and got_bits == b"\x02\x01"
    assert read_index_record(path).generation == 7
    assert not (tmp_path / "index.tmp").exists()


def test_index_null_validators_and_zero_size(tmp_path: Path) -> None:
    path = tmp_path / "index"
    identity = ident(0, 64, etag=None, last_modified=None)
    write_index(path, identity, b"")
    assert read_index(path) == (identity, b"")


def test_index_keeps_prev(tmp_path: Path) -> None:
    path = tmp_path / "index"
    identity = ident()
    write_index(path, identity, b"\x00\x00", generation=0)
    assert not (tmp_path / "index.prev").exists()
    write_index(path, identity, b"\x01\x00", generation=1)
    assert read_index_record(tmp_path / "index.prev").generation == 0
    assert read_index(path)[1] == b"\x01\x00"
    write_index(path, identity, b"\x03\x00", generation=2, keep_prev=False)
    assert not (tmp_path / "index.prev").exists()
    assert read_index_record(path).generation == 2


def test_write_index_checks_bitmap_length(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_index(tmp_path / "index", ident(), b"\x00")
    assert not (tmp_path / "index").exists()


def test_write_index_failure_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "index"
    write_index(path, ident(), b"\x01\x00")

    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(errors.NotEnoughSpace):
        write_index(path, ident(), b"\x03\x00")
    monkeypatch.undo()
    assert read_index(path)[1] == b"\x01\x00"
    assert not (tmp_path / "index.tmp").exists()


def test_write_index_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def one_byte(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:1]))

    monkeypatch.setattr(os, "write", one_byte)
    write_index(tmp_path / "index", ident(), b"\x05\x01")
    monkeypatch.undo()
    assert read_index(tmp_path / "index")[1] == b"\x05\x01"


def _valid_blob(tmp_path: Path) -> bytes:
    path = tmp_path / "good"
    write_index(path, ident(), b"\x05\x01", generation=3)
    return path.read_bytes()


def _with_crc(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "big")


def test_index_every_truncation_is_detected(tmp_path: Path) -> None:
    blob = _valid_blob(tmp_path)
    path = tmp_path / "index"
    for n in range(len(blob)):
        path.write_bytes(blob[:n])
        with pytest.raises(errors.CacheCorrupt):
            read_index(path)


def test_index_every_byte_flip_is_detected(tmp_path: Path) -> None:
    blob = _valid_blob(tmp_path)
    path = tmp_path / "index"
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= 0x20
        path.write_bytes(bytes(damaged))
        with pytest.raises(errors.CacheCorrupt):
            read_index(path)


def _header(**over: Any) -> bytes:
    header: dict[str, Any] = {
        "url": "u",
        "size": 1036,
        "block_size": 128,
        "etag": None,
        "last_modified": None,
        "generation": 0,
        "bitmap_bytes": 2,
    }
    header.update(over)
    return json.dumps(header).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"RANGEFS-INDEX 2\n" + _header() + b"\n\x00\x00", "magic"),
        (b'{"content_size":"1036","block_size":128,"ranges":["0"]}', "magic"),
        (INDEX_MAGIC + b"not json\n\x00\x00", "header"),
        (INDEX_MAGIC + _header() + b"\x00\x00", "header"),  # no newline
        (INDEX_MAGIC + b"[1]\n\x00\x00", "object"),
        (INDEX_MAGIC + _header() + b"\n\x00", "bitmap"),
        (INDEX_MAGIC + _header() + b"\n\x00\x00\x00", "bitmap"),
        (INDEX_MAGIC + _header(bitmap_bytes=3) + b"\n\x00\x00", "bitmap"),
        (INDEX_MAGIC + _header() + b"\n\x00\x02", "beyond"),  # block 9 of 9
        (INDEX_MAGIC + _header(size="1036") + b"\n\x00\x00", "size"),
        (INDEX_MAGIC + _header(block_size=0) + b"\n", "block size"),
        (INDEX_MAGIC + _header(etag=5) + b"\n\x00\x00", "etag"),
        (INDEX_MAGIC + _header(generation=None) + b"\n\x00\x00", "generation"),
        (INDEX_MAGIC + _header(url=None) + b"\n\x00\x00", "url"),
    ],
)
def test_index_rejects_malformed(tmp_path: Path, body: bytes, reason: str) -> None:
    path = tmp_path / "index"
    path.write_bytes(_with_crc(body))
    with pytest.raises(errors.CacheCorrupt, match=reason):
        read_index(path)


def test_index_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_index(tmp_path / "nope")
    (tmp_path / "dir").mkdir()
    with pytest.raises(errors.CacheCorrupt):
        read_index(tmp_path / "dir")


# --------------------------------------------------------------------------------------
# create / open / exist (seed C10, C11)


def test_create_new_files(tmp_path: Path) -> None:
    data, index = tmp_path / "data", tmp_path / "index"
    data.write_bytes(b"junk" * 1000)
    index.write_bytes(b"junk")
    (tmp_path / "index.prev").write_bytes(b"junk")
    (tmp_path / "index.tmp").write_bytes(b"junk")
    create_new_files_for_cache(data, index, ident(1036, 128))
    assert os.stat(data).st_size == 1036 and data.read_bytes() == bytes(1036)
    identity, bits = read_index(index)
    assert identity == ident(1036, 128)
    tracker = ByteRangesTracker.from_bytes(1036, 128, bits)
    assert len(list(tracker.all_clear())) == 9
    assert not (tmp_path / "index.prev").exists() and not (tmp_path / "index.tmp").exists()
    assert mode_of(data) == 0o600 and mode_of(index) == 0o600


def test_create_rejects(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        create_new_files_for_cache("", tmp_path / "index", ident())
    with pytest.raises(ValueError, match="empty"):
        create_new_files_for_cache(tmp_path / "data", "", ident())
    (tmp_path / "dir").mkdir()
    with pytest.raises(errors.InternalError):
        create_new_files_for_cache(tmp_path / "dir", tmp_path / "index", ident())


def test_create_not_enough_space_leaves_no_index(tmp_path: Path) -> None:
    data, index = tmp_path / "data", tmp_path / "index"
    write_index(index, ident(), b"\x01\x00")
    with pytest.raises(errors.NotEnoughSpace):
        create_new_files_for_cache(data, index, ident(10**15, 1 << 20))
    assert cache_files_exist(data, index) == (False, False)


def test_open_cache_files(tmp_path: Path) -> None:
    data, index = tmp_path / "data", tmp_path / "index"
    with pytest.raises(FileNotFoundError):
        open_cache_files(data, index)
    create_new_files_for_cache(data, index, ident())
    fd, record = open_cache_files(data, index)
    try:
        assert record.identity == ident() and record.bitmap == b"\x00\x00"
        assert os.fstat(fd).st_size == 1036
    finally:
        os.close(fd)
    index.write_bytes(b"{not an index}")
    fds_before = _open_fds()
    with pytest.raises(errors.CacheCorrupt):
        open_cache_files(data, index)
    assert _open_fds() == fds_before  # the data fd was closed
    index.unlink()
    with pytest.raises(FileNotFoundError):
        open_cache_files(data, index)
    (tmp_path / "dir").mkdir()
    with pytest.raises(errors.InternalError, match="failed to open cache file"):
        open_cache_files(tmp_path / "dir", index)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_cache_files_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, index = tmp_path / "data", tmp_path / "index"
    assert cache_files_exist(data, index) == (False, False)
    data.write_bytes(b"")
    assert cache_files_exist(data, index) == (True, False)
    index.write_bytes(b"")
    assert cache_files_exist(data, index) == (True, True)

    real_stat: Callable[..., Any] = os.stat

    def denied(p: Any, *a: Any, **kw: Any) -> Any:
        if str(p).endswith("index"):
            raise PermissionError(errno.EACCES, "denied")
        return real_stat(p, *a, **kw)

    monkeypatch.setattr(os, "stat", denied)
    with pytest.raises(errors.InternalError):
        cache_files_exist(data, index)


def test_check_space(tmp_path: Path) -> None:
    cachefiles.check_space(tmp_path / "x", 0)
    cachefiles.check_space(tmp_path / "x", 1000)
    with pytest.raises(errors.NotEnoughSpace, match=str(10**15)):
        cachefiles.check_space(tmp_path / "x", 10**15)
    assert not (tmp_path / "x").exists()

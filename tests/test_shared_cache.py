"""Mounts sharing one cache directory (issue 18, "one cache, many processes"): each
object's cache is owned by one process at a time; the others read it through that process
(rangefs/guest.py), and take over when it goes away. Real mounts through the kernel, the
in-process origin; every byte is checked; kill -9 of either side."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from pathlib import Path

import pytest

from rangefs.cachedir import CacheDir, cache_key
from tests import content
from tests.faultserver import FaultServer
from tests.mountutil import mounted, run_rangefs, start_mount, write_list

MIB = 1 << 20
GUARD = 30.0
ARGS = ("--prefetch", "none")


def status_files(mnt: Path) -> dict[str, dict[str, object]]:
    done = run_rangefs(["status", "--json", "--files", str(mnt)])
    assert done.returncode == 0, done.stderr
    (answer,) = json.loads(done.stdout)
    return {f["path"]: f for f in answer["files"]}


def fetched(mnt: Path) -> int:
    done = run_rangefs(["status", "--json", str(mnt)])
    assert done.returncode == 0, done.stderr
    (answer,) = json.loads(done.stdout)
    return int(answer["stats"]["bytes_fetched"])


def gets_bytes(origin: FaultServer, path: str) -> int:
    return sum(r.bytes_sent for r in origin.gets(path))


def test_two_mounts_share_one_cache_and_fetch_each_block_once(
    tmp_path: Path, cache: Path, origin: FaultServer
) -> None:
    size = 8 * MIB + 1234
    origin.add("/s.bin", size)
    urls = write_list(tmp_path / "s.urls", [f"{origin.url('/s.bin')} s.bin"])
    a_mnt, b_mnt = tmp_path / "a", tmp_path / "b"
    with mounted(urls, a_mnt, *ARGS, cache_dir=cache) as a, \
            mounted(urls, b_mnt, *ARGS, cache_dir=cache) as b:
        origin.reset_log()
        with open(a_mnt / "s.bin", "rb") as owner:  # a owns the object's cache now
            content.check("/s.bin", 0, os.pread(owner.fileno(), 4096, 0))
            content.check("/s.bin", 0, (b_mnt / "s.bin").read_bytes())  # through a
            assert f"its cache is open in process {a.pid}: reading through it" in b.stderr()
            state = status_files(b_mnt)["s.bin"]
            assert state["state"] == "reading" or state["state"] == "idle", state
            assert fetched(b_mnt) == 0  # b fetched nothing itself
            content.check("/s.bin", 0, owner.read())  # a reads what it fetched for b
        # each byte came from the origin once, for both mounts
        assert gets_bytes(origin, "/s.bin") == size
        assert fetched(a_mnt) == size


def test_kill_9_of_the_owner_while_the_guest_reads(
    tmp_path: Path, cache: Path, origin: FaultServer
) -> None:
    size = 6 * MIB
    origin.add("/k.bin", size)
    urls = write_list(tmp_path / "k.urls", [f"{origin.url('/k.bin')} k.bin"])
    a_mnt, b_mnt = tmp_path / "a", tmp_path / "b"
    a = start_mount(urls, a_mnt, *ARGS, cache_dir=cache)
    try:
        a.wait_mounted()
        with mounted(urls, b_mnt, *ARGS, cache_dir=cache, warnings_ok=True) as b:
            owner = os.open(a_mnt / "k.bin", os.O_RDONLY)
            try:
                os.pread(owner, 1, 0)  # a owns the cache
                with open(b_mnt / "k.bin", "rb", buffering=0) as guest:
                    first = guest.read(2 * MIB)  # through a
                    assert "reading through it" in b.stderr()
                    a.send(signal.SIGKILL)
                    a.wait_exit()
                    rest = guest.read()  # b takes the cache over
                content.check("/k.bin", 0, first + rest)
                assert len(first + rest) == size
                assert "stopped serving it" in b.stderr()
            finally:
                with contextlib.suppress(OSError):  # a's mount is dead: ENOTCONN
                    os.close(owner)
            # b owns it now: a fresh read is exact and b's own
            content.check("/k.bin", 0, (b_mnt / "k.bin").read_bytes())
    finally:
        a.cleanup()


def test_kill_9_of_the_guest_releases_what_it_held(
    tmp_path: Path, cache: Path, origin: FaultServer
) -> None:
    origin.add("/g.bin", 2 * MIB)
    urls = write_list(tmp_path / "g.urls", [f"{origin.url('/g.bin')} g.bin"])
    a_mnt, b_mnt = tmp_path / "a", tmp_path / "b"
    with mounted(urls, a_mnt, *ARGS, cache_dir=cache) as a:
        b = start_mount(urls, b_mnt, *ARGS, cache_dir=cache)
        try:
            b.wait_mounted()
            with open(a_mnt / "g.bin", "rb") as owner:
                owner.read(1)
                guest = os.open(b_mnt / "g.bin", os.O_RDONLY)
                content.check("/g.bin", MIB, os.pread(guest, MIB, MIB))  # held via a, then let go
                b.send(signal.SIGKILL)
                b.wait_exit()
            # a's handles for b are gone with b's connections: nothing keeps g.bin open
            deadline = time.monotonic() + GUARD
            while status_files(a_mnt)["g.bin"]["state"] == "reading":
                if time.monotonic() > deadline:
                    pytest.fail("the killed guest's hold outlived it")
                time.sleep(0.05)
            freed = run_rangefs(["evict", str(a_mnt / "g.bin")])
            assert freed.returncode == 0 and " evicted from 1 files" in freed.stdout, freed
            assert "still hold" not in freed.stdout
            content.check("/g.bin", 0, (a_mnt / "g.bin").read_bytes())
            a.check_log()
        finally:
            b.cleanup()


def test_the_metadata_of_both_lists_is_kept(
    tmp_path: Path, cache: Path, origin: FaultServer
) -> None:
    origin.add("/one", 10)
    origin.add("/two", 20)
    first = write_list(tmp_path / "1.urls", [origin.url("/one")])
    second = write_list(tmp_path / "2.urls", [origin.url("/two")])
    with mounted(first, tmp_path / "m1", *ARGS, cache_dir=cache), \
            mounted(second, tmp_path / "m2", *ARGS, cache_dir=cache):
        assert (tmp_path / "m1" / "one").stat().st_size == 10
        assert (tmp_path / "m2" / "two").stat().st_size == 20
    table = json.loads((cache / "metadata.json").read_text())["objects"]
    assert {cache_key(origin.url("/one")), cache_key(origin.url("/two"))} <= set(table)


def test_eviction_never_removes_a_cache_another_process_has_open(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cd = CacheDir.open(root)
    try:
        key = "0" * 32
        directory = cd.object_dir(key)
        directory.mkdir(parents=True)
        (directory / "data").write_bytes(b"x")
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # as another process's open cache holds it
            assert cd.remove(key) is False
            assert (directory / "data").exists()
        finally:
            os.close(fd)
        assert cd.remove(key) is True
        assert not directory.exists()
    finally:
        cd.close()

"""``rangefs download`` copies what a rangefs mount of this machine cached (issue 18, one
cache for many processes: the download's side, rangefs/sharing.py). Real mounts through
the kernel, the CLI as a subprocess, the in-process origin; every byte is checked."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import content
from tests.faultserver import FaultServer
from tests.mountutil import (
    ROOT,
    child_env,
    mounted,
    run_rangefs,
    run_user,
    write_list,
)

MIB = 1 << 20
GUARD = 30.0


def download(url: str, dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = run_rangefs(["download", "--no-progress", *args, url, str(dest)], timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def cat_url(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    done = run_user("cat", *args, url)
    assert done.returncode == 0, done.stderr
    return done


def test_download_copies_what_a_mount_cached(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    size = 5 * MIB + 123
    origin.add("/s.bin", size)
    url = origin.url("/s.bin")
    urls = write_list(tmp_path / "s.urls", [f"{url} s.bin"])
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache):
        with open(mnt / "s.bin", "rb") as f:  # the first 2 MiB + a bit, through the kernel
            content.check("/s.bin", 0, f.read(2 * MIB + 5000))
        # all of it cached by the mount: the download costs the origin no body byte
        whole = tmp_path / "whole"
        content.check("/s.bin", 0, (mnt / "s.bin").read_bytes())
        origin.reset_log()
        done = download(url, whole)
        assert f"{size} copied from mounts" in done.stderr
        content.check("/s.bin", 0, whole.read_bytes())
        assert origin.gets("/s.bin") == []  # the probe was a HEAD

        # without the copy: everything from the origin
        origin.reset_log()
        done = download(url, tmp_path / "again", "--no-from-mounts")
        assert "0 copied from mounts" in done.stderr
        assert origin.bytes_sent("/s.bin") >= size


def test_download_copies_part_and_fetches_the_rest(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    size = 6 * MIB
    origin.add("/p.bin", size)
    url = origin.url("/p.bin")
    urls = write_list(tmp_path / "p.urls", [f"{url} p.bin"])
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache):
        with open(mnt / "p.bin", "rb") as f:
            f.seek(3 * MIB)
            content.check("/p.bin", 3 * MIB, f.read(MIB))  # cached: MiB 3 (and read-ahead)
        dest = tmp_path / "p.out"
        done = download(url, dest)
        content.check("/p.bin", 0, dest.read_bytes())
        counts = re.search(r"\((\d+) downloaded, (\d+) resumed, (\d+) copied from mounts\)",
                           done.stderr)
        assert counts is not None, done.stderr
        fetched, resumed, copied = (int(n) for n in counts.groups())
        # what the mount had (MiB 3, and what its read-ahead brought by then: the origin's
        # log cannot tell the mount's requests from the download's) was copied, the rest
        # fetched, nothing twice
        assert MIB <= copied < size and resumed == 0
        assert fetched + copied == size


def test_another_version_is_not_copied(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    origin.add("/v.bin", 2 * MIB, etag='"v1"')
    url = origin.url("/v.bin")
    urls = write_list(tmp_path / "v.urls", [f"{url} v.bin"])
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache, warnings_ok=True):
        content.check("/v.bin", 0, (mnt / "v.bin").read_bytes())
        origin.set_version("/v.bin", etag='"v2"', key="/v.bin#2")
        dest = tmp_path / "v.out"
        done = download(url, dest, "-v")
        assert "0 copied from mounts" in done.stderr
        assert "not used: another (or a weak) ETag" in done.stderr
        content.check("/v.bin#2", 0, dest.read_bytes())  # the new version, every byte


def test_a_killed_client_releases_its_pin(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """An export pins the object until the connection closes: kill -9 of the client
    (the kernel closes its socket) lets eviction free the blocks."""
    origin.add("/k.bin", MIB)
    url = origin.url("/k.bin")
    urls = write_list(tmp_path / "k.urls", [f"{url} k.bin"])
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache):
        content.check("/k.bin", 0, (mnt / "k.bin").read_bytes())
        client = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, time; from pathlib import Path; from rangefs import control;"
             "c = control.Client(Path(sys.argv[1]));"
             "a = c.request('export', url=sys.argv[2]); assert a['found'], a;"
             "print('pinned', flush=True); time.sleep(120)",
             os.fsdecode(os.getxattr(mnt, "user.rangefs.control")), url],
            env=child_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert client.stdout is not None
            assert client.stdout.readline() == b"pinned\n", client.stderr
            held = run_rangefs(["evict", str(mnt / "k.bin")])
            assert held.returncode == 0, held.stderr
            assert "0 B evicted" in held.stdout and "still hold blocks in use: k.bin" \
                in held.stdout
            os.kill(client.pid, signal.SIGKILL)
            client.wait(GUARD)
            deadline = time.monotonic() + GUARD
            while True:  # the mount sees the closed connection on its next event loop turn
                freed = run_rangefs(["evict", str(mnt / "k.bin")])
                assert freed.returncode == 0, freed.stderr
                if "1.0 MiB evicted from 1 files" in freed.stdout:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"the pin outlived its client: {freed.stdout}")
                time.sleep(0.05)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        origin.reset_log()
        content.check("/k.bin", 0, (mnt / "k.bin").read_bytes())  # fetched again, exact


def test_cat_reads_what_a_mount_cached(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    size = 4 * MIB + 77
    origin.add("/c.bin", size)
    url = origin.url("/c.bin")
    urls = write_list(tmp_path / "c.urls", [f"{url} c.bin"])
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache):
        with open(mnt / "c.bin", "rb") as f:
            content.check("/c.bin", 0, f.read(2 * MIB))  # the first half (and read-ahead)
        origin.reset_log()
        cat = cat_url(url, "-v")
        assert len(cat.stdout) == size
        content.check("/c.bin", 0, cat.stdout)
        copied = int(cat.stderr.decode().split(" bytes copied from a mount's cache")[0]
                     .rsplit(" ", 1)[1])
        # whole 1 MiB ranges of what the mount had (the half read, and what its read-ahead
        # brought by then: the origin's log cannot tell the mount's requests from cat's)
        assert MIB <= copied <= size
        # all of it cached now: cat costs the origin no GET
        content.check("/c.bin", 0, (mnt / "c.bin").read_bytes())
        origin.reset_log()
        cat = cat_url(url)
        content.check("/c.bin", 0, cat.stdout)
        assert origin.gets("/c.bin") == []

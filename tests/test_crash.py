"""Crash safety, a damaged cache and a full disk (issue 5: "Crash safety", "Disk full").

- kill -9 of ``rangefs mount`` (and of ``rangefs download``) at 20 seeded random moments
  while one object is copied; after every kill the index on disk is read offline, the
  blocks it does not claim are overwritten with garbage, and the origin's request log must
  show that no block it claimed is ever requested again; the final bytes are exact and the
  total fetched stays within a measured bound (figures in the comments of each loop; run
  with ``-s`` for a per-kill table). Both loops are ``slow`` (~25 s each).
- The index (and the data file) damaged between two mounts: detected, logged, recovered
  from what still vouches for blocks; every byte checked after the remount, and exactly
  the blocks nobody vouches for fetched again.
- A cache file system that another program fills up mid-way (reads fail with ENOSPC, no
  wrong byte, the index never torn; index flushes retried with backoff), read-only and
  unusable cache directories (one line, exit 2, nothing mounted).
- The two policies behind these: how soon the index claims new blocks, and the headroom.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.lowlevel

from rangefs import cache as cache_mod
from rangefs import errors, objects, scheduler
from rangefs.cache import LocalDownloadCache
from rangefs.cachedir import cache_key
from rangefs.cachefiles import (
    DEFAULT_HEADROOM,
    INDEX_MAGIC,
    ObjectIdentity,
    check_space,
    read_index,
    write_index,
)
from rangefs.download import partial_dir
from tests import content
from tests.faultserver import Fault, FaultServer, Request
from tests.mountutil import (
    child_env,
    is_mounted,
    mounted,
    run_rangefs,
    start_mount,
    write_list,
)

KIB, MIB = 1 << 10, 1 << 20
KILLS = 20


# -- reading the cache offline and the origin's log -----------------------------------------


def persisted_blocks(directory: Path) -> set[int]:
    """The blocks that the index in ``directory`` claims, read as a remount would: the
    index, else ``index.prev`` (a crash between the two renames); none if neither exists.
    A torn or damaged index raises (``CacheCorrupt``): after a kill it would be a bug."""
    for name in ("index", "index.prev"):
        try:
            _, bitmap = read_index(directory / name)
        except FileNotFoundError:
            continue
        bits = int.from_bytes(bitmap, "little")
        return {i for i in range(len(bitmap) * 8) if bits >> i & 1}
    return set()


def written_blocks(data_path: Path, key: str, size: int, block_size: int) -> set[int]:
    """The blocks whose bytes in the data file are right (written by the killed process,
    persisted or not: the page cache survives a kill -9). Unwritten blocks read as zeros."""
    out = set()
    with open(data_path, "rb") as fh:
        for i in range(0, (size + block_size - 1) // block_size):
            want = min(block_size, size - i * block_size)
            got = os.pread(fh.fileno(), want, i * block_size)
            if got == content.content(key, i * block_size, want):
                out.add(i)
    return out


def requested_blocks(req: Request, block_size: int, size: int) -> range:
    """The blocks a GET asked for (its Range, or the whole object)."""
    spec = (req.range or "bytes=0-").removeprefix("bytes=")
    start, _, end = spec.partition("-")
    last_byte = int(end) if end else size - 1
    return range(int(start) // block_size, last_byte // block_size + 1)


def slow_gets(origin: FaultServer, path: str, seconds: float) -> None:
    """Every GET of ``path`` waits ``seconds`` before its answer (then its body comes at
    loopback speed); HEAD probes do not wait. 0: no more waiting."""
    if seconds:
        origin.fault_probability(path, 1.0, [Fault("delay", method="GET", seconds=seconds)])
    else:
        origin.fault_probability(path, 0.0, [])


def body_gets(origin: FaultServer, path: str) -> list[Request]:
    return [r for r in origin.gets(path) if r.status in (200, 206)]


GARBAGE = 0xA5


def scribble_unclaimed(data_path: Path, blocks: set[int], size: int, block_size: int) -> None:
    """Overwrite ``blocks`` (written but not claimed by the index) with garbage: a cache
    that trusted an unclaimed block would now serve wrong bytes, and the next cycle's
    written blocks are told apart from this one's."""
    with open(data_path, "r+b") as fh:
        for i in blocks:
            want = min(block_size, size - i * block_size)
            os.pwrite(fh.fileno(), bytes([GARBAGE]) * want, i * block_size)


@dataclass
class Cycle:
    """One run until a kill -9: what the origin sent and what the cache kept."""

    first_request: int  # index in the origin's log of the cycle's first request
    delay: float  # seconds from the start of the copy to the kill
    persisted: set[int]  # blocks the index claims after the kill
    unclaimed: set[int]  # blocks right in the data file but not claimed (flush window)
    # filled in by check_cycles:
    sent: int = 0  # body bytes the origin sent in the cycle
    gained: int = 0  # blocks newly claimed in the cycle
    lost: int = 0  # bytes sent in the cycle that the cache did not keep


def after_kill(directory: Path, key: str, size: int, block_size: int, first_request: int,
               delay: float) -> Cycle:
    """Read the cache offline after a kill; scribble over what it does not claim."""
    persisted = persisted_blocks(directory)
    data = directory / "data"
    unclaimed: set[int] = set()
    if data.exists() and data.stat().st_size == size:
        unclaimed = written_blocks(data, key, size, block_size) - persisted
        scribble_unclaimed(data, unclaimed, size, block_size)
    return Cycle(first_request, delay, persisted, unclaimed)


def check_cycles(
    origin: FaultServer,
    path: str,
    block_size: int,
    size: int,
    cycles: list[Cycle],
) -> None:
    """Assert, from the origin's log and the indexes read after each kill:

    - the claimed set never shrinks;
    - no request of a cycle asks for a block claimed before that cycle began.

    Fills in ``sent``, ``gained`` and ``lost``.
    """
    log = origin.log
    before: set[int] = set()
    for n, cycle in enumerate(cycles):
        stop = cycles[n + 1].first_request if n + 1 < len(cycles) else len(log)
        reqs = [
            r for r in log[cycle.first_request : stop] if r.path == path and r.method == "GET"
        ]
        for req in reqs:
            blocks = requested_blocks(req, block_size, size)
            again = before.intersection(blocks)
            assert not again, (
                f"cycle {n}: {req.range} asks for blocks {sorted(again)[:8]} that the index "
                "had persisted before the kill"
            )
        lost = before - cycle.persisted
        assert not lost, f"cycle {n}: the index lost blocks {sorted(lost)[:8]}"
        cycle.sent = sum(r.bytes_sent for r in reqs)
        cycle.gained = len(cycle.persisted - before)
        cycle.lost = cycle.sent - cycle.gained * block_size  # block_size divides size
        before = cycle.persisted


def report(title: str, cycles: list[Cycle], total: int, size: int, block_size: int) -> str:
    """A table for the log (pytest -s): per kill, the bytes sent and where they went."""
    lines = [f"{title}: {total / MIB:.1f} MiB fetched for {size / MIB:.0f} MiB "
             f"({total / size:.3f} x)"]
    window = other = 0
    for n, c in enumerate(cycles):
        w = len(c.unclaimed) * block_size
        window += w
        other += c.lost - w
        lines.append(
            f"  {'kill' if n < len(cycles) - 1 else 'last'} {n:2d} at {c.delay:4.2f} s: "
            f"sent {c.sent / MIB:6.2f} MiB, +{c.gained:3d} blocks = {len(c.persisted):3d}; "
            f"lost {c.lost / MIB:5.2f} MiB = written, unclaimed {w / MIB:5.2f} "
            f"+ never written {(c.lost - w) / MIB:5.2f}"
        )
    lines.append(f"  lost in all: {(window + other) / MIB:.2f} MiB = written, unclaimed "
                 f"{window / MIB:.2f} + never written (in flight) {other / MIB:.2f}")
    return "\n".join(lines)


# -- kill -9 of the mount during a copy ---------------------------------------------------
#
# A kill loses what arrived since the last flush: about fill rate x (FLUSH_INTERVAL +
# FLUSH_PERIOD, 0.04 s), plus what sat in socket buffers. The origin here paces itself (each
# GET answered after 0.5 s, then the body at loopback speed), so whole 4 MiB fill answers
# land at once. Measured with the 0.02 s cadence: 96.0 MiB fetched for 96 MiB over 20 kills
# (1.00 x). With a 0.1 s interval / 0.05 s ticks it was 1.08..1.16 x; with the first 1 s
# interval / 0.5 s ticks no run shorter than ~1.5 s kept anything (8.5 x).

SIZE = 96 * MIB  # more than 20 short runs can fetch: every kill lands mid-copy
BS = 256 * KIB
MOUNT_ARGS = ("--block-size", "256K", "--concurrency", "1")
MOUNT_GET_DELAY = 0.5
MOUNT_KILL_WINDOW = (0.1, 1.2)  # seconds after cp starts
MOUNT_MAX_LOSS = 12 * MIB  # per kill: two 4 MiB fill answers not yet claimed, cp's reads


@pytest.mark.slow
def test_kill_9_mount_20_times_during_a_copy(
    tmp_path: Path, mnt: Path, origin: FaultServer
) -> None:
    origin.add("/obj", SIZE)
    slow_gets(origin, "/obj", MOUNT_GET_DELAY)
    urls = write_list(tmp_path / "r.urls", [origin.url("/obj")])
    cache = tmp_path / "cache"
    objdir = cache / "objects" / cache_key(origin.url("/obj"))
    rng = random.Random(20250101)
    cycles: list[Cycle] = []
    for _ in range(KILLS):
        first = len(origin.log)
        mount = start_mount(urls, mnt, *MOUNT_ARGS, cache_dir=cache)
        try:
            mount.wait_mounted()
            copier = subprocess.Popen(
                ["cp", str(mnt / "obj"), str(tmp_path / "copy")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            delay = rng.uniform(*MOUNT_KILL_WINDOW)
            time.sleep(delay)
            mount.send(signal.SIGKILL)
            assert mount.wait_exit() == -signal.SIGKILL
            copier.wait(20)
            mount.check_log(warnings_ok=True)
            assert "corrupt" not in mount.stderr()
        finally:
            mount.cleanup()
        assert not is_mounted(mnt)
        cycles.append(after_kill(objdir, "/obj", SIZE, BS, first, delay))
    slow_gets(origin, "/obj", 0)  # the last run goes at full speed
    first = len(origin.log)
    with mounted(urls, mnt, *MOUNT_ARGS, cache_dir=cache):
        data = (mnt / "obj").read_bytes()
    assert len(data) == SIZE
    content.check("/obj", 0, data)
    cycles.append(Cycle(first, 0.0, set(range(SIZE // BS)), set()))
    check_cycles(origin, "/obj", BS, SIZE, cycles)
    total = sum(r.bytes_sent for r in body_gets(origin, "/obj"))
    print(report("mount, kill -9 x 20", cycles, total, SIZE, BS))
    assert sum(1 for c in cycles if c.gained) >= 3  # the kills did land mid-copy
    assert max(c.lost for c in cycles) <= MOUNT_MAX_LOSS
    assert total <= SIZE * 1.1  # issue 5's bound


def test_mount_claims_new_blocks_while_it_runs(
    tmp_path: Path, mnt: Path, origin: FaultServer
) -> None:
    """What a kill -9 of the mount loses is bounded by how soon a block that arrived is
    claimed by the index on disk: FLUSH_INTERVAL + FLUSH_PERIOD plus the flush itself.
    Here every block read is claimed while the mount runs on, idle (no other read, no
    unmount): by its periodic flusher. The latencies are printed, not asserted (they
    measure the machine's disk and load); the cadence is proven on trio's clock by
    test_the_flusher_starts_the_flush_of_a_new_block_within_interval_plus_period."""
    origin.add("/obj", 16 * BS)
    urls = write_list(tmp_path / "r.urls", [origin.url("/obj")])
    cache = tmp_path / "cache"
    objdir = cache / "objects" / cache_key(origin.url("/obj"))
    latencies = []
    with mounted(urls, mnt, "--block-size", "256K", "--prefetch", "none", cache_dir=cache):
        fd = os.open(mnt / "obj", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: one at a time
            for block in (5, 1, 12, 3, 9, 14, 7, 0):
                content.check("/obj", block * BS, os.pread(fd, BS, block * BS))
                arrived = time.monotonic()
                hang_guard = arrived + 60
                while block not in persisted_blocks(objdir):
                    assert time.monotonic() < hang_guard, f"block {block} never claimed"
                    time.sleep(0.005)
                latencies.append(time.monotonic() - arrived)
        finally:
            os.close(fd)
    nominal = objects.FLUSH_INTERVAL + objects.FLUSH_PERIOD
    print(f"\nclaimed after {', '.join(f'{t:.3f}' for t in latencies)} s (nominal <= "
          f"{nominal:g} s + the flush)")


async def test_the_flusher_starts_the_flush_of_a_new_block_within_interval_plus_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """The policy behind the claim latency above: the store's flusher looks every
    FLUSH_PERIOD and flushes a cache whose oldest unclaimed block is FLUSH_INTERVAL old, so
    the flush of a new block starts between FLUSH_INTERVAL and FLUSH_INTERVAL +
    FLUSH_PERIOD after the block arrived, whatever the phase of the flusher's ticks. On
    trio's clock (autojump): the machine's speed does not count, only the cadence."""
    interval, period = objects.FLUSH_INTERVAL, objects.FLUSH_PERIOD
    assert interval + period <= 0.15  # what the kill -9 loop's MOUNT_MAX_LOSS assumes
    started: list[float] = []
    events = {"started": trio.Event(), "flushed": trio.Event()}
    real_flush = LocalDownloadCache.flush

    async def recording_flush(self: LocalDownloadCache) -> None:
        started.append(trio.current_time())
        events["started"].set()
        await real_flush(self)
        events["flushed"].set()

    monkeypatch.setattr(LocalDownloadCache, "flush", recording_flush)
    config = objects.StoreConfig(cache_dir=tmp_path / "cache", probe_at_mount=False)
    store = objects.ObjectStore([], config)
    caches: list[LocalDownloadCache] = []
    monkeypatch.setattr(store, "_caches", lambda: list(caches))  # the store's open caches
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for n, phase in enumerate((0.0, 0.003, 0.0101, 0.0173, 0.0199, period, 0.031)):
            directory = tmp_path / f"o{n}"
            identity = ObjectIdentity(f"http://h/o{n}", 8 * 64, 64, '"e"', None)
            # a new cache each time: no earlier index write of it stretches its interval
            with LocalDownloadCache.open(directory, identity, flush_interval=interval) as c:
                caches[:] = [c]
                await trio.sleep(phase)  # another point between two of the flusher's ticks
                started.clear()
                events.update(started=trio.Event(), flushed=trio.Event())
                c.write_block(3, b"x" * 64)
                arrived = trio.current_time()
                # no thread runs until the flush starts: a guard in virtual time is safe
                with trio.fail_after(10 * (interval + period)):
                    await events["started"].wait()
                waited = started[0] - arrived
                assert interval - 1e-9 <= waited <= interval + period + 1e-9, (n, waited)
                await events["flushed"].wait()  # the index write, in a worker thread
                assert persisted_blocks(directory) == {3}
                caches.clear()
        nursery.cancel_scope.cancel()


# -- kill -9 of `rangefs download` ----------------------------------------------------------
#
# download.py checks every 0.02 s and claims blocks 0.02 s old. Answers are 8 MiB
# (CachingDownloader's request size); one request at a time, each answered 1 s after it was
# asked. Measured: 96.0 MiB fetched for 96 MiB over 20 kills (1.00 x); with the former
# 0.5 s ticks and 0.25 s interval, 1.4..1.5 x.

DL_GET_DELAY = 1.0
DL_EARLY_KILLS = 0.2  # this share of the kills hit the start-up, the others ...
DL_KILL_WINDOW = (0.0, 1.9)  # ... this many seconds after its first GET arrived
DL_MAX_LOSS = 17 * MIB  # per kill: the answer in flight and the one not yet claimed


@pytest.mark.slow
def test_kill_9_download_20_times(tmp_path: Path, origin: FaultServer) -> None:
    origin.add("/dl", SIZE)
    slow_gets(origin, "/dl", DL_GET_DELAY)
    dest = tmp_path / "dl"
    args = [sys.executable, "-m", "rangefs.cli", "download", "--block-size", "256K",
            "--concurrency", "1", origin.url("/dl"), str(dest)]
    rng = random.Random(777)
    cycles: list[Cycle] = []
    for _ in range(KILLS):
        first = len(origin.log)
        proc = subprocess.Popen(args, env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            if rng.random() < DL_EARLY_KILLS:  # while it starts: probe, reserve, open
                delay = rng.uniform(0.05, 0.5)
                time.sleep(delay)
            else:  # while it downloads: from its first GET on (start-up time varies)
                delay = rng.uniform(*DL_KILL_WINDOW)
                deadline = time.monotonic() + 30
                while not any(r.method == "GET" for r in origin.log[first:]):
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.01)
                time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == -signal.SIGKILL, err
        assert not dest.exists()
        cycles.append(after_kill(partial_dir(dest), "/dl", SIZE, BS, first, delay))
    slow_gets(origin, "/dl", 0)  # the last run goes at full speed
    first = len(origin.log)
    done = subprocess.run(args, env=child_env(), capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    content.check("/dl", 0, dest.read_bytes())
    assert not partial_dir(dest).exists()
    cycles.append(Cycle(first, 0.0, set(range(SIZE // BS)), set()))
    check_cycles(origin, "/dl", BS, SIZE, cycles)
    total = sum(r.bytes_sent for r in body_gets(origin, "/dl"))
    print(report("download, kill -9 x 20", cycles, total, SIZE, BS))
    assert sum(1 for c in cycles if c.gained) >= 2
    assert max(c.lost for c in cycles) <= DL_MAX_LOSS
    assert total <= SIZE * 1.1  # issue 5's bound


# -- a damaged cache between two mounts -----------------------------------------------------

CORRUPT_BS = 64 * KIB
CORRUPT_BLOCKS = 64


@dataclass
class Template:
    """A cache directory holding part of one object, made by a real mount; copied per test."""

    origin: FaultServer
    urls: Path
    cache: Path
    key: str
    index_claims: set[int]  # what index claims
    prev_claims: set[int]  # what index.prev claims (a strict subset: an older flush)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    base = tmp_path_factory.mktemp("template")
    with FaultServer() as origin:
        origin.add("/obj", CORRUPT_BLOCKS * CORRUPT_BS)
        urls = write_list(base / "r.urls", [origin.url("/obj")])
        cache = base / "cache"
        mnt = base / "mnt"
        args = ("--block-size", "64K", "--prefetch", "none")
        with mounted(urls, mnt, *args, cache_dir=cache):
            fd = os.open(mnt / "obj", os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead
                for block in reversed(range(CORRUPT_BLOCKS // 2)):  # not sequential either
                    data = os.pread(fd, CORRUPT_BS, block * CORRUPT_BS)
                    content.check("/obj", block * CORRUPT_BS, data)
            finally:
                os.close(fd)
        objdir = cache / "objects" / cache_key(origin.url("/obj"))
        identity, bitmap = read_index(objdir / "index")
        claims = persisted_blocks(objdir)
        assert set(range(CORRUPT_BLOCKS // 2)) <= claims  # a clean unmount claims all read
        # index.prev: an older, valid claim (as a flush before the last would have left)
        older = sorted(claims)[: len(claims) // 2]
        bits = sum(1 << i for i in older).to_bytes(len(bitmap), "little")
        write_index(base / "older", identity, bits, generation=1)
        os.replace(base / "older", objdir / "index.prev")
        yield Template(origin, urls, cache, cache_key(origin.url("/obj")), claims, set(older))


def _flip(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x10
    path.write_bytes(bytes(blob))


CORRUPTIONS = {
    # name: (what is done, expected WARNING text, which claims survive)
    "truncated-index": ("index", "checksum mismatch", "prev"),
    "flipped-bitmap-byte": ("index", "checksum mismatch", "prev"),
    "flipped-header-byte": ("index", "checksum mismatch", "prev"),
    "garbage-index": ("index", "bad magic", "prev"),
    "empty-index": ("index", "too short", "prev"),
    "missing-index": ("index", "is missing; resuming from index.prev", "prev"),
    "wrong-identity": ("index", "belongs to another object or version", "none"),
    "index-and-prev-broken": ("both", "starting over", "none"),
    "broken-prev-only": ("prev", "", "index"),
    # a data file of the wrong length starts over (test_cache.py pins this): the claimed
    # blocks before the cut are fetched again although they are intact
    "truncated-data-file": ("data", "expected 4194304; starting over", "none"),
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_damaged_cache_is_detected_and_recovered(
    template: Template, tmp_path: Path, damage: str
) -> None:
    """Damage the cache of a half-read object between two mounts: the remount logs it,
    serves every byte right (the blocks nobody vouches for hold garbage, so trusting them
    would show), and fetches exactly the blocks the surviving index does not claim."""
    _, message, survivor = CORRUPTIONS[damage]
    cache = tmp_path / "cache"
    shutil.copytree(template.cache, cache)
    objdir = cache / "objects" / template.key
    index, prev, data = objdir / "index", objdir / "index.prev", objdir / "data"
    blob = index.read_bytes()
    header_end = blob.index(b"\n", len(INDEX_MAGIC)) + 1
    if damage == "truncated-index":
        index.write_bytes(blob[: len(blob) // 2])
    elif damage == "flipped-bitmap-byte":
        _flip(index, header_end)
    elif damage == "flipped-header-byte":
        _flip(index, header_end - 10)
    elif damage == "garbage-index":
        index.write_bytes(random.Random(1).randbytes(len(blob)))
    elif damage == "empty-index":
        index.write_bytes(b"")
    elif damage == "missing-index":
        index.unlink()  # a crash between write_index's two renames
    elif damage == "wrong-identity":
        identity, bitmap = read_index(index)
        write_index(index, replace(identity, etag='"v0"'), bitmap)  # valid, but not ours
    elif damage == "index-and-prev-broken":
        index.write_bytes(blob[:-1])
        prev.write_bytes(b"\0" * 100)
    elif damage == "broken-prev-only":
        prev.write_bytes(blob[: len(blob) // 3])
    elif damage == "truncated-data-file":
        os.truncate(data, 10 * CORRUPT_BS + CORRUPT_BS // 2)
    survives = {"prev": template.prev_claims, "index": template.index_claims, "none": set()}
    vouched = survives[survivor]
    unvouched = set(range(CORRUPT_BLOCKS)) - vouched
    scribble_unclaimed(data, unvouched & set(range(os.path.getsize(data) // CORRUPT_BS)),
                       CORRUPT_BLOCKS * CORRUPT_BS, CORRUPT_BS)
    origin = template.origin
    origin.reset_log()
    mnt = tmp_path / "mnt"
    with mounted(template.urls, mnt, "--block-size", "64K", cache_dir=cache,
                 warnings_ok=True) as mount:
        got = (mnt / "obj").read_bytes()
        assert len(got) == CORRUPT_BLOCKS * CORRUPT_BS
        content.check("/obj", 0, got)
        log = mount.stderr()
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    if message:
        assert any(message in line for line in warnings), log
    else:
        assert warnings == [], log
    fetched = sorted(
        b for r in body_gets(origin, "/obj")
        for b in requested_blocks(r, CORRUPT_BS, CORRUPT_BLOCKS * CORRUPT_BS)
    )
    assert fetched == sorted(unvouched), f"fetched {fetched}, expected {sorted(unvouched)}"
    assert persisted_blocks(objdir) == set(range(CORRUPT_BLOCKS))  # repaired and complete


# -- a full disk, a read-only or unusable cache directory ----------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` for the ``with`` body; always unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0700" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "rangefs-test", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if done.returncode != 0:  # still busy (a failed test): detach it lazily
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill_up(path: Path) -> int:
    """Write a file at ``path`` until the filesystem is full; the bytes written."""
    chunk = b"\xff" * (64 * KIB)
    written = 0
    with open(path, "wb", buffering=0) as fh:
        for size in (64 * KIB, 4 * KIB, 1):
            try:
                while True:
                    written += fh.write(chunk[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return written


def test_disk_full_while_reading_then_kill_9_keeps_the_cache_consistent(
    tmp_path: Path, mnt: Path, origin: FaultServer
) -> None:
    """Another program fills the cache's file system while a file is read (data files are
    sparse: nothing was reserved): reads whose blocks cannot be stored fail with ENOSPC or
    EIO, never with a wrong byte, and the cache gives back what it can; a kill -9 then
    leaves a valid index that claims only right bytes, and a remount once there is space
    reads every byte right without fetching again what the index claims."""
    size, bs = 2 * MIB, 256 * KIB
    origin.add("/a", size)
    urls = write_list(tmp_path / "r.urls", [origin.url("/a")])
    args = ("--block-size", "256K", "--prefetch", "none")
    with tmpfs(tmp_path / "fs", "8m") as fs:
        cache = fs / "cache"
        objdir = cache / "objects" / cache_key(origin.url("/a"))
        mount = start_mount(urls, mnt, *args, cache_dir=cache)
        try:
            mount.wait_mounted()
            with open(mnt / "a", "rb", buffering=0) as fh:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead
                content.check("/a", 0, os.pread(fh.fileno(), bs, 0))  # block 0 only
                deadline = time.monotonic() + 30  # a hang guard
                while persisted_blocks(objdir) != {0}:
                    assert time.monotonic() < deadline, mount.stderr()
                    time.sleep(0.05)
                fill_up(fs / "filler")
                failures = 0
                for offset in range(bs, size, bs):
                    try:
                        content.check("/a", offset, os.pread(fh.fileno(), bs, offset))
                    except OSError as exc:
                        assert exc.errno in (errno.ENOSPC, errno.EIO), exc
                        failures += 1
                assert failures > 0  # the disk was full: not every block could be stored
            log = mount.stderr()
            mount.send(signal.SIGKILL)
            assert mount.wait_exit() == -signal.SIGKILL
        finally:
            mount.cleanup()
        assert "No space left" in log or "not enough space" in log, log
        assert "Traceback" not in log
        survived = persisted_blocks(objdir)  # a valid index (read_index checks it all)
        with open(objdir / "data", "rb") as data:
            for block in survived:  # what the index claims is right on disk
                content.check("/a", block * bs, os.pread(data.fileno(), bs, block * bs))
        (fs / "filler").unlink()
        origin.reset_log()
        again = tmp_path / "mnt2"
        with mounted(urls, again, *args, cache_dir=cache, warnings_ok=True):
            content.check("/a", 0, (again / "a").read_bytes())
        fetched = sorted(
            b for r in body_gets(origin, "/a") for b in requested_blocks(r, bs, size)
        )
        assert fetched == sorted(set(range(size // bs)) - survived)


async def test_a_failing_index_flush_is_retried_with_backoff_and_logged_once_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """A cache whose index cannot be persisted (a full disk) is retried after 1 s,
    doubling up to 30 s: no tight loop of errors, one log line per failure saying when it
    is retried; the other caches are flushed meanwhile; once it works, one line says so."""
    attempts: list[float] = []
    healthy_flushes: list[float] = []

    class Cache:
        closed = False
        directory = tmp_path / "obj"

        def __init__(self, fail_until: float, record: list[float]) -> None:
            self.fail_until = fail_until
            self.record = record

        def needs_flush(self) -> bool:
            return True

        async def flush(self) -> None:
            now = trio.current_time()
            self.record.append(now)
            await trio.lowlevel.checkpoint()
            if now < self.fail_until:
                raise errors.NotEnoughSpace("writing the index: No space left on device")

    start = trio.current_time()
    failing = Cache(start + 100, attempts)
    healthy = Cache(0.0, healthy_flushes)

    caplog.set_level(logging.INFO)
    with trio.move_on_after(140):
        await scheduler.flush_periodically(lambda: [failing, healthy])
    gaps = [round(b - a, 1) for a, b in itertools.pairwise(attempts)]
    period = scheduler.FLUSH_PERIOD
    expected = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert len(gaps) >= len(expected), gaps
    for gap, delay in zip(gaps, expected, strict=False):
        assert delay <= gap <= delay + 2 * period, gaps
    failures = [r for r in caplog.records if "cannot persist the cache index" in r.getMessage()]
    assert len(failures) == len([t for t in attempts if t < start + 100])
    assert "retrying in 1 s" in failures[0].getMessage()
    assert any("persisted again" in r.getMessage() for r in caplog.records)
    assert len(healthy_flushes) > 1000  # the other cache was flushed every period


def _assert_refused(result: subprocess.CompletedProcess[str], mnt: Path, *words: str) -> None:
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr  # one line
    assert result.stderr.startswith("rangefs: cache directory"), result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert not is_mounted(mnt)


def test_read_only_cache_directory_is_refused_at_start(
    tmp_path: Path, mnt: Path, origin: FaultServer
) -> None:
    """An existing cache on a filesystem that went read-only, and a cache directory whose
    missing parent cannot be created (it would be on a read-only filesystem): one line,
    exit 2, nothing mounted."""
    origin.add("/a", 1000)
    urls = write_list(tmp_path / "r.urls", [origin.url("/a")])
    with tmpfs(tmp_path / "fs", "4m") as fs:
        cache = fs / "cache"
        with mounted(urls, mnt, cache_dir=cache):
            content.check("/a", 0, (mnt / "a").read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True, capture_output=True)
        origin.reset_log()
        for target, words in ((cache, ("not writable", "--cache-dir")),
                              (fs / "no" / "such" / "cache", ("Read-only file system",))):
            result = run_rangefs(["mount", "-f", "--cache-dir", str(target), str(urls),
                                  str(mnt)], timeout=30)
            _assert_refused(result, mnt, str(target), *words)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        result = run_rangefs(["mount", "-f", "--cache-dir", str(ro / "cache"), str(urls),
                              str(mnt)], timeout=30)
        _assert_refused(result, mnt, "cannot be created", "Read-only file system")
    assert origin.gets() == []


def test_cache_directory_under_a_file_is_refused_at_start(
    tmp_path: Path, mnt: Path, origin: FaultServer
) -> None:
    """A missing parent that cannot exist (a path component is a file): one line, exit 2."""
    origin.add("/a", 1000)
    urls = write_list(tmp_path / "r.urls", [origin.url("/a")])
    (tmp_path / "file").write_bytes(b"")
    result = run_rangefs(["mount", "-f", "--cache-dir", str(tmp_path / "file" / "c" / "cache"),
                          str(urls), str(mnt)], timeout=30)
    _assert_refused(result, mnt, "cannot be created", "Not a directory")


# -- the policies behind the figures above (no mounts) --------------------------------------


async def test_slow_index_writes_stretch_the_flush_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """needs_flush waits FLUSH_COST_FACTOR x the last index write if that is longer than
    flush_interval; a slow fdatasync (the data's writeback, which grows with the blocks
    written) does not count, or the interval would feed on itself."""
    identity = ObjectIdentity("http://h/o", 8 * 64, 64, '"e"', None)
    real_write, real_sync = write_index, os.fdatasync

    def slow(seconds: float, call: Callable[..., None]) -> Callable[..., None]:
        def run(*args: Any, **kwargs: Any) -> None:
            time.sleep(seconds)  # real time: what the cache measures
            call(*args, **kwargs)
        return run

    # trio's clock jumps (autojump) while the cache measures real time: the sleeps below
    # are long against any real index write (a loaded disk's fsync: tens of ms), so that
    # only the patched, slow calls can stretch anything
    with LocalDownloadCache.open(tmp_path / "o", identity, flush_interval=0.25) as c:
        monkeypatch.setattr(os, "fdatasync", slow(0.5, real_sync))
        for block in range(2):
            c.write_block(block, b"x" * 64)
            await trio.sleep(5)
            assert c.needs_flush()  # a slow fdatasync does not stretch the interval
            await c.flush()
        monkeypatch.setattr(os, "fdatasync", real_sync)
        monkeypatch.setattr(cache_mod, "write_index", slow(0.5, real_write))
        c.write_block(2, b"x" * 64)
        await trio.sleep(5)
        await c.flush()  # this index write took >= 0.5 s: wait >= 20 x 0.5 = 10 s now
        c.write_block(3, b"x" * 64)
        await trio.sleep(6)
        assert not c.needs_flush()
        await trio.sleep(5)
        assert c.needs_flush()
        monkeypatch.setattr(cache_mod, "write_index", real_write)
        await c.flush()  # a fast write again: back to flush_interval
        c.write_block(4, b"x" * 64)
        await trio.sleep(5)
        assert c.needs_flush()


def test_headroom_is_a_fraction_of_a_small_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 MiB of headroom would make an 8 MiB filesystem useless: it is 1/16 of it there."""
    fake = SimpleNamespace(f_bavail=256, f_frsize=4096, f_blocks=2048)  # 1 of 8 MiB free
    monkeypatch.setattr(os, "statvfs", lambda _p: fake)
    check_space(tmp_path / "d", 1 * MIB - 512 * KIB)  # + 512 KiB headroom = 1 MiB: fits
    with pytest.raises(errors.NotEnoughSpace, match=r"not enough space.*524288 headroom"):
        check_space(tmp_path / "d", 1 * MIB - 512 * KIB + 1)
    big = SimpleNamespace(f_bavail=256 * 1024, f_frsize=4096, f_blocks=1 << 30)  # 1 GiB free
    monkeypatch.setattr(os, "statvfs", lambda _p: big)
    with pytest.raises(errors.NotEnoughSpace, match=f"{DEFAULT_HEADROOM} headroom"):
        check_space(tmp_path / "d", 1 << 30)

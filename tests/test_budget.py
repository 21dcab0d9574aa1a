"""A mount caches blocks, not objects (issue 16, items 1 and 2): real mounts on a small tmpfs.

- ``--cache-size`` bounds the whole cache directory (data blocks + index files) and
  ``--cache-min-free`` (default 5 %) keeps part of its file system free; data files are
  sparse, so an object larger than the free disk (1 TiB on a 1 GiB tmpfs) opens and reads.
- Past the budget, least recently used extents are evicted (index first, then a hole is
  punched): the cache directory's disk use (``st_blocks`` of every file under it) is
  sampled every ~20 ms and must stay within the budget + ``budget.EVICTION_MARGIN``.
- ``--prefetch open`` fills a whole object only when it fits the budget, and says once in
  the log when it does not.
- kill -9 during eviction-heavy reading: the index never claims a punched block.

Every read goes through the kernel and is checked byte for byte (``tests.content``); the
origin is the in-process fault server, whose objects cost nothing however large.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest

from rangefs.budget import EVICTION_MARGIN
from rangefs.cachedir import cache_key
from tests import content
from tests.faultserver import FaultServer, Request
from tests.mountutil import ROOT, child_env, is_mounted, mounted, start_mount, unmount, write_list
from tests.test_crash import persisted_blocks

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BS = 64 * KIB  # the default block size
TMPFS_SIZE = GIB
DOES_NOT_FIT = "does not fit the cache budget"
SAMPLE_PERIOD = 0.02


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def fs(tmp_path: Path, mnt: Path) -> Iterator[Path]:
    """A 1 GiB tmpfs (0700) for the cache directory, unmounted at teardown whatever the
    test left: the FUSE mount at ``mnt`` first (it may hold files open on the tmpfs), then
    the tmpfs, lazily if it is still busy."""
    path = tmp_path / "fs"
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "rangefs-budget",
         str(path)],
        check=True, capture_output=True,
    )
    try:
        yield path
    finally:
        unmount(mnt)
        done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if done.returncode != 0:  # still busy (a failed test): detach it lazily
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
        assert not is_mounted(path), f"{path} is still mounted"


def disk_use(directory: Path) -> int:
    """Bytes allocated to every file under ``directory`` (``st_blocks`` x 512): data,
    index, temporary files, everything. Files that vanish during the walk count 0."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fs_size(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


class Sampler:
    """Calls ``measure`` every ``period`` seconds in a thread for the ``with`` body (and
    once more at its end); ``values`` holds every figure. An exception in the thread is
    raised again at the end of the ``with``."""

    def __init__(self, measure: Callable[[], int], period: float = SAMPLE_PERIOD) -> None:
        self.measure = measure
        self.period = period
        self.values: list[int] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.values.append(self.measure())
                self._stop.wait(self.period)
        except BaseException as exc:  # raised in the test's thread by __exit__
            self._error = exc

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise self._error
        self.values.append(self.measure())

    @property
    def max(self) -> int:
        return max(self.values)

    @property
    def min(self) -> int:
        return min(self.values)


def pread_exact(fd: int, key: str, offset: int, length: int) -> int:
    """Read ``[offset, offset + length)`` (a large pread may come back short: go on) and
    check every byte; the bytes read."""
    got = 0
    while got < length:
        data = os.pread(fd, min(length - got, 8 * MIB), offset + got)
        assert data, f"EOF at {offset + got} reading {length} bytes at {offset} of {key}"
        content.check(key, offset + got, data)
        got += len(data)
    return got


def read_back(fd: int, key: str, offset: int, length: int) -> None:
    """Read ``[offset, offset + length)`` one block at a time, last block first, after
    dropping the kernel's pages of it: every read reaches the mount (nothing comes from the
    page cache), none is sequential (so rangefs adds no read-ahead) and, with
    POSIX_FADV_RANDOM, the kernel adds none either."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    for pos in reversed(range(offset, offset + length, BS)):
        pread_exact(fd, key, pos, min(BS, offset + length - pos))


def not_fit_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if DOES_NOT_FIT in line]


# -- 1. a 1 TiB object on a 1 GiB tmpfs ---------------------------------------------------------

RANDOM_READS = 300  # at least; more until the origin has sent RANDOM_PRESSURE x the free space
RANDOM_READS_MAX = 3000
RANDOM_PRESSURE = 1.5
FILLER = 640 * MIB  # not the cache's: the min-free rule counts the file system, not the cache


MIN_FREE_CASES = {
    # name: (mount options, bytes to keep free on the 1 GiB tmpfs)
    "default-5%": ((), int(0.05 * TMPFS_SIZE)),
    # 5 % of 1 GiB is less than EVICTION_MARGIN: the default case alone proves only that
    # the tmpfs never fills; these two make the floor bite
    "25%": (("--cache-min-free", "25%"), TMPFS_SIZE // 4),
    "200M": (("--cache-min-free", "200M"), 200 * MIB),
}


@pytest.mark.parametrize("case", list(MIN_FREE_CASES))
def test_random_reads_of_1_tib_on_a_1_gib_tmpfs_keep_min_free(
    tmp_path: Path, mnt: Path, fs: Path, origin: FaultServer, case: str
) -> None:
    """No --cache-size: --cache-min-free (default 5 %) alone bounds the cache. A 1 TiB
    object opens (nothing reserved) and random preads of 4 KiB..1 MiB spread over the
    whole TiB are exact, while a 640 MiB file of someone else's sits on the same tmpfs. The
    reads fetch more than the free space (precondition: the cache had to evict), and the
    free space, sampled every 20 ms, never drops below min-free minus EVICTION_MARGIN, and
    never to nothing (the tmpfs never fills)."""
    args, min_free = MIN_FREE_CASES[case]
    size = TIB
    origin.add("/big", size)
    urls = write_list(tmp_path / "r.urls", [f"{origin.url('/big')} big size={size}"])
    with open(fs / "filler", "wb") as fh:
        block = b"\x5a" * MIB
        for _ in range(FILLER // MIB):
            fh.write(block)
    assert fs_size(fs) == TMPFS_SIZE
    floor = max(min_free - EVICTION_MARGIN, 1)
    free_at_start = free_bytes(fs)
    rng = random.Random(16_1)
    done: list[tuple[int, int]] = []
    with mounted(urls, mnt, *args, cache_dir=fs / "cache") as mount, Sampler(
        lambda: free_bytes(fs)
    ) as free:
        fd = os.open(mnt / "big", os.O_RDONLY)
        try:
            for offset, length in ((0, 4 * KIB), (size - 4 * KIB, 4 * KIB),
                                   (size - 1 * MIB - 12345, 1 * MIB)):
                pread_exact(fd, "/big", offset, length)  # both ends, unaligned too
            while len(done) < RANDOM_READS or (
                origin.bytes_sent("/big") < RANDOM_PRESSURE * free_at_start
                and len(done) < RANDOM_READS_MAX
            ):
                length = rng.randint(4 * KIB, MIB)
                offset = rng.randrange(0, size - length)
                pread_exact(fd, "/big", offset, length)
                done.append((offset, length))
            # the first and the last reads, again: exact (kept, or evicted and fetched
            # again: never zeros)
            for offset, length in done[:20] + done[-20:]:
                pread_exact(fd, "/big", offset, length)
        finally:
            os.close(fd)
        log = mount.stderr()
    sent = origin.bytes_sent("/big")
    print(f"\n{len(done)} random reads; origin sent {sent / MIB:.0f} MiB; free at start "
          f"{free_at_start / MIB:.0f} MiB; free min {free.min / MIB:.1f} MiB over "
          f"{len(free.values)} samples; floor {floor / MIB:.1f} MiB; cache "
          f"{disk_use(fs / 'cache') / MIB:.1f} MiB at the end")
    assert sent > free_at_start, (
        f"the reads fetched {sent} bytes, less than the {free_at_start} free: nothing had to "
        "be evicted (raise RANDOM_READS_MAX)"
    )
    assert len(free.values) >= 10
    assert free.min >= floor, (free.min, floor)
    assert free_bytes(fs) >= floor
    assert len(not_fit_lines(log)) <= 1, not_fit_lines(log)  # said once, if at all


# -- 2. a sequential read of GiBs with --cache-size 512M ----------------------------------------

SEQ_SIZE = 100 * GIB
SEQ_READ = 3 * GIB  # the part read: 6 x the budget (2 GiB: 9 s here, 20 s with both cores busy)
SEQ_BUDGET = 512 * MIB
SEQ_CHUNK = MIB
READ_AHEAD_ALLOWANCE = 64 * MIB


@pytest.mark.slow
def test_sequential_read_of_gibs_stays_within_the_cache_size(
    tmp_path: Path, mnt: Path, fs: Path, origin: FaultServer
) -> None:
    """A 100 GiB object read from the start for 3 GiB with --cache-size 512M and the
    default --prefetch open: every chunk exact; the cache directory's disk use, sampled
    every 20 ms, never exceeds 512 MiB + EVICTION_MARGIN; the object does not fit, so the
    log says so (once) and the origin sends no more than what was read plus read-ahead
    (no whole-object fill)."""
    assert SEQ_READ > 2 * (SEQ_BUDGET + EVICTION_MARGIN)  # the budget must bite
    origin.add("/big", SEQ_SIZE)
    urls = write_list(tmp_path / "r.urls", [f"{origin.url('/big')} big size={SEQ_SIZE}"])
    cache = fs / "cache"
    started = time.monotonic()
    with mounted(urls, mnt, "--cache-size", "512M", cache_dir=cache) as mount, Sampler(
        lambda: disk_use(cache)
    ) as use:
        with open(mnt / "big", "rb", buffering=0) as fh:
            buf = bytearray(SEQ_CHUNK)
            done = 0
            while done < SEQ_READ:
                n = fh.readinto(buf)
                assert n == SEQ_CHUNK, (done, n)
                content.check("/big", done, memoryview(buf)[:n])
                done += n
        log = mount.stderr()
    elapsed = time.monotonic() - started
    sent = origin.bytes_sent("/big")  # after the unmount: read-ahead in flight included
    print(f"\nread {done / GIB:.1f} GiB in {elapsed:.1f} s; cache max "
          f"{use.max / MIB:.1f} MiB over {len(use.values)} samples (budget "
          f"{SEQ_BUDGET / MIB:.0f} + margin {EVICTION_MARGIN / MIB:.1f} MiB); origin sent "
          f"{sent / MIB:.0f} MiB")
    assert len(use.values) >= 20
    assert use.max <= SEQ_BUDGET + EVICTION_MARGIN, (use.max, sorted(use.values)[-5:])
    assert len(not_fit_lines(log)) == 1, log[-4000:]
    assert done <= sent <= done + READ_AHEAD_ALLOWANCE, (sent, done)


# -- 3. kill -9 while evicting ----------------------------------------------------------------

KILL_SIZE = 512 * MIB
KILL_BUDGET = 64 * MIB
KILL_ROUNDS = 5
KILL_WINDOW = (0.5, 4.0)  # seconds after the reader starts

# A reader in its own process (a kill -9 of the mount makes its reads fail, ENOTCONN):
# runs of sequential 1 MiB reads from random offsets and bursts of random preads, every
# byte checked. Exits 0 when a read fails or comes back short (the mount was killed), 3 on
# a wrong byte, and prints the bytes it read.
READER = r"""
import os, random, sys, time
from tests.content import check
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
done = 0
deadline = time.monotonic() + 60
def read(offset, length):
    global done
    data = os.pread(fd, length, offset)
    try:
        check("/obj", offset, data)
    except AssertionError as exc:
        print(f"WRONG after {done} bytes: {exc}", file=sys.stderr)
        sys.exit(3)
    done += len(data)
    if len(data) < min(length, size - offset):
        raise OSError(f"short read at {offset}")
try:
    fd = os.open(path, os.O_RDONLY)
    while time.monotonic() < deadline:
        if rng.random() < 0.5:
            pos = rng.randrange(0, size, 4096)
            stop = min(size, pos + rng.randint(8, 64) * 2**20)
            while pos < stop:
                read(pos, min(2**20, stop - pos))
                pos += 2**20
        else:
            for _ in range(rng.randint(5, 40)):
                length = rng.randint(4096, 2**20)
                read(rng.randrange(0, size - length), length)
except OSError as exc:
    print(f"{done} {exc}")
    sys.exit(0)
print(f"{done} deadline")
"""


def claimed_blocks_are_right(objdir: Path, size: int) -> int:
    """Every block the index on disk claims holds the object's bytes in the data file (a
    punched hole reads as zeros); the number of claimed blocks."""
    claimed = persisted_blocks(objdir)
    if not claimed:
        return 0
    with open(objdir / "data", "rb") as fh:
        for block in sorted(claimed):
            want = min(BS, size - block * BS)
            data = os.pread(fh.fileno(), want, block * BS)
            assert len(data) == want, f"block {block}: {len(data)} bytes in the data file"
            content.check("/obj", block * BS, data)
    return len(claimed)


@pytest.mark.slow
def test_kill_9_during_eviction_never_serves_a_punched_hole(
    tmp_path: Path, mnt: Path, fs: Path, origin: FaultServer
) -> None:
    """--cache-size 64M, a 512 MiB object, a reader mixing sequential runs and random
    preads; the mount is killed (-9) at a seeded random moment, 5 times, and remounted on
    the same cache. After each kill every block the index claims holds the right bytes in
    the data file (the index stops claiming a block before its hole is punched); then the
    whole object is read in random chunk order and every byte is checked: a punched hole
    served as data would be zeros. The disk use stays within budget + margin all along."""
    origin.add("/obj", KILL_SIZE)
    urls = write_list(tmp_path / "r.urls", [f"{origin.url('/obj')} obj size={KILL_SIZE}"])
    cache = fs / "cache"
    objdir = cache / "objects" / cache_key(origin.url("/obj"))
    rng = random.Random(160_003)
    rounds: list[str] = []
    peak = 0
    for n in range(KILL_ROUNDS):
        before = origin.bytes_sent("/obj")
        mount = start_mount(urls, mnt, "--cache-size", "64M", cache_dir=cache,
                            log_path=tmp_path / f"round{n}.stderr")
        try:
            mount.wait_mounted()
            with Sampler(lambda: disk_use(cache)) as use:
                reader = subprocess.Popen(
                    [sys.executable, "-c", READER, str(mnt / "obj"), str(KILL_SIZE),
                     str(rng.randrange(1 << 30))],
                    env=child_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )
                try:
                    delay = rng.uniform(*KILL_WINDOW)
                    time.sleep(delay)
                    alive = reader.poll() is None
                    mount.send(signal.SIGKILL)
                    assert mount.wait_exit() == -signal.SIGKILL
                finally:
                    out, err = reader.communicate(timeout=30)
            assert alive, f"the reader ended before the kill: {out!r} {err!r}"
            assert reader.returncode == 0, f"reader: {reader.returncode} {out!r} {err!r}"
            mount.check_log(warnings_ok=True)
            assert "corrupt" not in mount.stderr() and "checksum" not in mount.stderr()
        finally:
            mount.cleanup()
        assert not is_mounted(mnt)
        peak = max(peak, use.max)
        claimed = claimed_blocks_are_right(objdir, KILL_SIZE)
        sent = origin.bytes_sent("/obj") - before
        rounds.append(f"  kill {n} at {delay:.2f} s: reader {out.decode().strip()!r}, origin "
                      f"sent {sent / MIB:.0f} MiB, cache max {use.max / MIB:.1f} MiB, "
                      f"{claimed} blocks claimed after the kill")
        assert use.max <= KILL_BUDGET + EVICTION_MARGIN, "\n".join(rounds)
    print("\n" + "\n".join(rounds))
    # the rounds did evict: together they fetched several times the budget
    assert origin.bytes_sent("/obj") > 3 * (KILL_BUDGET + EVICTION_MARGIN), "\n".join(rounds)
    chunks = list(range(0, KILL_SIZE, MIB))
    rng.shuffle(chunks)
    # warnings allowed: a kill between the index's two renames leaves index.prev to resume
    # from (logged); a torn index would be a bug
    with mounted(urls, mnt, "--cache-size", "64M", cache_dir=cache,
                 warnings_ok=True) as mount, Sampler(lambda: disk_use(cache)) as use:
        fd = os.open(mnt / "obj", os.O_RDONLY)
        try:
            for offset in chunks:
                pread_exact(fd, "/obj", offset, MIB)
        finally:
            os.close(fd)
        log = mount.stderr()
    assert "corrupt" not in log and "checksum" not in log, log[-4000:]
    assert use.max <= KILL_BUDGET + EVICTION_MARGIN, use.max
    assert claimed_blocks_are_right(objdir, KILL_SIZE) > 0


# -- 4. an object that fits is filled whole ---------------------------------------------------

FIT_SIZE = 100 * MIB
FILL_WAIT = 60.0  # seconds: a liveness deadline, not a timing assertion


def test_an_object_that_fits_the_budget_is_filled_whole(
    tmp_path: Path, mnt: Path, fs: Path, origin: FaultServer
) -> None:
    """--cache-size 512M, a 100 MiB object, default --prefetch open: after cp's first
    8 MiB (sequential reads) the background fill completes the object
    (user.rangefs.complete = 1) while the reader waits; the rest of the copy costs the
    origin nothing, the whole object sits on disk within the budget, no "does not fit"."""
    origin.add("/obj", FIT_SIZE)
    urls = write_list(tmp_path / "r.urls", [f"{origin.url('/obj')} obj size={FIT_SIZE}"])
    cache = fs / "cache"
    with mounted(urls, mnt, "--cache-size", "512M", cache_dir=cache) as mount:
        path = mnt / "obj"
        with open(path, "rb", buffering=0) as fh:
            done = 0
            while done < 8 * MIB:  # cp's reads: 128 KiB, in order
                data = fh.read(128 * KIB)
                content.check("/obj", done, data)
                done += len(data)
            deadline = time.monotonic() + FILL_WAIT
            while os.getxattr(path, "user.rangefs.complete") != b"1":
                assert time.monotonic() < deadline, (
                    f"not filled after {FILL_WAIT:g} s: "
                    f"{os.getxattr(path, 'user.rangefs.blocks_cached')!r} blocks cached\n"
                    f"{mount.stderr()[-3000:]}"
                )
                time.sleep(0.05)
            gets = len(origin.gets("/obj"))
            while data:
                data = fh.read(MIB)
                content.check("/obj", done, data)
                done += len(data)
        assert done == FIT_SIZE
        assert len(origin.gets("/obj")) == gets  # the fill had it all
        use = disk_use(cache)
        log = mount.stderr()
    assert not not_fit_lines(log), not_fit_lines(log)
    assert FIT_SIZE <= use <= 512 * MIB + EVICTION_MARGIN, use
    assert origin.bytes_sent("/obj") <= FIT_SIZE + 8 * MIB  # once, give or take a race


# -- 5. two objects, LRU --------------------------------------------------------------------

PAIR_SIZE = 200 * MIB
PAIR_BUDGET = 256 * MIB
PAIR_CHUNK = 8 * MIB


def fetched(requests: list[Request], start: int, stop: int) -> int:
    """Bytes of ``[start, stop)`` that the GETs among ``requests`` asked for (a range
    asked twice counts twice; no Range: the whole object)."""
    total = 0
    for req in requests:
        if req.method != "GET":
            continue
        spec = (req.range or "bytes=0-").removeprefix("bytes=")
        first, _, last = spec.partition("-")
        lo, hi = int(first), int(last) + 1 if last else 1 << 62
        total += max(0, min(hi, stop) - max(lo, start))
    return total


def test_two_objects_read_alternately_share_the_budget_lru(
    tmp_path: Path, mnt: Path, fs: Path, origin: FaultServer
) -> None:
    """Two 200 MiB objects, --cache-size 256M, --prefetch none, read alternately 8 MiB at a
    time (each through its own sequential handle), the first 8 MiB of /a read again after
    every pair (the kernel's pages dropped: the re-reads reach the mount). Every byte
    exact, the disk use within budget + margin, and, from the ranges the origin was asked
    for:

    - the often re-read start of /a is fetched once in all (LRU keeps what is used; FIFO
      would evict it as the oldest stored and fetch it again);
    - re-reading what was read last (the end of each object) and the start of /a costs
      the origin nothing;
    - the second 8 MiB of /a, read once early, was evicted and is fetched again (the
      budget did bite, and these re-reads do reach the mount)."""
    # what must go: all 400 MiB minus budget and margin, at least /b's first chunk and
    # /a's second (the least recently used two)
    assert 2 * PAIR_SIZE - PAIR_BUDGET - EVICTION_MARGIN >= 3 * PAIR_CHUNK
    origin.add("/a", PAIR_SIZE)
    origin.add("/b", PAIR_SIZE)
    urls = write_list(tmp_path / "r.urls", [f"{origin.url(p)} {p[1:]} size={PAIR_SIZE}"
                                            for p in ("/a", "/b")])
    cache = fs / "cache"
    last = PAIR_SIZE - PAIR_CHUNK
    with mounted(urls, mnt, "--cache-size", "256M", "--prefetch", "none",
                 cache_dir=cache) as mount, Sampler(lambda: disk_use(cache)) as use:
        fds = {p: os.open(mnt / p[1:], os.O_RDONLY) for p in ("/a", "/b")}
        touch = os.open(mnt / "a", os.O_RDONLY)
        try:
            for offset in range(0, PAIR_SIZE, PAIR_CHUNK):
                for p in ("/a", "/b"):
                    pread_exact(fds[p], p, offset, PAIR_CHUNK)
                read_back(touch, "/a", 0, PAIR_CHUNK)
            for p in ("/a", "/b"):
                os.posix_fadvise(fds[p], 0, 0, os.POSIX_FADV_DONTNEED)
            since = len(origin.log)
            read_back(fds["/a"], "/a", last, PAIR_CHUNK)
            read_back(fds["/b"], "/b", last, PAIR_CHUNK)
            read_back(touch, "/a", 0, PAIR_CHUNK)
            recent = origin.log[since:]
            kept = {
                "end of /a": fetched([r for r in recent if r.path == "/a"], last, PAIR_SIZE),
                "end of /b": fetched([r for r in recent if r.path == "/b"], last, PAIR_SIZE),
                "start of /a": fetched([r for r in recent if r.path == "/a"], 0, PAIR_CHUNK),
            }
            since = len(origin.log)
            read_back(touch, "/a", PAIR_CHUNK, PAIR_CHUNK)
            refetched = fetched([r for r in origin.log[since:] if r.path == "/a"],
                                PAIR_CHUNK, 2 * PAIR_CHUNK)
        finally:
            for fd in (*fds.values(), touch):
                os.close(fd)
        log = mount.stderr()
    start_of_a = fetched(origin.requests("/a"), 0, PAIR_CHUNK)
    print(f"\ncache max {use.max / MIB:.1f} MiB over {len(use.values)} samples (budget "
          f"{PAIR_BUDGET / MIB:.0f} + margin {EVICTION_MARGIN / MIB:.1f} MiB); origin sent "
          f"{origin.bytes_sent() / MIB:.0f} MiB for {2 * PAIR_SIZE / MIB:.0f}; start of /a "
          f"fetched {start_of_a / MIB:.1f} MiB in all; re-reads of recent ranges fetched "
          f"{kept}; /a's second chunk fetched again {refetched / MIB:.1f} MiB")
    assert use.max <= PAIR_BUDGET + EVICTION_MARGIN, (use.max, sorted(use.values)[-5:])
    assert start_of_a == PAIR_CHUNK, f"the start of /a was fetched {start_of_a} bytes"
    assert kept == dict.fromkeys(kept, 0), kept
    assert refetched > 0, "the second chunk of /a was not evicted (or the re-read did not " \
                          "reach the mount)"
    assert not not_fit_lines(log)  # --prefetch none: no fill, nothing to say

"""Load (issue 5): 16 threads of random and sequential ``pread`` over 8 objects of a real
mount while background fill runs, against an origin in its own process.

Asserted: every read returns exactly the origin's bytes; no thread is ever stuck (each read
is bounded by --read-timeout, the run by a watchdog); no block is fetched twice (the origin
logs every request and writes its log at exit); the mount logs no warning; the peak RSS of
the rangefs process stays under a generous bound. Measured (2 cores, shared): VmHWM
~60 MiB for 8 x 32 MiB objects, 1 MiB blocks (printed with ``pytest -s``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import content
from tests.mountutil import ROOT, child_env, mounted, write_list

OBJECTS = 8
SIZE = 32 << 20
BS = 1 << 20  # the readers' unit of size
CACHE_BS = 64 << 10  # rangefs's default --block-size: the unit a block is fetched once in
READERS = 16
DURATION = 60.0  # seconds of reading (issue 5: 60 s)
GET_DELAY_MS = 500  # every request waits this long at the origin: fill takes ~16 s
READ_TIMEOUT = 30.0  # rangefs --read-timeout: a stuck read becomes EIO, never a hang
RSS_LIMIT = 300 << 20

# The origin of tests/faultserver.py in a process of its own (so that its threads do not
# compete with the readers for this process's GIL), keeping its request log, which it
# writes as JSON when it gets SIGTERM.
ORIGIN = """
import json, signal, sys
from tests.faultserver import FaultServer
objects, size, delay_ms, log_path = sys.argv[1:]
server = FaultServer(delay=float(delay_ms) / 1000)
for i in range(int(objects)):
    server.add(f"/objects/{i}", int(size))
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
with server:
    print(f"PORT {server.port}", flush=True)
    signal.sigwait({signal.SIGTERM})
    log = [[r.method, r.path, r.range, r.status, r.bytes_sent] for r in server.log]
with open(log_path, "w") as f:
    json.dump(log, f)
"""


@dataclass
class Origin:
    port: int
    process: subprocess.Popen[str]
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> list[tuple[str, str, str | None, int | None, int]]:
        """SIGTERM, wait, and return its request log: (method, path, range, status, bytes)."""
        self.process.terminate()
        assert self.process.wait(30) == 0
        return [tuple(r) for r in json.loads(self.log_path.read_text())]


@pytest.fixture
def origin_process(tmp_path: Path) -> Iterator[Origin]:
    log_path = tmp_path / "origin-log.json"
    process = subprocess.Popen(
        [sys.executable, "-c", ORIGIN, str(OBJECTS), str(SIZE), str(GET_DELAY_MS),
         str(log_path)],
        cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("PORT "), line
        yield Origin(int(line.split()[1]), process, log_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@dataclass
class Stats:
    reads: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    longest: float = 0.0  # seconds, the slowest single pread
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int, seconds: float) -> None:
        with self.lock:
            self.reads += 1
            self.bytes += n
            self.longest = max(self.longest, seconds)


def reader(mnt: Path, seed: int, deadline: float, stats: Stats, beats: dict[int, float]) -> None:
    """Random and sequential preads until ``deadline``; every byte checked."""
    rng = random.Random(seed)
    sequential = seed % 2 == 0
    fds = [os.open(mnt / str(i), os.O_RDONLY) for i in range(OBJECTS)]
    try:
        while time.monotonic() < deadline and not stats.errors:
            i = rng.randrange(OBJECTS)
            key = f"/objects/{i}"
            if sequential:  # a whole pass over one object, from a random start
                offset = rng.randrange(0, SIZE, 4096)
                chunk = rng.choice([64 << 10, 128 << 10, 1 << 20])
                stop = min(SIZE, offset + rng.randrange(1, 8) * BS)
            else:
                offset = rng.randrange(SIZE + 10)
                chunk = rng.choice([1, 4096, 100_000, BS, BS + 1, 3 * BS])
                stop = offset + chunk
            while offset < stop and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    data = os.pread(fds[i], chunk, offset)
                except OSError as exc:
                    stats.errors.append(f"pread {key} [{offset}+{chunk}]: {exc}")
                    return
                stats.add(len(data), time.monotonic() - started)
                beats[seed] = time.monotonic()
                want = max(0, min(chunk, SIZE - offset))
                if len(data) != want:
                    stats.errors.append(f"{key} [{offset}+{chunk}]: {len(data)} bytes, not {want}")
                    return
                try:
                    content.check(key, offset, data)
                except AssertionError as exc:
                    stats.errors.append(str(exc))
                    return
                offset += chunk
    finally:
        for fd in fds:
            os.close(fd)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) * 1024
    return out


@pytest.mark.slow
def test_16_readers_8_objects_with_background_fill(
    tmp_path: Path, origin_process: Origin
) -> None:
    entries = [f"{origin_process.url(f'/objects/{i}')} {i}" for i in range(OBJECTS)]
    urls = write_list(tmp_path / "r.urls", entries)
    mnt = tmp_path / "mnt"
    args = ("--concurrency", "2", "--read-timeout", str(READ_TIMEOUT),
            "--block-size", str(CACHE_BS))  # prefetch: open
    stats = Stats()
    beats: dict[int, float] = {}
    rss: list[int] = []
    with mounted(urls, mnt, *args, cache_dir=tmp_path / "cache") as mount:
        deadline = time.monotonic() + DURATION
        threads = [
            threading.Thread(target=reader, args=(mnt, n, deadline, stats, beats), daemon=True)
            for n in range(READERS)
        ]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            rss.append(memory(mount.pid)["VmRSS"])
            # watchdog: a read may wait READ_TIMEOUT at most, then it fails (EIO)
            assert time.monotonic() < deadline + READ_TIMEOUT + 30, "readers are stuck"
            time.sleep(0.5)
        for thread in threads:
            thread.join()
        assert stats.errors == [], stats.errors[:5]
        for i in range(OBJECTS):  # the background fill completed every object
            limit = time.monotonic() + 30
            while os.getxattr(mnt / str(i), "user.rangefs.complete") != b"1":
                assert time.monotonic() < limit, f"object {i} never complete"
                time.sleep(0.2)
        peak = memory(mount.pid)["VmHWM"]
    log = origin_process.stop()
    print(
        f"\nload: {stats.reads} preads, {stats.bytes / (1 << 20):.0f} MiB read and checked "
        f"in {DURATION:g} s by {READERS} threads; slowest pread {stats.longest:.2f} s; "
        f"rangefs VmHWM {peak / (1 << 20):.1f} MiB, VmRSS max sampled "
        f"{max(rss) / (1 << 20):.1f} MiB"
    )
    assert len(beats) == READERS and stats.reads > 1000
    fetched: Counter[tuple[str, int]] = Counter()
    for method, path, rng, status, sent in log:
        if method != "GET":
            continue
        assert status == 206, (path, rng, status)
        start, _, end = (rng or "").removeprefix("bytes=").partition("-")
        assert sent == int(end) - int(start) + 1
        for block in range(int(start) // CACHE_BS, int(end) // CACHE_BS + 1):
            fetched[(path, block)] += 1
    twice = [k for k, n in fetched.items() if n > 1]
    assert not twice, f"fetched more than once: {twice[:10]}"
    assert len(fetched) == OBJECTS * SIZE // CACHE_BS  # ... and every block once
    assert peak < RSS_LIMIT, f"rangefs VmHWM {peak} bytes"

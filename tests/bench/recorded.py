"""Recorded prefetch (issue 19): a cold start with and without ``--prefetch-list``.

``python -m tests.bench.recorded [--runs N] [--delay-ms MS]``: the in-process test origin
(tests/faultserver.py) answers every request after ``--delay-ms`` (30 ms: a far-away
store) and serves a 256 MiB "model". The workload is what a tool loading a model does
first: read the 64 KiB header, then 24 tensors of 1 MiB at scattered offsets, one after
another, through the mount (``FADV_RANDOM``: no kernel read-ahead). A first mount runs it
with ``--record``; then, alternately, a mount with an empty cache runs it without the list
and one with ``--prefetch-list`` (the list is played from mount time, the workload starts
as soon as the mount is ready). Printed: time from mount-ready to the workload's end, and
the origin's requests over that time; medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.faultserver import FaultServer
from tests.mountutil import mounted, write_list

SIZE = 256 << 20
TENSOR = 1 << 20


def _offsets() -> list[tuple[int, int]]:
    rng = random.Random(19)
    tensors = sorted(rng.sample(range(1, SIZE // TENSOR - 1), 24))
    rng.shuffle(tensors)  # a loader reads them in its own order, not the file's
    return [(0, 64 << 10)] + [(t * TENSOR, TENSOR) for t in tensors]


def _workload(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset, size in _offsets():
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise RuntimeError(f"short read at {offset}")
    finally:
        os.close(fd)


def _run(work: Path, origin: FaultServer, urls: Path, name: str, *args: str) -> tuple[float, int]:
    """Seconds from mount-ready to the workload's end, and origin requests meanwhile."""
    mnt, cache = work / f"mnt-{name}", work / f"cache-{name}"
    with mounted(urls, mnt, "--prefetch", "none", *args, cache_dir=cache, check_log=False):
        origin.reset_log()
        started = time.monotonic()
        _workload(mnt / "model.bin")
        seconds = time.monotonic() - started
        requests = len(origin.gets())
    subprocess.run(["rm", "-rf", str(cache)], check=False)
    return seconds, requests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.recorded", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--delay-ms", type=float, default=30.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rangefs-recorded-") as tmp, \
            FaultServer(delay=args.delay_ms / 1000, keep_log=True) as origin:
        work = Path(tmp)
        origin.add("/model.bin", SIZE)
        urls = write_list(work / "m.urls", [f"{origin.url('/model.bin')} model.bin"])
        record = work / "model.jsonl"
        _run(work, origin, urls, "record", "--record", str(record))
        lines = len(record.read_text().splitlines())
        cold, listed = [], []
        for i in range(args.runs):
            cold.append(_run(work, origin, urls, f"cold{i}"))
            listed.append(_run(work, origin, urls, f"list{i}", "--prefetch-list", str(record)))
    c = statistics.median(s for s, _ in cold)
    p = statistics.median(s for s, _ in listed)
    print(f"workload: 64 KiB header + 24 x 1 MiB tensors of a 256 MiB file, origin delay "
          f"{args.delay_ms:g} ms; the recorded list has {lines} lines; medians of {args.runs}")
    print(f"  cold, no list:          {c:6.3f} s, {statistics.median(r for _, r in cold):.0f} "
          "origin requests")
    print(f"  cold, --prefetch-list:  {p:6.3f} s, {statistics.median(r for _, r in listed):.0f} "
          "origin requests")
    print(f"  speed-up: {c / p:.1f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

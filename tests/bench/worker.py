"""Reads a file system is measured with, run in a child process so that a hung FUSE peer
can be killed by a timeout instead of hanging the benchmark.

``python -m tests.bench.worker JSON`` where JSON is ``{"op": ..., ...}``; prints one JSON
object on stdout. Times are ``time.perf_counter`` seconds around the system calls only.

ops:
  read     {"path", "chunk", "limit_s"}  sequential read()s to EOF (or until limit_s):
           {"bytes", "seconds"}
  ttfb     {"path"}  open + read(1) (what ``head -c 1`` does): {"seconds"}
  pread    {"path", "count", "size", "seed"}  cold random preads at size-aligned offsets:
           {"latencies": [...], "bytes"}
  readers  {"jobs": [[path, start, end], ...], "chunk"}  one thread per job, sequential
           preads of ``chunk`` bytes over [start, end): {"seconds", "bytes", "latencies"}
  safetensors {"path"}  load every tensor (safetensors + numpy): {"seconds", "tensors",
           "digest"} (sha256 of the tensors' bytes in name order, after the clock)
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from typing import Any


def op_read(path: str, chunk: int, limit_s: float | None = None) -> dict[str, Any]:
    buf = bytearray(chunk)
    total = 0
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        with open(fd, "rb", buffering=0, closefd=False) as fh:
            while True:
                n = fh.readinto(buf)
                if not n:
                    break
                total += n
                if limit_s is not None and time.perf_counter() - start > limit_s:
                    break
    finally:
        os.close(fd)
    return {"bytes": total, "seconds": time.perf_counter() - start}


def op_ttfb(path: str) -> dict[str, Any]:
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    data = os.read(fd, 1)
    elapsed = time.perf_counter() - start
    os.close(fd)
    return {"seconds": elapsed, "bytes": len(data)}


def op_pread(path: str, count: int, size: int, seed: int) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        rng = random.Random(seed)
        slots = file_size // size
        offsets = [rng.randrange(slots) * size for _ in range(count)]
        latencies = []
        total = 0
        for offset in offsets:
            start = time.perf_counter()
            data = os.pread(fd, size, offset)
            latencies.append(time.perf_counter() - start)
            total += len(data)
    finally:
        os.close(fd)
    return {"latencies": latencies, "bytes": total}


def op_readers(jobs: list[list[Any]], chunk: int) -> dict[str, Any]:
    latencies: list[float] = []
    totals: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    # open every file first, one at a time and untimed (httpdirfs loses concurrent first
    # opens of one file: "Cache file partially missing", ENOENT)
    fds = [os.open(path, os.O_RDONLY) for path, _, _ in jobs]
    barrier = threading.Barrier(len(jobs) + 1)

    def reader(fd: int, path: str, first: int, end: int) -> None:
        mine: list[float] = []
        total = 0
        offset = first
        barrier.wait()
        try:
            while offset < end:
                t0 = time.perf_counter()
                data = os.pread(fd, min(chunk, end - offset), offset)
                mine.append(time.perf_counter() - t0)
                if not data:
                    break
                offset += len(data)
                total += len(data)
        except OSError as exc:
            errors.append(f"{path}@{offset}: {exc}")
        with lock:
            latencies.extend(mine)
            totals.append(total)

    threads = [threading.Thread(target=reader, args=(fd, *job))
               for fd, job in zip(fds, jobs, strict=True)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    for fd in fds:
        os.close(fd)
    return {"seconds": seconds, "bytes": sum(totals), "latencies": latencies, "errors": errors}


def op_safetensors(path: str) -> dict[str, Any]:
    """Load every tensor of a safetensors file with numpy (what loading a checkpoint does);
    the sha256 of the tensors' bytes in name order is computed after the clock stopped."""
    import hashlib

    from safetensors import safe_open

    start = time.perf_counter()
    with safe_open(path, framework="np") as fh:
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(tensors[name].tobytes())
    return {"seconds": seconds, "tensors": len(tensors), "digest": digest.hexdigest()}


def main() -> None:
    args = json.loads(sys.argv[1])
    op = args.pop("op")
    result = {"read": op_read, "ttfb": op_ttfb, "pread": op_pread, "readers": op_readers,
              "safetensors": op_safetensors}[op](**args)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()

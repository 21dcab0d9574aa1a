"""A memory-mapped reader touching every page in random order, cold, against a cold ``cp``
(issue 20, item 3).

``python -m tests.bench.mmaprandom [--runs N] [--madv-random] [--code DIR]`` (root: it
drops the page cache). The emulated store of the benchmark (``origin.py``: nginx + lua,
30 ms first-byte delay, 16 MiB/s per connection) serves a 256 MiB object; rangefs mounts
it with its defaults (plus ``--mount-args``), a fresh cache directory and mount for every
measurement, the page cache dropped before each:

- ``cp``: ``cp`` of the file to /dev/null;
- ``mmap``: a reader (a child process) that maps the file and reads one byte of every
  4 KiB page in a random permutation order;
- ``mmap+MADV_RANDOM`` (``--madv-random``): the same after ``madvise(MADV_RANDOM)``
  (the kernel then faults one page at a time: no read-around).

Printed per workload, medians of ``--runs`` (the runs are interleaved): seconds, the
ratio to ``cp``, origin requests and bytes over the measurement (nginx's access log, until
it has held still: a fill may go on after the reader is done), FUSE reads the daemon
answered (``rangefs status``), the daemon's CPU seconds, and whether the object was
complete in the cache at the end. Every touched byte is checked against the origin's file.

``--code DIR``: the rangefs source tree the daemon runs (its PYTHONPATH; default: this
one), so that another revision is measured with the same harness, e.g. ``git worktree
add /tmp/before main`` then ``--code /tmp/before``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.content import iter_content

from .origin import Origin
from .system import daemon_cpu_seconds, drop_page_cache, unmount, wait_mounted

SIZE = 256 << 20
PAGE = 4096
KEY = "bench-mmaprandom"
ROOT = Path(__file__).resolve().parents[2]
RANGEFS = Path(sys.executable).parent / "rangefs"
READER_TIMEOUT = 600.0


def touch_pages(path: str, seed: int, *, madv_random: bool) -> tuple[float, int]:
    """Map ``path`` and read one byte of every page (at its start) in a random order
    (``seed``): (seconds, sum of the bytes read)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        pages = list(range((size + PAGE - 1) // PAGE))
        random.Random(seed).shuffle(pages)
        started = time.monotonic()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if madv_random:
                m.madvise(mmap.MADV_RANDOM)
            total = 0
            for page in pages:
                total += m[page * PAGE]
        return time.monotonic() - started, total


def page_sum(path: Path) -> int:
    """The sum of the first byte of every page of ``path`` (what :func:`touch_pages`
    must find)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return sum(m[::PAGE])


@dataclass
class Result:
    seconds: float
    requests: int
    mib_sent: float
    reads: int
    cpu: float
    complete: bool


@contextmanager
def _mount(urls: Path, work: Path, tag: str, code: Path,
           extra: Sequence[str]) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    mnt, cache = work / f"mnt-{tag}", work / f"cache-{tag}"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(code))
    env.pop("NOTIFY_SOCKET", None)
    with open(work / f"{tag}.log", "wb") as err:
        proc = subprocess.Popen(
            [str(RANGEFS), "mount", "--foreground", "--cache-dir", str(cache), *extra,
             str(urls), str(mnt)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, start_new_session=True,
        )
    try:
        if not wait_mounted(mnt, proc, 60):
            raise SystemExit(f"mount {tag} failed: {(work / f'{tag}.log').read_text()[-1500:]}")
        os.stat(mnt / "obj.bin")  # ready: the tree answers
        yield mnt, proc
    finally:
        unmount(mnt, proc)
        subprocess.run(["rm", "-rf", str(cache), str(mnt)], check=False)


def _status(mnt: Path, code: Path) -> tuple[int, bool]:
    """(FUSE reads answered, object complete) of the mount at ``mnt``."""
    env = dict(os.environ, PYTHONPATH=str(code))
    out = subprocess.run([str(RANGEFS), "status", "--json", str(mnt)], capture_output=True,
                         text=True, env=env, check=False, timeout=60)
    reads = -1
    try:
        doc = json.loads(out.stdout)
        first = doc[0] if isinstance(doc, list) else doc
        stats = first.get("stats", first)
        reads = int(stats.get("reads", -1))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        pass
    complete = os.getxattr(mnt / "obj.bin", "user.rangefs.complete") == b"1"
    return reads, complete


def _measure(kind: str, origin: Origin, urls: Path, work: Path, tag: str, code: Path,
             extra: Sequence[str], seed: int, expected: int) -> Result:
    with _mount(urls, work, tag, code, extra) as (mnt, proc):
        drop_page_cache()
        mark = origin.mark()
        cpu0 = daemon_cpu_seconds(proc.pid)
        path = str(mnt / "obj.bin")
        if kind == "cp":
            started = time.monotonic()
            subprocess.run(["cp", path, "/dev/null"], check=True, timeout=READER_TIMEOUT)
            seconds = time.monotonic() - started
        else:
            out = subprocess.run(
                [sys.executable, "-m", "tests.bench.mmaprandom", "--touch", path,
                 "--seed", str(seed), *(["--madv-random"] if kind != "mmap" else [])],
                check=True, timeout=READER_TIMEOUT, capture_output=True, text=True,
                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )
            seconds_text, total_text = out.stdout.split()
            seconds = float(seconds_text)
            if int(total_text) != expected:
                raise SystemExit(f"{tag}: wrong bytes: sum {total_text}, expected {expected}")
        traffic = origin.sent_since(mark, hold=1.0)  # a fill may still be running
        reads, complete = _status(mnt, code)
        cpu = daemon_cpu_seconds(proc.pid) - cpu0
    return Result(seconds, traffic.requests, traffic.bytes_sent / (1 << 20), reads, cpu,
                  complete)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.mmaprandom", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--madv-random", action="store_true",
                    help="also measure the reader with MADV_RANDOM")
    ap.add_argument("--code", type=Path, default=ROOT,
                    help="rangefs source tree the daemon runs (default: this one)")
    ap.add_argument("--mount-args", default="", help="extra rangefs mount options")
    ap.add_argument("--delay-ms", type=float, default=30.0)
    ap.add_argument("--rate", default="16m")
    ap.add_argument("--touch", help=argparse.SUPPRESS)  # the reader child
    ap.add_argument("--seed", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.touch:
        seconds, total = touch_pages(args.touch, args.seed, madv_random=args.madv_random)
        print(f"{seconds:.6f} {total}")
        return 0
    if os.geteuid() != 0:
        raise SystemExit("mmaprandom: run as root (it drops the page cache)")
    kinds = ["cp", "mmap"] + (["mmap+MADV_RANDOM"] if args.madv_random else [])
    extra = shlex.split(args.mount_args)
    results: dict[str, list[Result]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="rangefs-mmap-", dir="/var/tmp") as tmp, \
            tempfile.TemporaryDirectory(prefix="rangefs-mmap-origin-", dir="/dev/shm") as shm:
        work, root = Path(tmp), Path(shm)
        root.chmod(0o755)  # nginx's workers read it
        (root / "mm").mkdir()
        obj = root / "mm" / "obj.bin"
        with open(obj, "wb") as fh:
            for offset in range(0, SIZE, 64 << 20):
                fh.write(b"".join(iter_content(KEY, offset, min(64 << 20, SIZE - offset))))
        expected = page_sum(obj)
        urls = work / "mm.urls"
        with Origin(root, work / "origin", delay_s=args.delay_ms / 1000,
                    rate=args.rate) as origin:
            urls.write_text(f"{origin.url('/mm/obj.bin')} obj.bin size={SIZE}\n")
            for run in range(args.runs):
                for kind in kinds:
                    tag = f"{kind.replace('+', '-')}-{run}"
                    r = _measure(kind, origin, urls, work, tag, args.code, extra,
                                 args.seed + run, expected)
                    results[kind].append(r)
                    print(f"[mmaprandom] run {run} {kind}: {r.seconds:.3f} s, "
                          f"{r.requests} requests, {r.mib_sent:.1f} MiB, {r.reads} reads, "
                          f"daemon CPU {r.cpu:.2f} s, complete {r.complete}", flush=True)
    cp = statistics.median(r.seconds for r in results["cp"])
    print(f"\n256 MiB object, origin delay {args.delay_ms:g} ms, {args.rate}/connection; "
          f"daemon code {args.code}; mount args {args.mount_args or '(defaults)'}; "
          f"medians of {args.runs}")
    print("| workload | seconds | ÷ cp | origin requests | origin MiB | FUSE reads "
          "| daemon CPU s | complete |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        rs = results[kind]
        sec = statistics.median(r.seconds for r in rs)
        print(f"| {kind} | {sec:.2f} | {sec / cp:.2f} | "
              f"{statistics.median(r.requests for r in rs):.0f} | "
              f"{statistics.median(r.mib_sent for r in rs):.0f} | "
              f"{statistics.median(r.reads for r in rs):.0f} | "
              f"{statistics.median(r.cpu for r in rs):.2f} | "
              f"{sum(r.complete for r in rs)}/{len(rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

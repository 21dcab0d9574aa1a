"""What a pyfuse3 daemon can do at best on this machine, beside rangefs (issue 20, items 1
and 4: the ceilings of a cold ``cp`` through a mount and of a re-read after the page cache
was dropped).

``python -m tests.bench.fuseceiling [--size MIB] [--runs N] [--workdir DIR]`` (root: it
drops the page cache and sets the mounts' read-ahead). One object, three ways to read it
sequentially (``cat`` to /dev/null), the runs interleaved, medians:

- ``disk``: the object's local file, no FUSE;
- ``minimal``: the least a pyfuse3 daemon can do: :func:`serve`, one file whose ``read()``
  is one ``os.pread`` of the local file on the trio thread (no cache, no network);
- ``rangefs``: a rangefs mount of the object (the bench origin's uncapped link, defaults,
  filled by a first read before the measurements).

Two conditions: ``resident``, the backing file (the local file, rangefs's cache file) in
the page cache and the FUSE file's own pages dropped (``POSIX_FADV_DONTNEED``), so every
read goes through the daemon and none to the disk; ``dropped``, the whole page cache
dropped, as scenario 2 does. Printed: MiB/s and the daemon's CPU seconds per GiB.

Then the start floor of a ``rangefs download``: ``rangefs --version`` (the interpreter and
every module a download imports) beside ``python -c pass``.

``--code DIR`` adds a fourth way, ``rangefs@DIR``: a mount of the same object by the rangefs
source tree in DIR (its PYTHONPATH), measured in the same runs, e.g. ``git worktree add
/tmp/before main`` then ``--code /tmp/before``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .origin import Origin, _write_content
from .system import daemon_cpu_seconds, drop_page_cache, unmount, wait_mounted

RANGEFS = Path(sys.executable).parent / "rangefs"
READ_AHEAD_KB = 1024  # as rangefs sets its mounts'


def serve(source: str, mountpoint: str) -> None:
    """Mount ``source`` (a local file) as ``mountpoint/f`` until unmounted. Foreground."""
    import pyfuse3
    import trio

    class OneFile(pyfuse3.Operations):
        def __init__(self) -> None:
            super().__init__()
            self.fd = os.open(source, os.O_RDONLY)
            self.size = os.fstat(self.fd).st_size

        async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
            attr = pyfuse3.EntryAttributes()
            if inode == pyfuse3.ROOT_INODE:
                attr.st_mode, attr.st_size = stat.S_IFDIR | 0o755, 0
            elif inode == 2:
                attr.st_mode, attr.st_size = stat.S_IFREG | 0o444, self.size
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
            attr.st_ino, attr.entry_timeout, attr.attr_timeout = inode, 300, 300
            return attr

        async def lookup(self, parent: int, name: bytes, ctx: object = None
                         ) -> pyfuse3.EntryAttributes:
            if parent == pyfuse3.ROOT_INODE and name == b"f":
                return await self.getattr(2)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode: int, ctx: object) -> int:
            return inode

        async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
            if start_id == 0:
                pyfuse3.readdir_reply(token, b"f", await self.getattr(2), 1)

        async def open(self, inode: int, flags: int, ctx: object) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            return os.pread(self.fd, size, off)

    async def run() -> None:
        options = set(pyfuse3.default_options) | {"fsname=fuseceiling"}
        pyfuse3.init(OneFile(), mountpoint, options)
        try:
            await pyfuse3.main()
        finally:
            pyfuse3.close()

    trio.run(run)


def _raise_read_ahead(mountpoint: Path) -> None:
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    path.write_text(f"{READ_AHEAD_KB}\n")


def _drop_file_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cat(path: Path, pid: int | None) -> tuple[float, float | None]:
    """Read ``path`` with cat: (MiB/s, CPU seconds per GiB of the daemon ``pid``)."""
    size = path.stat().st_size
    before = daemon_cpu_seconds(pid) if pid else 0.0
    start = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True, timeout=600)
    seconds = time.perf_counter() - start
    cpu = (daemon_cpu_seconds(pid) - before) / (size / (1 << 30)) if pid else None
    return size / (1 << 20) / seconds, cpu


@contextmanager
def _mounted(argv: list[str], mountpoint: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run the daemon ``argv`` (its output in ``mountpoint``.log) until unmounted."""
    with open(f"{mountpoint}.log", "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    try:
        if not wait_mounted(mountpoint, proc, 30):
            raise SystemExit(f"fuseceiling: {argv[0]} did not mount {mountpoint} "
                             f"(see {mountpoint}.log)")
        _raise_read_ahead(mountpoint)
        yield proc
    finally:
        unmount(mountpoint, proc)


def _median_of(runs: list[tuple[float, float | None]]) -> str:
    rate = statistics.median(r for r, _ in runs)
    cpus = [c for _, c in runs if c is not None]
    return f"{rate:.0f} | {statistics.median(cpus):.2f}" if cpus else f"{rate:.0f} | –"


def _start_floor(runs: int) -> tuple[float, float]:
    def timed(argv: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, timeout=60)
        return time.perf_counter() - start

    bare = statistics.median(timed([sys.executable, "-c", "pass"]) for _ in range(runs))
    full = statistics.median(timed([str(RANGEFS), "--version"]) for _ in range(runs))
    return bare, full


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.fuseceiling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="object size, MiB (256)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (5)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the object, the cache and the mounts go (on the disk "
                             "rangefs's cache uses; its parents readable by nginx's workers; "
                             "default: a new directory under /var/tmp)")
    parser.add_argument("--code", type=Path, default=None,
                        help="also measure a mount by the rangefs source tree in CODE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("fuseceiling: run as root (it drops the page cache)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fuseceiling-", dir="/var/tmp"))
    root = work / "root"
    (root / "seq").mkdir(parents=True, exist_ok=True)
    for directory in (work, root, root / "seq"):
        directory.chmod(0o755)  # nginx's workers (www-data) read the object
    source = root / "seq" / "big.bin"
    size = args.size << 20
    if not source.exists() or source.stat().st_size != size:
        _write_content(source, f"fuseceiling-{size}", size)
    mp_min, mp_rfs = work / "minimal", work / "rangefs"
    for mp in (mp_min, mp_rfs):
        mp.mkdir(exist_ok=True)
    results: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
    with Origin(root, work / "origin", delay_s=0.03, rate="16m") as origin:
        (work / "list").write_text(origin.url("/seq/big.bin", "fast") + "\n")
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))
        minimal = [sys.executable, "-c", f"from tests.bench.fuseceiling import serve; "
                   f"serve({str(source)!r}, {str(mp_min)!r})"]
        rangefs = [str(RANGEFS), "mount", "-f", "--cache-dir", str(cache),
                   str(work / "list"), str(mp_rfs)]
        with contextlib.ExitStack() as mounts:
            pmin = mounts.enter_context(_mounted(minimal, mp_min))
            prfs = mounts.enter_context(_mounted(rangefs, mp_rfs))
            ways = {"disk": (source, None, source), "minimal": (mp_min / "f", pmin.pid, source),
                    "rangefs": (mp_rfs / "big.bin", prfs.pid, None)}
            if args.code is not None:
                mp_other = work / "other"
                mp_other.mkdir(exist_ok=True)
                other = ["env", f"PYTHONPATH={args.code.resolve()}", sys.executable, "-m",
                         "rangefs.cli", "mount", "-f", "--cache-dir",
                         tempfile.mkdtemp(prefix="cache-", dir=work), str(work / "list"),
                         str(mp_other)]
                pother = mounts.enter_context(_mounted(other, mp_other))
                ways[f"rangefs@{args.code}"] = (mp_other / "big.bin", pother.pid, None)
            for way, (path, _, _) in ways.items():
                if way.startswith("rangefs"):
                    _cat(path, None)  # the fill
            for run in range(args.runs):
                print(f"[fuseceiling] run {run + 1} of {args.runs}", file=sys.stderr)
                for way, (path, pid, backing) in ways.items():
                    if way != "disk":
                        subprocess.run(["cat", str(backing or path)], check=True,
                                       stdout=subprocess.DEVNULL)  # backing file resident
                        _drop_file_pages(path)
                        results.setdefault((way, "resident"), []).append(_cat(path, pid))
                    drop_page_cache()
                    results.setdefault((way, "dropped"), []).append(_cat(path, pid))
    bare, full = _start_floor(args.runs)
    print(f"\nOne {args.size} MiB object read with cat, medians of {args.runs} interleaved "
          "runs; CPU: the daemon's seconds per GiB read.\n")
    print("| read | backing file resident, MiB/s | CPU s/GiB | page cache dropped, MiB/s "
          "| CPU s/GiB |")
    print("|---|---|---|---|---|")
    for way in ways:
        resident = _median_of(results[(way, "resident")]) if way != "disk" else "– | –"
        print(f"| {way} | {resident} | {_median_of(results[(way, 'dropped')])} |")
    print(f"\nStart floor: `python -c pass` {bare * 1000:.0f} ms, `rangefs --version` "
          f"{full * 1000:.0f} ms (the interpreter and the imports of a download).")


if __name__ == "__main__":
    main()

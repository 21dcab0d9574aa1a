"""Listed directories (issue 19): ``ls -l`` of one big directory behind an HTML index.

``python -m tests.bench.listing [--files N] [--runs R] [--peers rangefs,rclone,httpdirfs]``:
Debian's nginx (``autoindex on``: exact sizes) serves a directory of N files (sparse, of
assorted sizes) on 127.0.0.1, with no added delay. Each peer mounts the index and runs
``ls -l`` of the directory, cold (a fresh cache), and then again on a remount (rangefs:
from its remembered listing). Printed: the seconds of each ``ls -l``, the requests nginx
answered (and how many were HEAD), and the mount process's RSS afterwards; medians of R.

- rangefs: a list with the one line ``URL/ data``;
- rclone: ``rclone mount :http: --http-url URL`` (its defaults: it asks HEAD of files
  whose size the listing does not give, ``--http-no-head`` off);
- httpdirfs: ``httpdirfs -f URL MNT`` (no cache: ``--cache`` only keeps file data).

Nothing here is a test; run it on demand (as root: it mounts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.indexrig import IndexServer
from tests.mountutil import answers, rangefs_argv, start_mount, unmount, write_list

PEERS = ("rangefs", "rclone", "httpdirfs")
MOUNT_TIMEOUT = 60.0


def _make(root: Path, count: int) -> None:
    directory = root / "d"
    directory.mkdir(parents=True)
    for i in range(count):
        fd = os.open(directory / f"f{i:06d}.bin", os.O_CREAT | os.O_WRONLY, 0o644)
        os.ftruncate(fd, (i * 7919) % 1_000_000)
        os.close(fd)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait(mnt: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the mount at {mnt} exited with {proc.returncode}")
        if os.path.ismount(mnt) and answers(mnt):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{mnt} was not mounted within {MOUNT_TIMEOUT:g} s")


def _start(peer: str, url: str, work: Path, mnt: Path, cache: Path) -> subprocess.Popen[bytes]:
    mnt.mkdir(parents=True, exist_ok=True)
    log = open(work / f"{peer}.log", "ab")  # noqa: SIM115 - closed with the process
    if peer == "rangefs":
        urls = write_list(work / "l.urls", [f"{url} data"])
        return start_mount(urls, mnt, cache_dir=cache, log_path=work / "rangefs.log").process
    if peer == "rclone":
        argv = ["rclone", "mount", ":http:", str(mnt), "--http-url", url, "--read-only",
                "--config", "/dev/null", "--cache-dir", str(cache)]
    else:
        argv = ["httpdirfs", "-f", url, str(mnt)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def _ls(directory: Path) -> tuple[float, int]:
    started = time.monotonic()
    out = subprocess.run(["ls", "-l", str(directory)], check=True, capture_output=True,
                         text=True).stdout
    return time.monotonic() - started, len(out.splitlines()) - 1


def _one(peer: str, server: IndexServer, work: Path) -> list[dict[str, float]]:
    """Cold ``ls -l``, then on a remount: seconds, files listed, requests, HEADs, RSS."""
    cache = work / f"cache-{peer}"
    shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for _ in ("cold", "remount"):
        mnt = work / f"mnt-{peer}"
        before = len(server.access_lines())
        proc = _start(peer, server.url, work, mnt, cache)
        try:
            _wait(mnt, proc)
            top = mnt / "data" / "d" if peer == "rangefs" else mnt / "d"
            seconds, listed = _ls(top)
            rss = _rss_mib(proc.pid)
        finally:
            unmount(mnt)
            proc.terminate()
            proc.wait(30)
        lines = server.access_lines()[before:]
        rows.append({"seconds": seconds, "listed": listed, "requests": len(lines),
                     "heads": sum(1 for ln in lines if ln.startswith("HEAD")), "rss": rss})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peers", default=",".join(PEERS))
    args = parser.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    if os.geteuid() != 0:
        sys.exit("run as root (it mounts)")
    rangefs_argv()  # fails early without the venv
    with tempfile.TemporaryDirectory(prefix="rangefs-listing-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        _make(work / "www", args.files)
        results: dict[str, list[list[dict[str, float]]]] = {p: [] for p in peers}
        with IndexServer("nginx", work / "www", work / "nginx") as server:
            for _ in range(args.runs):
                for peer in peers:  # interleaved: the same machine state for each
                    results[peer].append(_one(peer, server, work))
    print(f"ls -l of one directory of {args.files} files behind nginx autoindex "
          f"(medians of {args.runs})\n")
    print("| peer | cold ls -l, s | requests (HEAD) | remount ls -l, s | requests (HEAD) "
          "| RSS after, MiB | files listed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for peer in peers:
        runs = results[peer]

        def med(i: int, key: str, runs: list[list[dict[str, float]]] = runs) -> float:
            return statistics.median(run[i][key] for run in runs)

        print(f"| {peer} | {med(0, 'seconds'):.2f} | {med(0, 'requests'):.0f} "
              f"({med(0, 'heads'):.0f}) | {med(1, 'seconds'):.2f} | {med(1, 'requests'):.0f} "
              f"({med(1, 'heads'):.0f}) | {med(0, 'rss'):.0f} | {med(0, 'listed'):.0f} |")


if __name__ == "__main__":
    main()

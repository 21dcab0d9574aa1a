"""The embedded default (``bash .ci/dev demo``): a local origin, a mount, cp, verify.

1. start the test origin (tests/faultserver.py) in its own process on 127.0.0.1 with three
   generated objects, a first-byte delay and a 503 on one request in twenty;
2. write a URL list and ``rangefs mount`` it (daemon mode: returns once mounted);
3. ``ls -l``, then ``cp`` the 256 MiB object out and check its sha256, show its xattrs;
4. unmount, STOP the origin, mount again and copy again: every byte comes from the cache;
5. unmount and clean up. Exit 0 only if every check passed.

Options: ``--size 256M`` (the big object), ``--delay-ms 20``, ``--keep`` (leave the work
directory), ``--workdir DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.content import sha256_of

ROOT = Path(__file__).resolve().parent.parent
RANGEFS = [sys.executable, "-m", "rangefs.cli"]


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def parse_size(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) << units[text[-1].upper()]
    return int(text)


def start_origin(
    workdir: Path, objects: dict[str, int], delay_ms: float
) -> tuple[subprocess.Popen[str], int]:
    config = {
        "objects": [{"path": f"/{name}", "size": size, "repr_digest": True}
                    for name, size in objects.items()],
        "fault_probability": [{"path": None, "p": 0.05, "kinds": ["status"], "seed": 7}],
    }
    (workdir / "origin.json").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faultserver", "--port", "0",
         "--config", str(workdir / "origin.json"), "--delay-ms", str(delay_ms)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "PORT":
        proc.kill()
        raise SystemExit("demo: the origin did not start")
    return proc, int(line[1])


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mount(urls: Path, mnt: Path, cache: Path, log: Path) -> None:
    run([*RANGEFS, "mount", "--cache-dir", str(cache), "--log-file", str(log), "-v",
         str(urls), str(mnt)])
    if not os.path.ismount(mnt):
        raise SystemExit(f"demo: {mnt} is not mounted")


def unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        for _ in range(100):
            if not os.path.ismount(mnt):
                break
            time.sleep(0.1)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def copy_with_progress(src: Path, dest: Path, size: int) -> None:
    """``cp SRC DEST`` with a progress line drawn from DEST's growing size."""
    print(f"$ cp {src} {dest}", flush=True)
    proc = subprocess.Popen(["cp", str(src), str(dest)])
    start = time.monotonic()
    while proc.poll() is None:
        time.sleep(0.2)
        done = dest.stat().st_size if dest.exists() else 0
        rate = done / (1 << 20) / max(time.monotonic() - start, 1e-3)
        bar = "#" * int(30 * done / max(size, 1))
        print(f"\r   [{bar:<30}] {done / (1 << 20):7.1f} / {size / (1 << 20):.1f} MiB "
              f"{rate:7.1f} MiB/s", end="", flush=True)
    print()
    if proc.returncode != 0:
        raise SystemExit(f"demo: cp failed with exit code {proc.returncode}")


def copy_and_verify(src: Path, dest: Path, size: int, key: str) -> float:
    start = time.monotonic()
    copy_with_progress(src, dest, size)
    seconds = time.monotonic() - start
    got = sha256_file(dest)
    want = sha256_of(key, size)
    print(f"   {size / (1 << 20):.0f} MiB in {seconds:.2f} s = "
          f"{size / (1 << 20) / seconds:.1f} MiB/s; sha256 {got[:16]}… "
          f"{'matches' if got == want else 'DIFFERS from ' + want[:16]}")
    if got != want:
        raise SystemExit("demo: WRONG BYTES")
    dest.unlink()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256M")
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--workdir")
    args = parser.parse_args(argv)
    big = parse_size(args.size)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rangefs-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    mnt, cache, out = workdir / "mnt", workdir / "cache", workdir / "out"
    log = workdir / "rangefs.log"
    for d in (mnt, out):
        d.mkdir(exist_ok=True)
    objects = {"disk.img": big, "genome.fa": 3 * (1 << 20) + 12345, "README.txt": 4321}
    origin, port = start_origin(workdir, objects, args.delay_ms)
    try:
        say(f"origin on http://127.0.0.1:{port}/ ({args.delay_ms:g} ms first-byte delay, "
            "a 503 on one request in twenty)")
        urls = workdir / "urls.txt"
        urls.write_text(
            "# rangefs demo list: URL [PATH] [digest | size=N]\n"
            f"http://127.0.0.1:{port}/disk.img images/disk.img\n"
            f"http://127.0.0.1:{port}/genome.fa data/genome.fa "
            f"sha256:{sha256_of('/genome.fa', objects['genome.fa'])}\n"
            f"http://127.0.0.1:{port}/README.txt\n"
        )
        print(urls.read_text())
        say("mount")
        mount(urls, mnt, cache, log)
        run(["ls", "-lR", str(mnt)])
        say("cp the big object out of the mount (cold cache)")
        copy_and_verify(mnt / "images/disk.img", out / "disk.img", big, "/disk.img")
        copy_and_verify(mnt / "data/genome.fa", out / "genome.fa", objects["genome.fa"],
                        "/genome.fa")
        time.sleep(0.5)
        say("extended attributes")
        subprocess.run(["getfattr", "-d", str(mnt / "data/genome.fa")], check=False)
        say("unmount, stop the origin, mount again: every byte must come from the cache")
        unmount(mnt)
        stop(origin)
        mount(urls, mnt, cache, log)
        copy_and_verify(mnt / "images/disk.img", out / "disk.img", big, "/disk.img")
        say("demo passed: exact bytes cold, and again from the cache with the origin down")
        if args.keep:
            print(f"   the mount is at {mnt} (cache {cache}, log {log}); the origin is stopped,\n"
                  f"   so only cached files read. Unmount with: fusermount3 -u {mnt}")
        else:
            print(f"   the mount was at {mnt}; unmounting it (fusermount3 -u {mnt}) and removing "
                  f"{workdir}. Run with --keep to leave it mounted.")
            unmount(mnt)
        return 0
    finally:
        if not args.keep:
            unmount(mnt)
        stop(origin)
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Reading through another mount of the same cache directory (issue 18, guest.py): the
cost of a guest's reads against the owner's own.

``python -m tests.bench.sharedcache`` (root: it drops the page cache): Debian nginx on
127.0.0.1 serves a 256 MiB file (no delay: what is measured is the machine, not a
network); two rangefs mounts share one cache directory; mount A opens the file (so it
owns its cache); then mount B reads it whole (through A, which fetches it: cold), and
the file is read ``--runs`` times from each mount with the page cache dropped before
each read (warm: every block cached, A reads its own cache, B reads through A). Prints
MiB/s, medians.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.httpcpu import Nginx

SIZE_MIB = 256


def _rangefs() -> str:
    return str(Path(sys.executable).parent / "rangefs")


def _drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _read_all(path: Path) -> float:
    """MiB/s of one sequential read of ``path`` after the page cache is dropped."""
    _drop_page_cache()
    started = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    return SIZE_MIB / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.sharedcache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=4)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rangefs-shared-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        with Nginx(work / "nginx", SIZE_MIB << 20) as nginx:
            (work / "list").write_text(f"{nginx.url} o.bin\n")
            mounts = [work / "a", work / "b"]
            for mnt in mounts:
                mnt.mkdir()
                subprocess.run([_rangefs(), "mount", str(work / "list"), str(mnt),
                                "--cache-dir", str(work / "cache"), "--prefetch", "none"],
                               check=True)
            try:
                with open(mounts[0] / "o.bin", "rb") as owner:
                    owner.read(1)  # A owns the object's cache
                    cold = _read_all(mounts[1] / "o.bin")
                    own, guest = [], []
                    for _ in range(args.runs):
                        own.append(_read_all(mounts[0] / "o.bin"))
                        guest.append(_read_all(mounts[1] / "o.bin"))
            finally:
                for mnt in mounts:
                    subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    print(f"B through A, cold (A fetches from nginx on 127.0.0.1): {cold:.0f} MiB/s")
    print(f"warm, page cache dropped: A's own reads {statistics.median(own):.0f} MiB/s, "
          f"B through A {statistics.median(guest):.0f} MiB/s "
          f"(ratio {statistics.median(guest) / statistics.median(own):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

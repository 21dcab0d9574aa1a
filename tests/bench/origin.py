"""The emulated object store: nginx + lua on 127.0.0.1, serving generated objects.

Layout under the document root (one directory per scenario, so a FUSE peer that mounts a
directory URL sees only what the scenario needs):

    seq/big.bin        the sequential object (tests/content.py bytes; sha256 known)
    huge/huge.bin      a sparse object of ``huge_size`` bytes (reads as zeros)
    long/long.bin      a sparse object of ``long_size`` bytes (100 GiB; scenario 8)
    vast/vast.bin      a sparse object of ``vast_size`` bytes (1 TiB; scenario 9)
    multi/objN.bin     the objects of the concurrent-readers scenario
    many/fNNNNN.bin    the small objects of the big-URL-list scenario

The access log (``$bytes_sent`` and ``$http_range`` per request) is how every scenario
counts what the origin sent: :meth:`Origin.mark` then :meth:`Origin.sent_since`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.content import iter_content, sha256_of

from .system import NGINX_MODULES, free_port, kill_group, log

TEMPLATE = Path(__file__).with_name("nginx.conf.template")

# The links to the same objects (issue 20), by the URL prefix nginx.conf.template gives
# each: "store" the emulated far-away store (--rate per connection, 16 MiB/s), "fast" no
# per-connection cap, "cloud" --cloud-rate per connection (100 MiB/s). Every link has the
# first-byte delay.
LINKS = {"store": "", "fast": "link-fast/", "cloud": "link-cloud/"}


@dataclass(frozen=True)
class Layout:
    big_size: int
    huge_size: int
    multi_count: int
    multi_size: int
    many_count: int
    many_size: int = 1024
    long_size: int = 100 << 30  # sparse: a hole on tmpfs costs no memory
    vast_size: int = 1 << 40

    def big_key(self) -> str:
        return f"bench-big-{self.big_size}"


@dataclass
class Traffic:
    """What the origin did between two marks."""

    requests: int = 0
    bytes_sent: int = 0  # headers included
    body_bytes: int = 0


def _write_content(path: Path, key: str, size: int) -> None:
    with open(path, "wb") as fh:
        for offset in range(0, size, 64 << 20):
            fh.write(b"".join(iter_content(key, offset, min(64 << 20, size - offset))))


def populate(root: Path, layout: Layout) -> None:
    """Write every object (idempotent: existing files of the right size are kept)."""
    for sub in ("seq", "huge", "long", "vast", "multi", "many"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    big = root / "seq" / "big.bin"
    if not big.exists() or big.stat().st_size != layout.big_size:
        _write_content(big, layout.big_key(), layout.big_size)
    for sparse, size in ((root / "huge" / "huge.bin", layout.huge_size),
                         (root / "long" / "long.bin", layout.long_size),
                         (root / "vast" / "vast.bin", layout.vast_size)):
        # holes only (zeros when read): tmpfs allocates nothing for them, and its
        # splice_read sends the zero page for a hole, so serving them costs no memory
        if not sparse.exists() or sparse.stat().st_size != size:
            with open(sparse, "wb") as fh:
                fh.truncate(size)
    for i in range(layout.multi_count):
        path = root / "multi" / f"obj{i}.bin"
        if not path.exists() or path.stat().st_size != layout.multi_size:
            _write_content(path, f"bench-multi-{i}", layout.multi_size)
    filler = os.urandom(layout.many_size)
    existing = {p.name for p in (root / "many").iterdir()}
    for i in range(layout.many_count):
        name = f"f{i:05d}.bin"
        if name not in existing:
            (root / "many" / name).write_bytes(filler)


def big_sha256(layout: Layout) -> str:
    return sha256_of(layout.big_key(), layout.big_size)


class Origin:
    """A running nginx; use as a context manager (always stopped)."""

    def __init__(self, root: Path, work: Path, *, delay_s: float, rate: str,
                 chunk: str = "128k", cloud_rate: str = "100m") -> None:
        self.root = root
        self.work = work
        self.delay_s = delay_s
        self.rate = rate
        self.chunk = chunk
        self.cloud_rate = cloud_rate
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self.access_log = work / "access.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, link: str = "store") -> str:
        """The URL of ``path`` (under the document root) through ``link`` (see LINKS)."""
        return f"{self.base}/{LINKS[link]}{path.lstrip('/')}"

    def __enter__(self) -> Origin:
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        text = TEMPLATE.read_text()
        for name, value in {
            "modules": str(NGINX_MODULES), "work": str(self.work), "root": str(self.root),
            "port": str(self.port), "delay_s": f"{self.delay_s:.4f}", "rate": self.rate,
            "chunk": self.chunk, "cloud_rate": self.cloud_rate,
        }.items():
            text = text.replace(f"@{name}@", value)
        conf = self.work / "nginx.conf"
        conf.write_text(text)
        self._proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(self.work)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.work / "nginx.stderr", "wb"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        import socket

        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                errors = [self.work / "nginx.stderr", self.work / "error.log"]
                text = "".join(p.read_text(errors="replace") for p in errors if p.exists())
                raise SystemExit(f"bench: nginx did not start:\n{text}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=1
            ):
                break
            time.sleep(0.05)
        else:
            raise SystemExit("bench: nginx did not listen within 15 s")
        log(f"origin {self.base} (first-byte delay {self.delay_s * 1000:g} ms, "
            f"limit_rate {self.rate} per connection, sendfile_max_chunk {self.chunk}; "
            f"/{LINKS['fast']} uncapped, /{LINKS['cloud']} {self.cloud_rate} per connection)")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                kill_group(self._proc)

    def mark(self) -> int:
        """A position in the access log; see :meth:`sent_since`."""
        try:
            return self.access_log.stat().st_size
        except FileNotFoundError:
            return 0

    def quiet(self, hold: float = 0.5, limit: float = 30.0) -> float:
        """Wait until the access log has not grown for ``hold`` s (at most ``limit`` s):
        a caching tier in front of the origin may still be reading a slice to its end after
        its client has gone (a cacheable answer is fetched whole). Seconds waited."""
        start = now = time.monotonic()
        size, since = self.mark(), now
        while now - since < hold and now - start < limit:
            time.sleep(0.05)
            now = time.monotonic()
            if (grown := self.mark()) != size:
                size, since = grown, now
        return now - start

    def sent_since(self, mark: int, settle: float = 0.3, save_as: Path | None = None,
                   hold: float = 0.0) -> Traffic:
        """Requests and bytes the origin sent since ``mark`` (waits ``settle`` s first:
        nginx logs a request when it ends, an aborted one too; with ``hold``, then also
        until the log has held still that long, see :meth:`quiet`). ``save_as``: also
        write those access-log lines there."""
        time.sleep(settle)
        if hold > 0:
            self.quiet(hold)
        traffic = Traffic()
        try:
            with open(self.access_log, "rb") as fh:
                fh.seek(mark)
                data = fh.read()
        except FileNotFoundError:
            return traffic
        if save_as is not None:
            save_as.parent.mkdir(parents=True, exist_ok=True)
            save_as.write_bytes(data)
        for line in data.decode(errors="replace").splitlines():
            fields = line.split()
            if len(fields) < 4:
                continue
            traffic.requests += 1
            traffic.bytes_sent += int(fields[2])
            traffic.body_bytes += int(fields[3])
        return traffic

"""The contenders: rangefs and the tools people use today, each with the flags it is run with.

Two kinds:

- FUSE peers (rangefs, rclone mount, httpdirfs) mount one directory of the origin (or, for
  rangefs, a URL list of its objects) in the foreground; :func:`mounted` starts one, waits
  for the mount (bounded), and ALWAYS unmounts (``fusermount3 -u``, then abort + ``-u -z``)
  and reaps the daemon.
- Download peers (aria2c, hf_transfer, curl) fetch whole objects to a local file; in
  scenario 12 (downloads, issue 20) the ``rangefs`` peer is ``rangefs download`` with its
  defaults.

Variants that are not "defaults" (``rclone-tuned``, ``rangefs-none``, ``rangefs-metrics``)
are shown in the table but never count as the best *default* peer for rangefs's ratio,
except rclone-tuned which counts as a peer (people do tune rclone); ``rangefs-*`` variants
never count. ``rangefs-metrics`` is the ``rangefs`` mount plus ``--metrics`` on a free port,
scraped once a second by a :class:`Scraper` thread for as long as it is mounted (issue 18:
what the metrics endpoint costs).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .system import cpu_seconds, log, peak_rss_kib, unmount, wait_mounted

ROOT = Path(__file__).resolve().parents[2]
RANGEFS = Path(sys.executable).parent / "rangefs"

RCLONE_TUNED = (
    "--vfs-read-ahead", "512M", "--buffer-size", "64M",
    "--vfs-read-chunk-size", "16M", "--vfs-read-chunk-size-limit", "256M",
)


@dataclass(frozen=True)
class Peer:
    name: str
    kind: str  # "fuse" | "download"
    label: str  # how it was run, for the table's notes
    args: tuple[str, ...] = ()
    is_rangefs: bool = False
    scrape: bool = False  # rangefs --metrics on a free port, scraped once a second (Scraper)


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("rangefs", "fuse", "rangefs mount (defaults: --prefetch open, 64K blocks, "
             "concurrency 32)", is_rangefs=True),
        Peer("rangefs-none", "fuse", "rangefs mount --prefetch none", ("--prefetch", "none"),
             is_rangefs=True),
        Peer("rangefs-metrics", "fuse", "rangefs mount --metrics 127.0.0.1:PORT (a free "
             "port), GET /metrics once a second while mounted", is_rangefs=True, scrape=True),
        Peer("aria2", "download", "aria2c -x16 -s16 -k1M"),
        Peer("hf_transfer", "download", "hf_transfer (PyPI hf-transfer): max_files=64, "
             "10 MiB chunks, as huggingface_hub calls it"),
        Peer("curl", "download", "curl (one connection)"),
        Peer("rclone", "fuse", "rclone mount :http: --vfs-cache-mode full"),
        Peer("rclone-tuned", "fuse", "rclone mount --vfs-cache-mode full " + " ".join(RCLONE_TUNED),
             RCLONE_TUNED),
        Peer("httpdirfs", "fuse", "httpdirfs --cache"),
    )
}
DEFAULT_PEERS = ("rangefs", "rangefs-none", "aria2", "hf_transfer", "curl", "rclone",
                 "rclone-tuned", "httpdirfs")


@dataclass
class Mounted:
    """A live FUSE mount of one peer."""

    peer: Peer
    mountpoint: Path
    proc: subprocess.Popen[bytes]
    cache_dir: Path
    log_path: Path
    started: float  # perf_counter when the daemon was started
    mounted_at: float  # perf_counter when the mount appeared
    extra: dict[str, float] = field(default_factory=dict)
    scraper: Scraper | None = None  # peers with scrape=True: running while mounted

    @property
    def pid(self) -> int:
        return self.proc.pid

    def path(self, name: str) -> str:
        return str(self.mountpoint / name)

    def peak_rss_mib(self) -> float | None:
        kib = peak_rss_kib(self.proc.pid)
        return kib / 1024 if kib is not None else None

    def cpu_seconds(self) -> float | None:
        """user + system CPU time of the daemon so far (all threads)."""
        return cpu_seconds(self.proc.pid)


SCRAPE_INTERVAL_S = 1.0
SCRAPE_TIMEOUT_S = 5.0
# a line every scrape of a rangefs mount has: the read-latency histogram's count
SCRAPE_MARK = "rangefs_read_duration_seconds_count"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Scraper:
    """GETs ``url`` at once, then every ``interval`` seconds, on a daemon thread until
    :meth:`stop`: what a Prometheus server does to the mount (at a far shorter interval than
    its 15 s default). Counts the scrapes; the first failure (no answer within
    ``SCRAPE_TIMEOUT_S``, a status other than 200, or a body without ``SCRAPE_MARK``) stops
    it and is kept in :attr:`failure`."""

    def __init__(self, url: str, interval: float = SCRAPE_INTERVAL_S) -> None:
        self.url = url
        self.interval = interval
        self.scrapes = 0  # successful GETs
        self.seconds: list[float] = []  # how long each successful GET took
        self.reads = 0  # the mount's FUSE reads as of the last scrape (SCRAPE_MARK's value)
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scraper", daemon=True)

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and wait for the thread (an answer in flight: at most SCRAPE_TIMEOUT_S)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(SCRAPE_TIMEOUT_S + 5)

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self._scrape()
            except Exception as exc:
                self.failure = (f"scrape {self.scrapes + 1} of {self.url}: "
                                f"{type(exc).__name__}: {exc}")
                return
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _scrape(self) -> None:
        started = time.perf_counter()
        with urllib.request.urlopen(self.url, timeout=SCRAPE_TIMEOUT_S) as resp:
            status = resp.status
            body = resp.read().decode(errors="replace")
        took = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        for line in body.splitlines():
            if line.startswith(SCRAPE_MARK + " "):
                self.reads = int(float(line.split()[1]))
                break
        else:
            raise RuntimeError(f"no {SCRAPE_MARK} in the {len(body)}-byte answer")
        self.scrapes += 1
        self.seconds.append(took)


class ScrapeFailed(RuntimeError):
    """A scrape of a rangefs-metrics mount failed: the scenario step fails with it."""


def fuse_argv(peer: Peer, *, base_url: str, sub: str, names: Sequence[str], mountpoint: Path,
              cache_dir: Path, work: Path, sizes: dict[str, int] | None = None,
              extra: Sequence[str] = ()) -> list[str]:
    """The command line that mounts directory ``sub`` of the origin (objects ``names``);
    ``extra``: options a scenario adds to the peer's own (scenario 8: a cache budget)."""
    url_dir = f"{base_url}/{sub}/"
    if peer.is_rangefs:
        urls = work / f"{sub.replace('/', '-')}.urls"
        with open(urls, "w") as fh:
            for name in names:
                size = f" size={sizes[name]}" if sizes and name in sizes else ""
                fh.write(f"{url_dir}{name} {name}{size}\n")
        # RANGEFS_BENCH_ARGS: extra mount options for experiments (the table's notes say so)
        bench_args = shlex.split(os.environ.get("RANGEFS_BENCH_ARGS", ""))
        return [str(RANGEFS), "mount", "--foreground", "--cache-dir", str(cache_dir),
                *peer.args, *extra, *bench_args, str(urls), str(mountpoint)]
    if peer.name.startswith("rclone"):
        return ["rclone", "mount", ":http:", str(mountpoint), "--http-url", url_dir,
                "--vfs-cache-mode", "full", "--cache-dir", str(cache_dir), "--read-only",
                "--config", str(work / "rclone.conf"), *peer.args, *extra]
    if peer.name == "httpdirfs":
        return ["httpdirfs", "-f", "--cache", "--cache-location", str(cache_dir), *peer.args,
                *extra, url_dir, str(mountpoint)]
    raise ValueError(f"{peer.name} is not a FUSE peer")


@contextlib.contextmanager
def mounted(peer: Peer, *, base_url: str, sub: str, names: Sequence[str], work: Path,
            cache_dir: Path, tag: str, sizes: dict[str, int] | None = None,
            mount_timeout: float = 60.0, profile: Path | None = None,
            extra: Sequence[str] = ()) -> Iterator[Mounted]:
    """Mount, yield, and always unmount and reap. ``profile``: py-spy raw output for rangefs;
    ``extra``: options added to the peer's own (see :func:`fuse_argv`)."""
    mountpoint = work / f"mnt-{tag}"
    mountpoint.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    log_path = work / f"{tag}.log"
    metrics_url = None
    if peer.scrape:
        port = free_port()
        extra = (*extra, "--metrics", f"127.0.0.1:{port}")
        metrics_url = f"http://127.0.0.1:{port}/metrics"
    argv = fuse_argv(peer, base_url=base_url, sub=sub, names=names, mountpoint=mountpoint,
                     cache_dir=cache_dir, work=work, sizes=sizes, extra=extra)
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = str(ROOT)
    with open(log_path, "ab") as err:
        err.write(("$ " + " ".join(argv) + "\n").encode())
        err.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                                start_new_session=True)
    spy: subprocess.Popen[bytes] | None = None
    scraper: Scraper | None = None
    try:
        if not wait_mounted(mountpoint, proc, mount_timeout):
            tail = log_path.read_text(errors="replace")[-1500:]
            raise MountFailed(f"{peer.name} did not mount within {mount_timeout:g} s "
                              f"(exit {proc.poll()}):\n{tail}")
        mounted_at = time.perf_counter()
        if profile is not None and peer.is_rangefs and shutil.which("py-spy", path=str(
                Path(sys.executable).parent)):
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid),
                 "--rate", "250", "--format", "raw", "--nonblocking", "--threads",
                 "--output", str(profile)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=open(str(profile) + ".stderr", "wb"),  # noqa: SIM115
            )
        if metrics_url is not None:
            scraper = Scraper(metrics_url).start()
        yield Mounted(peer, mountpoint, proc, cache_dir, log_path, started, mounted_at,
                      scraper=scraper)
    finally:
        if scraper is not None:
            scraper.stop()  # before the unmount, which closes the endpoint
        unmount(mountpoint, proc)
        if spy is not None:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        with contextlib.suppress(OSError):
            mountpoint.rmdir()
        logs = work / "logs"
        logs.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            log_path.rename(logs / f"{tag}-{time.strftime('%H%M%S')}.log")


class MountFailed(RuntimeError):
    """A peer could not be mounted."""


def log_tail(path: Path, n: int = 800) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def announce(peer: Peer, what: str) -> None:
    log(f"  {peer.name}: {what}")

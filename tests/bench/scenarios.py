"""Scenarios 1-7 of issue 6, each for one peer; every figure is one run's.

Each function returns ``{metric key: value}`` (value ``None`` = not measured: timeout or
failure, with the reason under ``"error"``). Cold means: a fresh cache directory, a fresh
mount, and the page cache dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) just before
the measured I/O. Origin bytes are counted from the access log, from just before the mount
to just after the unmount, so a background fill that runs on counts too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .origin import Layout, Origin
from .peers import Mounted, MountFailed, Peer, mounted
from .system import drop_page_cache, kill_group, log, run, run_rusage

MiB = 1 << 20
Figures = dict[str, Any]


@dataclass(frozen=True)
class Knobs:
    delay_s: float
    rate: str
    runs: int
    quick: bool
    huge_read_s: float  # scenario 5b reads the 4 GiB object for at most this long
    random_reads: int = 200
    random_size: int = 4096
    readers: int = 16
    reader_chunk: int = 1 << 20
    quiet_wait_s: float = 180.0


@dataclass
class Ctx:
    origin: Origin
    layout: Layout
    work: Path  # on disk: mount points, caches, downloads
    knobs: Knobs
    big_sha256: str
    run: int
    profile_dir: Path | None = None

    def fresh(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def profile(self, peer: Peer, scenario: str) -> Path | None:
        if self.profile_dir is None or not peer.is_rangefs:
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        n = 1
        while (path := self.profile_dir / f"s{scenario}-{peer.name}-run{self.run}-{n}.txt"
               ).exists():
            n += 1
        return path


def worker(op: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """Run one measured I/O in a child process; None on timeout or failure."""
    code, _, out = run([sys.executable, "-m", "tests.bench.worker", json.dumps(op)],
                       timeout=timeout, stdout=None, cwd=Path(__file__).resolve().parents[2])
    if code != 0:
        return None
    result: dict[str, Any] = json.loads(out)
    return result


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _fuse(ctx: Ctx, peer: Peer, scenario: str, sub: str, names: list[str],
          body: Callable[[Mounted], Figures], *, cache_dir: Path | None = None,
          sizes: dict[str, int] | None = None) -> Figures:
    """Mount ``sub`` for ``peer`` on a fresh cache, run ``body``, unmount; add origin traffic."""
    cache = cache_dir or ctx.fresh(f"cache-{peer.name}-s{scenario}")
    mark = ctx.origin.mark()
    figures: Figures = {}
    try:
        with mounted(peer, base_url=ctx.origin.base, sub=sub, names=names, work=ctx.work,
                     cache_dir=cache, tag=f"{peer.name}-s{scenario}", sizes=sizes,
                     profile=ctx.profile(peer, scenario)) as m:
            figures = body(m)
            figures["_cpu_s"] = m.cpu_seconds()
    except MountFailed as exc:
        figures["error"] = str(exc).splitlines()[0]
        log(f"  {peer.name}: {exc}")
    name = f"{peer.name}-s{scenario}-run{ctx.run}-{time.strftime('%H%M%S')}.access.log"
    traffic = ctx.origin.sent_since(mark, save_as=ctx.work / "logs" / name)
    figures["_origin_bytes"] = traffic.bytes_sent
    figures["_origin_requests"] = traffic.requests
    if cache_dir is None:
        shutil.rmtree(cache, ignore_errors=True)
    return figures


def _read_timeout(ctx: Ctx, size: int) -> float:
    return max(60.0, size / (2 * MiB))


# -- 1, 2, 5a: cold cp, warm re-reads, peak RSS during the cp ------------------------------


def sequential(ctx: Ctx, peer: Peer, *, warm: bool) -> Figures:
    size = ctx.layout.big_size
    dl = ctx.fresh("dl")
    dest = dl / "big.bin"
    timeout = _read_timeout(ctx, size)

    def check(figures: Figures, ok: bool, seconds: float) -> None:
        if not ok:
            figures["error"] = "cp timed out or failed"
            return
        digest = _sha256(dest)
        if digest != ctx.big_sha256:
            figures["error"] = f"sha256 mismatch: {digest[:16]}"
            return
        figures["s1_mibps"] = size / MiB / seconds
        figures["s1_sha"] = "ok"

    if peer.kind == "download":
        mark = ctx.origin.mark()
        url = ctx.origin.url("seq/big.bin")
        drop_page_cache()
        if peer.name == "aria2":
            argv = ["aria2c", "-x16", "-s16", "-k1M", "-q", "--allow-overwrite=true",
                    "--auto-file-renaming=false", "-d", str(dl), "-o", "big.bin", url]
        else:
            argv = ["curl", "-sS", "-o", str(dest), url]
        code, seconds, rss = run_rusage(argv, timeout=timeout)
        figures: Figures = {"s5_rss_seq_mib": rss}
        check(figures, code == 0, seconds)
        traffic = ctx.origin.sent_since(mark)
        figures["_origin_bytes"] = traffic.bytes_sent
        figures["_origin_requests"] = traffic.requests
        figures["s1_amp"] = traffic.bytes_sent / size
        shutil.rmtree(dl, ignore_errors=True)
        return figures

    def body(m: Mounted) -> Figures:
        figures: Figures = {}
        drop_page_cache()
        code, seconds, _ = run(["cp", m.path("big.bin"), str(dest)], timeout=timeout)
        check(figures, code == 0, seconds)
        figures["s5_rss_seq_mib"] = m.peak_rss_mib()
        figures["s1_cpu_s"] = m.cpu_seconds()
        if warm and code == 0:
            dest.unlink()
            kept = worker({"op": "read", "path": m.path("big.bin"),
                           "chunk": ctx.knobs.reader_chunk}, timeout)
            if kept is not None:
                figures["s2_kept_mibps"] = kept["bytes"] / MiB / kept["seconds"]
            drop_page_cache()
            dropped = worker({"op": "read", "path": m.path("big.bin"),
                              "chunk": ctx.knobs.reader_chunk}, timeout)
            if dropped is not None:
                figures["s2_dropped_mibps"] = dropped["bytes"] / MiB / dropped["seconds"]
        return figures

    figures = _fuse(ctx, peer, "1", "seq", ["big.bin"], body)
    figures["s1_amp"] = figures["_origin_bytes"] / size
    shutil.rmtree(dl, ignore_errors=True)
    return figures


# -- 3: cold time to first byte -------------------------------------------------------------


def ttfb(ctx: Ctx, peer: Peer) -> Figures:
    if peer.name == "curl":
        drop_page_cache()
        code, _, out = run(["curl", "-sS", "-r", "0-0", "-o", "/dev/null", "-w",
                            "%{time_starttransfer}", ctx.origin.url("seq/big.bin")],
                           timeout=30, stdout=None)
        return {"s3_ttfb_ms": float(out) * 1000 if code == 0 else None}

    def body(m: Mounted) -> Figures:
        drop_page_cache()
        result = worker({"op": "ttfb", "path": m.path("big.bin")}, 60)
        return {"s3_ttfb_ms": result["seconds"] * 1000 if result else None}

    return _fuse(ctx, peer, "3", "seq", ["big.bin"], body)


# -- 4: cold random 4 KiB preads in the 4 GiB object --------------------------------------


def random_reads(ctx: Ctx, peer: Peer) -> Figures:
    count, size = ctx.knobs.random_reads, ctx.knobs.random_size
    read_bytes = count * size
    if peer.name == "curl":
        import random

        rng = random.Random(ctx.run)
        mark = ctx.origin.mark()
        latencies = []
        url = ctx.origin.url("huge/huge.bin")
        for _ in range(count):
            offset = rng.randrange(ctx.layout.huge_size // size) * size
            code, _, out = run(["curl", "-sS", "-r", f"{offset}-{offset + size - 1}", "-o",
                                "/dev/null", "-w", "%{time_total}", url], timeout=30, stdout=None)
            if code != 0:
                return {"error": "curl failed"}
            latencies.append(float(out))
        traffic = ctx.origin.sent_since(mark)
        return {"s4_p50_ms": pct(latencies, 0.5) * 1000, "s4_p99_ms": pct(latencies, 0.99) * 1000,
                "s4_amp": traffic.bytes_sent / read_bytes, "_origin_bytes": traffic.bytes_sent}

    def body(m: Mounted) -> Figures:
        drop_page_cache()
        result = worker({"op": "pread", "path": m.path("huge.bin"), "count": count,
                         "size": size, "seed": ctx.run}, 60 + count * 3.0)
        if result is None:
            return {"error": "random reads timed out or failed"}
        lat = result["latencies"]
        return {"s4_p50_ms": pct(lat, 0.5) * 1000, "s4_p99_ms": pct(lat, 0.99) * 1000,
                "s4_mean_ms": statistics.fmean(lat) * 1000}

    figures = _fuse(ctx, peer, "4", "huge", ["huge.bin"], body)
    if "s4_p50_ms" in figures:
        figures["s4_amp"] = figures["_origin_bytes"] / read_bytes
    return figures


# -- 5b: peak RSS while reading the 4 GiB object ------------------------------------------


def huge_rss(ctx: Ctx, peer: Peer) -> Figures:
    limit = ctx.knobs.huge_read_s
    if peer.kind == "download":
        dl = ctx.fresh("dl")
        url = ctx.origin.url("huge/huge.bin")
        if peer.name == "aria2":
            argv = ["aria2c", "-x16", "-s16", "-k1M", "-q", "--allow-overwrite=true",
                    "--auto-file-renaming=false", "-d", str(dl), "-o", "huge.bin", url]
        else:
            argv = ["curl", "-sS", "-o", str(dl / "huge.bin"), url]
        _, seconds, rss = run_rusage(argv, timeout=limit)
        got = (dl / "huge.bin").stat().st_size if (dl / "huge.bin").exists() else 0
        shutil.rmtree(dl, ignore_errors=True)
        return {"s5_rss_huge_mib": rss, "s5_huge_mibps": got / MiB / seconds}

    def body(m: Mounted) -> Figures:
        drop_page_cache()
        result = worker({"op": "read", "path": m.path("huge.bin"), "chunk": 1 << 20,
                         "limit_s": limit}, limit + 60)
        figures: Figures = {"s5_rss_huge_mib": m.peak_rss_mib()}
        if result is not None:
            figures["s5_huge_mibps"] = result["bytes"] / MiB / result["seconds"]
        return figures

    return _fuse(ctx, peer, "5", "huge", ["huge.bin"], body)


# -- 6: a 10,000-entry list: mount to `ls -l` done, cold and on remount --------------------


def big_list(ctx: Ctx, peer: Peer) -> Figures:
    names = [f"f{i:05d}.bin" for i in range(ctx.layout.many_count)]
    cache = ctx.fresh(f"cache-{peer.name}-s6")

    def body(key: str) -> Callable[[Mounted], Figures]:
        def measure(m: Mounted) -> Figures:
            code, _, out = run(["ls", "-l", str(m.mountpoint)], timeout=300, stdout=None)
            done = time.perf_counter()
            lines = out.count("\n") - 1  # "total N"
            if code != 0 or lines != len(names):
                return {"error": f"ls -l: exit {code}, {lines} entries"}
            return {key: done - m.started}
        return measure

    drop_page_cache()
    figures = _fuse(ctx, peer, "6", "many", names, body("s6_cold_s"), cache_dir=cache)
    figures["s6_cold_requests"] = figures.pop("_origin_requests")
    if figures.get("s6_cold_s") is not None:
        again = _fuse(ctx, peer, "6", "many", names, body("s6_remount_s"), cache_dir=cache)
        figures["s6_remount_s"] = again.get("s6_remount_s")
        figures["s6_remount_requests"] = again["_origin_requests"]
    if peer.is_rangefs:
        sized = ctx.fresh(f"cache-{peer.name}-s6-sized")
        sizes = dict.fromkeys(names, ctx.layout.many_size)
        drop_page_cache()
        more = _fuse(ctx, peer, "6", "many", names, body("s6_sized_cold_s"), cache_dir=sized,
                     sizes=sizes)
        figures["s6_sized_cold_s"] = more.get("s6_sized_cold_s")
        shutil.rmtree(sized, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return figures


# -- 7: 16 concurrent readers on 8 objects --------------------------------------------------


def concurrent(ctx: Ctx, peer: Peer) -> Figures:
    lay = ctx.layout
    names = [f"obj{i}.bin" for i in range(lay.multi_count)]
    total = lay.multi_count * lay.multi_size
    timeout = _read_timeout(ctx, total)
    if peer.kind == "download":
        dl = ctx.fresh("dl")
        urls = [ctx.origin.url(f"multi/{n}") for n in names]
        mark = ctx.origin.mark()
        drop_page_cache()
        if peer.name == "aria2":
            (ctx.work / "multi.list").write_text("\n".join(urls) + "\n")
            procs = [["aria2c", "-x16", "-s16", "-k1M", "-q", f"-j{len(urls)}",
                      "--allow-overwrite=true", "--auto-file-renaming=false", "-d", str(dl),
                      "-i", str(ctx.work / "multi.list")]]
        else:
            procs = [["curl", "-sS", "-o", str(dl / n), u] for n, u in zip(names, urls,
                                                                            strict=True)]
        start = time.perf_counter()
        running = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True) for a in procs]
        ok = True
        try:
            for p in running:
                try:
                    ok &= p.wait(max(1.0, timeout - (time.perf_counter() - start))) == 0
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                    ok = False
        except BaseException:  # interrupted: no download keeps running
            for p in running:
                kill_group(p)
            raise
        seconds = time.perf_counter() - start
        traffic = ctx.origin.sent_since(mark)
        shutil.rmtree(dl, ignore_errors=True)
        if not ok:
            return {"error": "download failed or timed out"}
        return {"s7_mibps": total / MiB / seconds, "s7_amp": traffic.bytes_sent / total}

    def body(m: Mounted) -> Figures:
        # names first, untimed (httpdirfs otherwise races its own directory listing)
        run(["ls", "-l", str(m.mountpoint)], timeout=60)
        per = ctx.knobs.readers // lay.multi_count
        jobs = []
        for n in names:
            step = lay.multi_size // per
            for k in range(per):
                end = lay.multi_size if k == per - 1 else (k + 1) * step
                jobs.append([m.path(n), k * step, end])
        drop_page_cache()
        result = worker({"op": "readers", "jobs": jobs, "chunk": ctx.knobs.reader_chunk},
                        timeout)
        if result is None or result["errors"] or result["bytes"] != total:
            why = result["errors"][:2] if result else "timeout"
            return {"error": f"readers failed: {why}"}
        return {"s7_mibps": result["bytes"] / MiB / result["seconds"],
                "s7_p99_ms": pct(result["latencies"], 0.99) * 1000,
                "s7_cpu_s": m.cpu_seconds()}

    figures = _fuse(ctx, peer, "7", "multi", names, body)
    if "s7_mibps" in figures:
        figures["s7_amp"] = figures["_origin_bytes"] / total
    return figures


# which peers can do which scenario
SUPPORTS: dict[str, set[str]] = {
    "1": {"rangefs", "rangefs-none", "aria2", "curl", "rclone", "rclone-tuned", "httpdirfs"},
    "2": {"rangefs", "rangefs-none", "rclone", "rclone-tuned", "httpdirfs"},
    "3": {"rangefs", "rangefs-none", "curl", "rclone", "rclone-tuned", "httpdirfs"},
    "4": {"rangefs", "rangefs-none", "curl", "rclone", "rclone-tuned", "httpdirfs"},
    "5": {"rangefs", "rangefs-none", "aria2", "curl", "rclone", "rclone-tuned", "httpdirfs"},
    "6": {"rangefs", "rclone", "httpdirfs"},  # the variants differ only in how they read
    "7": {"rangefs", "rangefs-none", "aria2", "curl", "rclone", "rclone-tuned", "httpdirfs"},
}

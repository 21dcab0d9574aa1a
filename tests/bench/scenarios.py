"""Scenarios 1-7 of issue 6, 8-9 of issue 16 and 10 of issue 17, each for one peer; every
figure is one run's.

Each function returns ``{metric key: value}`` (value ``None`` = not measured: timeout or
failure, with the reason under ``"error"``). Cold means: a fresh cache directory, a fresh
mount, and the page cache dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) just before
the measured I/O. Origin bytes are counted from the access log, from just before the mount
to just after the unmount, so a background fill that runs on counts too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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
from .peers import Mounted, MountFailed, Peer, ScrapeFailed, Scraper, mounted
from .system import DiskPeak, disk_bytes, drop_page_cache, kill_group, log, run, run_rusage

MiB = 1 << 20
Figures = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]  # the working directory of ``-m tests.bench.*``


@dataclass(frozen=True)
class Knobs:
    delay_s: float
    rate: str
    runs: int
    quick: bool
    huge_read_s: float  # scenario 5b reads the 4 GiB object for at most this long
    budget_read_s: float = 30.0  # scenario 8 reads the 100 GiB object for at most this long
    budget: str = "1G"  # scenario 8's cache budget (rangefs --cache-size, rclone's max size)
    random_reads: int = 200
    vast_reads: int = 300  # scenario 9: random preads in the 1 TiB object
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
    model_sha256: str = ""  # scenario 13: sha256 of the model's tensor bytes (modelload.py)

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
          sizes: dict[str, int] | None = None, extra: tuple[str, ...] = (),
          base_url: str | None = None, hold: float = 0.0, tag: str = "") -> Figures:
    """Mount ``sub`` for ``peer`` on a fresh cache, run ``body``, unmount; add origin traffic.
    ``extra``: mount options added to the peer's own; ``base_url``: where the objects are
    read from (default the origin; scenario 10: a caching tier in front of it); ``hold``:
    count the origin's traffic once its log has held still that long (see
    :meth:`Origin.quiet`); ``tag``: added to the names of the mount's logs.

    A peer that scrapes its metrics (``rangefs-metrics``) adds ``s{scenario}_scrapes`` (GETs
    of /metrics while mounted), ``s{scenario}_scrape_ms`` (the slowest) and
    ``s{scenario}_scraped_reads`` (the mount's read count in the last scrape); a failed
    scrape raises :class:`ScrapeFailed`, which fails the step."""
    cache = cache_dir or ctx.fresh(f"cache-{peer.name}-s{scenario}{tag}")
    mark = ctx.origin.mark()
    figures: Figures = {}
    scraper: Scraper | None = None
    try:
        with mounted(peer, base_url=base_url or ctx.origin.base, sub=sub, names=names,
                     work=ctx.work, cache_dir=cache, tag=f"{peer.name}-s{scenario}{tag}",
                     sizes=sizes, profile=ctx.profile(peer, scenario), extra=extra) as m:
            figures = body(m)
            figures["_cpu_s"] = m.cpu_seconds()
            scraper = m.scraper
            if scraper is not None:
                scraper.stop()
    except MountFailed as exc:
        figures["error"] = str(exc).splitlines()[0]
        log(f"  {peer.name}: {exc}")
    name = f"{peer.name}-s{scenario}{tag}-run{ctx.run}-{time.strftime('%H%M%S')}.access.log"
    traffic = ctx.origin.sent_since(mark, save_as=ctx.work / "logs" / name, hold=hold)
    figures["_origin_bytes"] = traffic.bytes_sent
    figures["_origin_requests"] = traffic.requests
    if cache_dir is None:
        shutil.rmtree(cache, ignore_errors=True)
    if scraper is not None:
        key = f"s{scenario}{tag}"
        figures[f"{key}_scrapes"] = scraper.scrapes
        if scraper.seconds:
            figures[f"{key}_scrape_ms"] = max(scraper.seconds) * 1000
        figures[f"{key}_scraped_reads"] = scraper.reads
        if scraper.failure is not None:
            raise ScrapeFailed(f"{scraper.failure} (after {scraper.scrapes} good ones)")
    return figures


def _cpu_since(m: Mounted, before: float | None) -> float | None:
    """The daemon's CPU seconds since ``before`` (its :meth:`Mounted.cpu_seconds` then): the
    measured I/O's share, without the daemon's start (imports) and mount."""
    now = m.cpu_seconds()
    return now - before if now is not None and before is not None else None


def _read_timeout(ctx: Ctx, size: int) -> float:
    return max(60.0, size / (2 * MiB))


def _download_argv(peer: Peer, url: str, dl: Path, name: str) -> list[str]:
    """How a download peer fetches ``url`` to ``dl/name`` (hf_transfer: run with the
    repository as the working directory, see tests/bench/hfget.py)."""
    if peer.name == "aria2":
        return ["aria2c", "-x16", "-s16", "-k1M", "-q", "--allow-overwrite=true",
                "--auto-file-renaming=false", "-d", str(dl), "-o", name, url]
    if peer.name == "hf_transfer":
        return [sys.executable, "-m", "tests.bench.hfget", url, str(dl / name)]
    return ["curl", "-sS", "-o", str(dl / name), url]


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
        code, seconds, rss = run_rusage(_download_argv(peer, url, dl, "big.bin"),
                                        timeout=timeout, cwd=REPO)
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
        before = m.cpu_seconds()
        code, seconds, _ = run(["cp", m.path("big.bin"), str(dest)], timeout=timeout)
        check(figures, code == 0, seconds)
        figures["s5_rss_seq_mib"] = m.peak_rss_mib()
        figures["s1_cpu_s"] = m.cpu_seconds()
        figures["s1_cpu_cp_s"] = _cpu_since(m, before)
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


# -- 4 and 9: cold random 4 KiB preads in the 4 GiB / 1 TiB object ------------------------


def random_reads(ctx: Ctx, peer: Peer) -> Figures:
    return _random_preads(ctx, peer, "4", "huge", "huge.bin", ctx.layout.huge_size,
                          ctx.knobs.random_reads)


def vast_random_reads(ctx: Ctx, peer: Peer) -> Figures:
    return _random_preads(ctx, peer, "9", "vast", "vast.bin", ctx.layout.vast_size,
                          ctx.knobs.vast_reads)


def _random_preads(ctx: Ctx, peer: Peer, scenario: str, sub: str, name: str, object_size: int,
                   count: int) -> Figures:
    """``count`` cold random preads of ``random_size`` bytes at aligned offsets (seed = run
    number): figures ``s{scenario}_p50_ms``, ``_p99_ms``, ``_amp`` (origin bytes ÷ bytes read)."""
    size = ctx.knobs.random_size
    read_bytes = count * size
    key = f"s{scenario}"
    if peer.name == "curl":
        import random

        rng = random.Random(ctx.run)
        mark = ctx.origin.mark()
        latencies = []
        url = ctx.origin.url(f"{sub}/{name}")
        for _ in range(count):
            offset = rng.randrange(object_size // size) * size
            code, _, out = run(["curl", "-sS", "-r", f"{offset}-{offset + size - 1}", "-o",
                                "/dev/null", "-w", "%{time_total}", url], timeout=30, stdout=None)
            if code != 0:
                return {"error": "curl failed"}
            latencies.append(float(out))
        traffic = ctx.origin.sent_since(mark)
        return {f"{key}_p50_ms": pct(latencies, 0.5) * 1000,
                f"{key}_p99_ms": pct(latencies, 0.99) * 1000,
                f"{key}_amp": traffic.bytes_sent / read_bytes, "_origin_bytes": traffic.bytes_sent}

    def body(m: Mounted) -> Figures:
        drop_page_cache()
        result = worker({"op": "pread", "path": m.path(name), "count": count,
                         "size": size, "seed": ctx.run}, 60 + count * 3.0)
        if result is None:
            return {"error": "random reads timed out or failed"}
        lat = result["latencies"]
        return {f"{key}_p50_ms": pct(lat, 0.5) * 1000, f"{key}_p99_ms": pct(lat, 0.99) * 1000,
                f"{key}_mean_ms": statistics.fmean(lat) * 1000}

    figures = _fuse(ctx, peer, scenario, sub, [name], body)
    if f"{key}_p50_ms" in figures:
        figures[f"{key}_amp"] = figures["_origin_bytes"] / read_bytes
    return figures


# -- 5b: peak RSS while reading the 4 GiB object ------------------------------------------


def huge_rss(ctx: Ctx, peer: Peer) -> Figures:
    limit = ctx.knobs.huge_read_s
    if peer.kind == "download":
        dl = ctx.fresh("dl")
        url = ctx.origin.url("huge/huge.bin")
        _, seconds, rss = run_rusage(_download_argv(peer, url, dl, "huge.bin"), timeout=limit)
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


# -- 8: the 100 GiB object read sequentially, with a 1 GiB cache budget and without ------


# the mount options that give each peer scenario 8's cache budget (SIZE = Knobs.budget)
BUDGET_ARGS: dict[str, tuple[str, ...]] = {
    "rangefs": ("--cache-size", "SIZE"),
    "rangefs-none": ("--cache-size", "SIZE"),
    "rclone": ("--vfs-cache-max-size", "SIZE"),
}
# an upper bound of what a peer can fetch per second here: rangefs's 32 connections at the
# origin's 16 MiB/s each; what the no-budget read may leave in the cache is at most this
# times the read time (rangefs's --cache-min-free keeps 5 % of the disk free in any case)
FETCH_BOUND = 512 * MiB


def _room(ctx: Ctx) -> str | None:
    """Why the work directory cannot hold what the no-budget read may cache, or None."""
    need = min(ctx.layout.long_size, int(ctx.knobs.budget_read_s * FETCH_BOUND)) + (1 << 30)
    st = os.statvfs(ctx.work)
    # what rangefs may use by default: the free space less its --cache-min-free 5 %
    usable = st.f_bavail * st.f_frsize - st.f_blocks * st.f_frsize // 20
    if usable < need:
        return (f"{ctx.work} leaves {usable / (1 << 30):.1f} GiB for a cache (free space less "
                f"5 %), the no-budget read may cache {need / (1 << 30):.1f} GiB: give "
                "--workdir on a larger disk or a shorter --budget-read-s")
    return None


def budget_read(ctx: Ctx, peer: Peer) -> Figures:
    """Read the 100 GiB object for at most ``budget_read_s`` from a cold mount, with the peer's
    cache budget (``s8_budget_*``) and with its defaults (``s8_free_*``): MiB/s, GiB read,
    peak bytes of the cache directory on disk (st_blocks, sampled every 50 ms from before
    the mount to after the unmount, so a fill that goes on after the read counts), the
    daemon's peak RSS (VmHWM)."""
    limit = ctx.knobs.budget_read_s
    figures: Figures = {}
    variants = (("budget", tuple(ctx.knobs.budget if a == "SIZE" else a
                                 for a in BUDGET_ARGS[peer.name])), ("free", ()))
    errors = []
    for variant, extra in variants:
        key = f"s8_{variant}"
        if variant == "free" and (why := _room(ctx)) is not None:
            errors.append(f"{variant}: {why}")
            continue
        cache = ctx.fresh(f"cache-{peer.name}-s8-{variant}")

        def body(m: Mounted, key: str = key) -> Figures:
            drop_page_cache()
            result = worker({"op": "read", "path": m.path("long.bin"), "chunk": 1 << 20,
                             "limit_s": limit}, limit + 60)
            if result is None:
                return {"error": "read timed out or failed"}
            return {f"{key}_mibps": result["bytes"] / MiB / result["seconds"],
                    f"{key}_gib": result["bytes"] / (1 << 30),
                    f"{key}_rss_mib": m.peak_rss_mib(), f"{key}_cpu_s": m.cpu_seconds(),
                    "_read_bytes": result["bytes"]}

        with DiskPeak(cache) as disk:
            got = _fuse(ctx, peer, "8", "long", ["long.bin"], body, cache_dir=cache,
                        extra=extra)
        got[f"{key}_cache_mib"] = disk.peak / MiB
        got[f"{key}_cache_left_mib"] = disk_bytes(cache) / MiB  # after the unmount
        got[f"{key}_disk_samples"] = disk.samples
        if got.get("_read_bytes"):
            got[f"{key}_amp"] = got["_origin_bytes"] / got["_read_bytes"]
        shutil.rmtree(cache, ignore_errors=True)
        if "error" in got:
            errors.append(f"{variant}: {got.pop('error')}")
            got.pop(f"{key}_cache_mib")
        figures.update({k: v for k, v in got.items() if not k.startswith("_")})
    if errors:
        figures["error"] = "; ".join(errors)
    return figures


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
        before = m.cpu_seconds()
        result = worker({"op": "readers", "jobs": jobs, "chunk": ctx.knobs.reader_chunk},
                        timeout)
        if result is None or result["errors"] or result["bytes"] != total:
            why = result["errors"][:2] if result else "timeout"
            return {"error": f"readers failed: {why}"}
        return {"s7_mibps": result["bytes"] / MiB / result["seconds"],
                "s7_p50_ms": pct(result["latencies"], 0.5) * 1000,
                "s7_p99_ms": pct(result["latencies"], 0.99) * 1000,
                "s7_cpu_s": m.cpu_seconds(), "s7_cpu_read_s": _cpu_since(m, before)}

    figures = _fuse(ctx, peer, "7", "multi", names, body)
    if "s7_mibps" in figures:
        figures["s7_amp"] = figures["_origin_bytes"] / total
    return figures


# -- 10: two machines through one HTTP caching tier (issue 17) ----------------------------

# how long the origin's log must hold still before a machine's traffic is counted: the tier
# reads a slice to its end after its client has gone (aria2c closes its connections at the
# end of each segment), and that belongs to the machine that asked for it
TIER_HOLD_S = 0.5


def _log_mark(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def tier_log(path: Path, mark: int) -> tuple[dict[str, int], list[float]]:
    """The tier's client requests logged since byte ``mark`` of its access log
    (tests/tierrig.py's LOG_FORMAT): their count by the cache status of each one's first
    slice (``$upstream_cache_status``: HIT, MISS, ...), and how long each took, in s.

    nginx logs one line per client request, with the status of the slice the request itself
    fetched: the first one; the other slices are subrequests, whose status nginx does not
    log reliably (with ``log_subrequest on`` the last one's line goes missing). A request
    that starts in a slice an earlier request fetched is a HIT even if its later slices
    were misses: the slice misses are the origin's GET answers (``s10_m*_slices_fetched``)."""
    counts: dict[str, int] = {}
    took: list[float] = []
    try:
        with open(path, "rb") as fh:
            fh.seek(mark)
            data = fh.read()
    except FileNotFoundError:
        return counts, took
    for line in data.decode(errors="replace").splitlines():
        fields = line.split()
        if len(fields) < 11:
            continue
        counts[fields[-4]] = counts.get(fields[-4], 0) + 1
        took.append(float(fields[-1]))
    return counts, took


def _tier_copy(ctx: Ctx, peer: Peer, base_url: str, machine: int) -> Figures:
    """One machine's cold copy of seq/big.bin from ``base_url`` (the tier): ``mibps`` (the
    copy's sha256 checked), and what the origin sent from before the mount (or download)
    until its log held still after the unmount (``_origin_bytes``, ``_origin_requests``)."""
    size = ctx.layout.big_size
    timeout = _read_timeout(ctx, size)
    dl = ctx.fresh(f"dl-s10-m{machine}")
    dest = dl / "big.bin"

    def copy(argv: list[str]) -> Figures:
        drop_page_cache()  # the tier's cached slices too: they come from its disk
        code, seconds, _ = run(argv, timeout=timeout)
        if code != 0:
            return {"error": f"machine {machine}: copy timed out or failed"}
        digest = _sha256(dest)
        if digest != ctx.big_sha256:
            return {"error": f"machine {machine}: sha256 mismatch: {digest[:16]}"}
        return {"mibps": size / MiB / seconds}

    try:
        if peer.kind == "download":
            mark = ctx.origin.mark()
            figures = copy(_download_argv(peer, f"{base_url}/seq/big.bin", dl, "big.bin"))
            name = f"{peer.name}-s10-m{machine}-run{ctx.run}-{time.strftime('%H%M%S')}"
            traffic = ctx.origin.sent_since(
                mark, hold=TIER_HOLD_S, save_as=ctx.work / "logs" / f"{name}.access.log")
            figures["_origin_bytes"] = traffic.bytes_sent
            figures["_origin_requests"] = traffic.requests
            return figures
        return _fuse(ctx, peer, "10", "seq", ["big.bin"],
                     lambda m: copy(["cp", m.path("big.bin"), str(dest)]),
                     base_url=base_url, hold=TIER_HOLD_S, tag=f"-m{machine}")
    finally:
        shutil.rmtree(dl, ignore_errors=True)


def tier_machines(ctx: Ctx, peer: Peer) -> Figures:
    """Two machines, one after the other, each a cold copy of the (1) object through one
    nginx slice-caching tier (tests/tierrig.py, a fresh one per peer) in front of the origin:
    per machine ``s10_m{1,2}_mibps``, the origin's bytes (headers included) as a % of the
    object (``_origin_pct``), the tier's answers by cache status
    (``_hit``, ``_miss``: by first slice, see :func:`tier_log`; every status in
    ``_tier``) and how long they took (``_tier_ms``: p50, p90, max; a wait for another
    request's fetch of the same slice takes 500 ms steps), the slices it fetched from the
    origin (``_slices_fetched``: the origin's GET answers, each one 1 MiB slice); the
    tier's cache on disk at the end."""
    from tests.tierrig import TierRig  # the tier rig lives with the tests that prove it

    size = ctx.layout.big_size
    figures: Figures = {}
    with TierRig(ctx.fresh(f"tier-{peer.name}"), ctx.origin.base) as tier:
        for machine in (1, 2):
            key = f"s10_m{machine}"
            mark = _log_mark(tier.access_log)
            got = _tier_copy(ctx, peer, tier.base_url, machine)
            statuses, took = tier_log(tier.access_log, mark)
            figures[f"{key}_slices_fetched"] = got.get("_origin_requests")
            figures[f"{key}_hit"] = statuses.get("HIT", 0)
            figures[f"{key}_miss"] = statuses.get("MISS", 0)
            figures[f"{key}_tier"] = statuses
            if took:
                figures[f"{key}_tier_ms"] = [round(pct(took, q) * 1000) for q in (0.5, 0.9, 1)]
            if "error" in got:
                figures["error"] = got["error"]
                break
            figures[f"{key}_mibps"] = got["mibps"]
            figures[f"{key}_origin_pct"] = 100 * got["_origin_bytes"] / size
        figures["s10_tier_cache_mib"] = disk_bytes(tier.cache_dir) / MiB
        with contextlib.suppress(OSError):
            shutil.copy(tier.access_log, ctx.work / "logs" /
                        f"tier-{peer.name}-s10-run{ctx.run}-{time.strftime('%H%M%S')}.log")
    shutil.rmtree(ctx.work / f"tier-{peer.name}", ignore_errors=True)
    return figures


# which peers can do which scenario; rangefs-metrics (issue 18) those where one mount's
# figures are the step's (8 mounts twice and 10 two machines: their scrape counts would mix)
SUPPORTS: dict[str, set[str]] = {
    "1": {"rangefs", "rangefs-none", "rangefs-metrics", "aria2", "curl", "rclone",
          "rclone-tuned", "httpdirfs"},
    "2": {"rangefs", "rangefs-none", "rangefs-metrics", "rclone", "rclone-tuned", "httpdirfs"},
    "3": {"rangefs", "rangefs-none", "rangefs-metrics", "curl", "rclone", "rclone-tuned",
          "httpdirfs"},
    "4": {"rangefs", "rangefs-none", "rangefs-metrics", "curl", "rclone", "rclone-tuned",
          "httpdirfs"},
    "5": {"rangefs", "rangefs-none", "rangefs-metrics", "aria2", "curl", "rclone",
          "rclone-tuned", "httpdirfs"},
    "6": {"rangefs", "rclone", "httpdirfs"},  # the variants differ only in how they read
    "7": {"rangefs", "rangefs-none", "rangefs-metrics", "aria2", "curl", "rclone",
          "rclone-tuned", "httpdirfs"},
    # issue 16: rclone's --vfs-cache-max-size is the one peer budget worth a row; httpdirfs
    # has no cache bound, the download peers no cache
    "8": set(BUDGET_ARGS),
    # curl is the floor, as in 4; the FUSE peers' 4 KiB reads cost 16-4096 × in (4) already
    "9": {"rangefs", "rangefs-none", "rangefs-metrics", "curl"},
    # issue 17: the download peers are the comparison (curl the one-connection floor); the
    # other FUSE peers read at ~17 MiB/s in (1) and would add a minute each
    "10": {"rangefs", "rangefs-none", "aria2", "curl"},
    # issue 20 (fastlinks.py): the download peers are the comparison; rclone and httpdirfs
    # read one object with one stream (17 MiB/s in (1)), curl is that floor on these links
    "11": {"rangefs", "aria2", "hf_transfer", "curl"},
    # downloads: `rangefs download` beside the downloaders
    "12": {"rangefs", "aria2", "hf_transfer", "curl"},
    # model loading (modelload.py): through the mount, or download then load; curl's one
    # connection would take a minute a run for 1 GiB (the floor of (1) says it already)
    "13": {"rangefs", "aria2", "hf_transfer"},
}

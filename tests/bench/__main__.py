"""``python -m tests.bench``: run the benchmark of issues 6, 16, 17 and 20 and write the table.

See tests/bench/README.md. Needs root (apt-get, drop_caches, FUSE mounts).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import modelload, report
from .fastlinks import CP_LINKS, DOWNLOAD_LINKS, downloads, fast_cp
from .origin import Layout, Origin, big_sha256, populate
from .peers import DEFAULT_PEERS, PEERS, ROOT
from .profile import summarize
from .scenarios import (
    SUPPORTS,
    Ctx,
    Knobs,
    big_list,
    budget_read,
    concurrent,
    huge_rss,
    random_reads,
    sequential,
    tier_machines,
    ttfb,
    vast_random_reads,
)
from .system import (
    drop_page_cache,
    ensure_pip,
    ensure_tools,
    log,
    machine,
    tool_versions,
    wait_quiet,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LOCK = Path("/var/tmp/rangefs-bench.lock")

# what each scenario step yields: a failed step marks these as failed for that peer
KEYS = {
    "seq": ("s1_mibps", "s1_amp", "s2_kept_mibps", "s2_dropped_mibps", "s5_rss_seq_mib"),
    "3": ("s3_ttfb_ms",),
    "4": ("s4_p50_ms", "s4_p99_ms", "s4_amp"),
    "5": ("s5_rss_huge_mib",),
    "6": ("s6_cold_s", "s6_remount_s"),
    "7": ("s7_mibps",),
    "8": ("s8_budget_mibps", "s8_budget_gib", "s8_budget_cache_mib", "s8_budget_rss_mib",
          "s8_free_mibps", "s8_free_gib", "s8_free_cache_mib", "s8_free_rss_mib"),
    "9": ("s9_p50_ms", "s9_p99_ms", "s9_amp"),
    "10": ("s10_m1_mibps", "s10_m1_origin_pct", "s10_m2_mibps", "s10_m2_origin_pct"),
    "11": tuple(f"s11_{link}_{what}" for link in CP_LINKS for what in ("mibps", "cpu_gib")),
    "12": tuple(f"s12_{link}_{what}" for link in DOWNLOAD_LINKS
                for what in ("mibps", "cpu_gib")),
    "13": ("s13_s",),
}
SCENARIOS = [str(n) for n in range(1, 14)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    ap.add_argument("--runs", type=int, default=None, help="runs per figure (median); default 3,"
                    " 1 with --quick")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (64 MiB, 8 x 16 MiB, 1,000 entries), 1 run")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="e.g. 1,3,4")
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                    help=f"comma-separated subset of {','.join(PEERS)}")
    ap.add_argument("--delay-ms", type=float, default=30.0, help="origin first-byte delay")
    ap.add_argument("--rate", default="16m", help="nginx limit_rate per connection (16m)")
    ap.add_argument("--cloud-rate", default="100m",
                    help="nginx limit_rate per connection of the 'cloud' link of scenarios "
                         "11 and 12 (100m; the 'fast' link has none)")
    ap.add_argument("--sendfile-chunk", default="128k",
                    help="nginx sendfile_max_chunk: how much goes out before limit_rate "
                         "delays (128k; nginx's default 2m leaves answers <= 2 MiB unthrottled)")
    ap.add_argument("--big-size", default=None,
                    help="the object of scenarios 1-3 and 10, MiB (256; 64 with --quick)")
    ap.add_argument("--huge-read-s", type=float, default=None,
                    help="scenario 5: read the 4 GiB object for at most this long (30 s)")
    ap.add_argument("--budget-read-s", type=float, default=None,
                    help="scenario 8: read the 100 GiB object for at most this long, with "
                         "and without a 1 GiB cache budget (30 s; 8 s with --quick)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp/rangefs-bench"),
                    help="mount points, caches, downloads (on disk)")
    ap.add_argument("--origin-dir", type=Path, default=None,
                    help="where the origin's objects live (default: a temp dir in /dev/shm)")
    ap.add_argument("--output", type=Path, default=None,
                    help="where the table goes (default: results/latest.md for the full run "
                         "with default knobs, results/partial.md for any other)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy record every rangefs mount (results/profiles/); figures "
                         "of a profiled run carry py-spy's overhead")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get anything")
    ap.add_argument("--quiet-wait", type=float, default=180.0,
                    help="before each measurement wait up to this long for idle CPUs (180 s)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work directory (daemon logs, access-log slices in logs/)")
    args = ap.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if args.budget_read_s is not None and args.budget_read_s <= 0:
        ap.error("--budget-read-s must be positive")
    for peer in args.peers:
        if peer not in PEERS:
            ap.error(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    for s in args.scenarios:
        if s not in SUPPORTS:
            ap.error(f"unknown scenario {s!r}; choose from 1-{SCENARIOS[-1]}")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.output is None:
        args.output = RESULTS / ("latest.md" if is_full_run(args) else "partial.md")
    return args


def is_full_run(args: argparse.Namespace) -> bool:
    """The run whose table the README shows: every scenario and peer, defaults, >= 3 runs.
    Any other run writes elsewhere, so that it never replaces that table."""
    return (
        args.scenarios == SCENARIOS
        and args.peers == list(DEFAULT_PEERS)
        and args.runs >= 3
        and not args.quick
        and (args.delay_ms, args.rate, args.sendfile_chunk, args.cloud_rate)
        == (30.0, "16m", "128k", "100m")
        and args.big_size is None
        and args.huge_read_s is None
        and args.budget_read_s is None
        and not args.profile
        and not os.environ.get("RANGEFS_BENCH_ARGS")
        and not os.environ.get("RANGEFS_BENCH_DOWNLOAD_ARGS")
    )


def layout(args: argparse.Namespace) -> Layout:
    big = int(args.big_size) << 20 if args.big_size else (64 << 20 if args.quick else 256 << 20)
    if args.quick:
        return Layout(big_size=big, huge_size=4 << 30, multi_count=8, multi_size=16 << 20,
                      many_count=1000)
    return Layout(big_size=big, huge_size=4 << 30, multi_count=8, multi_size=64 << 20,
                  many_count=10_000)


def one_run(ctx: Ctx, peers: list[str], scenarios: list[str]) -> dict[str, dict[str, Any]]:
    figures: dict[str, dict[str, Any]] = {p: {} for p in peers}
    steps: list[tuple[str, str, Any]] = []
    if {"1", "2", "5"} & set(scenarios):
        steps.append(("seq", "1", lambda c, p: sequential(c, p, warm="2" in scenarios)))
    one_step = {"3": ttfb, "4": random_reads, "5": huge_rss, "6": big_list, "7": concurrent,
                "8": budget_read, "9": vast_random_reads, "10": tier_machines, "11": fast_cp,
                "12": downloads}  # scenario -> its function, in the order they run
    steps.extend((scenario, scenario, fn) for scenario, fn in one_step.items()
                 if scenario in scenarios)
    if "13" in scenarios:
        steps.append(("13", "13", lambda c, p: modelload.model_load(c, p, c.model_sha256)))
    for step, scenario, fn in steps:
        who = [p for p in peers if p in SUPPORTS[scenario] or (step == "seq" and p in
               SUPPORTS["5"] and "5" in scenarios)]
        log(f"run {ctx.run}, scenario {step}: {', '.join(who)}")
        for name in who:
            busy = wait_quiet(ctx.knobs.quiet_wait_s)
            if busy > 0.25:
                log(f"  measuring {name} anyway: CPU {busy:.0%} busy")
                figures[name].setdefault("busy", []).append(f"{step}: {busy:.0%}")
            started = time.perf_counter()
            try:
                result = fn(ctx, PEERS[name])
            except Exception as exc:  # a peer's failure must not stop the benchmark
                log(f"  {name}: step {step} raised {type(exc).__name__}: {exc}")
                result = {"error": f"{type(exc).__name__}: {exc}"}
            if "error" in result:
                for key in KEYS[step]:
                    result.setdefault(key, None)
                figures[name].setdefault("errors", []).append(f"{step}: {result.pop('error')}")
            shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items()
                     if not k.startswith("_")}
            log(f"  {name} ({time.perf_counter() - started:.0f} s): {shown}")
            figures[name].update({k: v for k, v in result.items() if not k.startswith("_")})
    return figures


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        log("needs root: apt-get, drop_caches and FUSE mounts")
        return 2
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C: mounts unmounted, nginx stopped
    signal.signal(signal.SIGTERM, _exit_on_signal)
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    lock = open(LOCK, "w")  # noqa: SIM115  (held for the whole run)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another benchmark holds {LOCK}: one benchmark at a time")
        return 2
    command = "python -m tests.bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    tools = ["nginx", "fusermount3", "curl"] + [
        t for p in args.peers for t in {"aria2": ["aria2c"], "rclone": ["rclone"],
                                        "rclone-tuned": ["rclone"],
                                        "httpdirfs": ["httpdirfs"]}.get(p, [])
    ]
    # PyPI peers, into this Python's environment (never the suite's setup)
    modules = ["hf_transfer"] if "hf_transfer" in args.peers else []
    if "13" in args.scenarios:
        modules += ["safetensors", "numpy"]
    if not args.no_install:
        ensure_tools(tools)
        ensure_pip(modules)
    if not drop_page_cache():
        log("WARNING: cannot drop the page cache (not root?): 'cold' figures are not cold")
    info = machine()
    load = os.getloadavg()[0]
    if load > 1.0:
        log(f"WARNING: load average {load:.2f}: another job is using the CPU")
    lay = layout(args)
    knobs = Knobs(delay_s=args.delay_ms / 1000, rate=args.rate, runs=args.runs,
                  quick=args.quick,
                  huge_read_s=args.huge_read_s or (8.0 if args.quick else 30.0),
                  budget_read_s=args.budget_read_s or (8.0 if args.quick else 30.0),
                  quiet_wait_s=args.quiet_wait)
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    own_origin = args.origin_dir is None
    origin_root = args.origin_dir or Path(tempfile.mkdtemp(prefix="rangefs-bench-origin-",
                                                           dir="/dev/shm"))
    profile_dir = RESULTS / "profiles" if args.profile else None
    if profile_dir is not None:
        shutil.rmtree(profile_dir, ignore_errors=True)
    origin_root.chmod(0o755)  # nginx workers run as www-data
    log(f"generating objects in {origin_root}")
    populate(origin_root / "root", lay)
    sha = big_sha256(lay)
    # rangefs as installed: with its modules' bytecode (pip compiles it), even where the
    # environment sets PYTHONDONTWRITEBYTECODE (then every `rangefs download` of scenario
    # 12 compiled ~40 modules again: 0.1 s of a 1 s download); __pycache__ is ignored by git
    compileall.compile_dir(str(ROOT / "rangefs"), quiet=1)
    model_sha = ""
    if "13" in args.scenarios:
        log("generating the safetensors model of scenario 13")
        model_sha = modelload.populate(origin_root / "root", args.quick)
    runs: list[dict[str, dict[str, Any]]] = []
    started = time.time()
    try:
        with Origin(origin_root / "root", work / "origin", delay_s=knobs.delay_s,
                    rate=knobs.rate, chunk=args.sendfile_chunk,
                    cloud_rate=args.cloud_rate) as origin:
            for i in range(1, args.runs + 1):
                ctx = Ctx(origin, lay, work, knobs, sha, i, profile_dir, model_sha)
                runs.append(one_run(ctx, args.peers, args.scenarios))
    finally:
        if args.keep:
            log(f"kept {work} (logs/: daemon logs and access-log slices)")
        else:
            shutil.rmtree(work, ignore_errors=True)
        if own_origin:
            shutil.rmtree(origin_root, ignore_errors=True)
    text = render(args, command, info, lay, knobs, runs, time.time() - started)
    print("\n" + text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    args.output.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": info, "runs": runs}, indent=1, default=str))
    if profile_dir is not None and profile_dir.exists():
        parts = [summarize(p) for p in sorted(profile_dir.glob("*.txt"))]
        (profile_dir / "summary.md").write_text("\n".join(parts))
        log(f"profiles: {profile_dir}/summary.md")
    log(f"written to {args.output}")
    return 0


def render(args: argparse.Namespace, command: str, info: dict[str, str], lay: Layout,
           knobs: Knobs, runs: list[dict[str, dict[str, Any]]], seconds: float) -> str:
    peers = [p for p in args.peers if any(p in r for r in runs)]
    out = [
        "# rangefs benchmark (issues 6, 16, 17 and 20)", "",
        f"`{command}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{len(runs)} run(s), {seconds / 60:.1f} min", "",
        "**Machine:** " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
        f"**Origin:** nginx + lua on 127.0.0.1, first-byte delay {knobs.delay_s * 1000:g} ms "
        f"per request, `limit_rate {knobs.rate}` per connection (`sendfile_max_chunk "
        f"{args.sendfile_chunk}`: the cap holds for short answers too). **Objects:** "
        f"(1-3) {lay.big_size >> 20} MiB, (4, 5) {lay.huge_size >> 30} GiB sparse, "
        f"(6) {lay.many_count:,} × {lay.many_size} B, (7) {lay.multi_count} × "
        f"{lay.multi_size >> 20} MiB read by {knobs.readers} threads in "
        f"{knobs.reader_chunk >> 10} KiB preads; (4) {knobs.random_reads} preads of "
        f"{knobs.random_size} B; (5) the 4 GiB read stops after {knobs.huge_read_s:g} s; "
        f"(8) {lay.long_size >> 30} GiB sparse, read in 1 MiB reads for {knobs.budget_read_s:g} s "
        f"with a {knobs.budget} cache budget and without; (9) {lay.vast_size >> 40} TiB sparse, "
        f"{knobs.vast_reads} preads of {knobs.random_size} B; (10) the (1) object copied "
        "cold by two machines (two mounts, empty caches) one after the other through one "
        "nginx `proxy_cache` + `slice 1m` tier (`tests/tierrig.py`, empty at first), page "
        "cache dropped before each, so the second machine's slices come from the tier's "
        "disk; (11, 12) the (1) object through the 'fast' link (no per-connection cap) and "
        f"the 'cloud' link (`limit_rate {args.cloud_rate}`), same delay; (12) also through "
        "the store's link; CPU s/GiB: the daemon's during the cp (11), a downloader's whole "
        "process, its start included; (13) a safetensors model (64 × 16 MiB float32 "
        "tensors; 16 with `--quick`) loaded with `safetensors.safe_open(..., "
        "framework=\"np\")` + `get_tensor` of every tensor: through a cold mount, or "
        "downloaded (page cache dropped) and then loaded, on the store's link.", "",
        report.table(runs, peers, knobs.delay_s * 1000), "",
        "**Peers:** " + "; ".join(f"`{p}` = {PEERS[p].label}" for p in peers) + ".", "",
    ]
    errors = [f"- run {i + 1}, {p}: {e}" for i, r in enumerate(runs) for p, f in r.items()
              for e in f.get("errors", [])]
    busy = [f"run {i + 1} {p} {b}" for i, r in enumerate(runs) for p, f in r.items()
            for b in f.get("busy", [])]
    out += ["**CPU contention:** " + (
        "every measurement started with the CPUs idle (< 25 % busy)." if not busy else
        "measured while another job kept the CPUs busy: " + ", ".join(busy) + "."), ""]
    if errors:
        out += ["**Failures:**", "", *errors, ""]
    versions = tool_versions()
    out += ["**Versions:** " + "; ".join(f"{k}: {v}" for k, v in versions.items()), ""]
    return "\n".join(out)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

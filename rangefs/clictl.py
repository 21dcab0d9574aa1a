"""``rangefs status``, ``rangefs prefetch`` and ``rangefs evict``: the CLI side of the
control channel (``control.py``; the mount's side is ``mountctl.py``).

Exit codes as the rest of the CLI: 0 ok, 1 the mount refused or failed (one line on
stderr, prefixed ``rangefs:``), 2 usage (a path outside every rangefs mount), 130 when
Ctrl-C interrupts ``prefetch`` (the mount goes on filling).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from .control import Client, ControlError, MountInfo, find_mounts, mount_of

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
POLL = 0.5  # seconds between prefetch progress polls
DONE_STATES = frozenset({"complete", "verified", "failed"})


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"rangefs: {message}", err=True)
    sys.exit(code)


def _human(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover - the loop returns


def _targets(paths: Sequence[str]) -> list[tuple[MountInfo, list[str]]]:
    """The mounts to ask, each with the paths inside it ([] = the whole mount)."""
    mounts = find_mounts()
    if not paths:
        mine = [m for m in mounts if os.getuid() == 0 or m.uid in (None, os.getuid())]
        if not mine:
            _fail("no rangefs mount is running (for this user)")
        return [(m, []) for m in mine]
    grouped: dict[Path, tuple[MountInfo, list[str]]] = {}
    for path in paths:
        found = mount_of(Path(path), mounts)
        if found is None:
            _fail(f"{path}: not inside a rangefs mount", EXIT_USAGE)
        mount, inner = found
        entry = grouped.setdefault(mount.mountpoint, (mount, []))
        if inner:
            entry[1].append(inner)
        else:
            entry[1].append("")
    return list(grouped.values())


def _ask(mount: MountInfo, cmd: str, **args: Any) -> dict[str, Any]:
    with Client(mount.control_socket()) as client:
        return client.request(cmd, **args)


def _percentile(buckets: list[tuple[str, int]], q: float) -> str:
    """The upper bound of the latency bucket holding quantile ``q`` (as 'under X ms')."""
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return "-"
    for bound, count in buckets:
        if count >= q * total:
            return "> 60 s" if bound == "+Inf" else f"<= {float(bound) * 1000:g} ms"
    return "-"  # pragma: no cover


def _render(answer: dict[str, Any]) -> str:
    m, c, s = answer["mount"], answer["cache"], answer["stats"]
    responses = ", ".join(f"{k}: {v}" for k, v in s["responses"].items()) or "none"
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items())
    limit = f"{_human(c['limit'])}" + (f" (--cache-size {_human(c['cache_size'])})"
                                       if c["cache_size"] else f" (min free {c['min_free']})")
    buckets = [(str(b[0]), int(b[1])) for b in s["read_latency_seconds"]["buckets"]]
    lines = [
        f"{m['mountpoint']}  pid {m['pid']}, {m['entries']} files from {m['urllist']}",
        f"  cache   {m['cache_dir']}: {_human(c['used'])} of {limit}, "
        f"{_human(c['evicted'])} evicted",
        f"  origin  {s['requests']} requests ({responses}"
        + (f"; failed: {errors}" if errors else "") + f"), {_human(s['bytes_fetched'])} "
        f"fetched, {s['retries']} retries, {_human(s['rate'])}/s now, "
        f"{s['in_flight']} in flight",
        f"  reads   {s['reads']} ({_human(s['read_bytes_cache'])} from the cache, "
        f"{_human(s['read_bytes_network'])} waited for the origin), {s['read_errors']} "
        f"errors, p50 {_percentile(buckets, 0.5)}, p99 {_percentile(buckets, 0.99)}",
    ]
    files = answer.get("files")
    if files is not None:
        lines.append(f"  {'SIZE':>10} {'CACHED':>7}  {'STATE':<9} PATH")
        for f in files:
            pct = "-" if not f["size"] else f"{100 * f['cached'] / f['size']:.0f}%"
            why = f"  ({f['reason']})" if f["reason"] else ""
            lines.append(f"  {_human(f['size']):>10} {pct:>7}  {f['state']:<9} {f['path']}{why}")
    return "\n".join(lines)


@click.command("status")
@click.argument("paths", nargs=-1, metavar="[MOUNTPOINT|PATH]...")
@click.option("--files", is_flag=True, help="List every file of the mount with its state.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (a list, one "
              "object per mount) instead of the table.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True,
              help="Seconds between refreshes of --watch.")
def status_command(paths: Sequence[str], files: bool, as_json: bool, watch: bool,
                   interval: float) -> None:
    """Show what rangefs mounts are doing: cache use, origin traffic, reads, errors.

    With no argument, every rangefs mount of this user (root: every mount). A MOUNTPOINT
    shows that mount; a PATH inside a mount (a file or a directory) shows its files: size,
    share cached and state (idle, queued, reading, filling, complete, verifying,
    verified, failed and why). The mount answers on its control socket
    (CACHE_DIR/control.PID.sock).
    """
    targets = _targets(paths)
    stop = threading.Event()
    if watch:
        # Ctrl-C ends the watch at the next frame: a flag, not KeyboardInterrupt, which a
        # finalizer running at that moment would swallow ("Exception ignored ...")
        signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        while not stop.is_set():
            answers: list[dict[str, Any]] = []
            failed: list[str] = []
            for mount, inner in targets:
                args: dict[str, Any] = {"files": files}
                if inner and any(inner):
                    args["paths"] = inner
                try:
                    answers.append(_ask(mount, "status", **args))
                except ControlError as exc:  # one mount's failure: the others still show
                    failed.append(str(exc))
                    answers.append({"mount": {"mountpoint": str(mount.mountpoint)},
                                    "error": str(exc)})
            if as_json:
                text = json.dumps(answers, indent=2)
            else:
                text = "\n\n".join(_render(a) for a in answers if "error" not in a)
            if watch:
                lines = [f"rangefs: {e}" for e in failed]
                click.echo("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S") + "\n"
                           + "\n".join([*lines, text]))
                stop.wait(interval)
                continue
            if text:
                click.echo(text)
            for error in failed:
                click.echo(f"rangefs: {error}", err=True)
            sys.exit(EXIT_FAILURE if failed else 0)
    except KeyboardInterrupt:
        return


@click.command("prefetch")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--no-wait", is_flag=True, help="Start the prefetch and return at once.")
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
def prefetch_command(paths: Sequence[str], no_wait: bool, quiet: bool) -> None:
    """Fetch files of a mount into its cache now (a directory: every file under it).

    The mount fills them at background priority (reads come first), one object at a time;
    this command shows progress (bytes, rate, ETA) until every file is complete and, when a
    digest is known, verified. Ctrl-C stops waiting, not the prefetch. A file larger than
    the cache budget is not fetched (exit 1, with the reason). Exit 1 if any file failed.
    """
    targets = _targets(paths)
    jobs = []
    for mount, inner in targets:
        try:
            answer = _ask(mount, "prefetch", paths=inner)
        except ControlError as exc:
            _fail(str(exc))
        too_big = [f["path"] for f in answer["files"]
                   if f["size"] is not None and f["size"] > answer["limit"]]
        jobs.append((mount, inner, too_big))
    if no_wait:
        return
    try:
        failed = _wait(jobs, quiet)
    except KeyboardInterrupt:
        click.echo("", err=True)
        _fail("stopped waiting; the mount goes on prefetching", EXIT_SIGINT)
    for line in failed:
        click.echo(f"rangefs: {line}", err=True)
    if failed:
        sys.exit(EXIT_FAILURE)


def _wait(jobs: list[tuple[MountInfo, list[str], list[str]]], quiet: bool) -> list[str]:
    """Poll until no file is queued or filling; the failures, one line each."""
    tty = sys.stderr.isatty()
    samples: list[tuple[float, int]] = []
    last_line = 0.0
    while True:
        files: list[dict[str, Any]] = []
        for mount, inner, _ in jobs:
            try:
                files += _ask(mount, "status", paths=inner)["files"]
            except ControlError as exc:
                return [str(exc)]
        skipped = {p for _, _, too_big in jobs for p in too_big}
        wanted = [f for f in files if f["path"] not in skipped]
        total = sum(f["size"] or 0 for f in wanted)
        have = sum(min(f["cached"], f["size"] or 0) for f in wanted)
        now = time.monotonic()
        samples = [s for s in samples if now - s[0] <= 5.0] + [(now, have)]
        rate = (have - samples[0][1]) / (now - samples[0][0]) if now > samples[0][0] else 0.0
        busy = [f for f in wanted if f["state"] in ("queued", "filling", "verifying")]
        if not quiet and (tty or now - last_line >= 5.0 or not busy):
            eta = f", ETA {int((total - have) / rate)} s" if rate > 0 and busy else ""
            pct = 100 * have / total if total else 100.0
            line = (f"prefetch: {len(wanted) - len(busy)}/{len(wanted)} files, "
                    f"{_human(have)} of {_human(total)} ({pct:.0f}%), {_human(rate)}/s{eta}")
            click.echo(("\r\x1b[K" + line) if tty else line, err=True, nl=not tty)
            last_line = now
        if not busy:
            if tty and not quiet:
                click.echo("", err=True)
            out = [f"{p}: not prefetched: larger than the cache budget" for p in sorted(skipped)]
            for f in wanted:
                if f["state"] == "failed":
                    out.append(f"{f['path']}: {f['reason'] or 'failed'}")
                elif f["state"] not in DONE_STATES:
                    out.append(f"{f['path']}: not complete ({f['state']}; the log of the mount "
                               "says why)")
            return out
        time.sleep(POLL)


@click.command("evict")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
def evict_command(paths: Sequence[str]) -> None:
    """Drop the cached blocks of files of a mount (a directory: every file under it).

    Blocks a read is waiting for or reading, and files being opened, filled or checked,
    are kept (the command says which). The next read fetches the blocks again.
    """
    for mount, inner in _targets(paths):
        try:
            answer = _ask(mount, "evict", paths=inner)
        except ControlError as exc:
            _fail(str(exc))
        kept = answer["kept"]
        click.echo(f"{mount.mountpoint}: {_human(answer['freed'])} evicted from "
                   f"{answer['files']} files" + (f"; {len(kept)} still hold blocks in use: "
                                                 + ", ".join(kept[:10]) if kept else ""))


@click.command("refresh")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
def refresh_command(paths: Sequence[str]) -> None:
    """List listed directories of a mount again, now (a list entry whose URL ends with '/'
    is listed from the server; its listing is otherwise used for --listing-ttl).

    PATH is a listed directory, a file in one (its directory), or a directory above
    listed ones (each of them). Their subdirectories are listed again when next looked
    into. Exit 1 if one cannot be listed (it keeps its last listing).
    """
    failed = False
    for mount, inner in _targets(paths):
        try:
            answer = _ask(mount, "refresh", paths=inner)
        except ControlError as exc:
            _fail(str(exc))
        for row in answer["directories"]:
            where = mount.mountpoint if row["path"] in ("", ".") else \
                mount.mountpoint / row["path"]
            if "error" in row:
                failed = True
                click.echo(f"{where}: not listed: {row['error']}", err=True)
            else:
                click.echo(f"{where}: {row['entries']} entries ({row['added']} new, "
                           f"{row['removed']} gone, {row['changed']} changed)")
    if failed:
        sys.exit(EXIT_FAILURE)


"""Scenarios 11 and 12 of issue 20: fast links, where CPU decides, and downloads.

The origin serves the same objects through three links (``origin.LINKS``): "store" (the
emulated far-away store, 16 MiB/s per connection), "fast" (no per-connection cap) and
"cloud" (100 MiB/s per connection, what a cloud object store gives a machine near it); each
with the same first-byte delay.

11. cold ``cp`` of the (1) object through a fresh mount on the fast and on the cloud link
    (download peers: a download to local disk): MiB/s (sha256 of the copy checked) and CPU
    seconds per GiB (the daemon's during the cp; a downloader's whole process).
12. downloads of the (1) object with each tool's defaults on all three links (``rangefs``
    = ``rangefs download URL DEST``, no flags): MiB/s (sha256 checked), CPU seconds per GiB
    of the whole process (its start included), origin bytes ÷ size.

Each function returns ``{metric key: value}`` for one peer, as in scenarios.py.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from .origin import LINKS
from .peers import RANGEFS, Mounted, Peer
from .scenarios import (
    REPO,
    Ctx,
    Figures,
    _cpu_since,
    _download_argv,
    _fuse,
    _read_timeout,
    _sha256,
)
from .system import drop_page_cache, run, run_measured

MiB = 1 << 20
GiB = 1 << 30
CP_LINKS = ("fast", "cloud")
DOWNLOAD_LINKS = ("store", "fast", "cloud")


def _checked(ctx: Ctx, dest: Path) -> str | None:
    """Why the copy at ``dest`` is not the (1) object, or None."""
    if not dest.exists():
        return "no file"
    digest = _sha256(dest)
    return None if digest == ctx.big_sha256 else f"sha256 mismatch: {digest[:16]}"


def _download(ctx: Ctx, peer: Peer, link: str, key: str) -> Figures:
    """One download of seq/big.bin through ``link`` to local disk: ``{key}_mibps``,
    ``{key}_cpu_gib`` (the whole process), ``{key}_amp``."""
    size = ctx.layout.big_size
    dl = ctx.fresh("dl")
    dest = dl / "big.bin"
    url = ctx.origin.url("seq/big.bin", link)
    env = None
    if peer.is_rangefs:  # scenario 12's rangefs: `rangefs download`, its defaults
        extra = shlex.split(os.environ.get("RANGEFS_BENCH_DOWNLOAD_ARGS", ""))
        argv = [str(RANGEFS), "download", *extra, url, str(dest)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("NOTIFY_SOCKET", None)
    else:
        argv = _download_argv(peer, url, dl, "big.bin")
    mark = ctx.origin.mark()
    drop_page_cache()
    code, seconds, _, cpu = run_measured(argv, timeout=_read_timeout(ctx, size), cwd=REPO,
                                         env=env)
    traffic = ctx.origin.sent_since(mark)
    figures: Figures = {}
    why = "timed out or failed" if code != 0 else _checked(ctx, dest)
    if why is not None:
        figures["error"] = f"{link}: {why}"
    else:
        figures[f"{key}_mibps"] = size / MiB / seconds
        figures[f"{key}_cpu_gib"] = cpu / (size / GiB)
        figures[f"{key}_amp"] = traffic.bytes_sent / size
    shutil.rmtree(dl, ignore_errors=True)
    return figures


def fast_cp(ctx: Ctx, peer: Peer) -> Figures:
    """Scenario 11 for one peer: the cold cp (or download) on each of CP_LINKS."""
    size = ctx.layout.big_size
    figures: Figures = {}
    errors = []
    for link in CP_LINKS:
        key = f"s11_{link}"
        if peer.kind == "download":
            got = _download(ctx, peer, link, key)
        else:
            dl = ctx.fresh("dl")
            dest = dl / "big.bin"

            def body(m: Mounted, key: str = key, dest: Path = dest) -> Figures:
                drop_page_cache()
                before = m.cpu_seconds()
                code, seconds, _ = run(["cp", m.path("big.bin"), str(dest)],
                                       timeout=_read_timeout(ctx, size))
                cpu = _cpu_since(m, before)
                why = "cp timed out or failed" if code != 0 else _checked(ctx, dest)
                if why is not None:
                    return {"error": why}
                out: Figures = {f"{key}_mibps": size / MiB / seconds}
                if cpu is not None:
                    out[f"{key}_cpu_gib"] = cpu / (size / GiB)
                return out

            got = _fuse(ctx, peer, "11", f"{LINKS[link]}seq", ["big.bin"], body, tag=f"-{link}")
            if "error" not in got:
                got[f"{key}_amp"] = got["_origin_bytes"] / size
            shutil.rmtree(dl, ignore_errors=True)
        if "error" in got:
            errors.append(f"{link}: {got.pop('error')}")
        figures.update({k: v for k, v in got.items() if not k.startswith("_")})
    if errors:
        figures["error"] = "; ".join(errors)
    return figures


def downloads(ctx: Ctx, peer: Peer) -> Figures:
    """Scenario 12 for one peer: a download with its defaults on each of DOWNLOAD_LINKS."""
    figures: Figures = {}
    errors = []
    for link in DOWNLOAD_LINKS:
        got = _download(ctx, peer, link, f"s12_{link}")
        if "error" in got:
            errors.append(got.pop("error"))
        figures.update(got)
    if errors:
        figures["error"] = "; ".join(errors)
    return figures

"""The table: medians of every figure per peer, best peer, rangefs ÷ best, issue 6's target
(scenarios 8-9, of issue 16, have none; 10, of issue 17: the second machine's origin bytes).

Figures are never pass/fail of a build: "met" only says how the medians compare with the
target of issue 6 on this machine.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .peers import PEERS

Medians = dict[str, dict[str, float]]  # metric -> peer -> median
Target = Callable[[Medians, float], tuple[str, float | None]]  # -> (text, bound) for rangefs


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # "high" | "low" | "info"
    fmt: str
    target: Target | None = None


def _rel(metric: str, peer: str, factor: float, op: str) -> Target:
    def target(med: Medians, delay_ms: float) -> tuple[str, float | None]:
        ref = med.get(metric, {}).get(peer)
        text = f"{op} {factor:g} × {PEERS[peer].name}"
        if ref is None:
            return text + " (not measured)", None
        return f"{text} = {ref * factor:.1f}", ref * factor
    return target


def _rel_best(metric: str, peers: tuple[str, ...], factor: float, op: str) -> Target:
    """``op factor ×`` the best (highest) of ``peers``'s medians of ``metric``."""
    def target(med: Medians, delay_ms: float) -> tuple[str, float | None]:
        got = {p: v for p in peers if (v := med.get(metric, {}).get(p)) is not None}
        names = " / ".join(PEERS[p].name for p in peers)
        if not got:
            return f"{op} {factor:g} × best of {names} (not measured)", None
        best = max(got, key=lambda p: got[p])
        return (f"{op} {factor:g} × best of {names} ({best}) = {got[best] * factor:.1f}",
                got[best] * factor)
    return target


DOWNLOADERS = ("aria2", "hf_transfer")


def _abs(op: str, value: float, unit: str) -> Target:
    return lambda med, delay_ms: (f"{op} {value:g} {unit}", value)


def _delay(op: str, factor: float) -> Target:
    return lambda med, delay_ms: (
        f"{op} {factor:g} × origin delay = {factor * delay_ms:.0f} ms", factor * delay_ms
    )


METRICS: tuple[Metric, ...] = (
    Metric("s1_mibps", "1 cold sequential cp, MiB/s ↑", "high", "{:.1f}",
           _rel("s1_mibps", "aria2", 1.2, "≥")),
    Metric("s1_amp", "1 origin bytes ÷ object size ↓", "info", "{:.2f}×"),
    Metric("s1_cpu_s", "1 daemon CPU seconds during cp ↓", "info", "{:.2f}"),
    Metric("s1_cpu_cp_s", "1 (of which the cp itself, without start and mount)", "info",
           "{:.2f}"),
    Metric("s1_scrapes", "1 GETs of /metrics while mounted (rangefs-metrics)", "info", "{:.0f}"),
    Metric("s2_kept_mibps", "2 warm re-read, page cache kept, MiB/s ↑", "high", "{:.0f}",
           _rel("s2_kept_mibps", "httpdirfs", 3, "≥")),
    Metric("s2_dropped_mibps", "2 warm re-read, page cache dropped, MiB/s ↑", "high", "{:.0f}",
           _rel("s2_dropped_mibps", "httpdirfs", 0.9, "≥")),
    Metric("s3_ttfb_ms", "3 cold time to first byte, ms ↓", "low", "{:.1f}", _delay("≤", 1.5)),
    Metric("s4_p50_ms", "4 random 4 KiB cold pread p50, ms ↓", "low", "{:.1f}",
           _delay("≤", 1.2)),
    Metric("s4_p99_ms", "4 random 4 KiB cold pread p99, ms ↓", "low", "{:.1f}",
           _delay("≤", 2.5)),
    Metric("s4_amp", "4 amplification (origin bytes ÷ bytes read) ↓", "low", "{:.1f}×",
           _abs("≤", 32, "×")),
    Metric("s5_rss_seq_mib", "5 peak RSS during (1), MiB ↓", "low", "{:.0f}",
           _abs("≤", 80, "MiB")),
    Metric("s5_rss_huge_mib", "5 peak RSS reading the 4 GiB object, MiB ↓", "low", "{:.0f}",
           _abs("≤", 80, "MiB, = (1)")),
    Metric("s5_huge_mibps", "5 (rate of that 4 GiB read, MiB/s)", "info", "{:.1f}"),
    Metric("s6_cold_s", "6 big list: mount to `ls -l` done, cold, s ↓", "low", "{:.2f}",
           _abs("≤", 5, "s")),
    Metric("s6_remount_s", "6 big list: mount to `ls -l` done, remount, s ↓", "low", "{:.2f}",
           _abs("≤", 1, "s")),
    Metric("s6_cold_requests", "6 origin requests, cold mount + `ls -l`", "info", "{:.0f}"),
    Metric("s6_remount_requests", "6 origin requests, remount + `ls -l`", "info", "{:.0f}"),
    Metric("s6_sized_cold_s", "6 same list with size=N per entry, cold, s ↓", "info", "{:.2f}"),
    Metric("s7_mibps", "7 16 readers on 8 objects, aggregate MiB/s ↑", "high", "{:.1f}",
           _rel("s1_mibps", "aria2", 1.0, "≥")),
    Metric("s7_p50_ms", "7 16 readers, p50 read latency, ms ↓", "low", "{:.1f}"),
    Metric("s7_p99_ms", "7 16 readers, p99 read latency, ms ↓", "low", "{:.1f}",
           _delay("≤", 3)),
    Metric("s7_amp", "7 origin bytes ÷ bytes read ↓", "info", "{:.2f}×"),
    Metric("s7_cpu_s", "7 daemon CPU seconds ↓", "info", "{:.2f}"),
    Metric("s7_cpu_read_s", "7 (of which the reads themselves, without start and mount)",
           "info", "{:.2f}"),
    Metric("s7_scrapes", "7 GETs of /metrics while mounted (rangefs-metrics)", "info", "{:.0f}"),
    Metric("s8_budget_mibps", "8 100 GiB sequential read, 1 GiB cache budget, MiB/s ↑", "high",
           "{:.1f}"),
    Metric("s8_budget_gib", "8 (GiB read in the time, 1 GiB budget)", "info", "{:.2f}"),
    # "info": a peer that read less holds less; what counts is staying within the budget
    Metric("s8_budget_cache_mib", "8 peak cache on disk, 1 GiB budget, MiB", "info", "{:.0f}"),
    Metric("s8_budget_rss_mib", "8 daemon peak RSS, 1 GiB budget, MiB ↓", "low", "{:.0f}"),
    Metric("s8_free_mibps", "8 same read, no budget (defaults), MiB/s ↑", "high", "{:.1f}"),
    Metric("s8_free_gib", "8 (GiB read in the time, no budget)", "info", "{:.2f}"),
    Metric("s8_free_cache_mib", "8 peak cache on disk, no budget, MiB", "info", "{:.0f}"),
    Metric("s8_free_rss_mib", "8 daemon peak RSS, no budget, MiB ↓", "low", "{:.0f}"),
    Metric("s9_p50_ms", "9 random 4 KiB cold pread in 1 TiB, p50, ms ↓", "low", "{:.1f}"),
    Metric("s9_p99_ms", "9 random 4 KiB cold pread in 1 TiB, p99, ms ↓", "low", "{:.1f}"),
    Metric("s9_amp", "9 amplification (origin bytes ÷ bytes read) ↓", "low", "{:.1f}×"),
    Metric("s10_m1_mibps", "10 tier: machine 1 (empty tier) cold cp, MiB/s ↑", "high",
           "{:.1f}"),
    Metric("s10_m1_origin_pct", "10 machine 1 origin bytes, % of the object", "info",
           "{:.2f} %"),
    Metric("s10_m1_slices_fetched", "10 machine 1 slices the tier fetched (origin GETs)", "info",
           "{:.0f}"),
    Metric("s10_m1_hit", "10 machine 1 tier log: requests HIT (first slice)", "info", "{:.0f}"),
    Metric("s10_m1_miss", "10 machine 1 tier log: requests MISS (first slice)", "info",
           "{:.0f}"),
    Metric("s10_m2_mibps", "10 tier: machine 2 (tier filled by 1) cold cp, MiB/s ↑", "high",
           "{:.1f}"),
    Metric("s10_m2_origin_pct", "10 machine 2 origin bytes, % of the object ↓", "low",
           "{:.2f} %", _abs("≤", 1, "% (issue 17)")),
    Metric("s10_m2_slices_fetched", "10 machine 2 slices the tier fetched (origin GETs)", "info",
           "{:.0f}"),
    Metric("s10_m2_hit", "10 machine 2 tier log: requests HIT (first slice)", "info", "{:.0f}"),
    Metric("s10_m2_miss", "10 machine 2 tier log: requests MISS (first slice)", "info",
           "{:.0f}"),
    # issue 20: fast links (tests/bench/fastlinks.py)
    Metric("s11_fast_mibps", "11 fast link (no cap): cold cp, MiB/s ↑ (issue 20)", "high",
           "{:.0f}", _rel("s11_fast_mibps", "curl", 1.0, "≥")),
    Metric("s11_fast_cpu_gib", "11 (CPU s per GiB: daemon during cp; downloader's process)",
           "info", "{:.2f}"),
    Metric("s11_cloud_mibps", "11 cloud link (100 MiB/s per connection): cold cp, MiB/s ↑",
           "high", "{:.0f}", _rel("s11_cloud_mibps", "aria2", 1.2, "≥")),
    Metric("s11_cloud_cpu_gib", "11 (CPU s per GiB, cloud link)", "info", "{:.2f}"),
    Metric("s12_store_mibps", "12 download, defaults, store link (16 MiB/s per conn.), "
           "MiB/s ↑", "high", "{:.0f}", _rel_best("s12_store_mibps", DOWNLOADERS, 1.3, "≥")),
    Metric("s12_store_cpu_gib", "12 (CPU s per GiB of the process, store link)", "info",
           "{:.2f}"),
    Metric("s12_store_amp", "12 (origin bytes ÷ size, store link)", "info", "{:.3f}×"),
    Metric("s12_fast_mibps", "12 download, defaults, fast link, MiB/s ↑", "high", "{:.0f}",
           _rel_best("s12_fast_mibps", DOWNLOADERS, 1.0, "≥")),
    Metric("s12_fast_cpu_gib", "12 (CPU s per GiB, fast link)", "info", "{:.2f}"),
    Metric("s12_cloud_mibps", "12 download, defaults, cloud link, MiB/s ↑", "high", "{:.0f}",
           _rel_best("s12_cloud_mibps", DOWNLOADERS, 1.0, "≥")),
    Metric("s12_cloud_cpu_gib", "12 (CPU s per GiB, cloud link)", "info", "{:.2f}"),
    Metric("s13_s", "13 load a 1 GiB safetensors model cold (download peers: download, "
           "then load), s ↓", "low", "{:.2f}"),
    Metric("s13_cpu_s", "13 (daemon CPU seconds during the load)", "info", "{:.2f}"),
)


def medians(runs: Sequence[dict[str, dict[str, Any]]]) -> tuple[Medians, dict[str, set[str]]]:
    """runs: [{peer: figures}] -> (metric -> peer -> median, peer -> metrics with a gap)."""
    values: dict[str, dict[str, list[float]]] = {}
    seen: dict[str, dict[str, int]] = {}
    for figures_by_peer in runs:
        for peer, figures in figures_by_peer.items():
            for metric in METRICS:
                if metric.key not in figures and "error" not in figures:
                    continue
                seen.setdefault(metric.key, {}).setdefault(peer, 0)
                seen[metric.key][peer] += 1
                value = figures.get(metric.key)
                if isinstance(value, int | float):
                    values.setdefault(metric.key, {}).setdefault(peer, []).append(float(value))
    med: Medians = {
        k: {p: statistics.median(v) for p, v in per.items()} for k, per in values.items()
    }
    gaps: dict[str, set[str]] = {}
    for key, per in seen.items():
        for peer, n in per.items():
            if len(values.get(key, {}).get(peer, [])) < n:
                gaps.setdefault(peer, set()).add(key)
    return med, gaps


def table(runs: Sequence[dict[str, dict[str, Any]]], peers: Sequence[str],
          delay_ms: float) -> str:
    med, gaps = medians(runs)
    head = ["figure", *peers, "best peer", "rangefs ÷ best", "target (issue 6 unless said)",
            "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for metric in METRICS:
        per = med.get(metric.key, {})
        if not per and not any(metric.key in gaps.get(p, set()) for p in peers):
            continue
        cells = [metric.label]
        for peer in peers:
            value = per.get(peer)
            cell = metric.fmt.format(value) if value is not None else "–"
            if metric.key in gaps.get(peer, set()):
                cell = "fail" if value is None else cell + "*"
            cells.append(cell)
        others = {p: v for p, v in per.items() if p in peers and not PEERS[p].is_rangefs}
        best_peer = None
        if others and metric.better in ("high", "low"):
            pick = max if metric.better == "high" else min
            best_peer = pick(others, key=lambda p: others[p])
        ours = per.get("rangefs")
        if best_peer is not None:
            cells.append(f"{best_peer} {metric.fmt.format(others[best_peer])}")
            ratio = ours / others[best_peer] if ours is not None and others[best_peer] else None
            cells.append(f"{ratio:.2f}" if ratio is not None else "–")
        else:
            cells += ["–", "–"]
        met = ""
        if metric.target is not None:
            text, bound = metric.target(med, delay_ms)
            cells.append(text)
            if ours is not None and bound is not None:
                ok = ours >= bound if metric.better == "high" else ours <= bound
                if metric.key == "s5_rss_huge_mib":
                    seq = med.get("s5_rss_seq_mib", {}).get("rangefs")
                    ok = ok and (seq is None or ours <= seq * 1.1 + 4)
                met = "yes" if ok else "**no**"
        else:
            cells.append("")
        cells.append(met)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Medians of the runs; `*` = at least one run of that peer failed or timed out "
                 "(median of the others); `fail` = every run failed; `–` = not applicable. "
                 "↑ higher is better, ↓ lower is better; for ↓ rows a ratio below 1 means "
                 "rangefs is ahead.")
    return "\n".join(lines)

"""What a peer asked the origin for: ``python -m tests.bench.accesslog FILE...``.

Reads the access-log slices that ``--keep`` leaves in ``WORKDIR/run-*/logs/`` (format
``$msec $status $bytes_sent $body_bytes_sent $request_method "$uri" "$http_range"
$connection $request_time``) and prints, per file: requests by method, bytes, how many
requests were in flight at most, and the spread of body sizes and request durations.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path


def summarize(path: Path) -> str:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        fields = line.split()
        if len(fields) < 9:
            continue
        end = float(fields[0])
        took = float(fields[-1])
        rows.append((end - took, end, fields[1], int(fields[2]), int(fields[3]), fields[4],
                     fields[6].strip('"'), fields[7]))
    if not rows:
        return f"{path.name}: no requests"
    t0 = min(r[0] for r in rows)
    events = sorted([(r[0], 1) for r in rows] + [(r[1], -1) for r in rows])
    depth = peak = 0
    for _, step in events:
        depth += step
        peak = max(peak, depth)
    methods: dict[str, int] = {}
    for r in rows:
        methods[f"{r[5]} {r[2]}"] = methods.get(f"{r[5]} {r[2]}", 0) + 1
    bodies = sorted(r[4] for r in rows if r[5] == "GET")
    times = sorted((r[1] - r[0]) * 1000 for r in rows)
    connections = len({r[7] for r in rows})
    out = [
        f"{path.name}: {len(rows)} requests ({', '.join(f'{k} ×{v}' for k, v in methods.items())})"
        f" on {connections} connections, {sum(r[3] for r in rows) / (1 << 20):.1f} MiB sent, "
        f"at most {peak} in flight, span {max(r[1] for r in rows) - t0:.2f} s",
    ]
    if bodies:
        out.append(f"  GET body bytes: min {bodies[0]}, median {bodies[len(bodies) // 2]}, "
                   f"max {bodies[-1]}")
    out.append(f"  request time ms: min {times[0]:.0f}, median {statistics.median(times):.0f}, "
               f"p90 {times[int(0.9 * (len(times) - 1))]:.0f}, max {times[-1]:.0f}")
    return "\n".join(out)


def main() -> None:
    for name in sys.argv[1:]:
        print(summarize(Path(name)))


if __name__ == "__main__":
    main()

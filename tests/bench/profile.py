"""Summaries of py-spy ``--format raw`` profiles (collapsed stacks) of the rangefs daemon.

``python -m tests.bench.profile FILE...`` prints, per file, the share of samples per thread,
the functions with the most samples of their own (self) and those on the most stacks
(inclusive). A frame is ``function (file)``; line numbers are dropped so that one
function is one row.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame(text: str) -> str:
    match = _FRAME.match(text.strip())
    if match is None:
        return text.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def summarize(path: Path, top: int = 18) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames and frames[0].startswith(("thread ", "process ")):
            threads[frames[0]] += count
            frames = frames[1:]
        if not frames:  # the thread was in native code (no Python frame on its stack)
            frames = ["(native code, no Python frame)"]
        total += count
        names = [_frame(f) for f in frames]
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    if not total:
        return f"### {path.name}\n\n(no samples)\n"
    out = [f"### {path.name}", "", f"{total} samples (active, non-idle)", ""]
    if len(threads) > 1:
        out.append("threads: " + ", ".join(f"{t} {100 * n / total:.0f}%"
                                            for t, n in threads.most_common(6)))
        out.append("")
    out += ["| self % | function |", "| ---: | --- |"]
    out += [f"| {100 * n / total:.1f} | `{name}` |" for name, n in own.most_common(top)]
    out += ["", "| inclusive % | function |", "| ---: | --- |"]
    out += [f"| {100 * n / total:.1f} | `{name}` |" for name, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


def main() -> None:
    for name in sys.argv[1:]:
        print(summarize(Path(name)))


if __name__ == "__main__":
    main()

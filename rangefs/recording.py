"""Recorded prefetch (issue 19): ``--record FILE`` writes what a workload read, in the
order it was first read; ``--prefetch-list FILE`` fetches those ranges first on a later
mount (another machine, or after the cache was emptied).

The file is JSON lines, one range a line, appended as the workload runs::

    {"path": "llm/model.safetensors", "offset": 0, "length": 65536}

``path`` is the file's path in the mount, ``offset``/``length`` are bytes, in units of
:data:`GRAIN` (64 KiB, whatever the block size), each range read for the first time, in
first-touch order; consecutive new ranges of one file that continue each other are one
line. Append-only and crash-tolerant: lines are written at most :data:`FLUSH_PERIOD`
after the read (and at unmount), a torn last line is skipped when the list is read, and
several recordings may be appended to one file (a mount lists a range once; the player
plays a line that repeats another once, and a range already cached costs it nothing).

The player starts at mount: a background task walks the list in order with at most
``concurrency`` ranges in flight, each fetched as a read would be (``ObjectHandle.hold``:
demand requests, but never more than that many, so the workload's own reads go first).
Paths not in the mount are skipped (one warning with the count).

Why by hand: nothing standard records and replays per-file byte ranges; eStargz, SOCI and
nydus do it for container image layers only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Final, TextIO

import trio

from .errors import RangefsError, UsageError

log = logging.getLogger(__name__)

GRAIN: Final = 64 << 10
"""Bytes: the unit of recorded ranges."""
FLUSH_PERIOD: Final = 1.0
"""Seconds between writes of the recorded lines."""
MAX_RANGES: Final = 1_000_000
"""Most ranges one mount records (then it stops recording, with a warning)."""

FetchRange = Callable[[str, int, int], Awaitable[bool]]
"""``fetch_range(path, offset, length)``: fetch a range of a file of the mount; False if
there is no such file."""


class Recorder:
    """Records first touches (trio thread: :meth:`touch` from reads; :meth:`flush` from
    the periodic task and at unmount)."""

    def __init__(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UsageError(f"--record {path}: {exc.strerror or exc}") from exc
        self.path = path
        self._file: TextIO = os.fdopen(fd, "a", encoding="utf-8")
        self._seen: dict[str, set[int]] = {}  # path -> grains recorded
        self._pending: list[str] = []  # lines not yet written
        self._run: tuple[str, int, int] | None = None  # (path, first grain, last grain)
        self._count = 0
        self._full = False

    def touch(self, path: str, offset: int, size: int) -> None:
        """A read of ``size`` bytes at ``offset`` of the file at ``path`` succeeded."""
        if size <= 0 or self._full:
            return
        seen = self._seen.setdefault(path, set())
        for grain in range(offset // GRAIN, (offset + size - 1) // GRAIN + 1):
            if grain in seen:
                continue
            seen.add(grain)
            run = self._run
            if run is not None and run[0] == path and run[2] + 1 == grain:
                self._run = (path, run[1], grain)
                continue
            self._end_run()
            self._run = (path, grain, grain)

    def _end_run(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        path, first, last = run
        self._pending.append(json.dumps(
            {"path": path, "offset": first * GRAIN, "length": (last - first + 1) * GRAIN},
            ensure_ascii=False) + "\n")
        self._count += 1
        if self._count >= MAX_RANGES:
            self._full = True
            log.warning("--record %s: %d ranges recorded; recording stops here", self.path,
                        MAX_RANGES)

    def flush(self, *, final: bool = False) -> None:
        """Write the finished lines (with ``final``, the current run too). An error is
        logged and recording stops; never raises."""
        if final:
            self._end_run()
        if not self._pending or self._file.closed:
            return
        lines, self._pending = self._pending, []
        try:
            self._file.write("".join(lines))
            self._file.flush()
        except OSError as exc:
            log.warning("--record %s: %s; recording stops", self.path, exc)
            self._full = True

    def close(self) -> None:
        self.flush(final=True)
        with contextlib.suppress(OSError):
            self._file.close()

    async def run(self) -> None:
        """Flush every FLUSH_PERIOD seconds until cancelled (then the caller closes)."""
        while True:
            await trio.sleep(FLUSH_PERIOD)
            self.flush()


def read_list(path: Path) -> list[tuple[str, int, int]]:
    """The (path, offset, length) ranges of a recorded list, in order, each once; lines
    that do not parse (a torn last line) are skipped with one warning. UsageError if the
    file cannot be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"--prefetch-list {path}: {exc.strerror or exc}") from exc
    ranges: list[tuple[str, int, int]] = []
    seen: set[tuple[str, int, int]] = set()
    bad = 0
    for line in _lines(text):
        try:
            row = json.loads(line)
            item = (str(row["path"]), int(row["offset"]), int(row["length"]))
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if item[1] < 0 or item[2] <= 0 or item in seen:
            continue
        seen.add(item)
        ranges.append(item)
    if bad:
        log.warning("--prefetch-list %s: %d line(s) skipped (not a recorded range)", path, bad)
    return ranges


def _lines(text: str) -> Iterator[str]:
    for line in text.splitlines():
        line = line.strip()
        if line:
            yield line


class Player:
    """Plays a recorded list at mount (see the module docstring)."""

    def __init__(self, ranges: list[tuple[str, int, int]], concurrency: int) -> None:
        self.ranges = ranges
        self._limit = trio.Semaphore(max(1, concurrency))
        self.done = 0  # ranges fetched (or found cached)
        self.failed = 0

    async def run(self, fetch_range: FetchRange) -> None:
        """Fetch every range in order, at most ``concurrency`` at once; a range that fails
        is counted and the rest go on. ``fetch_range(path, offset, length)`` returns
        False for a path that is not in the mount."""
        missing: set[str] = set()
        async with trio.open_nursery() as nursery:
            for path, offset, length in self.ranges:
                if path in missing:
                    continue
                await self._limit.acquire()
                nursery.start_soon(self._one, fetch_range, path, offset, length, missing)
        if missing:
            log.warning("--prefetch-list: %d path(s) not in this mount were skipped",
                        len(missing))
        log.info("--prefetch-list: %d of %d ranges fetched, %d failed", self.done,
                 len(self.ranges), self.failed)

    async def _one(self, fetch_range: FetchRange, path: str, offset: int, length: int,
                   missing: set[str]) -> None:
        try:
            if await fetch_range(path, offset, length):
                self.done += 1
            else:
                missing.add(path)
        except RangefsError as exc:
            self.failed += 1
            log.info("--prefetch-list: %s [%d:%d]: %s", path, offset, offset + length, exc)
        finally:
            self._limit.release()


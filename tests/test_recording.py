"""Recorded prefetch (issue 19): ``--record`` writes the ranges reads touch first, in
order; ``--prefetch-list`` fetches them at the next mount before they are read. Real
mounts through the kernel (reads with FADV_RANDOM: no kernel read-ahead, so what is
recorded is what the test reads), the in-process origin, every byte checked."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from rangefs.recording import GRAIN, Recorder, read_list
from tests import content
from tests.faultserver import FaultServer
from tests.mountutil import mounted, write_list

MIB = 1 << 20
GUARD = 30.0


def pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def workload(mnt: Path) -> None:
    """What an application reads first: a header, a part of another file, the next part
    of the first."""
    content.check("/a.bin", 0, pread(mnt / "d" / "a.bin", 0, 4096))
    content.check("/b.bin", MIB, pread(mnt / "b.bin", MIB, 100_000))
    content.check("/a.bin", GRAIN, pread(mnt / "d" / "a.bin", GRAIN, GRAIN))


def test_record_then_prefetch_the_list(
    tmp_path: Path, cache: Path, origin: FaultServer
) -> None:
    origin.add("/a.bin", 2 * MIB)
    origin.add("/b.bin", 3 * MIB)
    urls = write_list(tmp_path / "r.urls", [f"{origin.url('/a.bin')} d/a.bin",
                                             f"{origin.url('/b.bin')} b.bin"])
    record = tmp_path / "warm.jsonl"
    with mounted(urls, tmp_path / "m1", "--prefetch", "none", "--record", str(record),
                 cache_dir=cache):
        workload(tmp_path / "m1")
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert lines == [  # first-touch order, in 64 KiB grains, consecutive ones merged
        {"path": "d/a.bin", "offset": 0, "length": GRAIN},
        {"path": "b.bin", "offset": MIB, "length": 2 * GRAIN},
        {"path": "d/a.bin", "offset": GRAIN, "length": GRAIN},
    ]

    # another machine: an empty cache, the list played at mount, one range at a time
    origin.reset_log()
    fresh = tmp_path / "cache2"
    with mounted(urls, tmp_path / "m2", "--prefetch", "none", "--concurrency", "1",
                 "--prefetch-list", str(record), cache_dir=fresh) as m:
        deadline = time.monotonic() + GUARD
        while "--prefetch-list: 3 of 3 ranges fetched" not in m.stderr():
            if time.monotonic() > deadline:
                pytest.fail(f"the list was not played:\n{m.stderr()}")
            time.sleep(0.02)
        played = [(r.path, r.range) for r in origin.gets()]
        firsts = [path for path, _ in played]
        assert firsts[:1] == ["/a.bin"] and "/b.bin" in firsts  # in the list's order
        assert firsts.index("/b.bin") < len(firsts)
        origin.reset_log()
        workload(tmp_path / "m2")  # everything it reads is cached already
        assert origin.gets() == []


def test_a_torn_line_and_unknown_paths_are_skipped(
    tmp_path: Path, cache: Path, origin: FaultServer
) -> None:
    origin.add("/a.bin", MIB)
    origin.add("/b.bin", MIB)
    urls = write_list(tmp_path / "t.urls", [f"{origin.url('/a.bin')} d/a.bin",
                                             f"{origin.url('/b.bin')} b.bin"])
    listed = tmp_path / "list.jsonl"
    listed.write_text(
        json.dumps({"path": "gone/x.bin", "offset": 0, "length": GRAIN}) + "\n"
        + json.dumps({"path": "b.bin", "offset": 0, "length": GRAIN}) + "\n"
        + '{"path": "d/a.bin", "off')  # a crash while writing
    with mounted(urls, tmp_path / "m", "--prefetch", "none", "--prefetch-list", str(listed),
                 cache_dir=cache, warnings_ok=True) as m:
        deadline = time.monotonic() + GUARD
        while "--prefetch-list: 1 of 2 ranges fetched" not in m.stderr():
            if time.monotonic() > deadline:
                pytest.fail(f"the list was not played:\n{m.stderr()}")
            time.sleep(0.02)
        assert "1 line(s) skipped" in m.stderr()
        assert "1 path(s) not in this mount were skipped" in m.stderr()
        origin.reset_log()
        content.check("/b.bin", 0, pread(tmp_path / "m" / "b.bin", 0, GRAIN))
        assert origin.gets() == []


def test_recorder_unit(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    rec = Recorder(path)
    rec.touch("x", 0, 10)
    rec.touch("x", 10, GRAIN)  # grain 0 again, then grain 1: the run goes on
    rec.touch("y", 5 * GRAIN, 1)
    rec.touch("x", 0, 3 * GRAIN)  # grains 0, 1 seen; 2 is new but does not follow y's
    rec.flush()  # the run in progress (x, grain 2) is not written yet
    assert read_list(path) == [("x", 0, 2 * GRAIN), ("y", 5 * GRAIN, GRAIN)]
    rec.close()
    assert read_list(path) == [("x", 0, 2 * GRAIN), ("y", 5 * GRAIN, GRAIN),
                               ("x", 2 * GRAIN, GRAIN)]
    second = Recorder(path)  # another recording is appended
    second.touch("x", 0, 1)
    second.close()
    assert read_list(path)[3:] == [("x", 0, GRAIN)]
    with open(path, "a") as f:  # the same line twice: played once
        f.write(json.dumps({"path": "x", "offset": 0, "length": GRAIN}) + "\n")
    assert len(read_list(path)) == 4

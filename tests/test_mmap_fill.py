"""A reader that maps a file and touches it all over, through a real mount (issue 20):
under ``--prefetch open`` the object is filled whole once the reads show that pattern
(``readahead.py``: ``Plan.whole``), every byte exact; under ``--prefetch none`` only
what is read is fetched. No timing assertions: the origin (tests/faultserver.py) answers
at once, and what is checked is what was fetched and what the cache holds.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faultserver import FaultServer
from tests.mountutil import ROOT, child_env, mounted, write_list

BS = 64 << 10
PAGE = 4096
SIZE = 32 << 20  # 512 blocks: 1/64 of it is 8 blocks
PATH = "/data/mapped.bin"


def _fetched_blocks(origin: FaultServer, block_size: int = BS) -> list[int]:
    """Block indexes covered by the GET answers of the origin, with repetitions."""
    blocks: list[int] = []
    for req in origin.gets(PATH):
        if req.status not in (200, 206) or not req.bytes_sent:
            continue
        start = int((req.range or "bytes=0-").removeprefix("bytes=").partition("-")[0])
        blocks.extend(range(start // block_size, (start + req.bytes_sent - 1) // block_size + 1))
    return blocks


def _complete(path: Path) -> bool:
    return os.getxattr(path, "user.rangefs.complete") == b"1"


def _wait_complete(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _complete(path):
        if time.monotonic() > deadline:
            pytest.fail(f"{path} not complete after {timeout} s: "
                        f"{os.getxattr(path, 'user.rangefs.blocks_cached')!r} blocks cached")
        time.sleep(0.05)


# The reader runs in a child process: a page fault blocks the faulting thread with the GIL
# held, and the origin's threads live in this process.
_READER = """
import mmap, random, sys
from tests import content
path, path_key, seed, count, madv = sys.argv[1:6]
with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
    if madv == "1":
        m.madvise(mmap.MADV_RANDOM)  # one 4 KiB read per fault: no read-around
    pages = list(range(len(m) // 4096))
    random.Random(int(seed)).shuffle(pages)
    for page in pages[: int(count)]:
        content.check(path_key, page * 4096, m[page * 4096 : (page + 1) * 4096])
"""


def _touch(path: Path, seed: int, count: int, *, madv_random: bool) -> None:
    """Map ``path`` in a child process and read whole pages, the first ``count`` of a
    random order (``seed``), checking every byte."""
    subprocess.run([sys.executable, "-c", _READER, str(path), PATH, str(seed), str(count),
                    "1" if madv_random else "0"], check=True, timeout=120, cwd=ROOT,
                   env=child_env())


def _pages(seed: int) -> list[int]:
    """The order in which the reader of ``seed`` touches the pages."""
    pages = list(range(SIZE // PAGE))
    random.Random(seed).shuffle(pages)
    return pages


def _mount(tmp_path: Path, origin: FaultServer) -> Path:
    origin.add(PATH, SIZE)
    return write_list(tmp_path / "m.urls", [f"{origin.url(PATH)} mapped.bin"])


def test_a_mapped_file_touched_all_over_is_filled_whole_and_exact(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    urls = _mount(tmp_path, origin)
    with mounted(urls, mnt, "--block-size", "64K", cache_dir=cache) as mount:
        _touch(mnt / "mapped.bin", 1, SIZE // PAGE, madv_random=False)
        _wait_complete(mnt / "mapped.bin")
        assert "read all over: filling it whole" in mount.stderr()
        fetched = _fetched_blocks(origin)
        # demand reads and the fill never fetch one block twice
        assert sorted(fetched) == list(range(SIZE // BS))


def test_a_few_random_faults_start_the_fill_and_every_byte_is_exact(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    urls = _mount(tmp_path, origin)
    path = mnt / "mapped.bin"
    with mounted(urls, mnt, "--block-size", "64K", cache_dir=cache) as mount:
        # 80 faults of 4 KiB in random places: 80 blocks of 512 at most (the policy's
        # threshold is 64: 4 MiB), the rest by the fill
        _touch(path, 2, 80, madv_random=True)
        _wait_complete(path)
        assert "read all over: filling it whole" in mount.stderr()
        assert sorted(_fetched_blocks(origin)) == list(range(SIZE // BS))
        origin.reset_log()
        _touch(path, 2, SIZE // PAGE, madv_random=True)  # every page, from the cache
        assert _fetched_blocks(origin) == []


def test_prefetch_none_fetches_only_what_is_touched(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    urls = _mount(tmp_path, origin)
    path = mnt / "mapped.bin"
    pages = _pages(3)[:80]
    with mounted(urls, mnt, "--block-size", "64K", "--prefetch", "none",
                 cache_dir=cache) as mount:
        _touch(path, 3, 80, madv_random=True)
        time.sleep(1.0)  # a fill, if one had started, would have fetched blocks meanwhile
        touched = {p * PAGE // BS for p in pages}
        fetched = _fetched_blocks(origin)
        assert set(fetched) == touched
        assert len(fetched) == len(touched)
        assert not _complete(path)
        assert int(os.getxattr(path, "user.rangefs.blocks_cached")) == len(touched)
        assert "filling it whole" not in mount.stderr()


def test_a_file_larger_than_the_cache_budget_is_not_filled_whole(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    urls = _mount(tmp_path, origin)
    path = mnt / "mapped.bin"
    pages = _pages(4)[:80]
    with mounted(urls, mnt, "--block-size", "64K", "--cache-size", "16M",
                 cache_dir=cache) as mount:
        _touch(path, 4, 80, madv_random=True)
        time.sleep(1.0)  # a fill, if one had started, would have fetched blocks meanwhile
        assert "does not fit the cache budget" in mount.stderr()
        touched = {p * PAGE // BS for p in pages}
        assert sorted(_fetched_blocks(origin)) == sorted(touched)
        assert not _complete(path)

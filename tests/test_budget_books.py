"""The books of the cache budget (``rangefs/budget.py``): pure accounting, no disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rangefs.budget import EXTENT_BYTES, Budget, MinFree, Victim

BS = 64 << 10
EB = EXTENT_BYTES // BS  # blocks per extent
MIB = 1 << 20


def books(tmp_path: Path, cache_size: int = 1 << 30) -> Budget:
    return Budget(tmp_path, BS, cache_size, MinFree())


def test_min_free_parses_percentages_only() -> None:
    assert MinFree.parse("5%") == MinFree(percent=5.0)
    assert MinFree.parse(" 0.5 % ") == MinFree(percent=0.5)
    assert MinFree.parse("2G") is None
    with pytest.raises(ValueError, match="less than 100"):
        MinFree.parse("100%")
    assert MinFree(percent=5.0).of(1000) == 50
    assert MinFree(nbytes=7).of(1000) == 7


def test_stored_and_evicted_blocks_are_counted(tmp_path: Path) -> None:
    b = books(tmp_path)
    b.opened("k", [], 0)
    b.stored("k", 0, 3)
    b.stored("k", EB, 1)
    assert b.used == 4 * BS and b.held_extents() == 2
    b.evicted("k", [0], 3)
    assert b.used == BS and b.held_extents() == 1 and b.evicted_bytes == 3 * BS


def test_the_least_recently_used_extents_go_first_and_no_more_than_needed(
    tmp_path: Path
) -> None:
    b = books(tmp_path)
    b.opened("a", [], 0)
    b.opened("b", [], 0)
    for extent in range(4):
        b.stored("a", extent * EB, EB)
    b.stored("b", 0, EB)
    b.touched("a", 0, 0)  # a's extent 0 is the most recent now
    # a's extents 1-3 are the oldest, in order; one extent covers 1 MiB of need
    assert b.oldest(MIB) == Victim("a", (1,))
    assert b.oldest(3 * EXTENT_BYTES) == Victim("a", (1, 2, 3))
    # never past an extent of another object: b's is older than a's extent 0
    assert b.oldest(10 * EXTENT_BYTES) == Victim("a", (1, 2, 3))
    b.evicted("a", [1, 2, 3], 3 * EB)
    assert b.oldest(10 * EXTENT_BYTES) == Victim("b", (0,))
    b.skip("b", [0])  # in use now: counted as used now
    assert b.oldest(10 * EXTENT_BYTES) == Victim("a", (0,))


def test_closed_caches_count_whole_and_are_compared_by_last_use(tmp_path: Path) -> None:
    b = books(tmp_path)
    b.load_closed([(0.0, 5 * MIB, "old")])  # an epoch-0 last use: older than anything
    b.opened("k", [], 0)
    b.stored("k", 0, 1)
    assert b.used == 5 * MIB + BS
    assert b.oldest(MIB) == Victim("old")
    b.removed("old")
    assert b.used == BS
    b.closed("k", BS)  # closed: one unit now, the newest
    assert b.oldest(MIB) == Victim("k")
    b.opened("k", [0], BS)  # reopened: per extent again, nothing counted twice
    assert b.used == BS and b.oldest(MIB) == Victim("k", (0,))


def test_the_limit_is_the_smaller_of_the_size_and_the_disk(tmp_path: Path) -> None:
    assert books(tmp_path, cache_size=10 * MIB).limit() == 10 * MIB
    disk = Budget(tmp_path, BS, None, MinFree(percent=90.0))
    vfs = os.statvfs(tmp_path)
    expected = max(0, vfs.f_bavail * vfs.f_frsize - int(vfs.f_blocks * vfs.f_frsize * 0.9))
    assert abs(disk.limit() - expected) < 64 * MIB  # (other writers move the free space)
    b = books(tmp_path, cache_size=32 * MIB)
    assert b.high_water() == 31 * MIB and b.low_water() == 30 * MIB
    assert b.fits(30 * MIB) and not b.fits(30 * MIB + 1)

"""Eviction from one object's cache (``LocalDownloadCache.evict``): the order that makes
it crash-safe, the space given back, and what a reader needs kept."""

from __future__ import annotations

import os
from pathlib import Path

from rangefs.cache import LocalDownloadCache
from rangefs.cachefiles import ObjectIdentity, read_index

BS = 64 << 10
N = 32


def identity() -> ObjectIdentity:
    return ObjectIdentity("http://h/o", N * BS, BS, '"e"', None)


def claimed(directory: Path) -> set[int]:
    _, bitmap = read_index(directory / "index")
    bits = int.from_bytes(bitmap, "little")
    return {i for i in range(N) if bits >> i & 1}


def block(i: int) -> bytes:
    return bytes([i % 251]) * BS


async def test_evict_gives_space_back_after_the_index_stops_claiming(tmp_path: Path) -> None:
    with LocalDownloadCache.open(tmp_path, identity(), reserve=False) as cache:
        assert os.stat(tmp_path / "data").st_blocks == 0  # sparse: nothing reserved
        cache.write_blocks(0, [block(i) for i in range(8)])
        await cache.flush()
        assert claimed(tmp_path) == set(range(8))
        allocated = os.stat(tmp_path / "data").st_blocks * 512
        assert allocated >= 8 * BS
        assert await cache.evict([(2, 5)]) == 4
        assert claimed(tmp_path) == {0, 1, 6, 7}
        assert not (tmp_path / "index.prev").exists()  # no older claim survives
        assert os.stat(tmp_path / "data").st_blocks * 512 <= allocated - 4 * BS
        assert cache.read_at(0, 2 * BS) == block(0) + block(1)
        assert cache.bitmap.first_clear(0, 8) == 2


async def test_what_a_reader_needs_when_the_lock_is_held_is_kept(tmp_path: Path) -> None:
    with LocalDownloadCache.open(tmp_path, identity(), reserve=False) as cache:
        cache.write_blocks(0, [block(i) for i in range(12)])
        asked: list[tuple[int, int]] = []

        def needed(first: int, last: int) -> bool:
            asked.append((first, last))
            return first == 4

        assert await cache.evict([(0, 3), (4, 7), (8, 11)], needed) == 8
        assert asked == [(0, 3), (4, 7), (8, 11)]
        assert cache.read_at(4 * BS, 4 * BS) == b"".join(block(i) for i in range(4, 8))
        assert claimed(tmp_path) == {4, 5, 6, 7}


async def test_unpersisted_blocks_are_made_durable_before_the_eviction_claims(
    tmp_path: Path,
) -> None:
    """Blocks written since the last flush and not evicted are claimed by the eviction's
    index write, which fdatasyncs first: a remount serves them."""
    identity_ = identity()
    with LocalDownloadCache.open(tmp_path, identity_, reserve=False) as cache:
        cache.write_blocks(0, [block(i) for i in range(4)])
        await cache.evict([(0, 0)])
        assert claimed(tmp_path) == {1, 2, 3}
    with LocalDownloadCache.open(tmp_path, identity_, reserve=False) as again:
        assert again.read_at(BS, 3 * BS) == block(1) + block(2) + block(3)
        assert again.bitmap.first_set(0) == 1


def test_an_object_whose_block_map_would_not_fit_in_memory_is_refused(tmp_path: Path) -> None:
    """4 EiB in blocks of 64 KiB would need an 8 TiB block map: refused (ENOSPC for a
    reader) with the way out, before anything is created."""
    import pytest

    from rangefs import errors

    huge = ObjectIdentity("http://h/huge", 1 << 62, BS, '"e"', None)
    with pytest.raises(errors.NotEnoughSpace, match="use a larger --block-size"):
        LocalDownloadCache.open(tmp_path / "o", huge, reserve=False)
    assert not (tmp_path / "o").exists()

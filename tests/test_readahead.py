"""The read-ahead policy of one handle (``rangefs/readahead.py``): pure decisions."""

from __future__ import annotations

from rangefs.readahead import (
    CACHE_READAHEAD,
    FIRST_PRELOAD,
    FIRST_READAHEAD,
    MAX_READAHEAD,
    Plan,
    ReadAhead,
)

MIB = 1 << 20
SIZE = 1 << 40


def test_a_first_read_at_zero_preloads_a_little_and_fetches_nothing_ahead() -> None:
    policy = ReadAhead(SIZE)
    assert policy.on_read(0, MIB) == Plan((MIB, MIB + FIRST_PRELOAD), False, 0)


def test_sequential_reads_grow_the_window_and_keep_the_preload_ahead() -> None:
    policy = ReadAhead(SIZE)
    policy.on_read(0, MIB)
    windows = []
    preloads = []
    for i in range(1, 12):
        plan = policy.on_read(i * MIB, (i + 1) * MIB)
        assert plan.sequential
        windows.append(plan.readahead)
        preloads.append(plan.preload)
    assert windows[:4] == [FIRST_READAHEAD, 2 * FIRST_READAHEAD, 4 * FIRST_READAHEAD,
                           MAX_READAHEAD]
    assert set(windows[3:]) == {MAX_READAHEAD}
    # the second read preloads CACHE_READAHEAD past its end; later ones only when less
    # than half of it is left
    assert preloads[0] == (FIRST_PRELOAD + MIB, 2 * MIB + CACHE_READAHEAD)
    assert preloads[1:] == [None] * 10


def test_a_read_elsewhere_resets_the_window() -> None:
    policy = ReadAhead(SIZE)
    policy.on_read(0, MIB)
    assert policy.on_read(MIB, 2 * MIB).sequential
    plan = policy.on_read(100 * MIB, 101 * MIB)
    assert plan == Plan(None, False, 0)
    assert policy.on_read(101 * MIB, 102 * MIB).readahead == FIRST_READAHEAD


def test_preloads_stop_at_the_end_of_the_object() -> None:
    size = 3 * MIB
    policy = ReadAhead(size)
    assert policy.on_read(0, MIB).preload == (MIB, size)
    assert policy.on_read(MIB, 2 * MIB).preload is None  # already preloaded to the end
    small = ReadAhead(MIB)
    assert small.on_read(0, MIB).preload is None  # nothing past the end

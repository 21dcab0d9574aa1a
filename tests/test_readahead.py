"""The read-ahead policy of one handle (``rangefs/readahead.py``): pure decisions."""

from __future__ import annotations

from rangefs.readahead import (
    CACHE_READAHEAD,
    FIRST_PRELOAD,
    FIRST_READAHEAD,
    MAX_READAHEAD,
    WHOLE_MIN_FETCHED,
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


# -- a random reader of the whole file (Plan.whole) ----------------------------------------

BIG = 256 * MIB


def _random_whole_file(policy: ReadAhead, reads: int, *, seed: int = 20) -> list[bool]:
    """Faults of a reader touching a mapped file in random order: reads of 1 MiB windows
    centred on random pages, each fetching what is not cached yet (as a fresh cache)."""
    import random

    rng = random.Random(seed)
    fetched: set[int] = set()
    answers = []
    for _ in range(reads):
        page = rng.randrange(BIG // 4096)
        offset = max(0, page * 4096 - 512 * 1024)
        blocks = set(range(offset // (64 << 10), (offset + MIB - 1) // (64 << 10) + 1))
        missing = len(blocks - fetched) * (64 << 10)
        fetched |= blocks
        answers.append(policy.on_read(offset, offset + MIB, missing).whole)
    return answers


def test_a_random_reader_of_the_whole_file_is_told_after_a_few_reads() -> None:
    for seed in range(20):
        answers = _random_whole_file(ReadAhead(BIG), 12, seed=seed)
        # 1/64 of 256 MiB is 4 MiB: the 4th or 5th fault of 1 MiB (5th or 6th when two
        # land in one part of the file)
        assert True in answers[3:6], (seed, answers)
        assert answers.index(True) >= 3


def test_a_few_scattered_reads_of_a_big_file_are_not_a_whole_file_reader() -> None:
    # a model loader: a 64 KiB header, then 24 tensors of 1 MiB of a 4 GiB file
    policy = ReadAhead(4 << 30)
    assert not policy.on_read(0, 64 << 10, 64 << 10).whole
    for i in range(24):
        offset = (i * 167 % 4000 + 1) * MIB
        assert not policy.on_read(offset, offset + MIB, MIB).whole
    # sqlite-like: 4 KiB pages all over a 1 GiB file, 200 of them (one 64 KiB block each)
    db = ReadAhead(1 << 30)
    for i in range(200):
        offset = (i * 7919 % 16384) * (64 << 10)
        assert not db.on_read(offset, offset + 4096, 64 << 10).whole


def test_a_few_random_reads_of_a_small_file_fetch_only_their_blocks() -> None:
    # 12 blocks of the 256 of a 16 MiB file, all over it: less than WHOLE_MIN_FETCHED
    block = 64 << 10
    order = [b * 97 % 256 for b in range(256)]  # every block once, scattered
    policy = ReadAhead(16 * MIB)
    answers = [policy.on_read(b * block, b * block + 4096, block).whole for b in order]
    assert not any(answers[:12])
    # a reader that goes on is taken to read it all once it fetched WHOLE_MIN_FETCHED
    assert answers.index(True) == WHOLE_MIN_FETCHED // block - 1


def test_reads_in_one_area_are_not_a_whole_file_reader() -> None:
    # 16 MiB fetched (1/16 of the file) in random order, all within its first 8 MiB (2 of
    # its 64 parts): no spread
    policy = ReadAhead(BIG)
    for i in range(16):
        offset = (i * 5 % 16) * MIB // 2
        assert not policy.on_read(offset, offset + MIB, MIB).whole


def test_a_reader_that_mostly_finds_its_blocks_cached_is_not_a_whole_file_reader() -> None:
    # spread over the file and fetching enough, but most reads find their blocks cached
    policy = ReadAhead(BIG)
    answers = []
    for i in range(40):
        offset = (i * 37 % 256) * MIB
        missing = MIB if i % 3 == 0 else 0
        answers.append(policy.on_read(offset, offset + MIB, missing).whole)
    assert not any(answers)


def test_a_sequential_reader_is_never_told_whole_and_keeps_its_read_ahead() -> None:
    policy = ReadAhead(BIG)
    plans = [policy.on_read(i * MIB, (i + 1) * MIB, MIB) for i in range(64)]
    assert not any(p.whole for p in plans)
    assert [p.sequential for p in plans] == [False] + [True] * 63
    assert plans[-1].readahead == MAX_READAHEAD

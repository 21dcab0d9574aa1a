"""Tests for rangefs.ranges: block arithmetic, the bitmap, tail/notify (seed scenarios A, B)."""

from __future__ import annotations

import contextlib
import json
import random
import sys
from collections.abc import Callable, Iterator
from types import FrameType

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from rangefs.ranges import (
    ByteRange,
    ByteRanges,
    ByteRangesTracker,
    block_span,
    num_blocks,
    range_for_index,
    ranges,
)

# --------------------------------------------------------------------------------------
# A. Block arithmetic


def test_byte_range_size_and_str() -> None:
    assert ByteRange(0, 9).size == 10
    assert ByteRange(5, 5).size == 1
    assert ByteRange(5, 4).size == 0
    assert ByteRange(-1, -1).size == 0
    assert ByteRange(-1, 10).size == 0
    assert str(ByteRange(128, 255)) == "[128:255]"


@pytest.mark.parametrize(
    ("size", "bs", "expected"),
    [(1000, 100, 10), (1005, 100, 11), (99, 100, 1), (0, 100, 0), (10, 1, 10), (100, 100, 1)],
)
def test_num_blocks_table(size: int, bs: int, expected: int) -> None:
    assert num_blocks(size, bs) == expected
    assert ByteRangesTracker(size, bs).num_blocks == expected


@pytest.mark.parametrize(("size", "bs"), [(10, 0), (10, -1), (-1, 10)])
def test_num_blocks_rejects(size: int, bs: int) -> None:
    with pytest.raises(ValueError):
        num_blocks(size, bs)
    with pytest.raises(ValueError):
        ByteRangesTracker(size, bs)


def test_range_for_index() -> None:
    assert range_for_index(0, 1036, 128) == ByteRange(0, 127)
    assert range_for_index(8, 1036, 128) == ByteRange(1024, 1035)
    assert range_for_index(1, 256, 128) == ByteRange(128, 255)
    for bad in (-1, 9):
        with pytest.raises(ValueError):
            range_for_index(bad, 1036, 128)
    with pytest.raises(ValueError):
        range_for_index(0, 0, 128)
    with pytest.raises(ValueError):
        range_for_index(0, 10, 0)


@pytest.mark.parametrize(
    ("start", "end", "bs", "expected"),
    [
        (0, 99, 25, [(0, 24), (25, 49), (50, 74), (75, 99)]),
        (0, 99, 30, [(0, 29), (30, 59), (60, 89), (90, 99)]),
        (50, 149, 25, [(50, 74), (75, 99), (100, 124), (125, 149)]),
        (0, 49, 100, [(0, 49)]),
        (10, 9, 100, []),
        (0, 99, 0, []),
        (0, 99, -1, []),
        (10, 5, 3, []),  # the seed yielded a bogus [10:5] here
        (7, 7, 4, [(7, 7)]),
    ],
)
def test_ranges_split(start: int, end: int, bs: int, expected: list[tuple[int, int]]) -> None:
    assert [(r.start, r.end) for r in ranges(start, end, bs)] == expected


def test_block_span() -> None:
    assert block_span(0, 8, 8) == (0, 0)
    assert block_span(12, 8, 8) == (1, 2)  # the seed's mid-block bug: block 2 is touched
    assert block_span(7, 2, 8) == (0, 1)
    assert block_span(56, 1, 8) == (7, 7)
    for args in ((0, 0, 8), (-1, 1, 8), (0, 1, 0)):
        with pytest.raises(ValueError):
            block_span(*args)


# --------------------------------------------------------------------------------------
# A. Bitmap


def test_positions_and_iteration_idiom() -> None:
    t = ByteRangesTracker(1010, 250)
    for pos in (0, 500, 600, 1001):
        t.set(pos)
    assert [str(r) for r in t.all_set()] == ["[0:249]", "[500:749]", "[1000:1009]"]
    assert [r.size for r in t.all_set()] == [250, 250, 10]
    assert [str(r) for r in t.all_clear()] == ["[250:499]", "[750:999]"]
    # Feed the returned value back: every set block is visited exactly once.
    seen = []
    nxt = t.next_set(0)
    while nxt is not None:
        seen.append(nxt[1])
        nxt = t.next_set(nxt[0])
    assert seen == list(t.all_set())
    # Adjacent set blocks are both visited (the seed's ret+1 idiom would skip one).
    t.set(250)
    seen = []
    nxt = t.next_set(0)
    while nxt is not None:
        seen.append(nxt[1].start)
        nxt = t.next_set(nxt[0])
    assert seen == [0, 250, 500, 1000]
    assert t.next_clear(0) == (4, ByteRange(750, 999))
    assert t.next_clear(4) is None


def test_position_semantics_out_of_range() -> None:
    t = ByteRangesTracker(1024, 128)
    for pos in (0, 512, 513, 1023, -1, 1025, 1024):
        t.set(pos)
    assert [t.is_block_set(i) for i in range(8)] == [
        True, False, False, False, True, False, False, True,
    ]  # fmt: skip
    assert t.block(-1) == -1 and t.block(1024) == -1 and t.block(1023) == 7
    # Out of range positions are neither set nor clear (seed contract).
    assert not t.is_set(1024) and not t.is_clear(1024)
    assert not t.is_set(-1) and not t.is_clear(-1)
    assert t.is_set(130) is False and t.is_clear(130) is True
    t.clear(513)
    assert not t.is_set(512)
    t.clear(5000)  # ignored
    assert t.count_set() == 2
    with pytest.raises(IndexError):
        t.set_block(8)
    with pytest.raises(IndexError):
        t.clear_block(-1)
    assert t.is_block_set(8) is False


def test_json_exact_bytes_and_roundtrip() -> None:
    t = ByteRangesTracker(1024, 128)
    for pos in (0, 512, 513, 1023, -1, 1025):
        t.set(pos)
    js = t.to_json()
    assert js == '{"content_size":"1024","block_size":128,"ranges":["91"]}'
    back = ByteRangesTracker.from_json(js)
    assert [back.is_block_set(i) for i in range(8)] == [t.is_block_set(i) for i in range(8)]
    assert back.size == 1024 and back.block_size == 128

    fresh = ByteRangesTracker(1036, 128)
    assert fresh.to_json() == '{"content_size":"1036","block_size":128,"ranges":["0"]}'
    for i in range(9):
        fresh.set_block(i)
    assert fresh.to_json() == '{"content_size":"1036","block_size":128,"ranges":["1ff"]}'
    empty = ByteRangesTracker(0, 128)
    assert empty.to_json() == '{"content_size":"0","block_size":128,"ranges":[]}'
    assert ByteRangesTracker.from_json(empty.to_json()).num_blocks == 0
    assert ByteRangesTracker.from_json('{"content_size":"0","block_size":1,"ranges":null}')

    big = ByteRangesTracker(130 * 64, 64)  # 130 blocks: three words
    big.set_block(0)
    big.set_block(64)
    big.set_block(129)
    assert json.loads(big.to_json())["ranges"] == ["1", "1", "2"]
    assert ByteRanges.from_json(big.to_json()).to_bytes() == big.to_bytes()


@pytest.mark.parametrize(
    "doc",
    [
        "not json",
        "[]",
        '{"content_size":"abc","block_size":128,"ranges":["0"]}',
        '{"content_size":1024,"block_size":128,"ranges":["0"]}',
        '{"content_size":"","block_size":128,"ranges":["0"]}',
        '{"content_size":"-5","block_size":128,"ranges":["0"]}',
        '{"block_size":128,"ranges":["0"]}',
        '{"content_size":"1024","block_size":0,"ranges":["0"]}',
        '{"content_size":"1024","block_size":true,"ranges":["0"]}',
        '{"content_size":"1024","block_size":128}',
        '{"content_size":"1024","block_size":128,"ranges":["xyz"]}',
        '{"content_size":"1024","block_size":128,"ranges":["0x1"]}',
        '{"content_size":"1024","block_size":128,"ranges":[1]}',
        '{"content_size":"1024","block_size":128,"ranges":["11111111111111111"]}',
        '{"content_size":"1024","block_size":128,"ranges":"0"}',
        # word count does not match (scenario A5)
        '{"content_size":"1024","block_size":128,"ranges":[]}',
        '{"content_size":"1024","block_size":128,"ranges":["0","0"]}',
        # bits beyond the last block
        '{"content_size":"1024","block_size":128,"ranges":["100"]}',
    ],
)
def test_json_rejects(doc: str) -> None:
    with pytest.raises(ValueError):
        ByteRangesTracker.from_json(doc)


def test_from_bytes_validates() -> None:
    t = ByteRangesTracker(1036, 128)  # 9 blocks: 2 bytes
    t.set_block(8)
    assert t.to_bytes() == b"\x00\x01"
    assert ByteRangesTracker.from_bytes(1036, 128, b"\x00\x01").is_block_set(8)
    with pytest.raises(ValueError):
        ByteRangesTracker.from_bytes(1036, 128, b"\x00")
    with pytest.raises(ValueError):
        ByteRangesTracker.from_bytes(1036, 128, b"\x00\x01\x00")
    with pytest.raises(ValueError):
        ByteRangesTracker.from_bytes(1036, 128, b"\x00\x02")  # block 9 does not exist
    assert ByteRangesTracker.from_bytes(0, 128, b"").complete()


def test_counts_cached_bytes_complete() -> None:
    t = ByteRangesTracker(130, 64)  # blocks of 64, 64, 2
    assert (t.count_set(), t.cached_bytes(), t.complete()) == (0, 0, False)
    t.set_block(2)
    assert (t.count_set(), t.cached_bytes()) == (1, 2)
    t.set_block(0)
    t.set_block(0)
    assert (t.count_set(), t.cached_bytes()) == (2, 66)
    t.set_block(1)
    assert (t.count_set(), t.cached_bytes(), t.complete()) == (3, 130, True)
    assert ByteRangesTracker(0, 64).complete()


def test_first_set_clear_bounds() -> None:
    t = ByteRangesTracker(100 * 8, 8)  # 100 blocks
    assert t.first_set() is None
    assert t.first_clear() == 0
    t.set_block(37)
    assert t.first_set() == 37
    assert t.first_set(37) == 37
    assert t.first_set(38) is None
    assert t.first_set(0, 37) is None
    assert t.first_set(0, 38) == 37
    assert t.first_set(-5) == 37
    assert t.first_set(50, 10) is None
    for i in range(100):
        t.set_block(i)
    assert t.first_clear() is None
    t.clear_block(99)
    assert t.first_clear(0) == 99
    assert t.first_clear(0, 99) is None
    assert t.first_clear(0, 1000) == 99


@contextlib.contextmanager
def _python_lines_at_most(budget: int) -> Iterator[list[int]]:
    """Count the Python lines executed inside the block (in every function it calls) and
    fail as soon as there are more than ``budget``: work done per byte or per block in
    Python shows up here as millions of lines, whatever the machine's speed; a search in C
    (``re``, ``bytes.find``, ``int.from_bytes``) as a handful."""
    count = [0]

    def local(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        if event == "line":
            count[0] += 1
            if count[0] > budget:
                raise AssertionError(f"more than {budget} Python lines: work per byte/block")
        return local

    def call(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        return local

    previous = sys.gettrace()
    sys.settrace(call)
    try:
        yield count
    finally:
        sys.settrace(previous)


def test_search_is_fast_on_huge_bitmaps() -> None:
    """The searches skip whole 0x00 / 0xff bytes in C: on an 8 MiB bitmap they run a
    bounded number of Python lines (not one per byte or block), however fast the machine."""
    n = 64 * 1024 * 1024  # 64 Mi blocks = 8 MiB of bitmap
    t = ByteRangesTracker(n, 1)
    t.set_block(n - 3)
    with _python_lines_at_most(2000) as lines:
        for _ in range(5):
            assert t.first_set(0) == n - 3
            assert t.next_set(0) == (n - 2, ByteRange(n - 3, n - 3))
        t._load(b"\xff" * (n // 8))  # everything set
        t.clear_block(n - 2)
        for _ in range(5):
            assert t.first_clear(1) == n - 2
        assert t.count_set() == n - 1
    assert lines[0] > 10  # the counter did see the searches (tracing works here)


def test_mutation_while_iterating() -> None:
    t = ByteRangesTracker(10, 1)
    seen = []
    for r in t.all_clear():
        seen.append(r.start)
        t.set_block(r.start)
        if r.start + 2 < 10:
            t.set_block(r.start + 2)  # ahead of the cursor: skipped by the iterator
    assert seen == [0, 1, 4, 5, 8, 9]
    assert t.complete()


# --------------------------------------------------------------------------------------
# A. Hypothesis: the tracker against a Python set model

ops = st.lists(
    st.tuples(st.sampled_from(["set", "clear", "setpos", "clearpos"]), st.integers(-3, 300)),
    max_size=120,
)


@settings(max_examples=250, deadline=None)
@given(
    size=st.integers(0, 2100),
    bs=st.integers(1, 40),
    actions=ops,
    probes=st.lists(st.tuples(st.integers(-2, 300), st.integers(-2, 300)), max_size=8),
)
def test_tracker_matches_set_model(
    size: int,
    bs: int,
    actions: list[tuple[str, int]],
    probes: list[tuple[int, int]],
) -> None:
    for cls in (ByteRangesTracker, ByteRanges):
        t = cls(size, bs)
        n = t.num_blocks
        model: set[int] = set()
        for op, arg in actions:
            if op in ("set", "clear"):
                if not 0 <= arg < n:
                    continue
                if op == "set":
                    assert t.set_block(arg) == (arg not in model)
                    model.add(arg)
                else:
                    assert t.clear_block(arg) == (arg in model)
                    model.discard(arg)
            else:
                pos = arg * 7
                if op == "setpos":
                    t.set(pos)
                    if 0 <= pos < size:
                        model.add(pos // bs)
                else:
                    t.clear(pos)
                    if 0 <= pos < size:
                        model.discard(pos // bs)
        assert [t.is_block_set(i) for i in range(n)] == [i in model for i in range(n)]
        assert t.count_set() == len(model)
        assert t.complete() == (len(model) == n)
        assert t.cached_bytes() == sum(range_for_index(i, size, bs).size for i in model)
        assert [r.start // bs for r in t.all_set()] == sorted(model)
        assert [r.start // bs for r in t.all_clear()] == sorted(set(range(n)) - model)
        for start, stop in [*probes, (0, None)]:
            hi = n if stop is None else min(stop, n)
            window = range(max(start, 0), hi)
            want_set = next((i for i in window if i in model), None)
            want_clear = next((i for i in window if i not in model), None)
            assert t.first_set(start, stop) == want_set
            assert t.first_clear(start, stop) == want_clear
            if stop is None:
                ns = t.next_set(start)
                assert (ns[0] - 1 if ns else None) == want_set
                nc = t.next_clear(start)
                assert (nc[0] - 1 if nc else None) == want_clear
        for back in (
            cls.from_bytes(size, bs, t.to_bytes()),
            cls.from_json(t.to_json()),
        ):
            assert back.to_bytes() == t.to_bytes()
            assert back.count_set() == len(model)
        if isinstance(t, ByteRanges):
            prefix = next((i for i in range(n) if i not in model), n)
            tail = t.tail()
            if prefix == 0:
                assert tail is None
            else:
                assert tail == ByteRange(0, min(prefix * bs, size) - 1)
            loaded = ByteRanges.from_bytes(size, bs, t.to_bytes())
            assert loaded.tail() == tail


# --------------------------------------------------------------------------------------
# B. Tail and notification


async def test_notify_and_tail_seed() -> None:
    br = ByteRanges(4096, 1024)
    assert br.tail() is None
    ev = br.notify()
    assert not ev.is_set()
    br.set_block(2)  # not an extension of the prefix
    assert not ev.is_set()
    assert br.tail() is None
    br.set(0)
    assert ev.is_set()
    assert br.tail() == ByteRange(0, 1023)
    ev2 = br.notify()
    assert ev2 is not ev and not ev2.is_set()
    br.set_block(1)  # extension absorbs the already-set block 2
    assert ev2.is_set()
    assert br.tail() == ByteRange(0, 3071)
    br.set_block(3)
    assert br.tail() == ByteRange(0, 4095)
    assert br.notify().is_set()  # complete: already signalled


async def test_subscribe_then_check_idiom() -> None:
    br = ByteRanges(256, 64)
    # Checking first and subscribing after an extension yields an unsignalled event: the
    # caller must re-check tail() after subscribing (which finds the extension).
    assert br.tail() is None
    br.set_block(0)
    ev = br.notify()
    assert not ev.is_set()
    assert br.tail() == ByteRange(0, 63)
    # Subscribe, then the extension happens: the event fires.
    br.set_block(1)
    assert ev.is_set()


async def test_wait_tail_in_order_and_gap() -> None:
    br = ByteRanges(256, 64)
    with trio.move_on_after(0.01) as scope:
        await br.wait_tail(-1)
    assert scope.cancelled_caught
    for i in range(4):
        br.set_block(i)
        with trio.fail_after(1):
            assert await br.wait_tail(-1) == ByteRange(0, min((i + 1) * 64, 256) - 1)
    with trio.fail_after(1):
        assert await br.wait_tail(255) == ByteRange(0, 255)  # complete: at once


async def test_wait_tail_gap_releases_on_fill() -> None:
    br = ByteRanges(256, 64)
    br.set_block(0)
    br.set_block(2)
    assert br.tail() == ByteRange(0, 63)
    got: list[ByteRange] = []

    async def waiter() -> None:
        got.append(await br.wait_tail(63))

    with trio.fail_after(0.1 + 0.02):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(0.02)
            assert got == []
            br.set_block(1)
    assert got == [ByteRange(0, 191)]


async def test_wait_tail_zero_byte_object() -> None:
    br = ByteRanges(0, 64)
    assert br.tail() is None
    assert br.notify().is_set()
    with trio.fail_after(1):
        assert await br.wait_tail(-1) == ByteRange(0, -1)


async def test_block_event() -> None:
    br = ByteRanges(512, 64)
    ev = br.block_event(5)
    assert br.block_event(5) is ev
    assert br.pending_block_events() == 1
    br.set_block(4)
    assert not ev.is_set()
    br.set_block(5)
    assert ev.is_set()
    assert br.pending_block_events() == 0
    assert br.block_event(5).is_set()
    with pytest.raises(IndexError):
        br.block_event(8)


async def test_reset_fires_nothing_and_waiters_keep_waiting() -> None:
    br = ByteRanges(256, 64)
    br.set_block(0)
    br.set_block(1)
    ev_tail = br.notify()
    ev_block = br.block_event(3)
    br.reset()
    assert br.count_set() == 0 and br.tail() is None and br.first_set() is None
    assert not ev_tail.is_set() and not ev_block.is_set()
    br.set_block(3)
    assert ev_block.is_set() and not ev_tail.is_set()
    br.set_block(0)
    assert ev_tail.is_set()
    assert br.tail() == ByteRange(0, 63)


async def _stress_round(rng: random.Random) -> int:
    nblocks = rng.randint(1, 40)
    br = ByteRanges(nblocks * 4 - rng.randint(0, 3), 4)
    order = list(range(nblocks))
    rng.shuffle(order)
    results: list[tuple[int, ByteRange]] = []
    nwaiters = rng.randint(1, 60)

    async def waiter(after: int, delay_steps: int) -> None:
        for _ in range(delay_steps):
            await trio.lowlevel.checkpoint()
        results.append((after, await br.wait_tail(after)))

    async def block_waiter(i: int, delay_steps: int) -> None:
        for _ in range(delay_steps):
            await trio.lowlevel.checkpoint()
        await br.block_event(i).wait()
        assert br.is_block_set(i)

    async def setter() -> None:
        for i in order:
            for _ in range(rng.randint(0, 2)):
                await trio.lowlevel.checkpoint()
            br.set_block(i)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(nwaiters):
                nursery.start_soon(waiter, rng.randint(-1, br.size - 2), rng.randint(0, 5))
                nursery.start_soon(block_waiter, rng.randrange(nblocks), rng.randint(0, 5))
            nursery.start_soon(setter)
    assert len(results) == nwaiters
    for after, tail in results:
        assert tail.end > after
    assert br.pending_block_events() == 0
    return 2 * nwaiters


async def test_lost_wakeup_stress() -> None:
    """Scenario B9: many waiters with random targets, blocks completing in random order with
    random scheduling; every waiter must wake. 10k waits in total."""
    rng = random.Random(1234)
    waits = 0
    while waits < 10_000:
        waits += await _stress_round(rng)

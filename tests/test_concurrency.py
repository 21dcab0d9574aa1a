"""ConcurrencyController (ratecontrol.py): how a download chooses its number of streams.

The decisions are driven with made-up counters (no clock, no network); the trio loop on
an autojump MockClock. No timing assertions: the figures are in tests/bench."""

from __future__ import annotations

import trio
import trio.testing

from rangefs.download import download_request_bytes
from rangefs.ratecontrol import ConcurrencyController, ConcurrencyPlan

MiB = 1 << 20


class Link:
    """A made-up link: ``per_stream`` B/s per stream up to ``ceiling`` B/s in all."""

    def __init__(self, per_stream: float, ceiling: float) -> None:
        self.per_stream = per_stream
        self.ceiling = ceiling

    def rate(self, streams: int) -> float:
        return min(self.ceiling, streams * self.per_stream)


def drive(ctl: ConcurrencyController, link: Link, steps: int, *,
          errors_at: frozenset[int] = frozenset()) -> list[int]:
    """Feed ``steps`` intervals of ``link`` at the controller's count; the counts used."""
    now, received, errors = 0.0, 0.0, 0
    counts = []
    ctl.observe(now, 0, 0)
    for step in range(steps):
        dt = ctl.plan.interval
        received += link.rate(ctl.count) * dt
        now += dt
        if step in errors_at:
            errors += 1
        counts.append(ctl.observe(now, int(received), errors))
    return counts


def test_it_grows_while_the_rate_grows_and_stops_at_the_maximum() -> None:
    ctl = ConcurrencyController(ConcurrencyPlan(initial=4, maximum=64))
    counts = drive(ctl, Link(16 * MiB, 10_000 * MiB), 20)
    assert counts[-1] == 64
    assert max(counts) == 64  # never above the cap


def test_it_goes_back_to_the_best_count_when_more_does_not_pay() -> None:
    # one stream already fills the link: doubling gains nothing
    ctl = ConcurrencyController(ConcurrencyPlan(initial=4, maximum=64, probe_every=1e9))
    counts = drive(ctl, Link(800 * MiB, 800 * MiB), 20)
    assert counts[-1] == 4


def test_it_settles_where_the_link_is_full() -> None:
    # 16 MiB/s per stream, 400 MiB/s in all: 25 streams fill it; 32 is the first doubling
    # past it, and 64 brings nothing more
    ctl = ConcurrencyController(ConcurrencyPlan(initial=4, maximum=64, probe_every=1e9))
    counts = drive(ctl, Link(16 * MiB, 400 * MiB), 30)
    assert counts[-1] == 32


def test_an_error_halves_the_count_and_holds_growth() -> None:
    plan = ConcurrencyPlan(initial=16, maximum=64, hold=1.0, probe_every=0.5)
    ctl = ConcurrencyController(plan)
    counts = drive(ctl, Link(16 * MiB, 10_000 * MiB), 12, errors_at=frozenset({5}))
    before = counts[4]
    assert counts[5] == before // 2
    # no growth within the hold (1 s = 10 intervals of 0.1 s)
    assert all(c <= before // 2 for c in counts[5:11])


def test_probes_find_a_link_that_got_faster() -> None:
    plan = ConcurrencyPlan(initial=8, maximum=64, probe_every=0.3)
    ctl = ConcurrencyController(plan)
    link = Link(16 * MiB, 128 * MiB)  # full at 8 streams
    drive(ctl, link, 10)
    assert ctl.count == 8
    link.ceiling = 10_000 * MiB  # the cap is gone: probes raise the count
    drive(ctl, link, 60)
    assert ctl.count > 8


def test_the_plan_keeps_initial_within_its_bounds() -> None:
    assert ConcurrencyPlan(initial=16, maximum=4).initial == 4
    assert ConcurrencyPlan(initial=0, minimum=2, maximum=4).initial == 2


async def test_run_applies_the_count_to_the_slots(
        autojump_clock: trio.testing.MockClock) -> None:
    ctl = ConcurrencyController(ConcurrencyPlan(initial=2, maximum=16))
    received = 0

    def counters() -> tuple[int, int]:
        nonlocal received
        received += ctl.count * MiB  # every stream brings 1 MiB per poll
        return received, 0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ctl.run, counters)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert ctl.slots.total_tokens == ctl.count == 16


def test_download_requests_leave_every_stream_work() -> None:
    assert download_request_bytes(256 * MiB, MiB, 64) == 2 * MiB
    assert download_request_bytes(100 << 30, MiB, 64) == 8 * MiB  # at most 8 MiB
    assert download_request_bytes(3 * MiB, MiB, 64) == MiB  # at least one block
    assert download_request_bytes(256 * MiB, 4 * MiB, 64) == 4 * MiB

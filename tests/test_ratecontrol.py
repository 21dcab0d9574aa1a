"""Rate limits and backoff; timing tests run on trio's autojump clock (virtual time)."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from rangefs.errors import PermanentError, RemoteChanged, TransientError
from rangefs.ratecontrol import Backoff, BackoffPolicy, Limiter, new_backoff

MiB = 1 << 20


def now() -> float:
    return trio.current_time()


# --- Limiter: unlimited ---------------------------------------------------------------


async def test_unlimited_never_waits(autojump_clock: trio.testing.MockClock) -> None:
    limiter = Limiter()
    assert limiter.unlimited
    start = now()
    for _ in range(1000):
        await limiter.wait_request()
        await limiter.wait_bytes(100 * MiB)
    assert now() == start


async def test_unlimited_waits_are_checkpoints() -> None:
    limiter = Limiter()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await limiter.wait_request()
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await limiter.wait_bytes(1)


@pytest.mark.parametrize("rate", [0, -1, float("nan"), float("inf")])
def test_limiter_rejects_bad_rates(rate: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        Limiter(requests_per_second=rate)
    with pytest.raises(ValueError, match="positive"):
        Limiter(bytes_per_second=rate)


async def test_wait_bytes_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        await Limiter(bytes_per_second=10).wait_bytes(-1)
    with pytest.raises(ValueError, match="negative"):
        await Limiter().wait_bytes(-1)


def test_limiter_built_outside_trio_run() -> None:
    limiter = Limiter(requests_per_second=1)

    async def main() -> float:
        start = now()
        for _ in range(3):
            await limiter.wait_request()
        return now() - start

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert elapsed == pytest.approx(2.0)


# --- Limiter: requests ----------------------------------------------------------------


async def test_requests_sequential(autojump_clock: trio.testing.MockClock) -> None:
    # burst max(1, 2) = 2 go at once, the other 8 at 0.5 s intervals
    limiter = Limiter(requests_per_second=2)
    start = now()
    times = []
    for _ in range(10):
        await limiter.wait_request()
        times.append(now() - start)
    assert times == pytest.approx([0, 0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])


async def test_requests_seed_one_per_tick(autojump_clock: trio.testing.MockClock) -> None:
    # seed 1.11: 1 request per 500 ms lets 2 waits through in about 500 ms (burst 1)
    limiter = Limiter(requests_per_second=1)
    start = now()
    await limiter.wait_request()
    await limiter.wait_request()
    assert now() - start == pytest.approx(1.0)


async def test_requests_fractional_rate(autojump_clock: trio.testing.MockClock) -> None:
    limiter = Limiter(requests_per_second=0.5)  # burst is still one request
    start = now()
    times = []
    for _ in range(3):
        await limiter.wait_request()
        times.append(now() - start)
    assert times == pytest.approx([0, 2, 4])


async def test_requests_concurrent_fifo(autojump_clock: trio.testing.MockClock) -> None:
    limiter = Limiter(requests_per_second=2)
    start = now()
    done: list[tuple[int, float]] = []

    async def worker(i: int) -> None:
        await limiter.wait_request()
        done.append((i, now() - start))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(worker, i)
            await trio.testing.wait_all_tasks_blocked()  # fix the arrival order
    assert [i for i, _ in done] == list(range(8))  # first come, first served
    assert [t for _, t in done] == pytest.approx([0, 0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])


async def test_requests_burst_refills_after_idle(autojump_clock: trio.testing.MockClock) -> None:
    limiter = Limiter(requests_per_second=4)
    for _ in range(4):
        await limiter.wait_request()
    await trio.sleep(100)  # the bucket holds at most 4 tokens, not 400
    start = now()
    for _ in range(5):
        await limiter.wait_request()
    assert now() - start == pytest.approx(0.25)


async def test_request_cancelled_consumes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = Limiter(requests_per_second=1)
    start = now()
    await limiter.wait_request()  # the burst token
    with trio.move_on_after(0.3) as scope:
        await limiter.wait_request()
    assert scope.cancelled_caught
    await limiter.wait_request()
    assert now() - start == pytest.approx(1.0)  # not 2.0: the cancelled wait took nothing


# --- Limiter: bytes -------------------------------------------------------------------


async def test_bytes_10mib_at_1mib_per_second(autojump_clock: trio.testing.MockClock) -> None:
    limiter = Limiter(bytes_per_second=MiB)
    start = now()
    for _ in range(10):
        await limiter.wait_bytes(MiB)
    assert now() - start == pytest.approx(9.0)  # the first MiB is the full bucket


async def test_bytes_chunk_bigger_than_bucket_passes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = Limiter(bytes_per_second=MiB)
    start = now()
    await limiter.wait_bytes(10 * MiB)
    assert now() - start == pytest.approx(9.0)
    await limiter.wait_bytes(MiB)  # the debt is paid; the bucket is empty, not full
    assert now() - start == pytest.approx(10.0)


async def test_bytes_small_chunks_rate(autojump_clock: trio.testing.MockClock) -> None:
    # seed 1.11: 10 B per 100 ms with 10 x 10 B takes about 1 s
    limiter = Limiter(bytes_per_second=100)
    await limiter.wait_bytes(100)  # drain the initial burst
    start = now()
    for _ in range(10):
        await limiter.wait_bytes(10)
    assert now() - start == pytest.approx(1.0)


async def test_bytes_concurrent(autojump_clock: trio.testing.MockClock) -> None:
    limiter = Limiter(bytes_per_second=100)
    start = now()

    async def worker() -> None:
        for _ in range(10):
            await limiter.wait_bytes(10)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(worker)
    assert now() - start == pytest.approx(3.0)  # 400 B, 100 of them from the full bucket


async def test_bytes_zero_is_free(autojump_clock: trio.testing.MockClock) -> None:
    limiter = Limiter(bytes_per_second=1)
    await limiter.wait_bytes(1)
    start = now()
    await limiter.wait_bytes(0)
    assert now() == start


async def test_bytes_cancelled_while_paying_consumes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = Limiter(bytes_per_second=1)
    start = now()
    await limiter.wait_bytes(1)  # empties the bucket
    with trio.move_on_after(0.3) as scope:
        await limiter.wait_bytes(5)
    assert scope.cancelled_caught
    await limiter.wait_bytes(1)
    assert now() - start == pytest.approx(1.0)  # without the refund: 6.0


async def test_bytes_cancelled_while_queued_consumes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = Limiter(bytes_per_second=10)
    start = now()
    await limiter.wait_bytes(10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(limiter.wait_bytes, 10)  # pays 1 s of debt
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.5) as scope:
            await limiter.wait_bytes(1000)  # queued behind it, then cancelled
        assert scope.cancelled_caught
    assert now() - start == pytest.approx(1.0)
    await limiter.wait_bytes(10)
    assert now() - start == pytest.approx(2.0)


async def test_both_limits(autojump_clock: trio.testing.MockClock) -> None:
    limiter = Limiter(requests_per_second=1, bytes_per_second=1000)
    start = now()
    for _ in range(3):
        await limiter.wait_request()
        await limiter.wait_bytes(2000)
    # bytes dominate: 6000 B at 1000 B/s, the first 1000 from the bucket
    assert now() - start == pytest.approx(5.0)


# --- Backoff --------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, 1, 3, 8])
async def test_backoff_exactly_steps_retries(
    autojump_clock: trio.testing.MockClock, steps: int
) -> None:
    backoff = new_backoff(0.1, steps)
    for i in range(steps):
        assert not backoff.done
        assert await backoff.wait(TransientError("boom")) is False
        assert backoff.retries == i + 1
    assert backoff.done
    start = now()
    assert await backoff.wait(TransientError("boom")) is True
    assert now() == start  # giving up sleeps nothing
    assert backoff.retries == steps
    assert backoff.done


@pytest.mark.parametrize("pattern", ["explicit", "exponential", "alternating"])
async def test_backoff_steps_any_mix(autojump_clock: trio.testing.MockClock, pattern: str) -> None:
    # seed scenario 49: N retries across any mix of explicit and exponential delays
    backoff = new_backoff(0.5, 5)
    results = []
    for i in range(7):
        explicit = pattern == "explicit" or (pattern == "alternating" and i % 2 == 0)
        error = TransientError("503", retry_after=1.0 if explicit else None)
        results.append(await backoff.wait(error))
    assert results == [False] * 5 + [True] * 2
    assert backoff.retries == 5 and backoff.done


@pytest.mark.parametrize(
    "error", [PermanentError("404", status=404), RemoteChanged("etag"), ValueError("bug")]
)
async def test_backoff_non_retryable(
    autojump_clock: trio.testing.MockClock, error: BaseException
) -> None:
    backoff = new_backoff(0.1, 3)
    assert backoff.delay_for(error) is None
    start = now()
    assert await backoff.wait(error) is True
    assert now() == start
    assert backoff.retries == 0
    assert backoff.done


async def test_backoff_exponential_equal_jitter(autojump_clock: trio.testing.MockClock) -> None:
    backoff = new_backoff(0.25, 10, maximum=4.0, rng=random.Random(1))
    bases = [0.25, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    slept = []
    for _ in bases:
        start = now()
        assert await backoff.wait(TransientError("x")) is False
        slept.append(now() - start)
    for base, delay in zip(bases, slept, strict=True):
        assert base / 2 <= delay <= base
    assert len({round(d / b, 9) for d, b in zip(slept, bases, strict=True)}) > 5  # jittered


def test_backoff_delay_for_is_pure() -> None:
    backoff = Backoff(BackoffPolicy(initial=1.0, maximum=8.0, steps=4), rng=random.Random(0))
    for _ in range(3):
        delay = backoff.delay_for(TransientError("x"))
        assert delay is not None and 0.5 <= delay <= 1.0
    assert backoff.retries == 0 and not backoff.done
    backoff.retries = 3
    delay = backoff.delay_for(TransientError("x"))
    assert delay is not None and 4.0 <= delay <= 8.0
    backoff.retries = 4
    assert backoff.delay_for(TransientError("x")) is None


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(2.0, 2.0), (0.0, 0.0), (119.5, 119.5), (120.0, 120.0), (3600.0, 120.0), (-5.0, 0.0)],
)
async def test_backoff_retry_after_honoured_and_capped(
    autojump_clock: trio.testing.MockClock, retry_after: float, expected: float
) -> None:
    backoff = new_backoff(0.25, 3)
    error = TransientError("503", retry_after=retry_after)
    assert backoff.delay_for(error) == expected
    start = now()
    assert await backoff.wait(error) is False
    assert now() - start == pytest.approx(expected)
    assert backoff.retries == 1


async def test_backoff_retry_after_custom_cap(autojump_clock: trio.testing.MockClock) -> None:
    backoff = BackoffPolicy(retry_after_cap=5.0).new()
    start = now()
    await backoff.wait(TransientError("429", retry_after=60))
    assert now() - start == pytest.approx(5.0)


async def test_backoff_cancellation_propagates(autojump_clock: trio.testing.MockClock) -> None:
    backoff = new_backoff(10.0, 3)
    with trio.move_on_after(1.0) as scope:
        await backoff.wait(TransientError("x"))
        pytest.fail("the wait should have been cancelled")  # pragma: no cover
    assert scope.cancelled_caught
    assert backoff.retries == 0 and not backoff.done


def test_backoff_policy_defaults_and_validation() -> None:
    policy = BackoffPolicy()
    assert (policy.initial, policy.maximum, policy.steps, policy.retry_after_cap) == (
        0.25,
        10.0,
        8,
        120.0,
    )
    with pytest.raises(AttributeError):
        policy.steps = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="steps"):
        BackoffPolicy(steps=-1)
    with pytest.raises(ValueError, match="initial"):
        BackoffPolicy(initial=-1)
    with pytest.raises(ValueError, match="maximum"):
        BackoffPolicy(initial=5, maximum=1)
    with pytest.raises(ValueError, match="retry_after_cap"):
        BackoffPolicy(retry_after_cap=-1)
    first, second = policy.new(), policy.new()
    assert first is not second and first.policy is policy and first.retries == 0


def test_new_backoff() -> None:
    backoff = new_backoff(0.5, 4, retry_after_cap=30.0)
    assert backoff.policy == BackoffPolicy(initial=0.5, maximum=10.0, steps=4, retry_after_cap=30)
    # an initial delay above the default maximum raises the maximum instead of failing
    assert new_backoff(30.0, 2).policy.maximum == 30.0
    assert new_backoff().policy == BackoffPolicy()


def test_backoff_huge_retry_count_does_not_overflow() -> None:
    backoff = Backoff(BackoffPolicy(steps=100_000), retries=50_000)
    delay = backoff.delay_for(TransientError("x"))
    assert delay is not None and 5.0 <= delay <= 10.0

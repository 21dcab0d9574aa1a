"""Rate limits (token buckets) and retry backoff, on trio's clock.

:class:`Limiter` holds two token buckets on :func:`trio.current_time`: requests per second
(burst ``max(1, rate)``) and bytes per second (burst ``rate`` bytes). Both start full. The
byte bucket is debt-based: a caller takes all ``n`` tokens at once, possibly going negative,
and sleeps until the balance is back at zero, so a chunk larger than the bucket still passes
and the long-run rate holds. Waiters are served first come, first served.

:class:`Backoff` decides whether and how long to wait before retrying a failed request. Only
:class:`~rangefs.errors.TransientError` is retried; delays grow exponentially with "equal
jitter" and are capped; a server's ``Retry-After`` (``TransientError.retry_after``) replaces
the exponential delay, capped at ``retry_after_cap``. Unlike the seed there is no
"no backoff" default: every Backoff gives up after ``steps`` retries.

:class:`ConcurrencyController` chooses how many transfers of a download run at once by
measuring the rate they reach (more while more pays, fewer on errors).

Everything here runs in the trio thread; nothing is thread-safe. Use trio's autojump clock
in tests (``trio.testing.MockClock(autojump_threshold=0)``) so waits take no real time.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from rangefs.errors import TransientError

log = logging.getLogger(__name__)

# A balance this close to zero counts as paid (float rounding of rate * elapsed time).
_EPSILON = 1e-6


class _TokenBucket:
    """A debt-based token bucket: ``rate`` tokens/s, holding at most ``burst``; starts full."""

    def __init__(self, rate: float, burst: float) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number, got {rate!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._stamp: float | None = None  # set on first use: may be built outside trio.run
        self._lock = trio.Lock()  # FIFO: one waiter pays its debt at a time

    def _refill(self) -> None:
        now = trio.current_time()
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    @property
    def tokens(self) -> float:
        """The current balance (negative while a debt is being paid). Needs a trio run."""
        self._refill()
        return self._tokens

    async def take(self, amount: float) -> None:
        """Take ``amount`` tokens, then sleep until the balance is >= 0.

        Cancellation (while queued or while sleeping) takes nothing: the tokens are refunded.
        """
        async with self._lock:
            self._refill()
            self._tokens -= amount
            try:
                while self._tokens < -_EPSILON:
                    await trio.sleep(-self._tokens / self.rate)
                    self._refill()
            except BaseException:
                self._tokens = min(self.burst, self._tokens + amount)
                raise


class Limiter:
    """Requests-per-second and bytes-per-second limits shared by every fetch of a mount.

    ``None`` (the default) means unlimited: the waits are then a bare checkpoint. Rates must
    be positive. Call the waits from trio tasks only; each is cancellable and a cancelled
    wait consumes nothing. The seed's order applies: :meth:`wait_request` before sending a
    request, :meth:`wait_bytes` as bytes arrive (after each chunk of the body).
    """

    def __init__(
        self,
        *,
        requests_per_second: float | None = None,
        bytes_per_second: float | None = None,
    ) -> None:
        self.requests_per_second = requests_per_second
        self.bytes_per_second = bytes_per_second
        self._requests = (
            None
            if requests_per_second is None
            else _TokenBucket(requests_per_second, max(1.0, requests_per_second))
        )
        self._bytes = (
            None
            if bytes_per_second is None
            else _TokenBucket(bytes_per_second, bytes_per_second)
        )

    @property
    def unlimited(self) -> bool:
        """True if neither limit is set."""
        return self._requests is None and self._bytes is None

    async def wait_request(self) -> None:
        """Wait for the right to send one request (FIFO among waiters)."""
        if self._requests is None:
            await trio.lowlevel.checkpoint()
            return
        await self._requests.take(1)

    async def wait_bytes(self, n: int) -> None:
        """Account for ``n`` bytes transferred, sleeping as long as the byte rate requires.

        Debt-based: ``n`` may exceed the bucket; the caller then sleeps ``n/rate`` seconds
        (less what the bucket held). ``n == 0`` is a checkpoint; ValueError if ``n < 0``.
        """
        if n < 0:
            raise ValueError(f"negative byte count {n}")
        if self._bytes is None or n == 0:
            await trio.lowlevel.checkpoint()
            return
        await self._bytes.take(n)

    def __repr__(self) -> str:
        return (
            f"Limiter(requests_per_second={self.requests_per_second!r}, "
            f"bytes_per_second={self.bytes_per_second!r})"
        )


@dataclass(frozen=True)
class BackoffPolicy:
    """How to retry a transient failure. Seconds throughout.

    ``initial``: the first exponential delay (before jitter); doubled per retry, capped at
    ``maximum``. ``steps``: retries allowed before giving up. ``retry_after_cap``: the longest
    a server's Retry-After is honoured for.
    """

    initial: float = 0.25
    maximum: float = 10.0
    steps: int = 8
    retry_after_cap: float = 120.0

    def __post_init__(self) -> None:
        if not self.initial >= 0:
            raise ValueError(f"initial delay must be >= 0, got {self.initial!r}")
        if not self.maximum >= self.initial:
            raise ValueError(f"maximum delay {self.maximum!r} is below initial {self.initial!r}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps!r}")
        if not self.retry_after_cap >= 0:
            raise ValueError(f"retry_after_cap must be >= 0, got {self.retry_after_cap!r}")

    def new(self, *, rng: random.Random | None = None) -> Backoff:
        """A fresh Backoff (retries = 0) following this policy; one per request."""
        return Backoff(self, rng=rng)


@dataclass
class Backoff:
    """The retry state of one request. One owner; not shared between tasks.

    ``retries`` counts completed waits. ``done`` is True once ``steps`` retries were used or
    :meth:`wait` refused a non-retryable error.
    """

    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    retries: int = 0
    rng: random.Random | None = field(default=None, repr=False)
    _gave_up: bool = field(default=False, init=False, repr=False)

    @property
    def done(self) -> bool:
        """True if no further retry will be allowed."""
        return self._gave_up or self.retries >= self.policy.steps

    def exponential_delay(self) -> float:
        """The jittered exponential delay for the next retry: ``d = min(maximum,
        initial * 2**retries)``, then uniform in ``[d/2, d]`` ("equal jitter")."""
        policy = self.policy
        exponent = min(self.retries, 1023)
        base = min(policy.maximum, policy.initial * 2.0**exponent)
        if self.rng is None:  # made on the first retry: seeding costs more than a probe
            self.rng = random.Random()
        return base / 2 + self.rng.uniform(0, base / 2)

    def delay_for(self, error: BaseException) -> float | None:
        """The delay before retrying after ``error``, or None to give up: ``error`` is not a
        TransientError, or ``steps`` retries were used. A ``retry_after`` on the error is
        honoured (clamped to ``[0, retry_after_cap]``) instead of the exponential delay.
        Does not change the state."""
        if not isinstance(error, TransientError) or self.done:
            return None
        if error.retry_after is not None:
            return min(max(0.0, error.retry_after), self.policy.retry_after_cap)
        return self.exponential_delay()

    async def wait(self, error: BaseException) -> bool:
        """Sleep before the next retry. True means give up (nothing slept); False means the
        delay passed and ``retries`` went up by one. Cancellation propagates from the sleep
        and does not count a retry."""
        delay = self.delay_for(error)
        if delay is None:
            self._gave_up = True
            return True
        log.debug("retry %d/%d in %.3f s after: %s", self.retries + 1, self.policy.steps,
                  delay, error)
        await trio.sleep(delay)
        self.retries += 1
        return False


def new_backoff(
    initial: float = BackoffPolicy.initial,
    steps: int = BackoffPolicy.steps,
    *,
    maximum: float | None = None,
    retry_after_cap: float = BackoffPolicy.retry_after_cap,
    rng: random.Random | None = None,
) -> Backoff:
    """A Backoff with ``initial`` delay and ``steps`` retries (the seed's ``NewBackoff``);
    the keywords set the other :class:`BackoffPolicy` fields (and the jitter's ``rng``).
    ``maximum`` defaults to the policy's default, raised to ``initial`` if that is larger."""
    if maximum is None:
        maximum = max(BackoffPolicy.maximum, initial)
    policy = BackoffPolicy(
        initial=initial, maximum=maximum, steps=steps, retry_after_cap=retry_after_cap
    )
    return policy.new(rng=rng)


# -- how many transfers at once ----------------------------------------------------------


@dataclass
class ConcurrencyPlan:
    """The knobs of :class:`ConcurrencyController`; counts, seconds and ratios.

    ``initial`` transfers at first, never fewer than ``minimum`` nor more than
    ``maximum``. A rate is measured over ``interval`` seconds; the first interval after a
    change is left out (new connections are still opening), not the very first one.
    Growth doubles the count while each doubling raises the rate by at least ``gain``
    (1.15: 15 %); once it does not, the count goes back to the best one seen and a step
    of ``probe_step`` × is tried every ``probe_every`` seconds. A failed transfer (a
    transient error: 429, 503, a dropped connection...) halves the count and holds growth
    for ``hold`` seconds.
    """

    initial: int = 32
    minimum: int = 1
    maximum: int = 64
    interval: float = 0.1
    gain: float = 1.15
    probe_every: float = 2.0
    probe_step: float = 1.25
    hold: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, got {self.minimum}, {self.maximum}")
        if self.interval <= 0 or self.gain < 1 or self.probe_step <= 1:
            raise ValueError("need interval > 0, gain >= 1 and probe_step > 1")
        self.initial = min(self.maximum, max(self.minimum, self.initial))


class ConcurrencyController:
    """Chooses how many transfers of one job run at once, by measuring: the rate of
    bytes received per interval, hill-climbing (double while it pays, then back to the
    best count and probe a step up now and then), halving on errors.

    :meth:`observe` is the whole decision (pure: counters in, count out), called every
    ``plan.interval`` seconds of trio time by :meth:`run`, which applies the count to
    ``slots`` (a ``trio.CapacityLimiter`` the transfers take a token of: lowering it lets
    running transfers finish, raising it starts waiting ones). Trio thread only.
    """

    def __init__(self, plan: ConcurrencyPlan | None = None) -> None:
        self.plan = plan or ConcurrencyPlan()
        self.count = self.plan.initial
        self.slots = trio.CapacityLimiter(self.count)
        self.history: list[tuple[float, int, float]] = []  # (time, count, rate B/s) per step
        self._best_rate = 0.0
        self._best_count = self.count
        self._growing = True
        # the next interval follows a change: not measured (the first one is: growth
        # starts from any rate, and the sooner the better)
        self._settle = False
        self._probe_from: int | None = None  # the count a probe started from
        self._hold_until = -math.inf
        self._next_probe = -math.inf
        self._last: tuple[float, int, int] | None = None  # (time, bytes, errors)

    def observe(self, now: float, received: int, errors: int) -> int:
        """Counters at ``now`` (trio seconds): total bytes received and total failed
        transfers so far. Returns the count to run from now on."""
        plan = self.plan
        last, self._last = self._last, (now, received, errors)
        if last is None or now <= last[0]:
            return self.count
        if errors > last[2]:  # back off at once, and let the new count settle
            self._set(max(plan.minimum, self.count // 2))
            self._best_rate = 0.0
            self._best_count = self.count
            self._growing = False
            self._probe_from = None
            self._hold_until = now + plan.hold
            self._next_probe = self._hold_until
            return self.count
        if self._settle:
            self._settle = False
            return self.count
        rate = (received - last[1]) / (now - last[0])
        self.history.append((now, self.count, rate))
        if self._probe_from is not None:  # a probe's interval: keep it if it paid
            start, self._probe_from = self._probe_from, None
            if rate >= self._best_rate * plan.gain:
                self._best_rate, self._best_count = rate, self.count
            else:
                self._set(start)
            self._next_probe = now + plan.probe_every
            return self.count
        if self._growing:
            if rate >= self._best_rate * plan.gain:
                self._best_rate, self._best_count = rate, self.count
                if self.count < plan.maximum:
                    self._set(min(plan.maximum, self.count * 2))
                else:
                    self._growing = False
            else:
                self._growing = False
                self._set(self._best_count)
            self._next_probe = now + plan.probe_every
            return self.count
        if self.count == self._best_count:
            # the rate of the count in use is the reference (the link may have changed)
            self._best_rate = rate
        if now >= max(self._next_probe, self._hold_until) and self.count < plan.maximum:
            self._probe_from = self.count
            self._set(min(plan.maximum, max(self.count + 1, int(self.count * plan.probe_step))))
        return self.count

    def _set(self, count: int) -> None:
        if count != self.count:
            self.count = count
            self._settle = True

    async def run(self, counters: Callable[[], tuple[int, int]]) -> None:
        """Every ``plan.interval`` s: ``counters()`` -> (bytes received, failed transfers)
        so far; apply :meth:`observe`'s count to ``slots``. Runs until cancelled."""
        while True:
            received, errors = counters()
            count = self.observe(trio.current_time(), received, errors)
            if self.slots.total_tokens != count:
                self.slots.total_tokens = count
            await trio.sleep(self.plan.interval)

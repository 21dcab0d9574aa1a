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

Everything here runs in the trio thread; nothing is thread-safe. Use trio's autojump clock
in tests (``trio.testing.MockClock(autojump_threshold=0)``) so waits take no real time.
"""

from __future__ import annotations

import logging
import math
import random
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

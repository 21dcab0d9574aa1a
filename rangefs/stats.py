"""What a mount did, in numbers: the counters ``rangefs status`` and ``--metrics`` read.

One :class:`MountStats` per mount (or download), created by its owner (the ObjectStore,
or the download) and handed to the HTTP session, the fetchers and the FUSE operations,
which change it on the trio thread only: plain ints and dicts, no lock on the hot path.
Other threads (the metrics HTTP server) read it through :meth:`MountStats.snapshot`, whose
copies are single C-level operations under the GIL, so they never see a dict mid-update.

Units: bytes, seconds, counts since the owner started; nothing here ever decreases except
``in_flight``.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Final

import httpx

READ_LATENCY_BOUNDS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)
"""Upper bounds (seconds) of the read-latency histogram's buckets (then +Inf): from a page
cache-speed answer to the default read timeout."""


@dataclass
class LatencyHistogram:
    """Counts of observations per bucket of :data:`READ_LATENCY_BOUNDS` (not cumulative;
    the last bucket is +Inf), their sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(READ_LATENCY_BOUNDS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(READ_LATENCY_BOUNDS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound as Prometheus writes it, observations <= bound), +Inf last."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*READ_LATENCY_BOUNDS, float("inf")), list(self.counts), strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class MountStats:
    """The counters of one mount; see the module docstring for who may change them."""

    started: float = field(default_factory=time.time)  # wall clock, for rates and status
    responses: dict[int, int] = field(default_factory=dict)  # origin answers by status
    errors: dict[str, int] = field(default_factory=dict)  # failed origin requests by kind
    retries: int = 0  # requests repeated after a transient failure
    bytes_fetched: int = 0  # body bytes of ranged answers received from the origin
    in_flight: int = 0  # ranged requests open now
    read_calls: int = 0  # FUSE reads answered (with data or an error)
    read_errors: int = 0
    read_bytes_cache: int = 0  # bytes of reads whose blocks were all cached when asked
    read_bytes_network: int = 0  # bytes of reads that waited for the origin
    read_latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def response(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def read_done(self, nbytes: int, seconds: float, *, cached: bool, failed: bool) -> None:
        """One FUSE read answered after ``seconds``; ``cached``: no block was missing."""
        self.read_calls += 1
        self.read_latency.observe(seconds)
        if failed:
            self.read_errors += 1
        elif cached:
            self.read_bytes_cache += nbytes
        else:
            self.read_bytes_network += nbytes

    def snapshot(self) -> Snapshot:
        """A consistent-enough copy; safe to call from any thread."""
        hist = self.read_latency
        return Snapshot(
            started=self.started,
            responses=self.responses.copy(),
            errors=self.errors.copy(),
            retries=self.retries,
            bytes_fetched=self.bytes_fetched,
            in_flight=self.in_flight,
            read_calls=self.read_calls,
            read_errors=self.read_errors,
            read_bytes_cache=self.read_bytes_cache,
            read_bytes_network=self.read_bytes_network,
            latency_buckets=hist.cumulative(),
            latency_sum=hist.total,
        )


@dataclass(frozen=True)
class Snapshot:
    """A copy of :class:`MountStats` (same fields); ``latency_buckets`` is cumulative."""

    started: float
    responses: dict[int, int]
    errors: dict[str, int]
    retries: int
    bytes_fetched: int
    in_flight: int
    read_calls: int
    read_errors: int
    read_bytes_cache: int
    read_bytes_network: int
    latency_buckets: list[tuple[str, int]]
    latency_sum: float

    @property
    def requests(self) -> int:
        """Origin requests answered or failed."""
        return sum(self.responses.values()) + sum(self.errors.values())

    def as_json(self) -> dict[str, object]:
        return {
            "started": self.started,
            "requests": self.requests,
            "responses": {str(k): v for k, v in sorted(self.responses.items())},
            "errors": dict(sorted(self.errors.items())),
            "retries": self.retries,
            "bytes_fetched": self.bytes_fetched,
            "in_flight": self.in_flight,
            "reads": self.read_calls,
            "read_errors": self.read_errors,
            "read_bytes_cache": self.read_bytes_cache,
            "read_bytes_network": self.read_bytes_network,
            "read_latency_seconds": {"buckets": self.latency_buckets, "sum": self.latency_sum},
        }


def error_kind(exc: BaseException) -> str:
    """The kind of a failed origin request, as status and metrics count it: ``proxy``,
    ``connect``, ``timeout``, ``protocol`` or ``network`` (the caller knows ``tls``)."""
    from .fasthttp import ProxyRefused  # fasthttp imports nothing of ours but proxies

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ProxyRefused):
            return "proxy"
        if isinstance(cur, httpx.ConnectError | httpx.ConnectTimeout):
            return "connect"
        if isinstance(cur, httpx.TimeoutException):
            return "timeout"
        if isinstance(cur, httpx.RemoteProtocolError | httpx.LocalProtocolError):
            return "protocol"
        cur = cur.__cause__ or cur.__context__
    return "network"

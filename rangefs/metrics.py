"""``--metrics ADDRESS``: the mount's counters in Prometheus text format.

prometheus-client does the exposition and serves it (``start_http_server``: a WSGI server
on its own daemon thread). The numbers are not kept in prometheus-client's metric
objects, whose every increment takes a lock: a custom collector reads the mount's
:class:`~rangefs.stats.MountStats` and budget at scrape time instead, so the hot path
pays nothing for metrics (``stats.py`` explains why that read is safe from another
thread). Started and stopped by the mount (``mount.py``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .errors import UsageError
from .stats import MountStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheGauges:
    """What the collector reads of the cache at scrape time (callables: read-only, safe
    from another thread)."""

    used: Callable[[], int]
    limit: Callable[[], int]
    evicted: Callable[[], int]
    open_objects: Callable[[], int]


class MountCollector(Collector):
    """Turns a mount's counters into metric families, at each scrape."""

    def __init__(self, stats: MountStats, cache: CacheGauges) -> None:
        self._stats = stats
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        snap = self._stats.snapshot()
        responses = CounterMetricFamily(
            "rangefs_origin_requests", "Origin answers by HTTP status", labels=["status"])
        for status, n in sorted(snap.responses.items()):
            responses.add_metric([str(status)], n)
        yield responses
        errors = CounterMetricFamily(
            "rangefs_origin_errors",
            "Origin requests that failed without an answer, by kind "
            "(connect, timeout, tls, protocol, proxy, network)", labels=["kind"])
        for kind, n in sorted(snap.errors.items()):
            errors.add_metric([kind], n)
        yield errors
        yield CounterMetricFamily("rangefs_origin_retries", "Requests repeated after a "
                                  "transient failure", value=snap.retries)
        yield CounterMetricFamily("rangefs_origin_bytes", "Body bytes of ranged answers "
                                  "received from the origin", value=snap.bytes_fetched)
        yield GaugeMetricFamily("rangefs_fetches_in_flight", "Ranged requests open now",
                                value=snap.in_flight)
        served = CounterMetricFamily(
            "rangefs_read_bytes", "Bytes answered to FUSE reads, by where they came from "
            "(cache: every block was cached when asked; network: the read waited for the "
            "origin)", labels=["source"])
        served.add_metric(["cache"], snap.read_bytes_cache)
        served.add_metric(["network"], snap.read_bytes_network)
        yield served
        yield CounterMetricFamily("rangefs_read_errors", "FUSE reads answered with an error",
                                  value=snap.read_errors)
        yield HistogramMetricFamily(
            "rangefs_read_duration_seconds", "FUSE read: from the request to the answer",
            buckets=snap.latency_buckets, sum_value=snap.latency_sum)
        cache = self._cache
        yield GaugeMetricFamily("rangefs_cache_bytes", "Bytes the cache holds",
                                value=cache.used())
        yield GaugeMetricFamily("rangefs_cache_limit_bytes", "Bytes the cache may hold "
                                "(--cache-size, --cache-min-free)", value=cache.limit())
        yield CounterMetricFamily("rangefs_cache_evicted_bytes", "Bytes evicted from the "
                                  "cache", value=cache.evicted())
        yield GaugeMetricFamily("rangefs_open_objects", "Objects whose cache is open",
                                value=cache.open_objects())


def parse_address(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); the host defaults to
    127.0.0.1 (never every interface unless asked). UsageError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics {text!r}: expected PORT or HOST:PORT (e.g. 127.0.0.1:9464)")
    return host, int(port)


class MetricsServer:
    """The exposition endpoint of one mount: :meth:`start` on mount, :meth:`stop` on
    unmount (both from the trio thread)."""

    def __init__(self, address: str, stats: MountStats, cache: CacheGauges) -> None:
        self.host, self.port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MountCollector(stats, cache))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen; UsageError (one line) if the address cannot be bound."""
        try:
            self._server, self._thread = start_http_server(
                self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise UsageError(
                f"--metrics {self.host}:{self.port}: cannot listen: {exc.strerror or exc}"
            ) from exc
        self.port = self._server.server_port
        log.info("metrics at http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent, never raises."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

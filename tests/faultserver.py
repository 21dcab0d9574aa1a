"""A real HTTP/1.1 origin for tests, with faults configured as data.

Objects are served from :mod:`tests.content` (bytes are a pure function of key and offset),
on 127.0.0.1, on an ephemeral port, with keep-alive, one daemon thread per connection.

In-process (the ``origin`` fixture in ``conftest.py`` does this)::

    with FaultServer() as server:
        server.add("/a", 10 << 20)                       # ETag "v1", fixed Last-Modified
        server.faults("/a", [Fault("status", status=503, retry_after=2),
                             Fault("reset_body", after=4096)])
        url = server.url("/a")
        ...
        assert [r.range for r in server.gets("/a")] == [...]

As a process (for load tests; serves until SIGTERM/SIGINT)::

    python -m tests.faultserver --port 0 [--config FILE.json] [--delay-ms N]
                                [--objects N --size S]
    # first stdout line: "PORT <n>"; --objects serves /objects/0 .. /objects/N-1

The JSON config mirrors the methods (see :meth:`FaultServer.configure`)::

    {"delay_ms": 0,
     "objects": [{"path": "/a", "size": 1048576, "etag": "\\"v1\\"", "repr_digest": true}],
     "faults": {"/a": [{"kind": "status", "status": 503, "retry_after": "1"}]},
     "fault_probability": [{"path": null, "p": 0.05, "kinds": ["reset", "short_body"],
                            "seed": 1}],
     "redirects": [{"path": "/r", "location": "/a", "status": 302}]}

Protocol, as a correct origin: single ranges ``bytes=a-b``, ``a-``, ``-n`` (anything else,
including several ranges, is ignored: 200 with the whole body); 416 with ``bytes */size`` for
an unsatisfiable range; ``If-Range`` (strong ETag, or the exact Last-Modified) that does not
match -> 200 whole; ``If-Match`` / ``If-Unmodified-Since`` that fail -> 412; HEAD ignores
Range. Each response carries Accept-Ranges (unless the object refuses ranges), Content-Length
(unless the object says not: then the body ends with the connection), ETag and Last-Modified
(when set) and ``Repr-Digest: sha-256=:b64:`` of the whole object when asked.

Faults (:class:`Fault`, ``kind``):

=================== ===================================================================
status              answer ``status`` (default 503) with ``Retry-After: retry_after`` if set
reset               TCP reset before any byte of the answer (SO_LINGER 0)
reset_body          headers and ``after`` body bytes (default half), then a TCP reset
short_body          headers (true Content-Length) and ``after`` bytes, then a clean close
stall               ``after`` body bytes, a pause of ``seconds``, then the rest
ignore_range        200 with the whole body whatever the Range
wrong_start         206 whose Content-Range (and body) start ``delta`` bytes off
wrong_total         206 whose Content-Range total is ``size + delta``
wrong_length        Content-Length is the true length ``+ delta``; the true body; close
gzip                ``Content-Encoding: gzip`` and the slice really gzipped
overlong_body       no Content-Length, the body (ended by the close) starts at byte 0 of
                    the object (not at the range's start) and is ``delta`` bytes longer
                    than the range
undeclared_short    no Content-Length, the range's bytes less the last ``after`` (default
                    1), then a clean close
te_gzip             ``Transfer-Encoding: gzip, chunked``: the slice gzipped, then chunked
redirect            ``status`` (default 302) to ``location`` (a path here or any URL)
changed_validator   206 as asked (If-Range ignored) but with ETag ``etag`` (and
                    Last-Modified ``last_modified`` if set)
delay               wait ``seconds`` before the answer, then answer normally
=================== ===================================================================

For reset_body and short_body, ``after`` is clamped so that at least one byte of the body is
missing (the fault never turns into a success by accident). Pauses (stall, delay, the
server-wide ``delay``) are cut short when the server stops.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.utils
import fcntl
import gzip
import json
import logging
import random
import re
import signal
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from tests.content import content, digest_of, view

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
"""Body bytes per ``sendall``."""

DEFAULT_LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"

FaultKind = Literal[
    "status",
    "reset",
    "reset_body",
    "short_body",
    "stall",
    "ignore_range",
    "wrong_start",
    "wrong_total",
    "wrong_length",
    "gzip",
    "overlong_body",
    "undeclared_short",
    "te_gzip",
    "redirect",
    "changed_validator",
    "delay",
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII)


def http_date(epoch: float) -> str:
    """An IMF-fixdate (``Wed, 01 Jan 2025 00:00:00 GMT``) for ``epoch`` seconds."""
    return email.utils.formatdate(epoch, usegmt=True)


@dataclass(frozen=True)
class Fault:
    """One misbehaviour, for one request (see the module docstring for each ``kind``).

    ``method`` limits it to GET or HEAD requests (None: either).
    """

    kind: FaultKind
    method: str | None = None
    status: int | None = None
    retry_after: str | int | None = None
    after: int | None = None
    seconds: float = 1.0
    location: str | None = None
    etag: str | None = '"changed"'
    last_modified: str | None = None
    delta: int = 1

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {FAULT_KINDS}")
        if self.method not in (None, "GET", "HEAD"):
            raise ValueError(f"fault method must be GET, HEAD or None, not {self.method!r}")
        if self.kind == "redirect" and not self.location:
            raise ValueError("a redirect fault needs a location")
        if self.seconds < 0 or (self.after is not None and self.after < 0):
            raise ValueError("seconds and after must be >= 0")

    @classmethod
    def of(cls, spec: str | Mapping[str, Any] | Fault) -> Fault:
        """A Fault from a kind name, a dict of fields (as in JSON) or a Fault."""
        if isinstance(spec, Fault):
            return spec
        if isinstance(spec, str):
            return cls(spec)  # type: ignore[arg-type]  # checked in __post_init__
        return cls(**spec)


@dataclass(frozen=True)
class RemoteObject:
    """One object as the origin currently serves it (replaced whole by ``set_version``)."""

    path: str
    size: int
    key: str
    etag: str | None = '"v1"'
    last_modified: str | None = DEFAULT_LAST_MODIFIED
    accept_ranges: bool = True
    repr_digest: bool = False
    head_status: int | None = None
    content_length: bool = True

    def repr_digest_header(self) -> str:
        """``Repr-Digest`` (RFC 9530) of the whole object, SHA-256."""
        raw = digest_of(self.key, self.size, "sha256")
        return f"sha-256=:{base64.b64encode(raw).decode()}:"


@dataclass
class Request:
    """One request as the origin saw it; ``status`` and ``bytes_sent`` fill in as it is answered.

    ``headers`` has lower-case names. ``status`` is None when no status line was sent (a
    reset). ``bytes_sent`` counts body bytes handed to the kernel; it is counted just before
    each write (so it is never behind what a client has received) and a failed write is taken
    back. ``time`` is
    ``time.monotonic()`` at arrival; ``client_port`` tells connections apart.
    """

    time: float
    method: str
    path: str
    query: str
    range: str | None
    if_range: str | None
    headers: dict[str, str]
    client_port: int
    status: int | None = None
    bytes_sent: int = 0
    fault: str | None = None


_KEEP: Any = object()


class FaultServer:
    """The origin. Configure it from any thread, before or while it serves.

    ``start()``/``stop()`` or use it as a context manager. ``stop()`` closes every
    connection, joins every thread it started, and raises RuntimeError if one is stuck.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, delay: float = 0.0, keep_log: bool = True
    ) -> None:
        self.host = host
        self._port = port
        self.delay = delay
        """Seconds to wait before answering every request (first-byte delay)."""
        self.keep_log = keep_log
        """False: log nothing (long load runs in process mode)."""
        self.gate: threading.Event | None = None
        """When set to an unset Event, every GET waits (at most 60 s) until it is set: a
        test sees the client with requests in flight, then lets them go."""
        self._lock = threading.Lock()
        self._objects: dict[str, RemoteObject] = {}
        self._redirects: dict[str, tuple[int, str]] = {}
        self._queues: dict[str, list[Fault]] = {}
        self._random: dict[str | None, tuple[float, list[Fault], random.Random]] = {}
        self._log: list[Request] = []
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> FaultServer:
        """Bind and serve in a background thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("fault server already started")
        self._httpd = _HTTPServer((self.host, self._port), self)
        self._port = self._httpd.server_address[1]
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"faultserver-{self._port}",
            daemon=True,
        )
        self._serve_thread.start()
        log.debug("fault server listening on %s", self.base_url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, join every thread. Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if self._serve_thread is not None:
            self._serve_thread.join(timeout)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by its handler
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            raise RuntimeError(f"fault server threads did not stop: {stuck}")

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port (known once started)."""
        if self._httpd is None:
            raise RuntimeError("fault server not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` (which starts with '/') on this server."""
        return self.base_url + path

    # -- objects --------------------------------------------------------------------------

    def add(
        self,
        path: str,
        size: int,
        *,
        etag: str | None = '"v1"',
        last_modified: str | None = DEFAULT_LAST_MODIFIED,
        accept_ranges: bool = True,
        key: str | None = None,
        repr_digest: bool = False,
        head_status: int | None = None,
        content_length: bool = True,
    ) -> RemoteObject:
        """Serve ``size`` bytes of ``content(key or path, ...)`` at ``path`` (query ignored).

        ``head_status`` (e.g. 403, 405) refuses HEAD with that status. ``accept_ranges=False``
        ignores Range (200, whole body, no Accept-Ranges). ``content_length=False`` sends no
        Content-Length and ends the body by closing the connection.
        """
        if not path.startswith("/") or size < 0:
            raise ValueError(f"bad object path {path!r} or size {size}")
        obj = RemoteObject(
            path=path,
            size=size,
            key=path if key is None else key,
            etag=etag,
            last_modified=last_modified,
            accept_ranges=accept_ranges,
            repr_digest=repr_digest,
            head_status=head_status,
            content_length=content_length,
        )
        with self._lock:
            self._objects[path] = obj
        return obj

    def set_version(
        self,
        path: str,
        *,
        etag: str | None = _KEEP,
        last_modified: str | None = _KEEP,
        key: str = _KEEP,
        size: int = _KEEP,
    ) -> RemoteObject:
        """Change the remote object; arguments left out stay. A new ``key`` = new bytes."""
        changes: dict[str, Any] = {
            name: value
            for name, value in (
                ("etag", etag),
                ("last_modified", last_modified),
                ("key", key),
                ("size", size),
            )
            if value is not _KEEP
        }
        with self._lock:
            obj = replace(self._objects[path], **changes)
            self._objects[path] = obj
        return obj

    def object(self, path: str) -> RemoteObject:
        """The object currently served at ``path`` (KeyError if none)."""
        with self._lock:
            return self._objects[path]

    def remove(self, path: str) -> None:
        """Stop serving ``path`` (404 from now on)."""
        with self._lock:
            del self._objects[path]

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        """Always answer ``path`` with a redirect to ``location`` (a path here or a URL)."""
        with self._lock:
            self._redirects[path] = (status, location)

    # -- faults ---------------------------------------------------------------------------

    def faults(self, path: str, faults: Sequence[Fault | str | Mapping[str, Any]]) -> None:
        """Queue faults for ``path``: each request takes the first queued fault whose
        ``method`` matches it (queued faults come before random ones)."""
        parsed = [Fault.of(f) for f in faults]
        with self._lock:
            self._queues.setdefault(path, []).extend(parsed)

    def pending_faults(self, path: str) -> list[Fault]:
        """The queued faults of ``path`` not yet consumed."""
        with self._lock:
            return list(self._queues.get(path, ()))

    def fault_probability(
        self,
        path: str | None,
        p: float,
        kinds: Sequence[Fault | str | Mapping[str, Any]],
        seed: int = 0,
    ) -> None:
        """With probability ``p`` a request to ``path`` (None: to any path without its own
        setting) gets one of ``kinds``, chosen with a ``random.Random(seed)``; ``p=0`` clears.
        """
        if not 0.0 <= p <= 1.0 or (p > 0 and not kinds):
            raise ValueError("need 0 <= p <= 1 and at least one kind")
        parsed = [Fault.of(f) for f in kinds]
        with self._lock:
            if p == 0:
                self._random.pop(path, None)
            else:
                self._random[path] = (p, parsed, random.Random(seed))

    def clear_faults(self) -> None:
        """Forget every queued and random fault."""
        with self._lock:
            self._queues.clear()
            self._random.clear()

    def configure(self, config: Mapping[str, Any]) -> None:
        """Apply a config as in the module docstring (JSON-shaped data)."""
        if "delay_ms" in config:
            self.delay = float(config["delay_ms"]) / 1000
        for spec in config.get("objects", ()):
            spec = dict(spec)
            self.add(spec.pop("path"), spec.pop("size"), **spec)
        for path, faults in config.get("faults", {}).items():
            self.faults(path, faults)
        for spec in config.get("fault_probability", ()):
            self.fault_probability(spec.get("path"), spec["p"], spec["kinds"], spec.get("seed", 0))
        for spec in config.get("redirects", ()):
            self.redirect(spec["path"], spec["location"], spec.get("status", 302))

    # -- the request log ------------------------------------------------------------------

    @property
    def log(self) -> list[Request]:
        """Every request since the last ``reset_log()``, in arrival order (a copy)."""
        with self._lock:
            return list(self._log)

    def requests(self, path: str | None = None, method: str | None = None) -> list[Request]:
        """Logged requests, filtered by path (query excluded) and method."""
        return [
            r
            for r in self.log
            if (path is None or r.path == path) and (method is None or r.method == method)
        ]

    def gets(self, path: str | None = None) -> list[Request]:
        """Logged GET requests of ``path`` (None: any)."""
        return self.requests(path, "GET")

    def bytes_sent(self, path: str | None = None) -> int:
        """Body bytes sent, for ``path`` or in total."""
        return sum(r.bytes_sent for r in self.requests(path))

    def reset_log(self) -> None:
        """Forget the logged requests."""
        with self._lock:
            self._log.clear()

    # -- used by the handler threads ------------------------------------------------------

    def _track(self, thread: threading.Thread, conn: socket.socket) -> None:
        with self._lock:
            self._threads.add(thread)
            self._conns.add(conn)

    def _untrack(self, thread: threading.Thread, conn: socket.socket) -> None:
        with self._lock:
            self._threads.discard(thread)
            self._conns.discard(conn)

    def _record(self, rec: Request) -> None:
        if not self.keep_log:
            return
        with self._lock:
            self._log.append(rec)

    def _take_fault(self, path: str, method: str) -> Fault | None:
        with self._lock:
            queue = self._queues.get(path)
            for i, fault in enumerate(queue or ()):
                if fault.method in (None, method):
                    assert queue is not None
                    del queue[i]
                    return fault
            chance = self._random.get(path) or self._random.get(None)
            if chance is not None:
                p, kinds, rng = chance
                if rng.random() < p:
                    fault = rng.choice(kinds)
                    if fault.method in (None, method):
                        return fault
            return None

    def _lookup(self, path: str) -> tuple[tuple[int, str] | None, RemoteObject | None]:
        with self._lock:
            return self._redirects.get(path), self._objects.get(path)

    def _pause(self, seconds: float) -> None:
        """Sleep, cut short when the server stops."""
        self._stopping.wait(seconds)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], owner: FaultServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"faultserver-conn-{client_address[1]}",
            daemon=True,
        )
        self.owner._track(thread, request)
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.owner._untrack(threading.current_thread(), request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the client went away, or stop() closed the socket
            log.debug("fault server: connection %s ended: %r", client_address, exc)
        else:
            log.exception("fault server: bug while serving %s", client_address)


def parse_range(header: str, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """A single ``bytes=`` range as (first, last) inclusive, clamped to ``size``;
    "unsatisfiable" for a 416; None when the header is to be ignored (malformed, several
    ranges, another unit)."""
    match = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    end = size - 1 if not last else int(last)
    if last and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _strong_match(etag: str | None, candidate: str) -> bool:
    return etag is not None and not etag.startswith("W/") and candidate == etag


def _if_range_matches(value: str, obj: RemoteObject) -> bool:
    value = value.strip()
    if value.startswith(('"', "W/")):
        return _strong_match(obj.etag, value)
    return obj.last_modified is not None and value == obj.last_modified


def _precondition_fails(headers: Mapping[str, str], obj: RemoteObject) -> bool:
    if_match = headers.get("if-match")
    if if_match is not None:
        tags = [t.strip() for t in if_match.split(",")]
        return "*" not in tags and not any(_strong_match(obj.etag, t) for t in tags)
    since = headers.get("if-unmodified-since")
    if since is not None and obj.last_modified is not None:
        try:
            return email.utils.parsedate_to_datetime(
                obj.last_modified
            ) > email.utils.parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False  # an invalid date is ignored (RFC 9110 13.1.4)
    return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "faultserver"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fault server: " + format, *args)

    def do_GET(self) -> None:
        self._serve(with_body=True)

    def do_HEAD(self) -> None:
        self._serve(with_body=False)

    # -- plumbing -------------------------------------------------------------------------

    def _serve(self, *, with_body: bool) -> None:
        owner = self.server.owner
        target = urlsplit(self.path)
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        rec = Request(
            time=time.monotonic(),
            method=self.command,
            path=target.path,
            query=target.query,
            range=headers.get("range"),
            if_range=headers.get("if-range"),
            headers=headers,
            client_port=self.client_address[1],
        )
        owner._record(rec)
        try:
            self._respond(owner, rec, headers, with_body)
        except OSError as exc:  # the client went away (or stop() closed the socket)
            log.debug("fault server: %s %s: %r", rec.method, rec.path, exc)
            self.close_connection = True

    def _start(self, rec: Request, status: int, headers: Sequence[tuple[str, str]]) -> None:
        rec.status = status
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _simple(
        self, rec: Request, status: int, text: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        body = text.encode()
        self._start(
            rec,
            status,
            [*headers, ("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
        )
        if body and rec.method != "HEAD":
            self._send(rec, body)

    def _write(self, rec: Request, key: str, offset: int, length: int) -> None:
        """Write ``length`` content bytes from ``offset``, in CHUNK-sized zero-copy views."""
        end = offset + length
        while offset < end:
            n = min(CHUNK, end - offset)
            self._send(rec, view(key, offset, n))
            offset += n

    def _send(self, rec: Request, data: bytes | memoryview) -> None:
        """``sendall`` one piece of body, counted in ``rec.bytes_sent``."""
        rec.bytes_sent += len(data)
        try:
            self.wfile.write(data)
        except OSError:
            rec.bytes_sent -= len(data)
            raise

    def _reset(self) -> None:
        """Abort the connection with a TCP RST, once what was written has been acked."""
        sock = self.connection
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))
            if unacked[0] == 0:
                break
            time.sleep(0.001)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # drop the makefile() reference so that close() is the real one
        sock.close()
        self.close_connection = True

    # -- the answer -----------------------------------------------------------------------

    def _respond(
        self, owner: FaultServer, rec: Request, headers: Mapping[str, str], with_body: bool
    ) -> None:
        if owner.delay:
            owner._pause(owner.delay)
        gate = owner.gate
        if gate is not None and rec.method == "GET":
            gate.wait(60.0)
        fault = owner._take_fault(rec.path, rec.method)
        if fault is not None:
            rec.fault = fault.kind
            log.debug("fault server: %s %s -> fault %s", rec.method, rec.path, fault)
            if fault.kind == "delay":
                owner._pause(fault.seconds)
                fault = None
            elif fault.kind == "reset":
                self._reset()
                return
            elif fault.kind == "status":
                status = fault.status or 503
                extra = (
                    [] if fault.retry_after is None else [("Retry-After", str(fault.retry_after))]
                )
                self._simple(rec, status, f"fault {status}\n", extra)
                return
            elif fault.kind == "redirect":
                assert fault.location is not None
                self._simple(rec, fault.status or 302, "", [("Location", fault.location)])
                return

        redirect, obj = owner._lookup(rec.path)
        if redirect is not None:
            self._simple(rec, redirect[0], "", [("Location", redirect[1])])
            return
        if obj is None:
            self._simple(rec, 404, "no such object\n")
            return
        if not with_body and obj.head_status is not None:
            allow = [("Allow", "GET")] if obj.head_status == 405 else []
            self._simple(rec, obj.head_status, "HEAD refused\n", allow)
            return
        if _precondition_fails(headers, obj):
            self._simple(rec, 412, "precondition failed\n")
            return
        self._send_object(rec, obj, headers, fault, with_body)

    def _send_object(
        self,
        rec: Request,
        obj: RemoteObject,
        headers: Mapping[str, str],
        fault: Fault | None,
        with_body: bool,
    ) -> None:
        kind = fault.kind if fault is not None else None
        size = obj.size
        honour_range = (
            obj.accept_ranges
            and with_body
            and rec.range is not None
            and kind != "ignore_range"
            and (
                rec.if_range is None
                or kind == "changed_validator"
                or _if_range_matches(rec.if_range, obj)
            )
        )
        parsed = parse_range(rec.range, size) if honour_range and rec.range else None
        etag, last_modified = obj.etag, obj.last_modified
        if fault is not None and kind == "changed_validator":
            etag = fault.etag
            last_modified = fault.last_modified or last_modified

        out: list[tuple[str, str]] = []
        if obj.accept_ranges:
            out.append(("Accept-Ranges", "bytes"))
        if etag is not None:
            out.append(("ETag", etag))
        if last_modified is not None:
            out.append(("Last-Modified", last_modified))
        if obj.repr_digest:
            out.append(("Repr-Digest", obj.repr_digest_header()))

        if parsed == "unsatisfiable":
            out.append(("Content-Range", f"bytes */{size}"))
            self._simple(rec, 416, "range not satisfiable\n", out)
            return
        status, start, end = (206, *parsed) if parsed is not None else (200, 0, size - 1)
        total = size
        if status == 206 and fault is not None:
            if kind == "wrong_start":
                start, end = max(0, start + fault.delta), min(size - 1, end + fault.delta)
            elif kind == "wrong_total":
                total = size + fault.delta
        length = end - start + 1
        if status == 206:
            out.append(("Content-Range", f"bytes {start}-{end}/{total}"))
        out.append(("Content-Type", "application/octet-stream"))

        limit = length  # body bytes to send before the fault bites
        if kind in ("reset_body", "short_body", "stall"):
            assert fault is not None
            limit = length // 2 if fault.after is None else fault.after
            limit = min(limit, max(0, length - 1)) if kind != "stall" else min(limit, length)
        body: bytes | None = None
        if kind == "gzip":
            body = gzip.compress(content(obj.key, start, length), compresslevel=1)
            out.append(("Content-Encoding", "gzip"))
        declared = len(body) if body is not None else length
        if kind == "wrong_length":
            assert fault is not None
            declared += fault.delta
        undeclared = kind in ("overlong_body", "undeclared_short", "te_gzip")
        if obj.content_length and not undeclared:
            out.append(("Content-Length", str(declared)))
        if kind == "te_gzip":
            out.append(("Transfer-Encoding", "gzip, chunked"))
        if kind in ("short_body", "wrong_length", "reset_body") or not obj.content_length or (
            undeclared and kind != "te_gzip"
        ):
            self.close_connection = True
        self._start(rec, status, out)
        if not with_body:
            if kind == "reset_body":
                self._reset()
            return

        if kind == "overlong_body":
            assert fault is not None
            self._write(rec, obj.key, 0, min(size, length + max(1, fault.delta)))
        elif kind == "undeclared_short":
            assert fault is not None
            self._write(rec, obj.key, start, max(0, length - (fault.after or 1)))
        elif kind == "te_gzip":
            packed = gzip.compress(content(obj.key, start, length), compresslevel=1)
            self._send(rec, b"%x\r\n%s\r\n0\r\n\r\n" % (len(packed), packed))
        elif body is not None:
            self._send(rec, body)
        elif kind == "stall":
            assert fault is not None
            self._write(rec, obj.key, start, limit)
            self.server.owner._pause(fault.seconds)
            self._write(rec, obj.key, start + limit, length - limit)
        else:
            self._write(rec, obj.key, start, limit)
        if kind == "reset_body":
            self._reset()


def _parse_size(text: str) -> int:
    """``123``, ``4K``, ``16M``, ``1G`` (binary units) -> bytes."""
    match = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE | re.ASCII)
    if match is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    shift = {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]
    return int(match.group(1)) << shift


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; print ``PORT <n>`` first."""
    parser = argparse.ArgumentParser(prog="python -m tests.faultserver", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config", help="JSON file (see the module docstring)")
    parser.add_argument("--delay-ms", type=float, default=None, help="first-byte delay")
    parser.add_argument("--objects", type=int, default=0, help="serve /objects/0 .. /objects/N-1")
    parser.add_argument("--size", type=_parse_size, default=1 << 20, help="size of each of them")
    args = parser.parse_args(argv)

    server = FaultServer(args.host, args.port, keep_log=False)
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            server.configure(json.load(f))
    if args.delay_ms is not None:
        server.delay = args.delay_ms / 1000
    for i in range(args.objects):
        server.add(f"/objects/{i}", args.size)

    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # threads inherit the mask
    with server:
        print(f"PORT {server.port}", flush=True)
        signal.sigwait(stop_signals)
    return 0


if __name__ == "__main__":
    sys.exit(main())

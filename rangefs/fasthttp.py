"""A lean HTTP/1.1 client transport for httpx, on trio.

:class:`FastTransport` plugs into ``httpx.AsyncClient(transport=...)`` and replaces
httpcore + h11 with a small amount of straight-line code, to keep CPU per request low.

Supported:

* HTTP/1.1 requests (responses may be HTTP/1.0 or HTTP/1.1) over TCP (``http``) or TLS
  (``https``, ALPN ``http/1.1``), on **trio only**;
* a keep-alive pool: a LIFO stack of idle connections per origin (O(1) acquire and release),
  ``max_connections`` open connections in all (in use + idle); at the limit an idle connection
  of another origin is closed, else requests wait in FIFO order up to the ``pool`` timeout;
  an idle connection found readable (closed by the server, or unsolicited bytes) is discarded
  before reuse; a GET or HEAD whose *reused* connection fails before any response byte is
  retried once on a new connection;
* response bodies framed by ``Content-Length``, ``chunked`` (extensions and trailers are
  skipped) or by the end of the connection; interim 1xx responses are skipped;
* timeouts from ``request.extensions["timeout"]`` (``connect``, ``read``, ``write``,
  ``pool``; None = no limit). ``read`` and ``write`` bound each socket operation, as in httpcore.

Connections are opened with ``trio.open_tcp_stream``; plain ``http`` ones are then driven on
their non-blocking socket with ``trio.lowlevel.wait_readable`` / ``wait_writable`` (a cancel
scope only when a wait is needed), ``https`` ones through ``trio.SSLStream``.

Not supported: HTTP/2, proxies, ``Expect: 100-continue`` (the body is sent with the head),
streaming request bodies (a body is read whole and sent with ``Content-Length``; a
``Transfer-Encoding`` request header is replaced), pipelining, ``101 Switching Protocols``,
access to trailers, response heads terminated by bare LF.

Every failure is raised as an ``httpx.TransportError`` subclass: ConnectError / ConnectTimeout
(connect and TLS handshake), WriteError / WriteTimeout, ReadError / ReadTimeout, PoolTimeout,
RemoteProtocolError (malformed or truncated response, or heads over 64 KiB / 200 lines),
LocalProtocolError (a request that cannot be serialized safely), UnsupportedProtocol.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import ssl
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from typing import Final, cast

import httpx
import trio

from .proxies import Proxy, ProxyConfig

__all__ = ["MAX_HEAD_BYTES", "MAX_HEAD_LINES", "FastTransport"]

MAX_HEAD_BYTES: Final = 64 * 1024
"""Largest response head (status line + header lines) accepted."""
MAX_HEAD_LINES: Final = 200
"""Most header lines accepted in one response head."""
MAX_CHUNK_LINE: Final = 4096
"""Longest chunk-size line (with extensions) accepted."""
MAX_TRAILER_BYTES: Final = 64 * 1024
"""Most trailer bytes skipped after the last chunk."""
MAX_INTERIM: Final = 16
"""Most interim (1xx) responses skipped before the final one."""

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_RETRYABLE: Final = frozenset({"GET", "HEAD"})
_HEX: Final = b"0123456789abcdefABCDEF"

_Origin = tuple[str, str, int]

# Body framing modes.
_EMPTY: Final = 0
_LENGTH: Final = 1
_CHUNKED: Final = 2
_UNTIL_CLOSE: Final = 3

# Chunked decoder states.
_SIZE_LINE: Final = 0
_DATA: Final = 1
_DATA_END: Final = 2
_TRAILER: Final = 3


def _describe(exc: BaseException) -> str:
    """A one-line description of ``exc`` (or of its cause, for trio's wrapper exceptions)."""
    inner = exc.__cause__ if exc.__cause__ is not None else exc
    return f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__


class ProxyRefused(httpx.ProxyError):
    """The proxy could not be reached, or refused the request; ``status`` is its answer to
    CONNECT, if there was one."""

    def __init__(
        self, message: str, *, status: int | None, request: httpx.Request, proxy: str = ""
    ) -> None:
        super().__init__(message, request=request)
        self.status = status
        self.proxy = proxy  # its URL without credentials


class _Conn:
    """One open connection; holds one pool slot while in ``FastTransport._all``."""

    __slots__ = ("closed", "origin", "served")

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.served = 0  # responses completed on it: > 0 means a reused connection
        self.closed = False

    def close(self) -> None:
        """Close the socket now; wakes any task blocked on it. Idempotent."""
        raise NotImplementedError

    def idle_ok(self) -> bool:
        """True if an idle connection looks reusable: open and with nothing to read (a
        readable idle socket means EOF, a reset or unsolicited bytes)."""
        raise NotImplementedError

    async def receive(self, size: int, limit: float | None, request: httpx.Request) -> bytes:
        """Up to ``size`` bytes (b"" at EOF), waiting at most ``limit`` seconds."""
        raise NotImplementedError

    async def send(self, data: bytes, limit: float | None, request: httpx.Request) -> None:
        """Send all of ``data``, waiting at most ``limit`` seconds for each progress."""
        raise NotImplementedError


def _poll_readable(sock: socket.socket | trio.socket.SocketType) -> bool:
    try:
        poll = select.poll()
        poll.register(sock, select.POLLIN)
        return bool(poll.poll(0))
    except (OSError, ValueError):
        return True


class _PlainConn(_Conn):
    """A TCP connection driven directly on its non-blocking socket: fewer trio checkpoints
    and cancel scopes than a ``trio.SocketStream``."""

    __slots__ = ("sock",)

    def __init__(self, origin: _Origin, sock: socket.socket) -> None:
        super().__init__(origin)
        self.sock = sock

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(RuntimeError):  # outside trio.run: nobody is waiting
                trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    def idle_ok(self) -> bool:
        return not self.closed and not _poll_readable(self.sock)

    async def receive(self, size: int, limit: float | None, request: httpx.Request) -> bytes:
        sock = self.sock
        try:
            try:
                data = sock.recv(size)
            except BlockingIOError:
                pass
            else:  # data was ready: still let other tasks run
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            with trio.CancelScope(deadline=_deadline(limit)):
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    try:
                        return sock.recv(size)
                    except BlockingIOError:  # pragma: no cover - spurious wake-up
                        pass
        except (OSError, trio.ClosedResourceError) as exc:
            raise httpx.ReadError(_describe(exc), request=request) from exc
        raise httpx.ReadTimeout(f"no data from the server in {limit} s", request=request)

    async def send(self, data: bytes, limit: float | None, request: httpx.Request) -> None:
        sock = self.sock
        try:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            view = memoryview(data)[sent:]
            with trio.CancelScope(deadline=_deadline(limit)) as scope:
                while view:
                    await trio.lowlevel.wait_writable(sock)
                    with contextlib.suppress(BlockingIOError):  # a spurious wake-up
                        view = view[sock.send(view) :]
                    scope.deadline = _deadline(limit)
                return
        except (OSError, trio.ClosedResourceError) as exc:
            raise httpx.WriteError(_describe(exc), request=request) from exc
        raise httpx.WriteTimeout(f"could not send the request in {limit} s", request=request)


class _TLSConn(_Conn):
    """A TLS connection, through a ``trio.SSLStream``. Closing sends no close_notify."""

    __slots__ = ("sock", "stream")

    def __init__(self, origin: _Origin, stream: trio.SSLStream[trio.SocketStream]) -> None:
        super().__init__(origin)
        self.stream = stream
        self.sock = stream.transport_stream.socket

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()  # trio's close wakes the tasks blocked on it

    def idle_ok(self) -> bool:
        # Decrypted bytes buffered in the SSLObject are not seen here; unsolicited bytes
        # there would make the next response fail (not retried).
        return not self.closed and not _poll_readable(self.sock)

    async def receive(self, size: int, limit: float | None, request: httpx.Request) -> bytes:
        try:
            with trio.CancelScope(deadline=_deadline(limit)):
                # SSLStream returns bytes (the ABC says bytes | bytearray).
                return cast(bytes, await self.stream.receive_some(size))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(_describe(exc), request=request) from exc
        raise httpx.ReadTimeout(f"no data from the server in {limit} s", request=request)

    async def send(self, data: bytes, limit: float | None, request: httpx.Request) -> None:
        try:
            with trio.CancelScope(deadline=_deadline(limit)):
                await self.stream.send_all(data)
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(_describe(exc), request=request) from exc
        raise httpx.WriteTimeout(f"could not send the request in {limit} s", request=request)


def _deadline(limit: float | None) -> float:
    return math.inf if limit is None else trio.current_time() + limit


class _Waiter:
    """A request waiting for a pool slot (``conn`` None) or for an idle connection."""

    __slots__ = ("conn", "event", "granted", "origin")

    def __init__(self, origin: _Origin) -> None:
        self.origin = origin
        self.event = trio.Event()
        self.granted = False
        self.conn: _Conn | None = None


class _Stale(Exception):
    """A reused connection failed before any response byte: the request may be retried."""

    def __init__(self, error: httpx.TransportError) -> None:
        super().__init__(str(error))
        self.error = error


def _serialize(
    request: httpx.Request, body: bytes, proxy: Proxy | None = None
) -> tuple[bytes, bool]:
    """The request bytes (head + body) and whether the request asks to close. Through a
    ``proxy`` (plain http only) the target is the absolute URL, with the proxy's
    credentials."""
    try:
        method = request.method.encode("ascii")
    except UnicodeEncodeError as exc:
        raise httpx.LocalProtocolError("non-ASCII method", request=request) from exc
    target = request.url.raw_path
    if proxy is not None:
        target = b"http://" + request.url.netloc + target
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    if proxy is not None and proxy.authorization is not None:
        parts += (b"Proxy-Authorization", b": ", proxy.authorization, b"\r\n")
    has_length = False
    had_te = False
    close = False
    for name, value in request.headers.raw:
        first = name[:1].lower()
        if first == b"c" or first == b"t":
            lname = name.lower()
            if lname == b"content-length":
                has_length = True
            elif lname == b"transfer-encoding":
                had_te = True  # the body is buffered: sent with Content-Length instead
                continue
            elif lname == b"connection" and b"close" in value.lower():
                close = True
        parts += (name, b": ", value, b"\r\n")
    if (body or had_te) and not has_length:
        parts += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    # One CRLF per line (request line, 4 parts per field, blank line) and no other CR or LF:
    # a CR or LF inside a field would let a value inject headers or a second request.
    lines = len(parts) // 4 + 1
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b" " in method:
        raise httpx.LocalProtocolError("CR, LF or space inside a request field", request=request)
    return (head + body if body else head), close


def _content_length(values: list[bytes]) -> int | None:
    """The value of the Content-Length header fields, or None if there are none."""
    result: int | None = None
    for field in values:
        for part in field.split(b","):
            part = part.strip(b" \t")
            if not part.isdigit() or len(part) > 18:
                raise ValueError(f"invalid Content-Length {field!r}")
            n = int(part)
            if result is not None and n != result:
                raise ValueError("conflicting Content-Length values")
            result = n
    return result


_Head = tuple[int, bytes, bool, list[tuple[bytes, bytes]], list[bytes], bytes | None, bytes]


def _parse_head(head: bytes) -> _Head:
    """Parse a response head without its final CRLFCRLF.

    Returns (status, reason, http/1.0?, headers, Content-Length values, Transfer-Encoding
    or None, Connection tokens lower-cased); raises ValueError if malformed.
    """
    n = head.count(b"\r\n")
    if head.count(b"\n") != n or head.count(b"\r") != n:
        raise ValueError("bare CR or LF in the response head")
    if n > MAX_HEAD_LINES:
        raise ValueError(f"more than {MAX_HEAD_LINES} header lines")
    lines = head.split(b"\r\n")
    if b"\r\n " in head or b"\r\n\t" in head:
        lines = _unfold(lines)
        n = len(lines) - 1
    version, _, rest = lines[0].partition(b" ")
    if version == b"HTTP/1.1":
        http10 = False
    elif version == b"HTTP/1.0":
        http10 = True
    elif len(version) == 8 and version[:7] == b"HTTP/1." and version[7:].isdigit():
        http10 = False
    else:
        raise ValueError(f"invalid status line {lines[0][:100]!r}")
    code, _, reason = rest.partition(b" ")
    if len(code) != 3 or not code.isdigit() or code[0] == 0x30:
        raise ValueError(f"invalid status line {lines[0][:100]!r}")
    headers: list[tuple[bytes, bytes]] = []
    lengths: list[bytes] = []
    te: bytes | None = None
    connection = b""
    for i in range(1, n + 1):
        line = lines[i]
        name, sep, value = line.partition(b":")
        if not sep or not name or line[0] in (32, 9) or name[-1] in (32, 9):
            raise ValueError(f"invalid header line {line[:100]!r}")
        value = value.strip(b" \t")
        headers.append((name, value))
        first = name[0] | 0x20
        if first == 0x63 or first == 0x74:  # 'c' or 't'
            lname = name.lower()
            if lname == b"content-length":
                lengths.append(value)
            elif lname == b"transfer-encoding":
                te = value if te is None else te + b"," + value
            elif lname == b"connection":
                connection += b"," + value.lower()
    return int(code), reason, http10, headers, lengths, te, connection


def _unfold(lines: list[bytes]) -> list[bytes]:
    """Join obs-fold continuation lines (starting with SP or HT) to the field line before
    them with one SP, as RFC 9112 (5.2) asks of a user agent; ValueError for a fold with
    no field line before it."""
    out = [lines[0]]
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            if len(out) < 2:
                raise ValueError("obs-fold before the first header line")
            out[-1] = out[-1].rstrip(b" \t") + b" " + line.strip(b" \t")
        else:
            out.append(line)
    return out


class _Body(httpx.AsyncByteStream):
    """The body of one response: chunks as received (at most one copy), then the connection
    goes back to the pool if the body was complete and the connection is reusable."""

    __slots__ = (
        "_buf",
        "_conn",
        "_keep",
        "_left",
        "_mode",
        "_pos",
        "_read_timeout",
        "_request",
        "_size",
        "_state",
        "_trailer",
        "_transport",
    )

    def __init__(
        self,
        transport: FastTransport,
        conn: _Conn | None,
        mode: int,
        left: int,
        buf: bytes,
        pos: int,
        keep: bool,
        request: httpx.Request,
        read_timeout: float | None,
    ) -> None:
        self._transport = transport
        self._conn = conn
        self._mode = mode
        self._left = left
        self._buf = buf
        self._pos = pos
        self._keep = keep
        self._request = request
        self._read_timeout = read_timeout
        self._size = transport._receive_size
        self._state = _SIZE_LINE
        self._trailer = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._conn is None:
            raise StopAsyncIteration
        try:
            mode = self._mode
            if mode == _LENGTH:
                data = await self._next_length()
            elif mode == _CHUNKED:
                data = await self._next_chunked()
            else:
                data = await self._next_until_close()
        except BaseException:
            self._close()
            raise
        if data is None:
            self._finish()
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        """Return the connection to the pool if the body was read completely and the
        connection is reusable, else close it. Idempotent; never raises."""
        self._close()

    def _close(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._transport._drop(conn)

    def _finish(self) -> None:
        conn = self._conn
        self._conn = None
        assert conn is not None
        if self._keep and self._pos == len(self._buf):
            self._transport._release(conn)
        else:  # framed by the close, or unsolicited bytes after the body
            self._transport._drop(conn)

    async def _more(self, size: int) -> bytes:
        conn = self._conn
        assert conn is not None
        return await conn.receive(size, self._read_timeout, self._request)

    def _take(self, limit: int) -> bytes:
        """Up to ``limit`` buffered bytes (the whole buffer without copy when it fits)."""
        buf, pos = self._buf, self._pos
        if pos == 0 and len(buf) <= limit:
            self._buf = b""
            return buf
        end = min(len(buf), pos + limit)
        data = buf[pos:end]
        if end == len(buf):
            self._buf, self._pos = b"", 0
        else:
            self._pos = end
        return data

    def _truncated(self, what: str) -> httpx.RemoteProtocolError:
        return httpx.RemoteProtocolError(
            f"server closed the connection {what}", request=self._request
        )

    async def _next_length(self) -> bytes | None:
        left = self._left
        if left == 0:
            return None
        if self._pos < len(self._buf):
            data = self._take(left)
        else:
            data = await self._more(min(self._size, left))
            if not data:
                raise self._truncated(f"with {left} body bytes missing")
        self._left = left - len(data)
        return data

    async def _next_until_close(self) -> bytes | None:
        if self._pos < len(self._buf):
            return self._take(len(self._buf))
        data = await self._more(self._size)
        return data if data else None

    async def _line(self) -> bytes:
        """The next CRLF-terminated line of the chunked framing (bounded)."""
        while True:
            buf, pos = self._buf, self._pos
            i = buf.find(b"\r\n", pos)
            if i >= 0:
                if i - pos > MAX_CHUNK_LINE:
                    break
                self._pos = i + 2
                return buf[pos:i]
            if len(buf) - pos > MAX_CHUNK_LINE:
                break
            data = await self._more(self._size)
            if not data:
                raise self._truncated("inside the chunked framing")
            self._buf = buf[pos:] + data if pos < len(buf) else data
            self._pos = 0
        raise httpx.RemoteProtocolError("chunked framing line too long", request=self._request)

    async def _next_chunked(self) -> bytes | None:
        while True:
            state = self._state
            if state == _DATA:
                left = self._left
                if self._pos < len(self._buf):
                    data = self._take(left)
                else:
                    data = await self._more(self._size)
                    if not data:
                        raise self._truncated(f"with {left} bytes of a chunk missing")
                    if len(data) > left:
                        self._buf, self._pos = data, left
                        data = data[:left]
                left -= len(data)
                self._left = left
                if left == 0:
                    self._state = _DATA_END
                return data
            line = await self._line()
            if state == _SIZE_LINE:
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or len(size) > 16 or size.strip(_HEX):
                    raise httpx.RemoteProtocolError(
                        f"invalid chunk size line {line[:100]!r}", request=self._request
                    )
                self._left = int(size, 16)
                self._state = _DATA if self._left else _TRAILER
            elif state == _DATA_END:
                if line:
                    raise httpx.RemoteProtocolError(
                        "chunk data longer than its size", request=self._request
                    )
                self._state = _SIZE_LINE
            else:  # _TRAILER
                if not line:
                    return None
                self._trailer += len(line) + 2
                if self._trailer > MAX_TRAILER_BYTES:
                    raise httpx.RemoteProtocolError("trailers too large", request=self._request)


class FastTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive transport for ``httpx.AsyncClient`` on trio (see the module doc).

    ``max_connections`` bounds open connections (in use + idle) over all origins;
    ``max_keepalive`` bounds idle ones (default: ``max_connections``); ``ssl_context`` is
    used for https (default: certifi's CAs if installed, else the system's);
    ``receive_size`` is the most bytes asked of the socket per receive; ``proxies`` says
    which origins are reached through an http:// forward proxy (``proxies.py``): plain
    http in absolute form, https through a ``CONNECT`` tunnel. A proxy that refuses or
    cannot be reached raises :class:`ProxyRefused` (an ``httpx.ProxyError``).
    """

    def __init__(
        self,
        *,
        max_connections: int = 128,
        max_keepalive: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        receive_size: int = 128 * 1024,
        proxies: ProxyConfig | None = None,
    ) -> None:
        if max_connections < 1 or receive_size < 1:
            raise ValueError("max_connections and receive_size must be >= 1")
        if max_keepalive is not None and max_keepalive < 0:
            raise ValueError("max_keepalive must be >= 0")
        self._max = max_connections
        self._max_idle = max_connections if max_keepalive is None else max_keepalive
        self._ssl_context = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._receive_size = receive_size
        self._proxies = proxies if proxies else None
        self._routes: dict[_Origin, Proxy | None] = {}  # the proxy of each origin
        self._idle: dict[_Origin, deque[_Conn]] = {}
        self._lru: OrderedDict[_Conn, None] = OrderedDict()  # all idle, oldest first
        self._all: set[_Conn] = set()  # connections holding a slot
        self._open = 0  # slots taken: connections in _all + connects in progress
        self._waiters: deque[_Waiter] = deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections open or being opened (in use + idle)."""
        return self._open

    @property
    def idle_connections(self) -> int:
        """Idle keep-alive connections."""
        return len(self._lru)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and return the response with its body not yet read."""
        url = request.url
        scheme = url.scheme
        default_port = _DEFAULT_PORTS.get(scheme)
        if default_port is None:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        try:
            host = url.raw_host.decode("ascii")
        except UnicodeDecodeError as exc:  # pragma: no cover - httpx gives IDNA-encoded hosts
            raise httpx.LocalProtocolError("non-ASCII host", request=request) from exc
        if not host:
            raise httpx.UnsupportedProtocol("URL without a host", request=request)
        origin = (scheme, host, url.port or default_port)
        timeouts = request.extensions.get("timeout") or {}
        body = await request.aread()
        proxy = self._route(origin)
        payload, close = _serialize(request, body, proxy if scheme == "http" else None)
        connect_timeout = timeouts.get("connect")
        conn = await self._acquire(origin, timeouts.get("pool"), connect_timeout, request)
        retried = False
        while True:
            try:
                response = await self._exchange(conn, request, payload, close, timeouts)
                if proxy is not None and scheme == "http":
                    response.extensions["rangefs_proxy"] = proxy.name  # who answered
                return response
            except _Stale as stale:
                if retried or request.method not in _RETRYABLE:
                    self._drop(conn)
                    raise stale.error from stale.error.__cause__
                retried = True
                self._forget(conn)  # keep its slot for the new connection
                conn = await self._connect(origin, connect_timeout, request)
            except BaseException:
                self._drop(conn)
                raise

    async def aclose(self) -> None:
        """Close every connection; later requests raise ``httpx.ConnectError``."""
        self._closed = True
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._idle.clear()
        self._lru.clear()
        self._open = 0
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.event.set()  # not granted: it raises
        await trio.lowlevel.checkpoint()

    # -- one exchange ---------------------------------------------------------------------

    async def _exchange(
        self,
        conn: _Conn,
        request: httpx.Request,
        payload: bytes,
        close: bool,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        reused = conn.served > 0
        try:
            await conn.send(payload, timeouts.get("write"), request)
        except httpx.WriteError as exc:
            if reused:
                raise _Stale(exc) from exc
            raise
        read_timeout = timeouts.get("read")
        size = self._receive_size
        buf: bytes | bytearray = b""
        start = scan = 0
        interim = 0
        while True:
            end = buf.find(b"\r\n\r\n", scan)
            if end < 0:
                if len(buf) - start > MAX_HEAD_BYTES:
                    raise httpx.RemoteProtocolError(
                        f"response head larger than {MAX_HEAD_BYTES} bytes", request=request
                    )
                try:
                    data = await conn.receive(size, read_timeout, request)
                except httpx.ReadError as exc:
                    if reused and not buf and not interim:
                        raise _Stale(exc) from exc
                    raise
                if not data:
                    error = httpx.RemoteProtocolError(
                        "server closed the connection without a complete response head",
                        request=request,
                    )
                    if reused and not buf and not interim:
                        raise _Stale(error)
                    raise error
                if start:
                    buf, start = buf[start:], 0
                if buf:
                    scan = max(0, len(buf) - 3)
                    if not isinstance(buf, bytearray):
                        buf = bytearray(buf)
                    buf += data
                else:
                    buf, scan = data, 0
                continue
            if end - start > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError(
                    f"response head larger than {MAX_HEAD_BYTES} bytes", request=request
                )
            try:
                status, reason, http10, headers, lengths, te, connection = _parse_head(
                    bytes(buf[start:end])
                )
            except ValueError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            if status >= 200:
                break
            if status == 101:
                raise httpx.RemoteProtocolError(
                    "unexpected 101 Switching Protocols", request=request
                )
            interim += 1
            if interim > MAX_INTERIM:
                raise httpx.RemoteProtocolError("too many interim responses", request=request)
            start = scan = end + 4

        pos = end + 4
        if isinstance(buf, bytearray):
            buf, pos = bytes(buf[pos:]), 0
        if http10:
            keep = b"keep-alive" in connection and not close
        else:
            keep = not close and b"close" not in connection
        mode = _EMPTY
        left = 0
        if request.method == "HEAD" or status == 204 or status == 304:
            pass
        elif te is not None:
            if http10:
                raise httpx.RemoteProtocolError(
                    "Transfer-Encoding in an HTTP/1.0 response", request=request
                )
            if te.rsplit(b",", 1)[-1].strip(b" \t").lower() == b"chunked":
                mode = _CHUNKED
                keep = keep and not lengths  # both: a smuggling attempt? do not reuse
            else:
                mode, keep = _UNTIL_CLOSE, False
        elif lengths:
            try:
                left = _content_length(lengths) or 0
            except ValueError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from exc
            if left:
                mode = _LENGTH
        else:
            mode, keep = _UNTIL_CLOSE, False

        owner: _Conn | None = conn
        if mode == _EMPTY:
            owner = None
            if keep and pos == len(buf):
                self._release(conn)
            else:
                self._drop(conn)
        stream = _Body(self, owner, mode, left, buf, pos, keep, request, read_timeout)
        return httpx.Response(
            status,
            headers=headers,
            stream=stream,
            extensions={
                "http_version": b"HTTP/1.0" if http10 else b"HTTP/1.1",
                "reason_phrase": reason,
            },
            request=request,
        )

    # -- pool -----------------------------------------------------------------------------

    def _closed_error(self, request: httpx.Request) -> httpx.ConnectError:
        return httpx.ConnectError("the transport is closed", request=request)

    async def _acquire(
        self,
        origin: _Origin,
        pool_timeout: float | None,
        connect_timeout: float | None,
        request: httpx.Request,
    ) -> _Conn:
        """An idle connection to ``origin``, or a new one (waiting for a slot if needed)."""
        if self._closed:
            raise self._closed_error(request)
        stack = self._idle.get(origin)
        while stack:
            conn = stack.pop()
            del self._lru[conn]
            if not stack:
                del self._idle[origin]
            if conn.idle_ok():
                return conn
            self._drop(conn)
            stack = self._idle.get(origin)
        if self._open < self._max:
            self._open += 1
        elif self._lru:  # all idle connections are of other origins: close the oldest
            victim = self._pop_oldest_idle()
            self._forget(victim)  # its slot is ours
        else:
            conn_or_slot = await self._wait(origin, pool_timeout, request)
            if conn_or_slot is not None:
                if conn_or_slot.idle_ok():
                    return conn_or_slot
                self._forget(conn_or_slot)
        return await self._connect(origin, connect_timeout, request)

    async def _wait(
        self, origin: _Origin, limit: float | None, request: httpx.Request
    ) -> _Conn | None:
        """Wait (FIFO) for a slot (returns None) or an idle connection to ``origin``."""
        waiter = _Waiter(origin)
        self._waiters.append(waiter)
        try:
            with trio.move_on_after(math.inf if limit is None else limit):
                await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._give_back(waiter)
            elif not self._closed:
                self._waiters.remove(waiter)
            raise
        if waiter.granted:
            return waiter.conn
        if self._closed:
            raise self._closed_error(request)
        self._waiters.remove(waiter)
        raise httpx.PoolTimeout(
            f"no connection available within {limit} s ({self._max} connections in use)",
            request=request,
        )

    async def _connect(self, origin: _Origin, limit: float | None, request: httpx.Request) -> _Conn:
        """Open a connection in a slot the caller holds (freed again on failure)."""
        scheme, host, port = origin
        deadline = math.inf if limit is None else trio.current_time() + limit
        try:
            if self._closed:
                raise self._closed_error(request)
            with trio.CancelScope(deadline=deadline):
                proxy = self._route(origin)
                if proxy is None:
                    tcp = await trio.open_tcp_stream(host, port)  # with TCP_NODELAY
                else:
                    try:
                        tcp = await trio.open_tcp_stream(proxy.host, proxy.port)
                    except OSError as exc:
                        raise ProxyRefused(
                            f"cannot connect to the proxy {proxy.name}: {_describe(exc)}",
                            status=None, request=request, proxy=proxy.name) from exc
                conn: _Conn
                try:
                    if proxy is not None and scheme == "https":
                        await self._tunnel(tcp, origin, proxy, request)
                    if scheme == "https":
                        tls = trio.SSLStream(
                            tcp, self._tls_context(), server_hostname=host, https_compatible=True
                        )
                        await tls.do_handshake()
                        conn = _TLSConn(origin, tls)
                    else:
                        sock = socket.socket(fileno=tcp.socket.detach())
                        sock.setblocking(False)
                        conn = _PlainConn(origin, sock)
                    if self._closed:
                        conn.close()
                        raise self._closed_error(request)
                except BaseException:
                    tcp.socket.close()
                    raise
                self._all.add(conn)
                return conn
        except httpx.TransportError:
            self._free_slot()
            raise
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ValueError) as exc:
            self._free_slot()
            raise httpx.ConnectError(_describe(exc), request=request) from exc
        except BaseException:
            self._free_slot()
            raise
        self._free_slot()
        raise httpx.ConnectTimeout(f"could not connect within {limit} s", request=request)

    def _route(self, origin: _Origin) -> Proxy | None:
        """The proxy for ``origin`` (None: directly), decided once per origin."""
        if self._proxies is None:
            return None
        try:
            return self._routes[origin]
        except KeyError:
            proxy = self._routes[origin] = self._proxies.for_origin(*origin)
            return proxy

    async def _tunnel(
        self, tcp: trio.SocketStream, origin: _Origin, proxy: Proxy, request: httpx.Request
    ) -> None:
        """``CONNECT host:port`` through ``proxy`` on ``tcp``; returns once it answered 2xx
        (the stream then carries the TLS handshake), else ProxyRefused."""
        _, host, port = origin
        target = f"{host}:{port}".encode("ascii")
        parts = [b"CONNECT ", target, b" HTTP/1.1\r\nHost: ", target, b"\r\n"]
        if proxy.authorization is not None:
            parts += [b"Proxy-Authorization: ", proxy.authorization, b"\r\n"]
        await tcp.send_all(b"".join([*parts, b"\r\n"]))
        head = b""
        while b"\r\n\r\n" not in head:
            data = await tcp.receive_some(4096)
            if not data or len(head) > MAX_HEAD_BYTES:
                raise ProxyRefused(
                    f"the proxy {proxy.name} closed the connection during CONNECT "
                    f"{host}:{port}", status=None, request=request, proxy=proxy.name)
            head += data
        end = head.index(b"\r\n\r\n")
        try:
            status, reason, *_ = _parse_head(head[:end])
        except ValueError as exc:
            raise ProxyRefused(f"the proxy {proxy.name} gave a malformed CONNECT answer",
                               status=None, request=request, proxy=proxy.name) from exc
        if not 200 <= status < 300:  # its body, if any, is of no use: the caller closes
            text = reason.decode("ascii", "replace")
            advice = ""
            if status in (401, 407):
                advice = " (give the right user:password in the proxy URL)"
            raise ProxyRefused(
                f"the proxy {proxy.name} refused CONNECT {host}:{port}: {status} {text}"
                f"{advice}", status=status, request=request, proxy=proxy.name)
        if end + 4 != len(head):  # the TLS handshake has not begun: nothing may follow
            raise ProxyRefused(f"the proxy {proxy.name} sent bytes after its CONNECT answer",
                               status=None, request=request, proxy=proxy.name)

    def _tls_context(self) -> ssl.SSLContext:
        context = self._ssl_context
        if context is None:
            try:
                import certifi

                context = ssl.create_default_context(cafile=certifi.where())
            except ImportError:  # pragma: no cover - httpx depends on certifi
                context = ssl.create_default_context()
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return context

    def _pop_oldest_idle(self) -> _Conn:
        conn, _ = self._lru.popitem(last=False)
        stack = self._idle[conn.origin]
        # Stacks and the LRU are both in release order: the oldest is at the bottom.
        if stack[0] is conn:
            stack.popleft()
        else:  # pragma: no cover - defensive
            stack.remove(conn)
        if not stack:
            del self._idle[conn.origin]
        return conn

    def _free_slot(self) -> None:
        """A slot is free: hand it to the first waiter, else count it free."""
        if self._closed:
            return
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            waiter.event.set()
        else:
            self._open -= 1

    def _forget(self, conn: _Conn) -> None:
        """Close ``conn``; its slot passes to the caller."""
        conn.close()
        self._all.discard(conn)

    def _drop(self, conn: _Conn) -> None:
        """Close ``conn`` and free its slot (once)."""
        conn.close()
        if conn in self._all:
            self._all.remove(conn)
            self._free_slot()

    def _give_back(self, waiter: _Waiter) -> None:
        """Undo a grant to a waiter that was cancelled."""
        if waiter.conn is not None:
            self._release(waiter.conn, count=False)
        else:
            self._free_slot()

    def _release(self, conn: _Conn, *, count: bool = True) -> None:
        """``conn`` finished a response and may be reused."""
        if conn not in self._all:  # the transport was closed meanwhile
            conn.close()
            return
        if count:
            conn.served += 1
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.granted = True
            if waiter.origin == conn.origin:
                waiter.conn = conn
            else:
                self._forget(conn)  # its slot goes to the waiter
            waiter.event.set()
            return
        if len(self._lru) >= self._max_idle:
            if not self._lru:
                self._drop(conn)
                return
            self._drop(self._pop_oldest_idle())
        stack = self._idle.get(conn.origin)
        if stack is None:
            stack = self._idle[conn.origin] = deque()
        stack.append(conn)
        self._lru[conn] = None

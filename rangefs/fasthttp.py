"""A lean HTTP/1.1 client transport for httpx, on trio.

:class:`FastTransport` plugs into ``httpx.AsyncClient(transport=...)`` in place of httpcore:
the connection pool and the socket handling are written here, to keep CPU per request low;
responses are parsed by **llhttp** (Node.js's parser, through ``httptools``, as uvicorn
does). Why llhttp and not h11 (httpcore's parser), measured by ``python -m
tests.bench.httpcpu`` on this project's 2-core VM: parsing a 10-field 206 head costs about
2 us with llhttp and 45 us with h11, and h11 adds about 0.12 ms per MiB of body (it
buffers and re-slices every received block) where llhttp copies each block once; the
transport's own share is what remains (see the bench's figures in README "Performance").
A body framed by Content-Length alone does not go through llhttp at all: its bytes are
handed out as received (the parser would copy each block once more), counted against the
declared length.

What is still done here, and why: finding the end of each head (bounded by
:data:`MAX_HEAD_BYTES` / :data:`MAX_HEAD_LINES`; llhttp has no limit), replacing obs-folds
by SP before llhttp sees them (RFC 9112 5.2 asks a user agent to; llhttp refuses them),
ending the answer to a HEAD request at its head (llhttp cannot know the request method),
bounding chunked framing without data (:data:`MAX_FRAMING_BYTES`) and closing a
connection after anything that follows a complete body.

Supported:

* HTTP/1.1 requests (responses may be HTTP/1.0 or HTTP/1.1) over TCP (``http``) or TLS
  (``https``, ALPN ``http/1.1``), on **trio only**, directly or through an ``http://``
  forward proxy (absolute-form requests for http, ``CONNECT`` tunnels for https);
* a keep-alive pool: a LIFO stack of idle connections per origin (O(1) acquire and release),
  ``max_connections`` open connections in all (in use + idle); at the limit an idle connection
  of another origin is closed, else requests wait in FIFO order up to the ``pool`` timeout;
  an idle connection found readable (closed by the server, or unsolicited bytes) is discarded
  before reuse; a GET or HEAD whose *reused* connection fails before any response byte is
  retried once on a new connection;
* response bodies framed by ``Content-Length``, ``chunked`` (extensions and trailers are
  skipped) or by the end of the connection (RFC 9112 6.3, as llhttp applies it: a
  Transfer-Encoding whose last coding is not ``chunked`` is read to the close; the caller
  decides whether to accept it); interim 1xx responses are skipped. Refused as malformed
  (RemoteProtocolError): Content-Length repeated (even with equal values) or together with
  Transfer-Encoding, bare CR or LF, a body shorter than its framing;
* timeouts from ``request.extensions["timeout"]`` (``connect``, ``read``, ``write``,
  ``pool``; None = no limit). ``read`` and ``write`` bound each socket operation, as in httpcore.

Connections are opened with ``trio.open_tcp_stream``; plain ``http`` ones are then driven on
their non-blocking socket with ``trio.lowlevel.wait_readable`` / ``wait_writable`` (a cancel
scope only when a wait is needed), ``https`` ones through ``trio.SSLStream``.

Not supported: HTTP/2, ``Expect: 100-continue`` (the body is sent with the head),
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
import contextvars
import math
import re
import select
import socket
import ssl
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Final, cast

import httptools
import httpx
import trio

from .proxies import Proxy, ProxyConfig

__all__ = ["MAX_HEAD_BYTES", "MAX_HEAD_LINES", "FastTransport"]

MAX_HEAD_BYTES: Final = 64 * 1024
"""Largest response head (status line + header lines) accepted."""
MAX_HEAD_LINES: Final = 200
"""Most header lines accepted in one response head."""
MAX_FRAMING_BYTES: Final = 64 * 1024
"""Most bytes of chunked framing (size lines, extensions, trailers) accepted between two
pieces of body data."""
MAX_INTERIM: Final = 16
"""Most interim (1xx) responses skipped before the final one."""
RECEIVE_SIZE: Final = 128 * 1024
"""Most bytes asked of a socket per receive, by default (a mount's transports: each
connection may hold one such block, and a mount's peak RSS is bounded)."""
BULK_RECEIVE_SIZE: Final = 512 * 1024
"""The receive size of bulk transfers (``rangefs download``, see :func:`receive_size`): on
a link without a per-connection cap a receive then brings up to 512 KiB at once, and the
fetcher writes it with one ``pwritev``: a 1 GiB download on the bench's uncapped link used
0.9 s of system CPU instead of 1.2-1.6 s with 128 KiB. A mount's daemon with it peaked at
84 MiB RSS instead of 55 reading a 4 GiB object (32 connections), over its 80 MiB target."""
_receive_size: contextvars.ContextVar[int] = contextvars.ContextVar(
    "rangefs_receive_size", default=RECEIVE_SIZE
)


@contextlib.contextmanager
def receive_size(size: int) -> Iterator[None]:
    """Within this block (this context: the calling trio task), transports made without a
    ``receive_size`` receive up to ``size`` bytes per read."""
    token = _receive_size.set(size)
    try:
        yield
    finally:
        _receive_size.reset(token)

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_RETRYABLE: Final = frozenset({"GET", "HEAD"})

_Origin = tuple[str, str, int]

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


_FOLD: Final = re.compile(rb"[ \t]*\r\n[ \t]+")


def _unfold(head: bytes) -> bytes:
    """``head`` with each obs-fold (CRLF followed by SP or HT) replaced by one SP, as RFC
    9112 (5.2) asks of a user agent (llhttp refuses folds); ValueError for a fold with no
    field line before it."""
    first = head.find(b"\r\n")
    if head[first + 2 : first + 3] in (b" ", b"\t"):
        raise ValueError("obs-fold before the first header line")
    return head[: first + 2] + _FOLD.sub(b" ", head[first + 2 :])


class _Message:
    """What httptools' llhttp parser reports of one response (its callbacks): the fields
    of the head, then the body in pieces as received. One per response head; an interim
    (1xx) head gets its own. Anything after the end of the message sets ``extra``."""

    __slots__ = ("complete", "extra", "fields", "framing", "head_done", "keep", "parser",
                 "pieces", "reason", "remaining")

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.pieces: deque[bytes] = deque()
        self.head_done = False
        self.complete = False
        self.extra = False
        self.keep = False
        self.framing = 0  # framing bytes (chunk lines, trailers) fed since the last piece
        # A body framed by Content-Length alone: the bytes it still lacks, taken as received
        # (_take) without llhttp, which would copy every received block once more; None:
        # every received byte goes through llhttp (chunked, framed by the close, no body)
        self.remaining: int | None = None
        self.parser = httptools.HttpResponseParser(self)
        # RFC 9112 (7.1.1) allows whitespace (BWS) between a chunk's size and ';'
        self.parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            self.extra = True
        elif not self.head_done:  # after the head: a trailer field, skipped
            self.fields.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        if self.complete:
            self.extra = True
        else:
            self.head_done = True
            self.keep = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        if self.complete:
            self.extra = True
        elif data:
            self.pieces.append(data)

    def on_message_complete(self) -> None:
        if self.complete:
            self.extra = True
        self.complete = True

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True


def _framed_by_close(fields: list[tuple[bytes, bytes]]) -> bool:
    """True if a body with these header fields ends when the connection closes: neither a
    Content-Length nor ``chunked`` as the last transfer coding (RFC 9112 6.3), the rule
    llhttp follows."""
    codings = b""
    for name, value in fields:
        if (name[0] | 0x20) in (0x63, 0x74):  # 'c' or 't'
            lname = name.lower()
            if lname == b"content-length":
                return False
            if lname == b"transfer-encoding":
                codings += b"," + value
    return codings.rsplit(b",", 1)[-1].strip(b" \t").lower() != b"chunked"


def _parse_head(head: bytes) -> tuple[_Message, int, bool]:
    """Parse one response head (through its final CRLFCRLF) with llhttp.

    Returns the message, its status and whether it is HTTP/1.0; raises ValueError if the
    head is malformed (llhttp's reason), has more than MAX_HEAD_LINES header lines, or is
    not HTTP/1.x.
    """
    if head.count(b"\r\n") - 2 > MAX_HEAD_LINES:
        raise ValueError(f"more than {MAX_HEAD_LINES} header lines")
    if b"\r\n " in head or b"\r\n\t" in head:
        head = _unfold(head)
    message = _Message()
    parser = message.parser
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # a 101: the caller refuses it by its status
    except httptools.HttpParserError as exc:
        raise ValueError(_parser_reason(exc)) from exc
    if not message.head_done:
        raise ValueError("incomplete response head")
    status = parser.get_status_code()
    version = parser.get_http_version()
    if not 100 <= status <= 999 or not version.startswith("1."):
        line = head.split(b"\r\n", 1)[0][:100]
        raise ValueError(f"invalid status line {line!r}")
    return message, status, version == "1.0"


def _parser_reason(exc: BaseException) -> str:
    """llhttp's reason for refusing a response, or the error a callback raised."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, httptools.HttpParserCallbackError) and cause is not None:
        return str(cause)
    return str(exc) or type(exc).__name__


class _Body(httpx.AsyncByteStream):
    """The body of one response: the pieces llhttp decodes as they are received (one copy
    per received block), then the connection goes back to the pool if the body was complete
    and nothing followed it."""

    __slots__ = ("_conn", "_eof_ends", "_keep", "_message", "_read_timeout", "_request",
                 "_size", "_transport")

    def __init__(
        self,
        transport: FastTransport,
        conn: _Conn | None,
        message: _Message,
        eof_ends: bool,
        keep: bool,
        request: httpx.Request,
        read_timeout: float | None,
    ) -> None:
        self._transport = transport
        self._conn = conn
        self._message = message
        self._eof_ends = eof_ends
        self._keep = keep
        self._request = request
        self._read_timeout = read_timeout
        self._size = transport._receive_size

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        message = self._message
        pieces = message.pieces
        while not pieces:
            conn = self._conn
            if conn is None:
                raise StopAsyncIteration
            if message.complete:
                self._finish()
                raise StopAsyncIteration
            try:
                data = await conn.receive(self._size, self._read_timeout, self._request)
                if data:
                    if message.remaining is not None:
                        _take(message, data)
                    else:
                        _feed(message, data, self._request)
                elif self._eof_ends:
                    message.complete = True
                    self._keep = False
                else:
                    raise httpx.RemoteProtocolError(
                        "server closed the connection before the end of the body",
                        request=self._request,
                    )
            except BaseException:
                self._close()
                raise
        return pieces.popleft()

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
        if self._keep and not self._message.extra:
            self._transport._release(conn)
        else:  # framed by the close, or unsolicited bytes after the body
            self._transport._drop(conn)


def _identity_length(fields: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length of a head whose body it alone frames (no Transfer-Encoding), or
    None. Call after llhttp accepted the head: it refuses a malformed or repeated
    Content-Length and one beside Transfer-Encoding."""
    length = None
    for name, value in fields:
        if (name[0] | 0x20) in (0x63, 0x74):  # 'c' or 't'
            lname = name.lower()
            if lname == b"transfer-encoding":
                return None
            if lname == b"content-length":
                length = int(value)
    return length


def _take(message: _Message, data: bytes) -> None:
    """Body bytes of a Content-Length body (``message.remaining`` not None), as received:
    the pieces are ``data`` itself (no copy) up to the declared end; anything past it
    sets ``extra`` (the connection is then not reused)."""
    remaining = message.remaining
    assert remaining is not None
    if len(data) <= remaining:
        if data:
            message.pieces.append(data)
        remaining -= len(data)
    else:
        if remaining:
            message.pieces.append(data[:remaining])
        remaining = 0
        message.extra = True
    message.remaining = remaining
    if remaining == 0:
        message.complete = True


def _feed(message: _Message, data: bytes, request: httpx.Request) -> None:
    """Give received body bytes to the parser: its pieces go to ``message.pieces``. Raises
    RemoteProtocolError for malformed framing, or for more than MAX_FRAMING_BYTES of
    chunked framing without a byte of data (endless chunk extensions or trailers)."""
    before = len(message.pieces)
    try:
        message.parser.feed_data(data)
    except httptools.HttpParserError as exc:
        if not message.complete:
            raise httpx.RemoteProtocolError(_parser_reason(exc), request=request) from exc
        message.extra = True  # bytes after the end of the body: the connection is not reused
    if len(message.pieces) > before or message.complete:
        message.framing = 0
    else:
        message.framing += len(data)
        if message.framing > MAX_FRAMING_BYTES:
            raise httpx.RemoteProtocolError(
                f"chunked framing too long: over {MAX_FRAMING_BYTES} bytes without data",
                request=request,
            )


class FastTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive transport for ``httpx.AsyncClient`` on trio (see the module doc).

    ``max_connections`` bounds open connections (in use + idle) over all origins;
    ``max_keepalive`` bounds idle ones (default: ``max_connections``); ``ssl_context`` is
    used for https (default: certifi's CAs if installed, else the system's), or the one
    ``ssl_context_factory`` makes at the first https connection (a context costs ~40 ms
    of CPU: a download over plain http never pays it);
    ``receive_size`` is the most bytes asked of the socket per receive (default:
    RECEIVE_SIZE, or what :func:`receive_size` says where the transport is made); ``proxies`` says
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
        ssl_context_factory: Callable[[], ssl.SSLContext] | None = None,
        receive_size: int | None = None,
        proxies: ProxyConfig | None = None,
    ) -> None:
        if receive_size is None:
            receive_size = _receive_size.get()
        if max_connections < 1 or receive_size < 1:
            raise ValueError("max_connections and receive_size must be >= 1")
        if max_keepalive is not None and max_keepalive < 0:
            raise ValueError("max_keepalive must be >= 0")
        self._max = max_connections
        self._max_idle = max_connections if max_keepalive is None else max_keepalive
        self._ssl_context = ssl_context
        self._ssl_context_factory = ssl_context_factory
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
                message, status, http10 = _parse_head(bytes(buf[start : end + 4]))
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

        rest = buf[end + 4 :]
        headers = message.fields
        keep = message.keep and not close
        if http10 and keep and any(n.lower() == b"transfer-encoding" for n, _ in headers):
            keep = False  # RFC 9112 (6.1): decode it, then close the connection
        eof_ends = False
        if request.method == "HEAD" or status == 204 or status == 304:
            message.complete = True  # llhttp cannot know a HEAD answer has no body
            message.extra = bool(rest)
        else:
            eof_ends = not keep and _framed_by_close(headers)
            if not message.complete and not eof_ends:
                message.remaining = _identity_length(headers)
            if message.remaining is not None:
                if rest:
                    _take(message, bytes(rest))
            elif rest:
                _feed(message, bytes(rest), request)
        owner: _Conn | None = conn
        if message.complete and not message.pieces:  # no body: the connection is free now
            owner = None
            if keep and not message.extra:
                self._release(conn)
            else:
                self._drop(conn)
        stream = _Body(self, owner, message, eof_ends, keep, request, read_timeout)
        return httpx.Response(
            status,
            headers=headers,
            stream=stream,
            extensions={
                "http_version": b"HTTP/1.0" if http10 else b"HTTP/1.1",
                "reason_phrase": message.reason,
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
            message, status, _ = _parse_head(head[: end + 4])
        except ValueError as exc:
            raise ProxyRefused(f"the proxy {proxy.name} gave a malformed CONNECT answer",
                               status=None, request=request, proxy=proxy.name) from exc
        if not 200 <= status < 300:  # its body, if any, is of no use: the caller closes
            text = message.reason.decode("ascii", "replace")
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
        if context is None and self._ssl_context_factory is not None:
            context = self._ssl_context = self._ssl_context_factory()
            context.set_alpn_protocols(["http/1.1"])
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

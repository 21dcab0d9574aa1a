"""Tests of :mod:`rangefs.fasthttp` against real servers on 127.0.0.1.

Most servers here are small trio tasks (``serve``) that send exactly the bytes a test needs;
one test uses the project's fault-injecting origin (``tests/faultserver.py``).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import subprocess
import tracemalloc
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import httpx
import pytest
import trio
import trio.testing

from rangefs.fasthttp import MAX_HEAD_LINES, FastTransport
from tests.content import content
from tests.faultserver import Fault, FaultServer

LIMIT = 5.0
"""Upper bound on any single test's waits (seconds)."""

TIMEOUTS = {"connect": LIMIT, "read": LIMIT, "write": LIMIT, "pool": LIMIT}


@pytest.fixture
def jump_clock() -> trio.testing.MockClock:
    """trio's clock for the timeout tests: virtual time that stands still (rate 0) and
    jumps to the next deadline once every task has waited for 0.25 s of real time with no
    I/O ready. Client and server talk over loopback, where what one side sends is ready
    for the other at once, so the clock jumps only when every task waits for a timer: a
    timeout fires exactly at its deadline and the virtual time it took is the timeout,
    on a fast or a loaded machine alike (and LIMIT stays a hang guard: it is virtual too)."""
    return trio.testing.MockClock(autojump_threshold=0.25)


# -- test servers ----------------------------------------------------------------------------


class Peer:
    """The server side of one connection, with a read buffer."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def request(self) -> bytes | None:
        """The next request head (without CRLFCRLF), or None at EOF."""
        while (i := self.buf.find(b"\r\n\r\n")) < 0:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buf += data
        head = bytes(self.buf[:i])
        del self.buf[: i + 4]
        return head

    async def body(self, n: int) -> bytes:
        """Exactly ``n`` body bytes."""
        while len(self.buf) < n:
            data = await self.stream.receive_some(65536)
            assert data, "client closed inside the request body"
            self.buf += data
        body = bytes(self.buf[:n])
        del self.buf[:n]
        return body

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0)."""
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.stream.socket.close()


@dataclass
class Server:
    """A trio test server: ``accepted`` connections, request heads seen, connections the
    client closed (``client_closed``: EOF or error on the server side)."""

    port: int
    accepted: int = 0
    client_closed: int = 0
    requests: list[bytes] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def poke(self) -> None:
        """Something changed: wake :meth:`until`."""
        self._changed.set()
        self._changed = trio.Event()

    def saw(self, head: bytes) -> None:
        self.requests.append(head)
        self.poke()

    def closed(self) -> None:
        self.client_closed += 1
        self.poke()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds (bounded by the caller's timeout)."""
        while not predicate():
            await self._changed.wait()


Handler = Callable[[Peer, Server, int], Awaitable[None]]


async def serve(nursery: trio.Nursery, handler: Handler) -> Server:
    """Serve ``handler(peer, server, connection_index)`` for each connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = Server(port=listeners[0].socket.getsockname()[1])

    async def run(stream: trio.SocketStream) -> None:
        index = server.accepted
        server.accepted += 1
        server.poke()
        try:
            await handler(Peer(stream), server, index)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            server.closed()
        finally:
            stream.socket.close()

    nursery.start_soon(trio.serve_listeners, run, listeners)
    return server


def path_of(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def keepalive(respond: Callable[[bytes], bytes]) -> Handler:
    """Answer each request on the connection with ``respond(head)``; count the closes."""

    async def handler(peer: Peer, server: Server, index: int) -> None:
        while (head := await peer.request()) is not None:
            server.saw(head)
            await peer.send(respond(head))
        server.closed()

    return handler


def echo_path(head: bytes) -> bytes:
    return ok(b"path=" + path_of(head))


def canned(*responses: bytes) -> Handler:
    """Answer the first request of each connection with the next canned bytes, then close."""
    queue = list(responses)

    async def handler(peer: Peer, server: Server, index: int) -> None:
        head = await peer.request()
        assert head is not None
        server.saw(head)
        await peer.send(queue.pop(0))

    return handler


def req(method: str, url: str, **kwargs: object) -> httpx.Request:
    timeout = kwargs.pop("timeout", TIMEOUTS)
    return httpx.Request(method, url, extensions={"timeout": timeout}, **kwargs)  # type: ignore[arg-type]


async def fetch(t: FastTransport, method: str, url: str, **kwargs: object) -> httpx.Response:
    """Send, read the whole body, close."""
    with trio.fail_after(LIMIT):
        response = await t.handle_async_request(req(method, url, **kwargs))
        await response.aread()
    return response


async def raw_chunks(response: httpx.Response) -> list[bytes]:
    return [chunk async for chunk in response.aiter_raw()]


# -- keep-alive and framing -------------------------------------------------------------------


async def test_keepalive_reuse_one_connection(nursery: trio.Nursery) -> None:
    server = await serve(nursery, keepalive(echo_path))
    async with FastTransport() as t:
        for i in range(20):
            response = await fetch(t, "GET", server.url(f"/{i}"))
            assert response.status_code == 200
            assert response.content == b"path=/%d" % i
            assert response.extensions["reason_phrase"] == b"OK"
            assert response.extensions["http_version"] == b"HTTP/1.1"
        assert t.open_connections == 1
        assert t.idle_connections == 1
    assert server.accepted == 1
    assert len(server.requests) == 20
    first = server.requests[0].split(b"\r\n")
    assert first[0] == b"GET /0 HTTP/1.1"
    assert b"Host: 127.0.0.1:%d" % server.port in first


@pytest.mark.parametrize("receive_size", [1, 7, 4096, 128 * 1024])
async def test_content_length_body(nursery: trio.Nursery, receive_size: int) -> None:
    body = content("cl", 0, 300_000 if receive_size >= 4096 else 5000)

    async def handler(peer: Peer, server: Server, index: int) -> None:
        while (head := await peer.request()) is not None:
            server.saw(head)
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            for i in range(0, len(body), 100_000):  # in pieces, with pauses
                await peer.send(body[i : i + 100_000])
                await trio.sleep(0.001)

    server = await serve(nursery, handler)
    async with FastTransport(receive_size=receive_size) as t:
        for _ in range(2):
            with trio.fail_after(LIMIT):
                response = await t.handle_async_request(req("GET", server.url()))
                chunks = await raw_chunks(response)
            assert b"".join(chunks) == body
            assert all(0 < len(c) <= receive_size for c in chunks)
            assert all(type(c) is bytes for c in chunks)
    assert server.accepted == 1


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
    b'5;name=value;other="q"\r\nhello\r\n'
    b"1A \r\nabcdefghijklmnopqrstuvwxyz\r\n"
    b"000\r\nX-Trailer: 1\r\nX-Trailer-2: two\r\n\r\n"
)


@pytest.mark.parametrize("receive_size", [1, 3, 64, 65536])
async def test_chunked_body_with_extensions_and_trailers(
    nursery: trio.Nursery, receive_size: int
) -> None:
    server = await serve(nursery, keepalive(lambda head: CHUNKED))
    async with FastTransport(receive_size=receive_size) as t:
        for _ in range(3):
            response = await fetch(t, "GET", server.url())
            assert response.content == b"hello" + b"abcdefghijklmnopqrstuvwxyz"
            assert response.headers["x-a"] == "1"
    assert server.accepted == 1  # the framing was consumed exactly: the connection is reused


async def test_chunked_body_chunks_are_not_rechunked(nursery: trio.Nursery) -> None:
    big = content("chunky", 0, 200_000)
    response_bytes = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        + b"%x\r\n" % len(big)
        + big
        + b"\r\n0\r\n\r\n"
    )
    server = await serve(nursery, keepalive(lambda head: response_bytes))
    async with FastTransport(receive_size=10_000) as t:
        with trio.fail_after(LIMIT):
            response = await t.handle_async_request(req("GET", server.url()))
            chunks = await raw_chunks(response)
        assert b"".join(chunks) == big  # gzip is not decoded by the transport
        assert all(len(c) <= 10_000 for c in chunks)
        assert len(chunks) >= 20
        await fetch(t, "GET", server.url())
    assert server.accepted == 1


@pytest.mark.parametrize(
    "body",
    [
        b"x\r\nhello\r\n0\r\n\r\n",  # size not hex
        b"0x5\r\nhello\r\n0\r\n\r\n",  # int() would accept it
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",  # empty size
        b"5\r\nhelloXX\r\n0\r\n\r\n",  # data longer than the size
        # chunk extensions or trailers longer than a receive + MAX_FRAMING_BYTES
        b"5;" + b"e" * 200_000 + b"\r\nhello\r\n0\r\n\r\n",
        b"0\r\n" + b"X-T: yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\r\n" * 6000 + b"\r\n",
        b"5\r\nhel",  # EOF inside a chunk
        b"5\r\nhello\r\n",  # EOF before the last chunk
    ],
)
async def test_chunked_malformed_or_truncated(nursery: trio.Nursery, body: bytes) -> None:
    server = await serve(
        nursery, canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    )
    async with FastTransport() as t:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(t, "GET", server.url())
        assert t.open_connections == 0


async def test_endless_chunk_size_line(nursery: trio.Nursery) -> None:
    async def handler(peer: Peer, server: Server, index: int) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=")
        while True:
            await peer.send(b"e" * 65536)

    server = await serve(nursery, handler)
    async with FastTransport(receive_size=1000) as t:
        with pytest.raises(httpx.RemoteProtocolError, match="too long"):
            await fetch(t, "GET", server.url())


async def test_close_delimited_body(nursery: trio.Nursery) -> None:
    body = content("close", 0, 150_000)
    server = await serve(
        nursery, canned(b"HTTP/1.1 200 OK\r\n\r\n" + body, b"HTTP/1.1 200 OK\r\n\r\nB")
    )
    async with FastTransport() as t:
        assert (await fetch(t, "GET", server.url())).content == body
        assert t.open_connections == 0  # not reusable: closed at the end of the body
        assert (await fetch(t, "GET", server.url())).content == b"B"
    assert server.accepted == 2


async def test_te_not_chunked_is_close_delimited(nursery: trio.Nursery) -> None:
    server = await serve(nursery, canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz"))
    async with FastTransport() as t:
        assert (await fetch(t, "GET", server.url())).content == b"zz"
        assert t.open_connections == 0


async def test_head_with_content_length_has_no_body(nursery: trio.Nursery) -> None:
    def respond(head: bytes) -> bytes:
        if head.startswith(b"HEAD "):
            return b'HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nETag: "e"\r\n\r\n'
        return ok(b"got")

    server = await serve(nursery, keepalive(respond))
    async with FastTransport() as t:
        head = await fetch(t, "HEAD", server.url())
        assert head.content == b""
        assert head.headers["content-length"] == "1000000"
        assert head.headers["etag"] == '"e"'
        assert t.idle_connections == 1  # released without waiting for a body
        assert (await fetch(t, "GET", server.url())).content == b"got"
    assert server.accepted == 1


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses(nursery: trio.Nursery, status: int) -> None:
    def respond(head: bytes) -> bytes:
        if path_of(head) == b"/empty":
            return b"HTTP/1.1 %d Whatever\r\nContent-Length: 50\r\n\r\n" % status
        return ok(b"after")

    server = await serve(nursery, keepalive(respond))
    async with FastTransport() as t:
        response = await fetch(t, "GET", server.url("/empty"))
        assert response.status_code == status
        assert response.content == b""
        assert (await fetch(t, "GET", server.url("/next"))).content == b"after"
    assert server.accepted == 1


async def test_interim_responses_are_skipped(nursery: trio.Nursery) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
    )
    server = await serve(nursery, keepalive(lambda head: interim + ok(b"final", b"X-F: 1\r\n")))
    async with FastTransport(receive_size=5) as t:
        for _ in range(2):
            response = await fetch(t, "GET", server.url())
            assert response.status_code == 200
            assert response.content == b"final"
            assert "link" not in response.headers
            assert response.headers["x-f"] == "1"
    assert server.accepted == 1


async def test_101_is_an_error(nursery: trio.Nursery) -> None:
    server = await serve(
        nursery, canned(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n" + ok(b""))
    )
    async with FastTransport() as t:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(t, "GET", server.url())


async def test_empty_reason_and_http10(nursery: trio.Nursery) -> None:
    server = await serve(
        nursery,
        canned(
            b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\na",
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb",  # 1.0 without keep-alive
        ),
    )
    async with FastTransport() as t:
        response = await fetch(t, "GET", server.url())
        assert (response.status_code, response.content) == (200, b"a")
        assert response.extensions["reason_phrase"] == b""
        response = await fetch(t, "GET", server.url())
        assert response.content == b"b"
        assert response.extensions["http_version"] == b"HTTP/1.0"
        assert t.open_connections == 0  # HTTP/1.0 without keep-alive: not reused
    assert server.accepted == 2


async def test_http10_keepalive_is_reused(nursery: trio.Nursery) -> None:
    respond = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok"
    server = await serve(nursery, keepalive(lambda head: respond))
    async with FastTransport() as t:
        for _ in range(3):
            assert (await fetch(t, "GET", server.url())).content == b"ok"
    assert server.accepted == 1


async def test_connection_close_is_honoured(nursery: trio.Nursery) -> None:
    server = await serve(nursery, keepalive(lambda head: ok(b"x", b"Connection: close\r\n")))
    async with FastTransport() as t:
        for _ in range(3):
            assert (await fetch(t, "GET", server.url())).content == b"x"
        assert t.open_connections == 0
    assert server.accepted == 3


async def test_request_connection_close_is_honoured(nursery: trio.Nursery) -> None:
    server = await serve(nursery, keepalive(echo_path))
    async with FastTransport() as t:
        for _ in range(2):
            await fetch(t, "GET", server.url(), headers={"Connection": "close"})
        assert t.open_connections == 0
    assert server.accepted == 2


async def test_unsolicited_bytes_prevent_reuse(
    nursery: trio.Nursery, jump_clock: trio.testing.MockClock
) -> None:
    # on the jump clock the server's pauses end before the client's longer ones, always
    async def handler(peer: Peer, server: Server, index: int) -> None:
        while await peer.request() is not None:
            if index == 0:  # extra bytes right after the body, in the same send
                await peer.send(ok(b"one") + b"HTTP/1.1 200 OK\r\n")
            elif index == 1:  # extra bytes a moment later, while idle
                await peer.send(ok(b"two"))
                await trio.sleep(0.02)
                await peer.send(b"junk")
            elif index == 2:  # the body arrives apart from the head, with extra bytes
                await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                await trio.sleep(0.05)
                await peer.send(b"threeEXTRA")
            else:
                await peer.send(ok(b"four"))

    server = await serve(nursery, handler)
    async with FastTransport() as t:
        assert (await fetch(t, "GET", server.url())).content == b"one"
        assert (await fetch(t, "GET", server.url())).content == b"two"
        await trio.sleep(0.2)
        with trio.fail_after(LIMIT):
            response = await t.handle_async_request(req("GET", server.url()))
            assert await raw_chunks(response) == [b"three"]  # not one byte past the body
        await trio.sleep(0.2)
        assert (await fetch(t, "GET", server.url())).content == b"four"
    assert server.accepted == 4


async def test_request_body_gets_content_length(nursery: trio.Nursery) -> None:
    async def handler(peer: Peer, server: Server, index: int) -> None:
        while (head := await peer.request()) is not None:
            server.saw(head)
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await peer.send(ok(await peer.body(length)))

    async def stream_body() -> AsyncIterator[bytes]:
        yield b"part1-"
        yield b"part2"

    server = await serve(nursery, handler)
    async with FastTransport() as t:
        response = await fetch(t, "POST", server.url(), content=b"a body")
        assert response.content == b"a body"
        response = await fetch(t, "PUT", server.url(), content=stream_body())
        assert response.content == b"part1-part2"
    streamed = server.requests[1].lower()
    assert b"transfer-encoding" not in streamed
    assert b"content-length: 11" in streamed
    assert server.accepted == 1


async def test_header_injection_is_refused(nursery: trio.Nursery) -> None:
    server = await serve(nursery, keepalive(echo_path))
    async with FastTransport() as t:
        with pytest.raises(httpx.LocalProtocolError):
            await fetch(t, "GET", server.url(), headers={"X-A": "a\r\nX-Injected: 1"})
        with pytest.raises(httpx.LocalProtocolError):
            await fetch(t, "GET", server.url(), headers={"X-A": "a\nb"})
    assert server.accepted == 0


async def test_unsupported_scheme() -> None:
    async with FastTransport() as t:
        with pytest.raises(httpx.UnsupportedProtocol):
            await t.handle_async_request(req("GET", "ftp://127.0.0.1/x"))


# -- malformed responses ----------------------------------------------------------------------


async def test_endless_headers_bounded_memory(nursery: trio.Nursery) -> None:
    block = b"X-Filler: " + b"a" * 90 + b"\r\n"
    block *= 100

    async def handler(peer: Peer, server: Server, index: int) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n")
        while True:
            await peer.send(block)

    server = await serve(nursery, handler)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        async with FastTransport() as t:
            with pytest.raises(httpx.RemoteProtocolError, match="head"):
                await fetch(t, "GET", server.url())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak


async def test_endless_header_line_bounded(nursery: trio.Nursery) -> None:
    async def handler(peer: Peer, server: Server, index: int) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nX-Long: ")
        while True:
            await peer.send(b"b" * 65536)

    server = await serve(nursery, handler)
    async with FastTransport(receive_size=1000) as t:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(t, "GET", server.url())


@pytest.mark.parametrize(("lines", "good"), [(MAX_HEAD_LINES, True), (MAX_HEAD_LINES + 1, False)])
async def test_header_line_count_limit(nursery: trio.Nursery, lines: int, good: bool) -> None:
    # Content-Length is one of the lines.
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(lines - 1))
    server = await serve(nursery, canned(ok(b"body", headers)))
    async with FastTransport() as t:
        if good:
            response = await fetch(t, "GET", server.url())
            assert response.content == b"body"
            assert len(response.headers) == lines
        else:
            with pytest.raises(httpx.RemoteProtocolError):
                await fetch(t, "GET", server.url())


@pytest.mark.parametrize(
    "status_line",
    [
        b"HTTP/2 200 OK",
        b"HTTP/2.0 200 OK",  # llhttp parses it: rangefs refuses a version other than 1.x
        b"HTTP/1.1  200 OK",
        b"HTP/1.1 200 OK",
        b"http/1.1 200 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 abc OK",
        b"HTTP/1.1 099 Low",
        b"HTTP/1.1",
        b"garbage",
        b"",
    ],
)
async def test_malformed_status_line(nursery: trio.Nursery, status_line: bytes) -> None:
    server = await serve(nursery, canned(status_line + b"\r\nContent-Length: 0\r\n\r\n"))
    async with FastTransport() as t:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(t, "GET", server.url())


@pytest.mark.parametrize(
    "headers",
    [
        b"No colon here\r\n",
        b": no name\r\n",
        b"X-A : space before colon\r\n",
        b"X-A: bare\nLF\r\n",
        b"X-A: bare\rCR\r\n",
    ],
)
async def test_malformed_header_lines(nursery: trio.Nursery, headers: bytes) -> None:
    server = await serve(
        nursery, canned(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 0\r\n\r\n")
    )
    async with FastTransport() as t:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(t, "GET", server.url())


@pytest.mark.parametrize(
    ("headers", "name", "value"),
    [
        (b"X-A: 1\r\n folded\r\n", "x-a", "1 folded"),
        (b"X-A: 1\r\n\tfolded: looks like a field\r\n", "x-a", "1 folded: looks like a field"),
        (b"X-A: 1  \r\n \t  two\r\n   three\r\n", "x-a", "1 two three"),
    ],
)
async def test_obs_fold_is_replaced_by_a_space(
    nursery: trio.Nursery, headers: bytes, name: str, value: str
) -> None:
    """RFC 9112 5.2: a user agent replaces each obs-fold of a response with SP."""
    server = await serve(
        nursery, canned(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok")
    )
    async with FastTransport() as t:
        response = await fetch(t, "GET", server.url())
    assert response.headers[name] == value
    assert "folded" not in response.headers


@pytest.mark.parametrize(
    "headers",
    [
        b" X-A: 1\r\n",  # a fold with nothing to continue
        b"Content-Length: 1\r\n 00\r\n",  # a folded length is no length
    ],
)
async def test_obs_fold_that_breaks_framing_is_refused(
    nursery: trio.Nursery, headers: bytes
) -> None:
    server = await serve(nursery, canned(b"HTTP/1.1 200 OK\r\n" + headers + b"\r\nx"))
    async with FastTransport() as t:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(t, "GET", server.url())


async def test_header_values_are_stripped_and_repeated_kept(nursery: trio.Nursery) -> None:
    server = await serve(
        nursery,
        canned(ok(b"", b"X-Sp: \t padded \t\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nX-E:\r\n")),
    )
    async with FastTransport() as t:
        response = await fetch(t, "GET", server.url())
    assert response.headers["x-sp"] == "padded"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.headers["x-e"] == ""


@pytest.mark.parametrize(
    "lengths",
    [
        [b"5", b"3"],  # with the last value, "hel" would be a valid body
        [b"5, 3"],
        [b"3", b"5"],
        [b"abc"],
        [b"-1"],
        [b"+5"],
        [b""],
        [b"1" * 30],
    ],
)
async def test_invalid_content_length(nursery: trio.Nursery, lengths: list[bytes]) -> None:
    fields = b"".join(b"Content-Length: " + v + b"\r\n" for v in lengths)
    server = await serve(nursery, canned(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nhello"))
    async with FastTransport() as t:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(t, "GET", server.url())
        assert t.open_connections == 0


async def test_repeated_content_length_is_refused(nursery: trio.Nursery) -> None:
    """llhttp refuses a repeated Content-Length even when the values agree (RFC 9110 8.6
    lets a recipient refuse it)."""
    fields = b"Content-Length: 5\r\nContent-Length: 5\r\n"
    server = await serve(nursery, canned(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nhello"))
    async with FastTransport() as t:
        with pytest.raises(httpx.RemoteProtocolError, match="Content-Length"):
            await fetch(t, "GET", server.url())


async def test_te_in_http10_response_is_decoded_and_the_connection_closed(
    nursery: trio.Nursery,
) -> None:
    """RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing: the message
    is processed, then the connection closed (even when it asked for keep-alive)."""
    server = await serve(
        nursery,
        canned(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n2\r\nok\r\n0\r\n\r\n",
            ok(b"again"),
        ),
    )
    async with FastTransport() as t:
        assert (await fetch(t, "GET", server.url())).content == b"ok"
        assert t.open_connections == 0
        assert (await fetch(t, "GET", server.url())).content == b"again"
    assert server.accepted == 2


async def test_eof_mid_body(nursery: trio.Nursery) -> None:
    server = await serve(
        nursery, canned(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
    )
    async with FastTransport() as t:
        with pytest.raises(httpx.RemoteProtocolError, match="before the end of the body"):
            await fetch(t, "GET", server.url())
        assert t.open_connections == 0


async def test_eof_before_head_on_new_connection(nursery: trio.Nursery) -> None:
    server = await serve(nursery, canned(b"HTTP/1.1 200 OK\r\nContent-Le"))
    async with FastTransport() as t:
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(t, "GET", server.url())
    assert server.accepted == 1  # a new connection is not retried


async def test_reset_mid_body(nursery: trio.Nursery) -> None:
    got_head = trio.Event()

    async def handler(peer: Peer, server: Server, index: int) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        await got_head.wait()
        peer.reset()

    server = await serve(nursery, handler)
    async with FastTransport() as t:
        with trio.fail_after(LIMIT):
            response = await t.handle_async_request(req("GET", server.url()))
            got_head.set()
            with pytest.raises(httpx.ReadError):
                await response.aread()
        assert t.open_connections == 0


# -- timeouts and connect errors --------------------------------------------------------------


async def test_stalled_server_read_timeout(
    nursery: trio.Nursery, jump_clock: trio.testing.MockClock
) -> None:
    async def handler(peer: Peer, server: Server, index: int) -> None:
        await peer.request()
        if index == 1:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await trio.sleep_forever()

    server = await serve(nursery, handler)
    timeout = {**TIMEOUTS, "read": 0.3}
    async with FastTransport() as t:
        for _ in range(2):  # stalled before the head, then inside the body
            start = trio.current_time()
            with trio.fail_after(LIMIT), pytest.raises(httpx.ReadTimeout):
                response = await t.handle_async_request(req("GET", server.url(), timeout=timeout))
                await response.aread()
            assert trio.current_time() - start == pytest.approx(0.3)  # read, not another
        assert t.open_connections == 0


async def test_write_timeout(nursery: trio.Nursery, jump_clock: trio.testing.MockClock) -> None:
    async def handler(peer: Peer, server: Server, index: int) -> None:
        await trio.sleep_forever()  # never reads

    server = await serve(nursery, handler)
    timeout = {**TIMEOUTS, "write": 0.3}
    async with FastTransport() as t:
        start = trio.current_time()
        with trio.fail_after(LIMIT), pytest.raises(httpx.WriteTimeout):
            await t.handle_async_request(
                req("POST", server.url(), content=b"\0" * (64 << 20), timeout=timeout)
            )
        assert trio.current_time() - start == pytest.approx(0.3)  # write, not another
        assert t.open_connections == 0


async def test_connect_refused() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = unused.getsockname()[1]
        async with FastTransport() as t:
            with trio.fail_after(LIMIT), pytest.raises(httpx.ConnectError):
                await t.handle_async_request(req("GET", f"http://127.0.0.1:{port}/"))
            assert t.open_connections == 0  # the slot was given back


async def test_connect_timeout(jump_clock: trio.testing.MockClock) -> None:
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))  # fills the accept queue: later SYNs are dropped
        timeout = {**TIMEOUTS, "connect": 0.3}
        async with FastTransport() as t:
            start = trio.current_time()
            with trio.fail_after(LIMIT), pytest.raises(httpx.ConnectTimeout):
                await t.handle_async_request(
                    req("GET", f"http://127.0.0.1:{port}/", timeout=timeout)
                )
            assert trio.current_time() - start == pytest.approx(0.3)  # connect, not another
            assert t.open_connections == 0


# -- pool ---------------------------------------------------------------------------------------


async def test_pool_limit_third_request_waits(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def handler(peer: Peer, server: Server, index: int) -> None:
        while (head := await peer.request()) is not None:
            server.saw(head)
            await release.wait()
            await peer.send(echo_path(head))

    server = await serve(nursery, handler)
    results: dict[int, bytes] = {}
    async with FastTransport(max_connections=2) as t:

        async def one(i: int) -> None:
            results[i] = (await fetch(t, "GET", server.url(f"/{i}"))).content

        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as inner:
                for i in range(3):
                    inner.start_soon(one, i)
                await server.until(lambda: len(server.requests) == 2)
                # every task waits: a third request that had a connection would have been
                # accepted and seen by now (loopback I/O is ready at once)
                await trio.testing.wait_all_tasks_blocked(0.01)
                assert server.accepted == 2
                assert len(server.requests) == 2  # the third waits for a connection
                assert t.open_connections == 2
                release.set()
        assert results == {i: b"path=/%d" % i for i in range(3)}
        assert t.open_connections == 2
    assert server.accepted == 2  # the third reused a released connection


async def test_pool_timeout(nursery: trio.Nursery, jump_clock: trio.testing.MockClock) -> None:
    server = await serve(nursery, keepalive(lambda head: ok(b"a" * 100_000)))
    async with FastTransport(max_connections=1) as t:
        with trio.fail_after(LIMIT):
            held = await t.handle_async_request(req("GET", server.url()))  # body not read
            start = trio.current_time()
            with pytest.raises(httpx.PoolTimeout):
                await t.handle_async_request(req("GET", server.url(), timeout={"pool": 0.2}))
            assert trio.current_time() - start == pytest.approx(0.2)  # pool, not another
            assert len(await held.aread()) == 100_000
            await held.aclose()
        assert len((await fetch(t, "GET", server.url())).content) == 100_000
    assert server.accepted == 1


async def test_idle_connection_of_other_origin_is_closed_at_the_limit(
    nursery: trio.Nursery,
) -> None:
    a = await serve(nursery, keepalive(lambda head: ok(b"A")))
    b = await serve(nursery, keepalive(lambda head: ok(b"B")))
    async with FastTransport(max_connections=1) as t:
        assert (await fetch(t, "GET", a.url())).content == b"A"
        timeout = {**TIMEOUTS, "pool": 0.5}
        assert (await fetch(t, "GET", b.url(), timeout=timeout)).content == b"B"
        assert t.open_connections == 1
        with trio.fail_after(LIMIT):
            await a.until(lambda: a.client_closed == 1)
        assert (await fetch(t, "GET", b.url())).content == b"B"
    assert (a.accepted, b.accepted) == (1, 1)


async def test_waiter_of_other_origin_gets_the_slot(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def slow(peer: Peer, server: Server, index: int) -> None:
        while await peer.request() is not None:
            await release.wait()
            await peer.send(ok(b"A"))

    a = await serve(nursery, slow)
    b = await serve(nursery, keepalive(lambda head: ok(b"B")))
    async with FastTransport(max_connections=1) as t:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as inner:
                results: list[bytes] = []

                async def get(url: str) -> None:
                    results.append((await fetch(t, "GET", url)).content)

                inner.start_soon(get, a.url())
                await a.until(lambda: a.accepted == 1)  # A holds the only slot
                inner.start_soon(get, b.url())
                await trio.testing.wait_all_tasks_blocked()
                assert b.accepted == 0
                release.set()
        assert results == [b"A", b"B"]
        assert t.open_connections == 1


async def test_waiter_gets_the_slot_of_a_closed_connection(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def handler(peer: Peer, server: Server, index: int) -> None:
        head = await peer.request()
        assert head is not None
        if path_of(head) == b"/first":
            await release.wait()
        await peer.send(ok(b"bye", b"Connection: close\r\n"))

    server = await serve(nursery, handler)
    async with FastTransport(max_connections=1) as t:
        results: list[bytes] = []

        async def get(path: str) -> None:
            timeout = {**TIMEOUTS, "pool": 2.0}
            results.append((await fetch(t, "GET", server.url(path), timeout=timeout)).content)

        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as inner:
                inner.start_soon(get, "/first")
                await server.until(lambda: server.accepted == 1)
                inner.start_soon(get, "/second")
                await trio.testing.wait_all_tasks_blocked()
                release.set()  # the first connection closes: its slot goes to the waiter
        assert results == [b"bye", b"bye"]
        assert t.open_connections == 0
    assert server.accepted == 2


async def test_cancelled_waiter_leaves_the_queue(nursery: trio.Nursery) -> None:
    server = await serve(nursery, keepalive(lambda head: ok(b"q")))
    async with FastTransport(max_connections=1) as t:
        with trio.fail_after(LIMIT):
            held = await t.handle_async_request(req("GET", server.url()))
            with trio.move_on_after(0.05) as scope:
                await t.handle_async_request(req("GET", server.url()))  # waits, then cancelled
            assert scope.cancelled_caught
            await held.aread()  # released: must not go to the cancelled waiter
            assert t.idle_connections == 1
            response = await fetch(t, "GET", server.url(), timeout={"pool": 0.5})
            assert response.content == b"q"
    assert server.accepted == 1


async def test_max_keepalive(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def handler(peer: Peer, server: Server, index: int) -> None:
        while await peer.request() is not None:
            await release.wait()
            await peer.send(ok(b"k"))

    server = await serve(nursery, handler)
    async with FastTransport(max_connections=4, max_keepalive=1) as t:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as inner:
                for _ in range(3):
                    inner.start_soon(fetch, t, "GET", server.url())
                await server.until(lambda: server.accepted == 3)
                release.set()
        assert t.idle_connections == 1
        assert t.open_connections == 1


async def test_server_closing_idle_connections(nursery: trio.Nursery) -> None:
    async def handler(peer: Peer, server: Server, index: int) -> None:
        await peer.request()
        await peer.send(ok(b"once"))  # keep-alive by default, but closes right after

    server = await serve(nursery, handler)
    async with FastTransport() as t:
        for _ in range(5):
            assert (await fetch(t, "GET", server.url())).content == b"once"
            await trio.sleep(0.02)
    assert server.accepted == 5


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("HEAD", True), ("POST", False)])
async def test_stale_reused_connection_is_retried_once(
    nursery: trio.Nursery, method: str, retried: bool
) -> None:
    async def handler(peer: Peer, server: Server, index: int) -> None:
        head = await peer.request()
        server.saw(head or b"")
        if index == 0:
            await peer.send(ok(b"first"))
            head = await peer.request()  # closes without an answer: an idle-close race
            server.saw(head or b"")
            return
        while head is not None:
            await peer.send(ok(b"fresh"))
            head = await peer.request()

    server = await serve(nursery, handler)
    async with FastTransport() as t:
        assert (await fetch(t, "GET", server.url())).content == b"first"
        if retried:
            response = await fetch(t, method, server.url())
            assert response.status_code == 200
            assert server.accepted == 2
        else:
            # EOF, or a reset if the server closed with unread bytes: not retried either way
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await fetch(t, method, server.url(), content=b"data")
            assert server.accepted == 1
        assert server.requests[1].startswith(method.encode() + b" ")


async def test_retry_happens_only_once(nursery: trio.Nursery) -> None:
    async def handler(peer: Peer, server: Server, index: int) -> None:
        head = await peer.request()
        server.saw(head or b"")
        if index == 0:
            await peer.send(ok(b"first"))
            await peer.request()  # then closes; the retry's connection closes too

    server = await serve(nursery, handler)
    async with FastTransport() as t:
        assert (await fetch(t, "GET", server.url())).content == b"first"
        with pytest.raises(httpx.RemoteProtocolError):
            await fetch(t, "GET", server.url())
        assert t.open_connections == 0
    assert server.accepted == 2


async def test_early_aclose_closes_the_connection(nursery: trio.Nursery) -> None:
    big = b"z" * 2_000_000
    server = await serve(nursery, keepalive(lambda head: ok(big)))
    async with FastTransport(receive_size=1024) as t:
        with trio.fail_after(LIMIT):
            response = await t.handle_async_request(req("GET", server.url()))
            raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())
            async with contextlib.aclosing(raw) as chunks:
                async for chunk in chunks:
                    assert chunk
                    break
            await response.aclose()
            await response.aclose()  # idempotent
            assert t.open_connections == 0
            await server.until(lambda: server.client_closed == 1)
        assert len((await fetch(t, "GET", server.url())).content) == len(big)
    assert server.accepted == 2


async def test_concurrency_50_requests_over_8_connections(nursery: trio.Nursery) -> None:
    def body_for(path: bytes) -> bytes:
        n = int(path[1:])
        return content(f"c{n}", 0, 1000 + 997 * n)

    async def handler(peer: Peer, server: Server, index: int) -> None:
        while (head := await peer.request()) is not None:
            path = path_of(head)
            await trio.sleep((int(path[1:]) % 5) * 0.002)
            body = body_for(path)
            if int(path[1:]) % 2:
                await peer.send(ok(body))
            else:
                await peer.send(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                )

    server = await serve(nursery, handler)
    results: dict[int, bytes] = {}
    async with FastTransport(max_connections=8, receive_size=4096) as t:

        async def one(i: int) -> None:
            results[i] = (await fetch(t, "GET", server.url(f"/{i}"))).content

        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as inner:
                for i in range(50):
                    inner.start_soon(one, i)
        assert t.open_connections <= 8
    assert server.accepted <= 8
    assert sorted(results) == list(range(50))
    for i, body in results.items():
        assert body == body_for(b"/%d" % i), i


async def test_aclose_transport(nursery: trio.Nursery) -> None:
    release = trio.Event()

    async def handler(peer: Peer, server: Server, index: int) -> None:
        while (head := await peer.request()) is not None:
            if path_of(head) == b"/slow":
                await release.wait()
            await peer.send(ok(b"x"))
        server.closed()

    server = await serve(nursery, handler)
    t = FastTransport(max_connections=2)
    await fetch(t, "GET", server.url())
    assert t.idle_connections == 1
    errors: list[BaseException] = []

    async def slow() -> None:
        try:
            await fetch(t, "GET", server.url("/slow"))
        except httpx.TransportError as exc:
            errors.append(exc)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as inner:
            for _ in range(3):  # two connections in use, one request waiting in the pool
                inner.start_soon(slow)
            await server.until(lambda: server.accepted == 2)
            await trio.testing.wait_all_tasks_blocked()
            await t.aclose()
        release.set()  # the server answers into closed connections, then sees them closed
        await server.until(lambda: server.client_closed == 2)
    assert len(errors) == 3
    assert all(isinstance(e, httpx.TransportError) for e in errors)
    assert t.open_connections == 0
    with pytest.raises(httpx.TransportError):
        await fetch(t, "GET", server.url())


async def test_cancelled_request_frees_its_slot(nursery: trio.Nursery) -> None:
    async def handler(peer: Peer, server: Server, index: int) -> None:
        while (head := await peer.request()) is not None:
            if path_of(head) == b"/hang":
                await trio.sleep_forever()
            await peer.send(ok(b"fine"))

    server = await serve(nursery, handler)
    async with FastTransport(max_connections=1) as t:
        with trio.move_on_after(0.2):
            await t.handle_async_request(req("GET", server.url("/hang")))
        assert t.open_connections == 0
        assert (await fetch(t, "GET", server.url(), timeout={"pool": 1.0})).content == b"fine"


# -- through httpx, TLS, the fault server ----------------------------------------------------


async def test_through_async_client(nursery: trio.Nursery) -> None:
    body = content("client", 0, 50_000)

    def respond(head: bytes) -> bytes:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n"
        return ok(body, b"Content-Type: application/octet-stream\r\nX-Multi: a\r\nX-Multi: b\r\n")

    server = await serve(nursery, keepalive(respond))
    async with httpx.AsyncClient(transport=FastTransport(receive_size=8192), timeout=LIMIT) as c:
        response = await c.get(server.url("/a"), headers={"Range": "bytes=0-"})
        assert response.status_code == 200
        assert response.reason_phrase == "OK"
        assert response.http_version == "HTTP/1.1"
        assert response.headers["content-type"] == "application/octet-stream"
        assert response.headers.get_list("x-multi") == ["a", "b"]
        assert response.content == body
        async with c.stream("GET", server.url("/b")) as streamed:
            chunks = [chunk async for chunk in streamed.aiter_raw()]
        assert b"".join(chunks) == body
        assert max(map(len, chunks)) <= 8192
        async with c.stream("GET", server.url("/c")) as streamed:
            assert await streamed.aread() == body
        head = await c.head(server.url("/d"))
        assert (head.status_code, head.content) == (200, b"")
        assert int(head.headers["content-length"]) == 50_000
    assert server.accepted == 1
    sent = server.requests[0].split(b"\r\n")
    assert sent[0] == b"GET /a HTTP/1.1"
    assert b"Range: bytes=0-" in sent
    assert any(line.lower().startswith(b"user-agent: python-httpx") for line in sent)


async def test_many_head_probes_are_quick(
    nursery: trio.Nursery, jump_clock: trio.testing.MockClock
) -> None:
    """1000 HEADs with a Content-Length: none waits for a body (on the jump clock, LIMIT
    is the time the probes wait for a timer, not how fast this machine is)."""
    server = await serve(
        nursery, keepalive(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 123\r\n\r\n")
    )
    async with httpx.AsyncClient(transport=FastTransport(max_connections=16)) as c:
        sem = trio.Semaphore(32)

        async def probe(i: int) -> None:
            async with sem:
                response = await c.head(server.url(f"/{i}"))
                assert response.headers["content-length"] == "123"

        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as inner:
                for i in range(1000):
                    inner.start_soon(probe, i)
    assert len(server.requests) == 1000
    assert server.accepted <= 16


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


async def test_https_keepalive_and_verification(nursery: trio.Nursery, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])
    listeners = await trio.open_ssl_over_tcp_listeners(0, server_ctx, host="127.0.0.1")
    tcp_listener = cast(trio.SocketListener, listeners[0].transport_listener)
    port = tcp_listener.socket.getsockname()[1]
    accepted: list[str | None] = []

    async def run(stream: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await stream.do_handshake()
            accepted.append(stream.selected_alpn_protocol())
            peer = Peer(stream)  # type: ignore[arg-type]
            while (head := await peer.request()) is not None:
                await peer.send(echo_path(head))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    nursery.start_soon(trio.serve_listeners, run, listeners)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    async with FastTransport(ssl_context=client_ctx) as t:
        for i in range(3):
            response = await fetch(t, "GET", f"https://127.0.0.1:{port}/{i}")
            assert response.content == b"path=/%d" % i
    assert accepted == ["http/1.1"]
    async with FastTransport() as untrusting:  # certifi does not know this certificate
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await fetch(untrusting, "GET", f"https://127.0.0.1:{port}/")


async def test_fault_server(origin: FaultServer) -> None:
    size = 3 << 20
    origin.add("/obj", size)
    origin.add("/noclen", 100_000, content_length=False)
    url = origin.url("/obj")
    async with httpx.AsyncClient(transport=FastTransport(), timeout=LIMIT) as client:
        for start in (0, 1_000_000, size - 10):
            response = await client.get(url, headers={"Range": f"bytes={start}-{start + 99_999}"})
            assert response.status_code == 206
            length = min(100_000, size - start)
            assert response.content == content("/obj", start, length)
        head = await client.head(url)
        assert head.headers["content-length"] == str(size)
        full = await client.get(url)
        assert full.content == content("/obj", 0, size)
        assert len({r.client_port for r in origin.log}) == 1  # one keep-alive connection

        noclen = await client.get(origin.url("/noclen"))
        assert noclen.content == content("/noclen", 0, 100_000)

        origin.faults("/obj", [Fault("reset_body", after=10_000)])
        with pytest.raises(httpx.ReadError):
            await client.get(url)
        origin.faults("/obj", [Fault("short_body", after=10_000)])
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url)
        assert (await client.get(url, headers={"Range": "bytes=0-0"})).status_code == 206
        before = len(origin.log)
        origin.faults("/obj", [Fault("reset")])  # on a reused connection: retried once
        retried = await client.get(url, headers={"Range": "bytes=7-8"})
        assert retried.content == content("/obj", 7, 2)
        assert len(origin.log) == before + 2
        assert origin.log[-2].status is None  # the reset one
        origin.faults("/obj", [Fault("status", status=503, retry_after=2)])
        busy = await client.get(url)
        assert (busy.status_code, busy.headers["retry-after"]) == (503, "2")
        ok_again = await client.get(url, headers={"Range": "bytes=5-9"})
        assert ok_again.content == content("/obj", 5, 5)


def test_receive_size_follows_the_context_where_the_transport_is_made() -> None:
    from rangefs.fasthttp import BULK_RECEIVE_SIZE, RECEIVE_SIZE, receive_size

    assert FastTransport()._receive_size == RECEIVE_SIZE
    with receive_size(BULK_RECEIVE_SIZE):
        bulk = FastTransport()
        assert FastTransport(receive_size=7)._receive_size == 7
    assert bulk._receive_size == BULK_RECEIVE_SIZE
    assert FastTransport()._receive_size == RECEIVE_SIZE

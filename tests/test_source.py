"""rangefs.source against an in-process fake server (httpx.MockTransport): no sockets.

The fake serves ``DATA`` (a pure function of the offset) correctly by default; a test
overrides single URLs or paths with ``server.routes`` to misbehave. Every request is checked
for ``Accept-Encoding: identity`` and the User-Agent, and every response body the fake hands
out must be closed by the end of the test (the ``session`` fixture checks that).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import trio
import trio.lowlevel

from rangefs.digests import Digest
from rangefs.errors import (
    PermanentError,
    RangeNotSupported,
    RemoteChanged,
    SourceError,
    TransientError,
)
from rangefs.ranges import ByteRange
from rangefs.redact import redact_url
from rangefs.source import (
    USER_AGENT,
    HttpOptions,
    HttpReader,
    HttpSession,
    Reader,
    RemoteInfo,
)

ORIGIN = "https://files.example.com"
URL = f"{ORIGIN}/data/obj.bin"
CDN = "https://cdn.example.net"
SIZE = 1000
DATA = bytes((i * 31 + 7) % 251 for i in range(SIZE))
ETAG = '"v1"'
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"
LAST_MODIFIED_EPOCH = 1445412480.0
RNG = ByteRange(100, 199)
BIG = bytes((i * 31 + 7) % 251 for i in range(1 << 20))  # larger than source.CHUNK_SIZE

# A body that is not read to its end (early exit, error, cancellation, a rest not worth
# reading) leaves httpx's own nested async generators (BoundAsyncStream.__aiter__ ...)
# unfinished; trio reports them with a ResourceWarning when they are collected. The response
# itself is closed (the fixture checks it); only this httpx-internal warning is silenced.
pytestmark = pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")

Handler = Callable[[httpx.Request], httpx.Response]


class Tracked(httpx.AsyncByteStream):
    """A response body that records how far it was read and whether it was closed."""

    def __init__(
        self,
        server: FakeServer,
        data: bytes,
        *,
        chunk: int = 4096,
        error: Exception | None = None,
    ) -> None:
        server.streams.append(self)
        self.data = data
        self.chunk = chunk
        self.error = error
        self.sent = 0
        self.finished = False  # read to its end: the connection could be reused
        self.closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self.sent >= len(self.data):
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            self.finished = True
            raise StopAsyncIteration
        piece = self.data[self.sent : self.sent + self.chunk]
        self.sent += len(piece)
        return piece

    async def aclose(self) -> None:
        self.closed = True


class FakeServer:
    """A correct range-serving origin, with per-URL / per-path overrides in ``routes``."""

    def __init__(self, data: bytes = DATA) -> None:
        self.data = data
        self.etag: str | None = ETAG
        self.last_modified: str | None = LAST_MODIFIED
        self.accept_ranges: str | None = "bytes"
        self.extra: dict[str, str] = {}
        self.requests: list[httpx.Request] = []
        self.streams: list[Tracked] = []
        self.routes: dict[str, Handler] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.headers.get("accept-encoding") == "identity"
        assert request.headers.get("user-agent") == USER_AGENT
        route = self.routes.get(str(request.url)) or self.routes.get(request.url.path)
        if route is not None:
            return route(request)
        return self.serve(request)

    def validators(self) -> dict[str, str]:
        headers = dict(self.extra)
        if self.etag is not None:
            headers["ETag"] = self.etag
        if self.last_modified is not None:
            headers["Last-Modified"] = self.last_modified
        return headers

    def respond(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        content_length: int | None = None,
        error: Exception | None = None,
    ) -> httpx.Response:
        headers = dict(headers or {})
        if content_length is not None:
            headers["Content-Length"] = str(content_length)
        stream = Tracked(self, body, error=error)
        return httpx.Response(status, headers=headers, stream=stream)

    def serve(self, request: httpx.Request) -> httpx.Response:
        headers = self.validators()
        size = len(self.data)
        if request.method == "HEAD":
            if self.accept_ranges is not None:
                headers["Accept-Ranges"] = self.accept_ranges
            return self.respond(200, b"", headers, content_length=size)
        spec = request.headers.get("range")
        if spec is None:
            return self.respond(200, self.data, headers, content_length=size)
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", spec)
        assert match is not None, spec
        start, end = int(match[1]), min(int(match[2]), size - 1)
        if start >= size:
            return self.respond(416, b"", {"Content-Range": f"bytes */{size}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = self.data[start : end + 1]
        return self.respond(206, body, headers, content_length=len(body))

    def ranged(self, **override: str | None) -> Handler:
        """A route answering like :meth:`serve`, with some headers replaced (None: removed)."""

        def handler(request: httpx.Request) -> httpx.Response:
            response = self.serve(request)
            headers = dict(response.headers)
            for name, value in override.items():
                key = name.replace("_", "-").lower()
                headers.pop(key, None)
                if value is not None:
                    headers[key] = value
            stream = response.stream
            assert isinstance(stream, Tracked)
            return httpx.Response(response.status_code, headers=headers, stream=stream)

        return handler

    def status(self, code: int, headers: dict[str, str] | None = None) -> Handler:
        return lambda request: self.respond(code, b"error page", headers, content_length=10)

    def redirect(self, location: str, code: int = 302) -> Handler:
        return lambda request: self.respond(code, b"", {"Location": location}, content_length=0)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
async def session(server: FakeServer) -> AsyncIterator[HttpSession]:
    options = HttpOptions(retry_after_cap=60.0, max_redirects=3)
    async with HttpSession(options, transport=httpx.MockTransport(server)) as session:
        yield session
    unclosed = [s for s in server.streams if not s.closed]
    assert not unclosed, f"{len(unclosed)} of {len(server.streams)} responses left open"


def info(
    url: str = URL,
    *,
    etag: str | None = ETAG,
    last_modified: str | None = LAST_MODIFIED,
    size: int = SIZE,
) -> RemoteInfo:
    return RemoteInfo(
        url=url,
        size=size,
        etag=etag,
        last_modified=last_modified,
        mtime=None,
        accept_ranges=True,
        digest=None,
    )


def big_reader(session: HttpSession) -> HttpReader:
    return session.reader(URL, info(size=len(BIG)))


async def read(reader: Reader, rng: ByteRange = RNG) -> bytes:
    out = bytearray()
    async with reader.open_range(rng) as body:
        async for chunk in body:
            out += chunk
    return bytes(out)


# -- redact_url ------------------------------------------------------------------------------


def test_redact_url_removes_userinfo_query_values_and_fragment() -> None:
    url = "https://alice:pw1234@files.example.com:8443/a/b.bin?X-Amz-Signature=abc&flag&x=#tok"
    assert redact_url(url) == (
        "https://files.example.com:8443/a/b.bin?X-Amz-Signature=REDACTED&REDACTED&x=REDACTED"
    )
    assert redact_url(URL) == URL
    assert redact_url("http://u:p@[::1/x?sig=1") == "http://[::1/x?REDACTED"


# -- probe -----------------------------------------------------------------------------------


async def test_probe_with_head(server: FakeServer, session: HttpSession) -> None:
    sha = hashlib.sha256(DATA).digest()
    server.extra["Repr-Digest"] = f"unixsum=:AA==:, sha-256=:{base64.b64encode(sha).decode()}:"
    got = await session.probe(URL)
    assert got == RemoteInfo(
        url=URL,
        size=SIZE,
        etag=ETAG,
        last_modified=LAST_MODIFIED,
        mtime=LAST_MODIFIED_EPOCH,
        accept_ranges=True,
        digest=Digest("sha256", sha),
    )
    assert [r.method for r in server.requests] == ["HEAD"]


async def test_probe_takes_the_legacy_digest_header(
    server: FakeServer, session: HttpSession
) -> None:
    md5 = hashlib.md5(DATA).digest()
    server.extra["Digest"] = f"MD5={base64.b64encode(md5).decode()}"
    got = await session.probe(URL)
    assert got.digest == Digest("md5", md5)


@pytest.mark.parametrize("refusal", [403, 405, 501])
async def test_probe_falls_back_to_get_when_head_is_refused(
    server: FakeServer, session: HttpSession, refusal: int
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return server.respond(refusal, b"", content_length=0)
        return server.serve(request)

    server.routes[URL] = handler
    got = await session.probe(URL)
    assert (got.size, got.accept_ranges, got.etag, got.mtime) == (
        SIZE,
        True,
        ETAG,
        LAST_MODIFIED_EPOCH,
    )
    head, get = server.requests
    assert head.method == "HEAD"
    assert (get.method, get.headers["range"]) == ("GET", "bytes=0-0")
    assert server.streams[-1].finished  # the one byte was read: the connection is reusable


async def test_probe_get_fallback_answered_with_200_means_no_ranges(
    server: FakeServer, session: HttpSession
) -> None:
    server.data = BIG

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return server.respond(405, content_length=0)
        return server.respond(200, BIG, server.validators(), content_length=len(BIG))

    server.routes[URL] = handler
    got = await session.probe(URL)
    assert (got.size, got.accept_ranges) == (len(BIG), False)
    assert server.streams[-1].sent <= 4096  # one network chunk at most, never the whole body


async def test_probe_without_content_length_on_head(
    server: FakeServer, session: HttpSession
) -> None:
    server.routes[URL] = lambda request: (
        server.respond(200, b"", server.validators())
        if request.method == "HEAD"
        else server.serve(request)
    )
    got = await session.probe(URL)
    assert got.size == SIZE
    assert [r.method for r in server.requests] == ["HEAD", "GET"]


async def test_probe_checks_range_support_when_head_does_not_say(
    server: FakeServer, session: HttpSession
) -> None:
    server.accept_ranges = None
    got = await session.probe(URL)
    assert (got.size, got.accept_ranges) == (SIZE, True)
    assert [r.method for r in server.requests] == ["HEAD", "GET"]


async def test_probe_accept_ranges_none(server: FakeServer, session: HttpSession) -> None:
    server.accept_ranges = "none"
    got = await session.probe(URL)
    assert (got.size, got.accept_ranges) == (SIZE, False)
    assert len(server.requests) == 1


async def test_probe_empty_object(server: FakeServer, session: HttpSession) -> None:
    server.data = b""
    assert (await session.probe(URL)).size == 0
    server.routes[URL] = lambda request: (
        server.respond(405, content_length=0)
        if request.method == "HEAD"
        else server.respond(416, b"", {"Content-Range": "bytes */0"}, content_length=0)
    )
    assert (await session.probe(URL)).size == 0


async def test_probe_without_any_size_is_permanent(
    server: FakeServer, session: HttpSession
) -> None:
    server.routes[URL] = lambda request: (
        server.respond(405, content_length=0)
        if request.method == "HEAD"
        else server.respond(200, DATA)
    )
    with pytest.raises(PermanentError, match="no size"):
        await session.probe(URL)


async def test_probe_statuses(server: FakeServer, session: HttpSession) -> None:
    server.routes[URL] = server.status(404)
    with pytest.raises(PermanentError) as caught:
        await session.probe(URL)
    assert caught.value.status == 404
    server.routes[URL] = server.status(503, {"Retry-After": "5"})
    with pytest.raises(TransientError) as transient:
        await session.probe(URL)
    assert transient.value.retry_after == 5.0
    # a 5xx to HEAD is not a refusal of HEAD: no GET fallback
    assert [r.method for r in server.requests] == ["HEAD", "HEAD"]


async def test_probe_transport_error_is_transient(server: FakeServer, session: HttpSession) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Name or service not known")

    server.routes[URL] = handler
    with pytest.raises(TransientError, match="ConnectError: Name or service not known"):
        await session.probe(URL)


async def test_probe_of_a_non_http_url_is_permanent(session: HttpSession) -> None:
    with pytest.raises(PermanentError, match="not an http"):
        await session.probe("ftp://files.example.com/x")


# -- request headers ---------------------------------------------------------------------------


async def test_accept_encoding_identity_on_every_request(
    server: FakeServer, session: HttpSession
) -> None:
    server.routes["/start"] = server.redirect(URL)
    server.accept_ranges = None  # forces the GET probe too
    got = await session.probe(f"{ORIGIN}/start")
    await read(session.reader(f"{ORIGIN}/start", got))
    assert [(r.method, r.url.path) for r in server.requests] == [
        ("HEAD", "/start"),
        ("HEAD", "/data/obj.bin"),
        ("GET", "/start"),
        ("GET", "/data/obj.bin"),
        ("GET", "/data/obj.bin"),
    ]
    assert {r.headers["accept-encoding"] for r in server.requests} == {"identity"}


async def test_range_request_headers_with_strong_etag(
    server: FakeServer, session: HttpSession
) -> None:
    assert await read(session.reader(URL, info())) == DATA[100:200]
    request = server.requests[-1]
    assert request.headers["range"] == "bytes=100-199"
    assert request.headers["if-range"] == ETAG


async def test_if_range_uses_last_modified_for_a_weak_etag(
    server: FakeServer, session: HttpSession
) -> None:
    server.etag = 'W/"v1"'
    assert await read(session.reader(URL, info(etag='W/"v1"'))) == DATA[100:200]
    assert server.requests[-1].headers["if-range"] == LAST_MODIFIED


async def test_no_if_range_without_validators(server: FakeServer, session: HttpSession) -> None:
    server.etag = server.last_modified = None
    assert await read(session.reader(URL, info(etag=None, last_modified=None))) == DATA[100:200]
    assert "if-range" not in server.requests[-1].headers


# -- checking the answer -----------------------------------------------------------------------


async def test_good_ranges_including_the_last_byte(
    server: FakeServer, session: HttpSession
) -> None:
    reader = session.reader(URL, info())
    assert await read(reader, ByteRange(0, 0)) == DATA[:1]
    assert await read(reader, ByteRange(900, 999)) == DATA[900:]
    assert await read(reader, ByteRange(0, 999)) == DATA
    assert all(s.finished for s in server.streams)  # every body drained: connections reusable


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ({"content_range": "bytes 101-199/1000"}, TransientError, r"sent bytes \[101:199\]"),
        ({"content_range": "bytes 100-198/1000"}, TransientError, r"sent bytes \[100:198\]"),
        ({"content_range": "bytes 100-199/999"}, TransientError, "contradicts"),
        ({"content_range": "bytes 100-199/999", "etag": None}, RemoteChanged, "999 bytes"),
        ({"content_range": "bytes 100-199/*"}, TransientError, "Content-Range"),
        ({"content_range": "bytes=100-199/1000"}, TransientError, "Content-Range"),
        ({"content_range": None}, TransientError, "Content-Range"),
        ({"content_length": "99"}, TransientError, "Content-Length"),
        ({"content_length": "ten"}, TransientError, "Content-Length"),
        ({"content_encoding": "gzip"}, TransientError, "misbehaves"),
        ({"etag": '"v2"'}, RemoteChanged, "ETag"),
        ({"last_modified": "Thu, 22 Oct 2015 07:28:00 GMT"}, RemoteChanged, "Last-Modified"),
    ],
    ids=[
        "wrong-start",
        "wrong-end",
        "wrong-total-same-etag",
        "wrong-total-no-etag",
        "unknown-total",
        "garbled",
        "missing",
        "wrong-length",
        "bad-length",
        "gzip",
        "changed-etag",
        "changed-last-modified",
    ],
)
async def test_bad_206_rejected_before_any_byte(
    server: FakeServer,
    session: HttpSession,
    override: dict[str, str | None],
    error: type[SourceError],
    match: str,
) -> None:
    server.routes[URL] = server.ranged(**override)
    with pytest.raises(error, match=match) as caught:
        async with session.reader(URL, info()).open_range(RNG):
            pytest.fail("the body was handed out")
    assert "[100:199]" in str(caught.value)
    assert server.streams[-1].closed


async def test_validators_that_match_or_are_absent_are_fine(
    server: FakeServer, session: HttpSession
) -> None:
    server.routes[URL] = server.ranged(etag=None, last_modified="Wed, 21 Oct 2015 07:28:00 +0000")
    assert await read(session.reader(URL, info())) == DATA[100:200]


async def test_200_to_a_partial_request_is_range_not_supported(
    server: FakeServer, session: HttpSession
) -> None:
    big = DATA * 1000  # as if the object were 1 MB: the body is not read to its end
    server.routes[URL] = lambda request: httpx.Response(
        200, headers=server.validators(), stream=Tracked(server, big, chunk=4096)
    )
    with pytest.raises(RangeNotSupported, match=r"\[100:199\].*ignored the Range"):
        await read(session.reader(URL, info()))
    assert server.streams[-1].sent <= 80_000
    server.etag = '"v2"'
    with pytest.raises(RemoteChanged):
        await read(session.reader(URL, info()))


async def test_200_with_the_whole_object_is_accepted(
    server: FakeServer, session: HttpSession
) -> None:
    server.routes[URL] = lambda request: server.respond(
        200, DATA, server.validators(), content_length=SIZE
    )
    reader = session.reader(URL, info())
    assert await read(reader, ByteRange(0, SIZE - 1)) == DATA
    server.etag = '"v2"'
    with pytest.raises(RemoteChanged):
        await read(reader, ByteRange(0, SIZE - 1))
    server.etag = ETAG
    server.routes[URL] = lambda request: server.respond(
        200, DATA, server.validators(), content_length=SIZE + 1
    )
    with pytest.raises(RemoteChanged, match="1001 bytes"):
        await read(reader, ByteRange(0, SIZE - 1))


async def test_200_that_is_exactly_the_range_is_accepted(
    server: FakeServer, session: HttpSession
) -> None:
    # seed scenario 43: the upstream test server answers ranges with 200 + Content-Range
    def handler(request: httpx.Request) -> httpx.Response:
        response = server.serve(request)
        return httpx.Response(200, headers=response.headers, stream=response.stream)

    server.routes[URL] = handler
    assert await read(session.reader(URL, info())) == DATA[100:200]


@pytest.mark.parametrize("status", [412, 416])
async def test_412_and_416_mean_the_remote_changed(
    server: FakeServer, session: HttpSession, status: int
) -> None:
    server.routes[URL] = server.status(status)
    with pytest.raises(RemoteChanged, match=str(status)):
        await read(session.reader(URL, info()))


async def test_a_shrunk_object_answers_416(server: FakeServer, session: HttpSession) -> None:
    server.data = DATA[:50]
    with pytest.raises(RemoteChanged):
        await read(session.reader(URL, info()))


@pytest.mark.parametrize("rng", [ByteRange(0, SIZE), ByteRange(5, 4), ByteRange(-1, 3)])
async def test_open_range_outside_the_object_is_a_bug(session: HttpSession, rng: ByteRange) -> None:
    with pytest.raises(ValueError, match="outside"):
        await read(session.reader(URL, info()), rng)


# -- statuses and Retry-After ------------------------------------------------------------------


def http_date(offset: float) -> str:
    """An HTTP date ``offset`` seconds from now (built when the test runs)."""
    return email.utils.formatdate(time.time() + offset, usegmt=True)


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 0 ", 0.0),
        ("100000", 60.0),
        ("99999999999999999999999", 60.0),
        (30.0, pytest.approx(30, abs=3)),  # a float: an HTTP date that many seconds away
        (1e6, 60.0),
        (-3600.0, 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("-3", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
async def test_retry_after(
    server: FakeServer,
    session: HttpSession,
    status: int,
    value: str | float | None,
    expected: object,
) -> None:
    if isinstance(value, float):
        value = http_date(value)
    server.routes[URL] = server.status(status, {"Retry-After": value} if value is not None else {})
    with pytest.raises(TransientError) as caught:
        await read(session.reader(URL, info()))
    assert caught.value.retry_after == expected
    assert f"HTTP {status}" in str(caught.value)


@pytest.mark.parametrize("status", [408, 500, 502, 504, 505])
async def test_transient_statuses(server: FakeServer, session: HttpSession, status: int) -> None:
    server.routes[URL] = server.status(status)
    with pytest.raises(TransientError, match=f"HTTP {status}") as caught:
        await read(session.reader(URL, info()))
    assert caught.value.retry_after is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 204, 304])
async def test_permanent_statuses(server: FakeServer, session: HttpSession, status: int) -> None:
    server.routes[URL] = server.status(status)
    with pytest.raises(PermanentError, match=f"HTTP {status}") as caught:
        await read(session.reader(URL, info()))
    assert caught.value.status == status
    assert len(server.requests) == 1  # the pinned URL is the original: nothing to re-resolve


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (httpx.ConnectError("refused"), TransientError),
        (httpx.ConnectTimeout("timed out"), TransientError),
        (httpx.ReadTimeout("timed out"), TransientError),
        (httpx.PoolTimeout("timed out"), TransientError),
        (httpx.RemoteProtocolError("Server disconnected"), TransientError),
        (httpx.UnsupportedProtocol("no"), PermanentError),
    ],
)
async def test_transport_errors_on_send(
    server: FakeServer, session: HttpSession, error: Exception, expected: type[SourceError]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    server.routes[URL] = handler
    with pytest.raises(expected, match=type(error).__name__) as caught:
        await read(session.reader(URL, info()))
    assert caught.value.__cause__ is error


# -- the body ------------------------------------------------------------------------------------


async def test_short_body_raises_from_the_iterator(
    server: FakeServer, session: HttpSession
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return server.respond(
            206,
            DATA[100:150],
            {**server.validators(), "Content-Range": "bytes 100-199/1000"},
            content_length=100,
        )

    server.routes[URL] = handler
    received = bytearray()
    with pytest.raises(TransientError, match=r"short body: got 50 of 100 bytes") as caught:
        async with session.reader(URL, info()).open_range(RNG) as body:
            async for chunk in body:
                received += chunk
    assert bytes(received) == DATA[100:150]
    assert "[100:199]" in str(caught.value)


async def _received_before(body_error: type[Exception], reader: Reader) -> bytes:
    """Every byte ``reader`` hands out for RNG before it raises ``body_error``."""
    received = bytearray()
    with pytest.raises(body_error):
        async with reader.open_range(RNG) as body:
            async for chunk in body:
                received += chunk
    return bytes(received)


@pytest.mark.parametrize(
    ("what", "body", "chunk"),
    [
        # the object from byte 0 instead of byte 100: each chunk is wrong, none may pass
        ("longer", DATA, 4096),
        ("longer", DATA, 30),
        ("longer by one byte", DATA[100:201], 10),
        ("shorter", DATA[100:199], 10),
        ("empty", b"", 10),
    ],
)
async def test_undeclared_body_of_the_wrong_length_yields_nothing(
    server: FakeServer, session: HttpSession, what: str, body: bytes, chunk: int
) -> None:
    """A 206 without Content-Length (chunked or delimited by the close) whose body is
    longer or shorter than its Content-Range hands out no byte at all: a transient fault
    (retried by the fetcher), never bytes that a cache would store."""

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {**server.validators(), "Content-Range": "bytes 100-199/1000"}
        stream = Tracked(server, body, chunk=chunk)
        return httpx.Response(206, headers=headers, stream=stream)

    server.routes[URL] = handler
    pattern = "longer than the 100 bytes" if what.startswith("longer") else "short body"
    with pytest.raises(TransientError, match=pattern):
        await read(session.reader(URL, info()))
    assert await _received_before(TransientError, session.reader(URL, info())) == b""
    stream = server.streams[-1]
    assert stream.closed


async def test_undeclared_body_of_the_right_length_is_handed_out(
    server: FakeServer, session: HttpSession
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {**server.validators(), "Content-Range": "bytes 100-199/1000"}
        return httpx.Response(206, headers=headers, stream=Tracked(server, DATA[100:200], chunk=7))

    server.routes[URL] = handler
    assert await read(session.reader(URL, info())) == DATA[100:200]


async def test_declared_body_longer_than_its_length_raises(
    server: FakeServer, session: HttpSession
) -> None:
    """A transport that hands out more than the (checked) Content-Length: an error at the
    first chunk too long, whose bytes are not handed out."""

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {**server.validators(), "Content-Range": "bytes 100-199/1000"}
        return server.respond(206, DATA[100:160] + DATA[:100], headers, content_length=100)

    server.routes[URL] = handler
    received = await _received_before(TransientError, session.reader(URL, info()))
    assert DATA[100:200].startswith(received)


@pytest.mark.parametrize("coding", ["gzip, chunked", "gzip", "chunked, chunked", "x-custom"])
async def test_transfer_codings_other_than_chunked_are_refused(
    server: FakeServer, session: HttpSession, coding: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {
            **server.validators(),
            "Content-Range": "bytes 100-199/1000",
            "Transfer-Encoding": coding,
        }
        return httpx.Response(206, headers=headers, stream=Tracked(server, DATA[100:200]))

    server.routes[URL] = handler
    with pytest.raises(TransientError, match="transfer coding"):
        await read(session.reader(URL, info()))
    assert await _received_before(TransientError, session.reader(URL, info())) == b""


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("peer closed"),
        httpx.ReadError("connection reset"),
    ],
)
async def test_failure_mid_body_is_transient(
    server: FakeServer, session: HttpSession, error: Exception
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {**server.validators(), "Content-Range": "bytes 100-199/1000"}
        return server.respond(206, DATA[100:160], headers, content_length=100, error=error)

    server.routes[URL] = handler
    received = bytearray()
    pattern = rf"{type(error).__name__}.*after \d+ of 100 bytes"
    with pytest.raises(TransientError, match=pattern) as caught:
        async with session.reader(URL, info()).open_range(RNG) as body:
            async for chunk in body:
                received += chunk
    assert caught.value.__cause__ is error
    assert DATA[100:160].startswith(bytes(received))


async def test_response_closed_when_the_consumer_stops_early(
    server: FakeServer, session: HttpSession
) -> None:
    server.data = BIG
    async with big_reader(session).open_range(ByteRange(0, len(BIG) - 1)) as body:
        async for _chunk in body:
            break
    stream = server.streams[-1]
    assert stream.closed and not stream.finished


async def test_consumer_errors_surface_and_close_the_response(
    server: FakeServer, session: HttpSession
) -> None:
    server.data = BIG

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with big_reader(session).open_range(ByteRange(0, len(BIG) - 1)) as body:
            async for _chunk in body:
                raise Boom
    assert server.streams[-1].closed


async def test_cancellation_closes_the_response(server: FakeServer, session: HttpSession) -> None:
    server.data = BIG
    with trio.CancelScope() as scope:
        async with big_reader(session).open_range(ByteRange(0, len(BIG) - 1)) as body:
            async for _chunk in body:
                scope.cancel()
                await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught
    assert server.streams[-1].closed


async def test_body_unusable_after_its_context(session: HttpSession) -> None:
    async with session.reader(URL, info()).open_range(RNG) as body:
        pass
    with pytest.raises(RuntimeError):
        await anext(body)


# -- redirects -----------------------------------------------------------------------------------


async def test_redirect_is_followed_and_pinned(server: FakeServer, session: HttpSession) -> None:
    target = f"{CDN}/obj?sig=abc"
    server.routes[URL] = server.redirect(target)
    server.routes[target] = server.serve
    got = await session.probe(URL)
    assert got.url == target
    reader = session.reader(URL, got)
    assert reader.name == URL
    assert await read(reader) == DATA[100:200]
    assert [str(r.url) for r in server.requests] == [URL, target, target]


async def test_relative_and_same_origin_redirects_keep_user_headers(server: FakeServer) -> None:
    server.routes[URL] = server.redirect("/moved/obj.bin", 301)
    options = HttpOptions(headers=(("Authorization", "Bearer sekrit-token"),))
    async with HttpSession(options, transport=httpx.MockTransport(server)) as session:
        got = await session.probe(URL)
    assert got.url == f"{ORIGIN}/moved/obj.bin"
    assert [r.headers.get("authorization") for r in server.requests] == ["Bearer sekrit-token"] * 2


async def test_cross_origin_redirect_drops_user_headers_and_userinfo(server: FakeServer) -> None:
    target = f"{CDN}/obj?sig=abc"
    server.routes["/data/obj.bin"] = server.redirect(target, 307)
    server.routes[target] = server.serve
    options = HttpOptions(headers=(("Authorization", "Bearer sekrit-token"), ("X-Team", "t1")))
    async with HttpSession(options, transport=httpx.MockTransport(server)) as session:
        got = await session.probe(URL)
        await read(session.reader(URL, got))
        with_userinfo = "https://alice:pw1234@files.example.com/data/obj.bin"
        got = await session.probe(with_userinfo)
        await read(session.reader(with_userinfo, got))
    first, to_cdn, ranged, basic, basic_cdn, basic_ranged = server.requests
    assert (first.headers["authorization"], first.headers["x-team"]) == (
        "Bearer sekrit-token",
        "t1",
    )
    expected_basic = "Basic " + base64.b64encode(b"alice:pw1234").decode()
    assert basic.headers["authorization"] == expected_basic
    assert basic.url == URL  # credentials went in the header, not in the request line
    for request in (to_cdn, ranged, basic_cdn, basic_ranged):
        assert request.url.host == "cdn.example.net"
        assert "authorization" not in request.headers
        assert "x-team" not in request.headers
    assert got.url == target


async def test_redirect_to_another_port_is_another_origin(server: FakeServer) -> None:
    target = f"{ORIGIN}:8443/data/obj.bin"
    server.routes[URL] = server.redirect(target)
    server.routes[target] = server.serve
    options = HttpOptions(headers=(("Authorization", "Bearer sekrit-token"),))
    async with HttpSession(options, transport=httpx.MockTransport(server)) as session:
        await session.probe(URL)
    assert "authorization" in server.requests[0].headers
    assert "authorization" not in server.requests[1].headers


async def test_redirect_loop(server: FakeServer, session: HttpSession) -> None:
    server.routes[URL] = server.redirect(f"{CDN}/a")
    server.routes[f"{CDN}/a"] = server.redirect(URL)
    with pytest.raises(PermanentError, match="redirect loop"):
        await session.probe(URL)


async def test_too_many_redirects(server: FakeServer, session: HttpSession) -> None:
    for hop in range(5):
        server.routes[f"/hop/{hop}"] = server.redirect(f"/hop/{hop + 1}")
    server.routes["/hop/3"] = server.serve  # max_redirects=3: exactly three hops are fine
    assert (await session.probe(f"{ORIGIN}/hop/0")).url == f"{ORIGIN}/hop/3"
    del server.routes["/hop/3"]
    server.routes["/hop/3"] = server.redirect("/hop/4")
    with pytest.raises(PermanentError, match="more than 3 redirects"):
        await session.probe(f"{ORIGIN}/hop/0")


async def test_unusable_redirects(server: FakeServer, session: HttpSession) -> None:
    server.routes[URL] = lambda request: server.respond(302, content_length=0)
    with pytest.raises(PermanentError, match="without a Location"):
        await session.probe(URL)
    server.routes[URL] = server.redirect("ftp://files.example.com/x")
    with pytest.raises(PermanentError, match="redirect to a ftp URL"):
        await session.probe(URL)


@pytest.mark.parametrize("expired", [403, 404, 410])
async def test_expired_pinned_target_is_resolved_again(
    server: FakeServer, session: HttpSession, expired: int
) -> None:
    old, new = f"{CDN}/obj?sig=old", f"{CDN}/obj?sig=new"
    server.routes[old] = server.status(expired)
    server.routes[URL] = server.redirect(new)
    server.routes[new] = server.serve
    reader = session.reader(URL, info(old))
    assert await read(reader) == DATA[100:200]
    assert await read(reader) == DATA[100:200]
    assert [str(r.url) for r in server.requests] == [old, URL, new, new]


async def test_expired_pinned_target_is_resolved_only_once(
    server: FakeServer, session: HttpSession
) -> None:
    old, new = f"{CDN}/obj?sig=old", f"{CDN}/obj?sig=new"
    server.routes[old] = server.status(403)
    server.routes[URL] = server.redirect(new)
    server.routes[new] = server.status(404)
    with pytest.raises(PermanentError) as caught:
        await read(session.reader(URL, info(old)))
    assert caught.value.status == 404
    assert "(at https://cdn.example.net/obj?sig=REDACTED)" in str(caught.value)
    assert [str(r.url) for r in server.requests] == [old, URL, new]


# -- credentials never in messages -------------------------------------------------------------

SECRET_URL = (
    "https://alice:pw1234@files.example.com/data/obj.bin"
    "?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=topsecret"
)
SECRETS = ("alice", "pw1234", "AKIAEXAMPLE", "topsecret", "sekrit-token")


async def test_credentials_never_in_messages(server: FakeServer) -> None:
    calls = 0

    def echoing_failure(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {SECRET_URL} with Bearer sekrit-token")

    options = HttpOptions(headers=(("Authorization", "Bearer sekrit-token"),))
    errors: list[SourceError] = []
    async with HttpSession(options, transport=httpx.MockTransport(server)) as session:
        reader = session.reader(SECRET_URL, info(SECRET_URL))
        for route in (
            server.status(500),
            server.status(404),
            echoing_failure,
            server.ranged(content_range="bytes 0-99/1000"),
            server.ranged(etag='"v2"'),
            server.redirect(SECRET_URL),
        ):
            server.routes["/data/obj.bin"] = route
            for attempt in (session.probe(SECRET_URL), read(reader)):
                calls += 1
                try:
                    await attempt
                except SourceError as exc:
                    errors.append(exc)
    assert calls == 12
    assert len(errors) == 10  # the probe does not read a range: a bad 206 cannot fail it
    for error in errors:
        text = str(error)
        assert "files.example.com/data/obj.bin?X-Amz-Credential=REDACTED" in text
        for secret in SECRETS:
            assert secret not in text, text
    assert "[100:199]" in str(errors[1])


# -- session -------------------------------------------------------------------------------------


async def test_session_client_settings() -> None:
    options = HttpOptions(connect_timeout=1.5, read_timeout=7.0, max_connections=5)
    async with HttpSession(options) as session:
        client = session._client
        assert client.follow_redirects is False
        assert client.timeout == httpx.Timeout(connect=1.5, read=7.0, write=7.0, pool=7.0)
        assert client.headers["accept-encoding"] == "identity"
        assert isinstance(session.reader(URL, info()), HttpReader)
    with pytest.raises(PermanentError, match="not an http"):
        session.reader("file:///etc/passwd", info())


class _HeadRecorder:
    """A raw HTTP/1.1 server on 127.0.0.1 that records every request head and answers
    ``200``, ``Content-Length: 10``, ``Accept-Ranges: bytes`` (no body: HEAD only)."""

    def __init__(self) -> None:
        self.heads: list[list[tuple[str, str]]] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")[1:]
                fields = (line.partition(":") for line in lines)
                self.heads.append([(name, value.strip()) for name, _, value in fields])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n"
                             b"Accept-Ranges: bytes\r\n\r\n")

    def close(self) -> None:
        self._sock.close()


@pytest.mark.parametrize("user", [
    (),
    (("User-Agent", "mine/1"), ("X-Token", "abc"), ("Cookie", "a=1"), ("Cookie", "b=2"),
     ("accept-encoding", "gzip")),
])
async def test_direct_requests_carry_what_the_client_would_send(
    user: tuple[tuple[str, str], ...]
) -> None:
    """The direct path (no proxy, no basic auth) builds its requests itself; they must carry
    the same fields as the client's build_request (the other path) would, each once."""
    server = _HeadRecorder()
    try:
        url = f"http://127.0.0.1:{server.port}/obj"
        direct = HttpSession(HttpOptions(headers=user))
        through_client = HttpSession(HttpOptions(headers=user))
        through_client._direct = None  # the other path, for comparison
        async with direct, through_client:
            await direct.probe(url)
            await through_client.probe(url)
    finally:
        server.close()
    mine, reference = (sorted((n.lower(), v) for n, v in head) for head in server.heads)
    assert mine == reference
    names = [n for n, _ in mine]
    assert names.count("user-agent") == names.count("accept-encoding") == 1
    assert ("accept-encoding", "identity") in mine
    assert ("user-agent", "mine/1" if user else USER_AGENT) in mine
    if user:
        assert ("cookie", "a=1") in mine and ("cookie", "b=2") in mine

"""The test origin and test content do what they say (real sockets, httpx sync client)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.content import MAX_VIEW, P, check, content, sha256_of, view
from tests.faultserver import (
    DEFAULT_LAST_MODIFIED,
    Fault,
    FaultServer,
    http_date,
    parse_range,
)

ROOT = Path(__file__).resolve().parent.parent
SIZE = 300_000  # more than one CHUNK, not a multiple of anything


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as c:
        yield c


def raw_get(port: int, path: str, extra: str = "") -> tuple[bytes, bytes, str]:
    """One GET on a fresh socket, read to the end: (head, body, 'eof' | 'reset')."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n".encode())
        data = bytearray()
        end = "eof"
        try:
            while chunk := sock.recv(1 << 16):
                data += chunk
        except ConnectionResetError:
            end = "reset"
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return head, body, end


# -- content ----------------------------------------------------------------------------------


def test_content_is_a_function_of_key_and_offset() -> None:
    whole = content("k", 0, 3 * MAX_VIEW + 12345)
    for offset, length in [(0, 1), (1, 100), (P - 1, 2), (MAX_VIEW - 3, 10), (5, 2 * MAX_VIEW + 7)]:
        assert content("k", offset, length) == whole[offset : offset + length]
        if length <= MAX_VIEW:
            assert bytes(view("k", offset, length)) == whole[offset : offset + length]
    assert content("k", 0, 0) == b""
    assert whole[:P] == whole[P : 2 * P]  # the period is the prime P ...
    assert whole[:4096] != whole[4096:8192]  # ... so power-of-two blocks never repeat
    assert content("other", 0, 4096) != whole[:4096]


def test_sha256_of_matches_hashlib() -> None:
    size = 2 * MAX_VIEW + 99
    assert sha256_of("k", size) == hashlib.sha256(content("k", 0, size)).hexdigest()
    assert sha256_of("k", 0) == hashlib.sha256(b"").hexdigest()


def test_check_names_the_first_wrong_offset() -> None:
    data = bytearray(content("k", 1000, 2 * MAX_VIEW))
    check("k", 1000, data)
    check("k", 1010, memoryview(data)[10:20])
    data[MAX_VIEW + 17] ^= 0xFF
    data[MAX_VIEW + 500] ^= 0xFF
    with pytest.raises(AssertionError, match=f"offset {1000 + MAX_VIEW + 17}:"):
        check("k", 1000, data)
    with pytest.raises(AssertionError, match="offset 5:"):
        check("k", 5, content("k", 6, 10))


# -- a correct origin -------------------------------------------------------------------------


def test_whole_get_headers_body_and_keep_alive(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", SIZE)
    for _ in range(2):
        r = client.get(origin.url("/a"))
        assert r.status_code == 200
        assert r.headers["accept-ranges"] == "bytes"
        assert r.headers["content-length"] == str(SIZE)
        assert r.headers["etag"] == '"v1"'
        assert r.headers["last-modified"] == DEFAULT_LAST_MODIFIED
        assert "repr-digest" not in r.headers
        check("/a", 0, r.content)
    first, second = origin.gets("/a")
    assert first.client_port == second.client_port  # one kept-alive connection
    assert origin.bytes_sent("/a") == 2 * SIZE
    assert first.status == 200 and first.headers["host"] == f"127.0.0.1:{origin.port}"


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=0-0", 0, 0), ("bytes=100-199", 100, 199), ("bytes=299990-", 299990, SIZE - 1),
     ("bytes=-10", SIZE - 10, SIZE - 1), ("bytes=299990-400000", 299990, SIZE - 1),
     ("bytes=-999999", 0, SIZE - 1)],
)  # fmt: skip
def test_single_ranges(
    origin: FaultServer, client: httpx.Client, header: str, start: int, end: int
) -> None:
    origin.add("/a", SIZE, key="key-a")
    r = client.get(origin.url("/a"), headers={"Range": header})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {start}-{end}/{SIZE}"
    assert r.headers["content-length"] == str(end - start + 1)
    check("key-a", start, r.content)
    assert len(r.content) == end - start + 1
    assert origin.gets("/a")[0].range == header


@pytest.mark.parametrize("header", ["bytes=300000-", "bytes=400000-400010", "bytes=-0"])
def test_unsatisfiable_range_is_416(origin: FaultServer, client: httpx.Client, header: str) -> None:
    origin.add("/a", SIZE)
    r = client.get(origin.url("/a"), headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=9-3", "items=0-1", "bytes=x-"])
def test_unusable_range_is_ignored(origin: FaultServer, client: httpx.Client, header: str) -> None:
    origin.add("/a", SIZE)
    r = client.get(origin.url("/a"), headers={"Range": header})
    assert r.status_code == 200 and len(r.content) == SIZE


def test_parse_range_edge_cases() -> None:
    assert parse_range("bytes=0-0", 0) == "unsatisfiable"
    assert parse_range("bytes=-5", 0) == "unsatisfiable"
    assert parse_range("bytes=3-", 4) == (3, 3)
    assert parse_range("bytes=-", 4) is None


def test_if_range(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", SIZE)
    rng = {"Range": "bytes=10-19"}
    assert client.get(origin.url("/a"), headers={**rng, "If-Range": '"v1"'}).status_code == 206
    date = {**rng, "If-Range": DEFAULT_LAST_MODIFIED}
    assert client.get(origin.url("/a"), headers=date).status_code == 206
    for stale in ['"v0"', 'W/"v1"', http_date(0)]:
        r = client.get(origin.url("/a"), headers={**rng, "If-Range": stale})
        assert r.status_code == 200 and len(r.content) == SIZE
    assert [g.if_range for g in origin.gets("/a")][-1] == http_date(0)


def test_preconditions(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", 10)
    assert client.get(origin.url("/a"), headers={"If-Match": '"v2"'}).status_code == 412
    assert client.get(origin.url("/a"), headers={"If-Match": '"v2", "v1"'}).status_code == 200
    old = {"If-Unmodified-Since": http_date(0)}
    assert client.get(origin.url("/a"), headers=old).status_code == 412
    assert client.get(origin.url("/a"), headers={"If-Unmodified-Since": "junk"}).status_code == 200


def test_head_and_refused_head(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", SIZE, repr_digest=True)
    origin.add("/no-head", 10, head_status=405)
    r = client.head(origin.url("/a"), headers={"Range": "bytes=0-0"})
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(SIZE)
    assert r.headers["repr-digest"].startswith("sha-256=:")
    r = client.head(origin.url("/no-head"))
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert client.get(origin.url("/no-head")).status_code == 200
    assert origin.bytes_sent() == 10


def test_repr_digest_is_the_whole_object(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", SIZE, repr_digest=True)
    r = client.get(origin.url("/a"), headers={"Range": "bytes=0-9"})
    want = base64.b64encode(hashlib.sha256(content("/a", 0, SIZE)).digest()).decode()
    assert r.headers["repr-digest"] == f"sha-256=:{want}:"


def test_no_ranges_no_validators(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", SIZE, accept_ranges=False, etag=None, last_modified=None)
    r = client.get(origin.url("/a"), headers={"Range": "bytes=0-9"})
    assert r.status_code == 200 and len(r.content) == SIZE
    assert "accept-ranges" not in r.headers
    assert "etag" not in r.headers and "last-modified" not in r.headers


def test_no_content_length_ends_with_close(origin: FaultServer) -> None:
    origin.add("/a", SIZE, content_length=False)
    head, body, end = raw_get(origin.port, "/a", "Range: bytes=5-\r\n")
    assert b"content-length" not in head.lower() and b"Connection: close" in head
    assert end == "eof"
    check("/a", 5, body)
    assert len(body) == SIZE - 5


def test_set_version_changes_bytes_and_validators(
    origin: FaultServer, client: httpx.Client
) -> None:
    origin.add("/a", SIZE)
    before = client.get(origin.url("/a"), headers={"Range": "bytes=0-99"}).content
    origin.set_version("/a", etag='"v2"', key="/a#2", last_modified=http_date(1e9))
    r = client.get(origin.url("/a"), headers={"Range": "bytes=0-99", "If-Range": '"v1"'})
    assert r.status_code == 200 and r.headers["etag"] == '"v2"'
    check("/a#2", 0, r.content)
    assert r.content[:100] != before
    assert origin.object("/a").size == SIZE
    origin.set_version("/a", size=10)
    assert client.get(origin.url("/a")).content == content("/a#2", 0, 10)


def test_unknown_path_is_404_and_query_is_ignored(
    origin: FaultServer, client: httpx.Client
) -> None:
    origin.add("/a", 10)
    assert client.get(origin.url("/nope")).status_code == 404
    r = client.get(origin.url("/a?token=secret"))
    assert r.content == content("/a", 0, 10)
    assert origin.gets("/a")[0].query == "token=secret"
    origin.remove("/a")
    assert client.get(origin.url("/a")).status_code == 404


def test_big_object_streams_intact(origin: FaultServer, client: httpx.Client) -> None:
    size = (48 << 20) + 3
    origin.add("/big", size)
    hasher = hashlib.sha256()
    with client.stream("GET", origin.url("/big")) as r:
        for part in r.iter_raw(1 << 20):
            hasher.update(part)
    assert hasher.hexdigest() == sha256_of("/big", size)


# -- faults -----------------------------------------------------------------------------------


def test_status_faults_are_consumed_in_order(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", 10)
    when = http_date(2e9)
    origin.faults(
        "/a",
        [
            Fault("status", status=503, retry_after=2),
            Fault("status", status=429, retry_after=when),
            Fault("status", status=500),
            {"kind": "status", "status": 410},
        ],
    )
    answers = [client.get(origin.url("/a")) for _ in range(5)]
    assert [r.status_code for r in answers] == [503, 429, 500, 410, 200]
    assert [r.headers.get("retry-after") for r in answers] == ["2", when, None, None, None]
    assert [g.fault for g in origin.gets("/a")] == ["status"] * 4 + [None]
    assert origin.pending_faults("/a") == []


def test_fault_method_filter(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", 10)
    origin.faults("/a", [Fault("status", method="HEAD", status=403)])
    assert client.get(origin.url("/a")).status_code == 200
    assert len(origin.pending_faults("/a")) == 1
    assert client.head(origin.url("/a")).status_code == 403
    assert client.head(origin.url("/a")).status_code == 200


def test_reset_before_headers(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", SIZE)
    origin.faults("/a", ["reset", "reset"])
    assert raw_get(origin.port, "/a") == (b"", b"", "reset")
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        client.get(origin.url("/a"))
    seen = [(g.status, g.bytes_sent, g.fault) for g in origin.gets("/a")]
    assert seen == [(None, 0, "reset")] * 2
    assert client.get(origin.url("/a")).status_code == 200


def test_reset_mid_body(origin: FaultServer) -> None:
    origin.add("/a", SIZE)
    origin.faults("/a", [Fault("reset_body", after=70_000), Fault("reset_body")])
    head, body, end = raw_get(origin.port, "/a", "Range: bytes=1000-\r\n")
    assert head.startswith(b"HTTP/1.1 206") and end == "reset"
    assert len(body) == 70_000
    check("/a", 1000, body)
    _, body, end = raw_get(origin.port, "/a", "Range: bytes=0-99\r\n")
    assert (len(body), end) == (50, "reset")  # default: half
    assert [g.bytes_sent for g in origin.gets("/a")] == [70_000, 50]


def test_short_body_then_clean_close(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", SIZE)
    origin.faults("/a", [Fault("short_body", after=123), Fault("short_body", after=10**9)])
    head, body, end = raw_get(origin.port, "/a")
    assert b"Content-Length: %d" % SIZE in head and end == "eof"
    assert body == content("/a", 0, 123)
    received = 0
    with pytest.raises(httpx.RemoteProtocolError), client.stream("GET", origin.url("/a")) as r:
        for part in r.iter_raw():
            received += len(part)
    assert received == SIZE - 1  # `after` is clamped: at least one byte is always missing


def test_stall_then_rest(origin: FaultServer) -> None:
    origin.add("/a", SIZE)
    origin.faults("/a", [Fault("stall", after=1000, seconds=0.5)] * 2)
    with httpx.Client(timeout=httpx.Timeout(5.0, read=0.25)) as slow_reader:
        received = bytearray()
        with pytest.raises(httpx.ReadTimeout), slow_reader.stream("GET", origin.url("/a")) as r:
            for part in r.iter_raw():
                received += part
    assert bytes(received) == content("/a", 0, 1000)
    started = time.monotonic()
    with httpx.Client(timeout=5.0) as patient:
        r = patient.get(origin.url("/a"))
    assert time.monotonic() - started >= 0.45
    check("/a", 0, r.content)
    assert len(r.content) == SIZE


def test_ignore_range(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", SIZE)
    origin.faults("/a", ["ignore_range"])
    r = client.get(origin.url("/a"), headers={"Range": "bytes=10-19"})
    assert r.status_code == 200 and "content-range" not in r.headers
    check("/a", 0, r.content)
    assert len(r.content) == SIZE


def test_wrong_content_range(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", SIZE)
    origin.faults("/a", [Fault("wrong_start", delta=4096), Fault("wrong_total", delta=-1)])
    r = client.get(origin.url("/a"), headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.headers["content-range"] == f"bytes 4096-4195/{SIZE}"
    check("/a", 4096, r.content)  # the bytes it claims, not the bytes asked for
    r = client.get(origin.url("/a"), headers={"Range": "bytes=0-99"})
    assert r.headers["content-range"] == f"bytes 0-99/{SIZE - 1}"
    check("/a", 0, r.content)


def test_wrong_content_length(origin: FaultServer) -> None:
    origin.add("/a", SIZE)
    origin.faults("/a", [Fault("wrong_length", delta=-10)])
    head, body, end = raw_get(origin.port, "/a", "Range: bytes=0-99\r\n")
    assert b"Content-Length: 90\r\n" in head and b"Content-Range: bytes 0-99/" in head
    assert body == content("/a", 0, 100) and end == "eof"


def test_gzip(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", SIZE)
    origin.faults("/a", ["gzip"])
    with client.stream("GET", origin.url("/a"), headers={"Range": "bytes=10-1009"}) as r:
        raw = b"".join(r.iter_raw())
    assert r.status_code == 206 and r.headers["content-encoding"] == "gzip"
    assert r.headers["content-range"] == f"bytes 10-1009/{SIZE}"
    assert r.headers["content-length"] == str(len(raw))
    assert gzip.decompress(raw) == content("/a", 10, 1000)


def test_redirects_same_and_cross_origin(
    origin: FaultServer, origin_factory: Callable[[], FaultServer], client: httpx.Client
) -> None:
    other = origin_factory()
    other.add("/there", 10, key="k")
    origin.add("/b", 10, key="k")
    origin.faults(
        "/a",
        [Fault("redirect", status=307, location="/b"),
         Fault("redirect", status=301, location=other.url("/there"))],
    )  # fmt: skip
    r = client.get(origin.url("/a"))
    assert r.status_code == 307 and r.headers["location"] == "/b"
    r = client.get(origin.url("/a"), follow_redirects=True)
    assert r.status_code == 200 and r.content == content("k", 0, 10)
    assert str(r.url) == other.url("/there")
    assert [g.path for g in other.gets()] == ["/there"]
    origin.redirect("/always", "/b", status=308)
    r = client.get(origin.url("/always"), follow_redirects=True)
    assert r.content == content("k", 0, 10) and r.history[0].status_code == 308


def test_changed_validator(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", SIZE)
    origin.faults("/a", [Fault("changed_validator", etag='"v9"', last_modified=http_date(5))])
    r = client.get(origin.url("/a"), headers={"Range": "bytes=0-9", "If-Range": '"v1"'})
    assert r.status_code == 206 and r.headers["etag"] == '"v9"'
    assert r.headers["last-modified"] == http_date(5)
    r = client.get(origin.url("/a"), headers={"Range": "bytes=0-9", "If-Range": '"v1"'})
    assert r.headers["etag"] == '"v1"'


def test_delays(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", 10)
    origin.faults("/a", [Fault("delay", seconds=0.3)])
    started = time.monotonic()
    assert client.get(origin.url("/a")).content == content("/a", 0, 10)
    assert time.monotonic() - started >= 0.28
    origin.delay = 0.2
    started = time.monotonic()
    client.get(origin.url("/a"))
    assert time.monotonic() - started >= 0.18
    assert [g.fault for g in origin.gets("/a")] == ["delay", None]


def test_fault_probability_is_seeded(
    origin: FaultServer, origin_factory: Callable[[], FaultServer], client: httpx.Client
) -> None:
    twin = origin_factory()
    for server in (origin, twin):
        server.add("/a", 10)
        server.add("/b", 10)
        server.fault_probability(None, 0.5, ["status", {"kind": "status", "status": 502}], seed=7)
        server.fault_probability("/b", 1.0, ["reset"])
    seqs = [[client.get(s.url("/a")).status_code for _ in range(40)] for s in (origin, twin)]
    assert seqs[0] == seqs[1]
    assert 5 < seqs[0].count(200) < 35 and {503, 502} <= set(seqs[0])
    with pytest.raises(httpx.TransportError):
        client.get(origin.url("/b"))
    origin.fault_probability(None, 0, [])
    assert client.get(origin.url("/a")).status_code == 200


def test_log_helpers(origin: FaultServer, client: httpx.Client) -> None:
    origin.add("/a", 100)
    client.get(origin.url("/a"), headers={"Range": "bytes=0-9", "X-Test": "yes"})
    client.head(origin.url("/a"))
    (get,) = origin.gets("/a")
    assert (get.method, get.status, get.bytes_sent, get.range) == ("GET", 206, 10, "bytes=0-9")
    assert get.headers["x-test"] == "yes" and get.if_range is None
    assert [r.method for r in origin.requests("/a")] == ["GET", "HEAD"]
    assert origin.bytes_sent() == 10
    origin.reset_log()
    assert origin.log == [] and origin.bytes_sent() == 0


def test_stop_closes_idle_and_stalled_connections() -> None:
    server = FaultServer().start()
    server.add("/a", SIZE)
    server.faults("/a", [Fault("stall", after=10, seconds=60)])
    idle = socket.create_connection(("127.0.0.1", server.port))
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.sendall(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
    while not server.log:
        time.sleep(0.01)
    before = threading.active_count()
    # stop() raises if a thread is still alive after its 5 s: the 60 s stall was cut short
    server.stop()
    assert threading.active_count() <= before - 3  # acceptor and both connection threads
    idle.close()
    stalled.close()


def test_configure_from_json_data(origin: FaultServer, client: httpx.Client) -> None:
    origin.configure(
        json.loads(
            '{"objects": [{"path": "/a", "size": 20, "etag": null, "key": "K"}],'
            ' "faults": {"/a": [{"kind": "status", "status": 504}]},'
            ' "redirects": [{"path": "/r", "location": "/a"}]}'
        )
    )
    assert client.get(origin.url("/a")).status_code == 504
    r = client.get(origin.url("/r"), follow_redirects=True)
    assert r.content == content("K", 0, 20) and "etag" not in r.headers
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault.of("explode")


def test_process_mode(tmp_path: Path) -> None:
    config = tmp_path / "origin.json"
    config.write_text(json.dumps({"objects": [{"path": "/x", "size": 1000}]}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faultserver", "--port", "0", "--config", str(config),
         "--objects", "3", "--size", "2K", "--delay-ms", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        word, port = proc.stdout.readline().split()
        assert word == "PORT"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            check("/x", 0, c.get("/x").content)
            r = c.get("/objects/2", headers={"Range": "bytes=2000-"})
            assert r.status_code == 206 and r.content == content("/objects/2", 2000, 48)
            assert c.get("/objects/3").status_code == 404
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0

"""Bad URLs fail fast (issue 17, item 4): a host that does not resolve or refuses the
connection is retried twice, quickly, by one-off requests (probes, cat, download); a 404
is known after one request; a certificate or a plain-http port behind https at once."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import httpx
import pytest

from rangefs.errors import RetriesExhausted, TransientError, Unreachable
from rangefs.fetcher import UNREACHABLE_RETRIES, retry_transient
from rangefs.ratecontrol import BackoffPolicy
from rangefs.source import HttpSession
from tests.content import content
from tests.faultserver import FaultServer
from tests.mountutil import mounted, write_list
from tests.test_cli_download import rangefs


def refused_port() -> int:
    """A port on 127.0.0.1 that refuses connections (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("cause", "words"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "does not resolve"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "refused"),
        (BaseExceptionGroup("all attempts", [ConnectionRefusedError(111, "refused")] * 2),
         "refused"),
    ],
)
async def test_no_connection_is_unreachable(cause: BaseException, words: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connect failed", request=request) from cause

    async with HttpSession(transport=httpx.MockTransport(handler)) as session:
        with pytest.raises(Unreachable, match=words):
            await session.probe("http://h.example/a")


async def test_other_connect_errors_stay_ordinary_transient_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("reset", request=request) from ConnectionResetError(104, "x")

    async with HttpSession(transport=httpx.MockTransport(handler)) as session:
        with pytest.raises(TransientError) as caught:
            await session.probe("http://h.example/a")
    assert not isinstance(caught.value, Unreachable)


async def test_one_off_requests_retry_unreachable_hosts_twice(autojump_clock: object) -> None:
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        raise Unreachable("cannot connect to h:80: connection refused")

    with pytest.raises(RetriesExhausted, match="gave up after 2 retries"):
        await retry_transient(call, BackoffPolicy(steps=8), "probe")
    assert calls == UNREACHABLE_RETRIES + 1 == 3


def test_cat_and_download_of_a_bad_host_fail_with_one_line(tmp_path: Path) -> None:
    port = refused_port()
    for args in (["cat", f"http://127.0.0.1:{port}/a"],
                 ["download", f"http://127.0.0.1:{port}/a", str(tmp_path / "a")],
                 ["cat", "http://no-such-host.invalid/a"]):
        done = rangefs(*args)
        lines = done.stderr.decode().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done
        assert "gave up after 2 retries" in lines[0], lines
        assert "connection refused" in lines[0] or "does not resolve" in lines[0], lines
    assert not (tmp_path / "a").exists()


def test_https_to_a_plain_http_port_fails_at_once(origin: FaultServer) -> None:
    origin.add("/a", 100)
    done = rangefs("cat", f"https://127.0.0.1:{origin.port}/a")
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done
    assert "is it an https server?" in lines[0]
    assert "retries" not in lines[0]


def test_one_bad_entry_never_delays_the_others(
    origin: FaultServer, tmp_path: Path, mnt: Path, cache: Path
) -> None:
    """A mount of a good file, a 404, a refused port and a name that does not resolve:
    the good one reads, each bad one fails (EIO) after one request (404) or two quick
    retries, and the log names each bad entry's probe failure once, with its reason."""
    origin.add("/good", 5000)
    port = refused_port()
    urls = write_list(tmp_path / "l.urls", [
        f"{origin.url('/good')} good",
        f"{origin.url('/missing')} missing",
        f"http://127.0.0.1:{port}/x refused",
        "http://no-such-host.invalid/x unresolvable",
    ])
    with mounted(urls, mnt, cache_dir=cache, warnings_ok=True) as mount:
        assert (mnt / "good").read_bytes() == content("/good", 0, 5000)
        for name in ("missing", "refused", "unresolvable"):
            with pytest.raises(OSError) as caught:
                os.stat(mnt / name)
            assert caught.value.errno == errno.EIO, name
        log = mount.stderr()
    assert len(origin.requests("/missing")) <= 2  # the probe (HEAD, then GET) and no retry
    for words in ("/missing", f"127.0.0.1:{port}", "no-such-host.invalid"):
        lines = [ln for ln in log.splitlines() if "probe at mount failed" in ln and words in ln]
        assert len(lines) == 1, (words, log)
    assert "HTTP 404" in log and "connection refused" in log and "does not resolve" in log

"""Expiring URLs and ``--url-command`` (rangefs/urlcommand.py, issue 19 item 2).

Without the network: the expiry of every signing format, when a URL is replaced, what
counts as a refusal, the command's contract (environment, output, failures, timeout,
children killed), single flight and the bound on runs, and the HTTP reader and probe with a
fresh URL (an in-process fake server, tests/test_source.py's).

Against moto's real S3 server (tests/s3rig.py; moto does not check presigned URLs, the
rig's front refuses expired and revoked ones as S3 does): a mount whose presigned URL
expires between two reads (refreshed ahead of time: no request refused) or is revoked
(refused, refreshed once), every byte exact and no byte served twice (cached blocks are
never fetched again); download and cat; the one-line error without the option; commands
that fail, print garbage or hang (the read fails, the mount stays up, runs are bounded).
"""

from __future__ import annotations

import errno
import math
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio

from rangefs import urlcommand
from rangefs.cachedir import cache_key
from rangefs.errors import PermanentError, RemoteChanged
from rangefs.ranges import ByteRange
from rangefs.redact import redact_url
from rangefs.source import HttpOptions, HttpSession
from rangefs.urlcommand import (
    CommandFailed,
    FreshUrl,
    UrlCommand,
    expired_hint,
    expiry,
    is_refusal,
    parse_output,
    refresh_time,
    run_command,
)
from rangefs.urllist import parse_url_list
from tests.mountutil import answers, mounted, run_user, write_list
from tests.s3rig import S3Rig
from tests.test_source import DATA, SIZE, FakeServer, info

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


# -- expiry, without the network -----------------------------------------------------------


@pytest.mark.parametrize(("query", "at", "start", "how"), [
    ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20260301T120000Z&X-Amz-Expires=3600"
     "&X-Amz-Signature=ab12", T0 + 3600, T0, "X-Amz-Date + X-Amz-Expires"),
    ("x-amz-date=20260301T120000Z&x-amz-expires=5", T0 + 5, T0, "X-Amz-Date + X-Amz-Expires"),
    ("X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Date=20260301T120000Z&X-Goog-Expires=900"
     "&X-Goog-Signature=cd", T0 + 900, T0, "X-Goog-Date + X-Goog-Expires"),
    (f"AWSAccessKeyId=AK&Signature=x%2By&Expires={int(T0)}", T0, None, "Expires"),
    (f"GoogleAccessId=a&Expires={int(T0) + 60}&Signature=s", T0 + 60, None, "Expires"),
    (f"Expires={int(T0)}&Signature=s&Key-Pair-Id=K", T0, None, "Expires"),  # CloudFront
    ("sv=2022-11-02&se=2026-03-01T12%3A00%3A00Z&sr=b&sp=r&sig=x", T0, None, "se"),
    ("se=2026-03-01T13:00Z&st=2026-03-01T12:00:00Z&sig=x", T0 + 3600, T0, "se"),
    ("se=2026-03-01&sig=x", T0 - 12 * 3600, None, "se"),  # a date: its midnight, UTC
    ("se=2026-03-01T14:00:00%2B02:00&sig=x", T0, None, "se"),  # with an offset
])
def test_expiry_of_every_format(query: str, at: float, start: float | None, how: str) -> None:
    found = expiry(f"https://h.example/b/k?{query}")
    assert found == urlcommand.Expiry(at, start, how)


@pytest.mark.parametrize("url", [
    "https://h.example/b/k",
    "https://h.example/b/k?versionId=3&sig=abc",
    "https://h.example/b/k?X-Amz-Date=20260301T120000Z",  # no lifetime
    "https://h.example/b/k?X-Amz-Date=yesterday&X-Amz-Expires=60",
    "https://h.example/b/k?X-Amz-Date=20260301T120000Z&X-Amz-Expires=-5",
    "https://h.example/b/k?Expires=soon&Signature=s",
    "https://h.example/b/k?se=never&sig=s",
    "http://[::1/broken?Expires=5",
])
def test_no_or_unreadable_expiry_is_none(url: str) -> None:
    assert expiry(url) is None
    assert refresh_time(url, T0) is None


def test_refresh_time_is_a_minute_or_a_tenth_of_the_lifetime_before_expiry() -> None:
    hour = "https://h/k?X-Amz-Date=20260301T120000Z&X-Amz-Expires=3600"
    assert refresh_time(hour, obtained=T0 + 100) == T0 + 3600 - 60
    short = "https://h/k?X-Amz-Date=20260301T120000Z&X-Amz-Expires=10"
    assert refresh_time(short, obtained=T0) == pytest.approx(T0 + 9)
    # no signing time in the URL: its lifetime counts from when rangefs got it
    epoch = f"https://h/k?Expires={int(T0) + 20}&Signature=s"
    assert refresh_time(epoch, obtained=T0) == pytest.approx(T0 + 18)
    assert refresh_time(epoch, obtained=T0 + 30) == T0 + 20  # got it expired: now


def test_what_counts_as_a_refusal() -> None:
    signed = "https://h/k?X-Amz-Date=20260301T120000Z&X-Amz-Expires=10&X-Amz-Signature=s"
    plain = "https://h/k"
    for status in (401, 403):
        assert is_refusal(status, plain) and is_refusal(status, signed)
    for status in (400, 404, 410):
        assert is_refusal(status, signed) and not is_refusal(status, plain)
    for status in (None, 200, 206, 416, 429, 500, 503):
        assert not is_refusal(status, signed)


def test_the_hint_for_an_expired_url() -> None:
    url = "https://h/k?X-Amz-Date=20260301T120000Z&X-Amz-Expires=60&X-Amz-Signature=secret"
    hint = expired_hint(url, now=T0 + 90)
    assert hint is not None
    assert "expired 30 s ago" in hint and "2026-03-01 12:01:00 UTC" in hint
    assert "--url-command" in hint and "secret" not in hint
    assert expired_hint(url, now=T0 + 30) is None  # not expired: no such claim
    assert expired_hint("https://h/k", now=T0) is None


def test_signing_parameters_do_not_change_the_cache_key() -> None:
    base = "https://bucket.s3.amazonaws.com/dir/obj.bin"
    keys = {
        cache_key(f"{base}?X-Amz-Date=20260301T120000Z&X-Amz-Expires=60&X-Amz-Signature=a"),
        cache_key(f"{base}?X-Amz-Date=20260302T000000Z&X-Amz-Expires=9&X-Amz-Signature=b"),
        cache_key(f"{base}?AWSAccessKeyId=A&Expires=1&Signature=c"),
        cache_key(f"{base}?se=2026-03-01&sig=d&sp=r&sv=1"),
        cache_key(base),
    }
    assert len(keys) == 1
    assert cache_key(f"{base}?versionId=2&X-Amz-Signature=a") != cache_key(base)


def test_redact_url_hides_every_signature() -> None:
    for url in (
        "https://h/k?X-Amz-Credential=AKIAX%2F1&X-Amz-Signature=deadbeef&X-Amz-Expires=60",
        "https://h/k?AWSAccessKeyId=AKIAX&Signature=deadbeef&Expires=1",
        "https://h/k?se=2026&sig=deadbeef",
        "https://h/k?X-Goog-Credential=AKIAX&X-Goog-Signature=deadbeef",
    ):
        shown = redact_url(url)
        assert "deadbeef" not in shown and "AKIAX" not in shown, shown


# -- the URL list's url-command= -------------------------------------------------------------


def test_the_list_names_a_program_per_entry() -> None:
    (entry, plain) = parse_url_list(
        "https://h/b/k?sig=1 data/k url-command=/opt/bin/presign size=5\nhttps://h/b/j\n", "l")
    assert entry.url_command == "/opt/bin/presign" and entry.size == 5
    assert str(entry.path) == "data/k" and plain.url_command is None
    assert "url_command='/opt/bin/presign'" in repr(entry)
    # the second token is an option, not a PATH
    (default,) = parse_url_list("https://h/b/k url-command=/x\n", "l")
    assert str(default.path) == "k" and default.url_command == "/x"


@pytest.mark.parametrize(("line", "needle"), [
    ("https://h/k url-command=presign", "absolute path"),
    ("https://h/k url-command=", "absolute path"),
    ("https://h/k url-command=/a url-command=/b", "url-command given twice"),
    ("https://h/k p urlcommand=/a", "url-command=PROGRAM"),  # the help names it
])
def test_bad_url_command_tokens(line: str, needle: str) -> None:
    with pytest.raises(Exception, match=needle):
        parse_url_list(line + "\n", "l")


def test_mount_refuses_a_program_it_cannot_run_and_a_blank_command(
    tmp_path: Path, mnt: Path,
) -> None:
    urls = write_list(tmp_path / "urls", ["https://h.example/k k url-command=/nonexistent/p"])
    done = run_user("mount", str(urls), str(mnt), "--cache-dir", str(tmp_path / "c"))
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        f"rangefs: {urls}: url-command=/nonexistent/p: not an executable file"]
    plain = write_list(tmp_path / "plain", ["https://h.example/k k"])
    for args in (["mount", str(plain), str(mnt), "--url-command", " "],
                 ["cat", "https://h.example/k", "--url-command", ""]):
        done = run_user(*args, "--cache-dir", str(tmp_path / "c")) if args[0] == "mount" \
            else run_user(*args)
        assert done.returncode == 2
        assert done.stderr.decode().splitlines() == [
            "rangefs: --url-command: give a command (it prints a fresh URL)"]


# -- the command's contract ----------------------------------------------------------------


def sh(text: str, timeout: float = 10.0) -> UrlCommand:
    return UrlCommand(text, timeout=timeout)


async def test_the_command_gets_path_url_and_reason_and_its_line_is_the_url() -> None:
    command = sh('test "$RANGEFS_URL" = "https://old.example/k?sig=1" || exit 9\n'
                 'printf "\\n  https://new.example/%s?why=%s  \\n\\n" "$RANGEFS_PATH" '
                 '"$RANGEFS_REASON"')
    fresh = await run_command(command, "dir/k", "https://old.example/k?sig=1", "refused")
    assert fresh == "https://new.example/dir/k?why=refused"


async def test_a_program_is_run_directly(tmp_path: Path) -> None:
    program = tmp_path / "presign"
    program.write_text("#!/bin/sh\necho \"https://new.example/$RANGEFS_PATH\"\n")
    program.chmod(0o755)
    assert urlcommand.program_problem(str(program)) is None
    command = UrlCommand(str(program), shell=False)
    assert await run_command(command, "x", "https://old/x", "expiring") == "https://new.example/x"
    assert "absolute" in (urlcommand.program_problem("presign") or "")
    assert "not an executable" in (urlcommand.program_problem(str(tmp_path / "no")) or "")


@pytest.mark.parametrize(("text", "needle"), [
    ("echo 'token=s3cr3t-value' >&2; echo 'why: https://x/?sig=s3cr3t' >&2; exit 3",
     "exited with status 3: why: https://x/?sig=REDACTED"),
    ("kill -9 $$", "killed by signal 9"),
    ("echo not-a-url", "printed no usable http(s) URL (not a URL)"),
    ("echo ftp://h/x", "printed no usable http(s) URL (unsupported URL scheme"),
    ("echo https://a/1; echo https://a/2", "printed 2 lines, not one URL"),
    ("true", "printed 0 lines"),
    ("echo https://old/x", "printed the same URL again"),
    ("head -c 70000 /dev/zero | tr '\\0' a", "printed more than 65536 bytes"),
    ("printf '\\377\\n'", "not UTF-8"),
])
async def test_a_failing_command_is_one_line_without_secrets(text: str, needle: str) -> None:
    with pytest.raises(CommandFailed) as caught:
        await run_command(sh(text), "x", "https://old/x", "refused")
    message = str(caught.value)
    assert needle in message and "\n" not in message and "s3cr3t" not in message


async def test_a_program_that_cannot_run() -> None:
    with pytest.raises(CommandFailed, match="cannot be run"):
        await run_command(UrlCommand("/nonexistent/presign", shell=False), "x", "https://o/x",
                          "refused")


def _gone(pid: int) -> bool:
    """``pid`` no longer runs (waits up to 10 s for it to be reaped by init)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


async def test_a_hanging_command_is_killed_with_its_children(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    command = sh(f"sleep 300 & echo $! > {pids}; sleep 300", timeout=0.5)
    with pytest.raises(CommandFailed, match=r"did not finish within 0.5 s \(killed\)"):
        await run_command(command, "x", "https://old/x", "expiring")
    assert _gone(int(pids.read_text()))


async def test_what_a_command_leaves_running_is_killed_and_its_url_taken(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    command = sh(f"sleep 300 & echo $! > {pids}; echo https://new/x")
    assert await run_command(command, "x", "https://old/x", "expiring") == "https://new/x"
    assert _gone(int(pids.read_text()))


def test_parse_output_takes_exactly_one_url() -> None:
    assert parse_output(b"https://a/b?c=d\n", "https://old") == "https://a/b?c=d"
    assert parse_output(b"\r\n http://a:8080/b \r\n", "https://old") == "http://a:8080/b"
    for bad in (b"https://a/b\x01\n", b"https://\n", b"http://a:99999/b\n", b"/b/k\n"):
        with pytest.raises(CommandFailed):
            parse_output(bad, "https://old")


# -- FreshUrl: when the command runs, single flight, bounded ----------------------------------


def counting(calls: Path, url: str) -> UrlCommand:
    """A command that appends a line to ``calls`` and prints ``url`` + a run number."""
    return sh(f'echo "$RANGEFS_REASON" >> {calls}; n=$(wc -l < {calls}); '
              f'echo "{url}$n"')


def runs(calls: Path) -> list[str]:
    return calls.read_text().split() if calls.exists() else []


async def test_an_expired_url_is_replaced_before_the_request(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    past = f"https://h/k?Expires={int(time.time()) - 5}&Signature=s"
    fresh = FreshUrl(past, counting(calls, "https://h/k?sig="), path="k", name="k")
    assert await fresh.current() == "https://h/k?sig=1"
    assert await fresh.current() == "https://h/k?sig=1"  # no expiry now: kept
    assert runs(calls) == ["expiring"]
    later = f"https://h/k?Expires={int(time.time()) + 3600}&Signature=s"
    fresh = FreshUrl(later, counting(tmp_path / "calls2", "https://h/k?sig="), path="k",
                     name="k")
    assert await fresh.current() == later
    assert runs(tmp_path / "calls2") == []


async def test_requests_during_a_run_wait_for_its_url(tmp_path: Path) -> None:
    """None of them goes out with the expired URL while the command runs."""
    calls = tmp_path / "calls"
    past = f"https://h/k?Expires={int(time.time()) - 5}&Signature=s"
    fresh = FreshUrl(past, sh(f"echo run >> {calls}; sleep 0.5; echo https://h/k?sig=1"),
                     path="k", name="k")
    got: list[str] = []

    async def request() -> None:
        got.append(await fresh.current())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        for _ in range(1000):  # until the command runs: the others come then
            if calls.exists():
                break
            await trio.sleep(0.01)
        for _ in range(19):
            nursery.start_soon(request)
    assert got == ["https://h/k?sig=1"] * 20
    assert runs(calls) == ["run"]


async def test_concurrent_refusals_run_the_command_once(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    fresh = FreshUrl("https://h/k?sig=0", counting(calls, "https://h/k?sig="), path="k",
                     name="k")
    got: list[str | None] = []

    async def refused() -> None:
        got.append(await fresh.after_refusal("https://h/k?sig=0"))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(refused)
    assert got == ["https://h/k?sig=1"] * 20
    assert runs(calls) == ["refused"] and fresh.runs == 1


async def test_a_command_that_keeps_giving_dead_urls_does_not_spin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(urlcommand, "MIN_INTERVAL", 60.0)
    monkeypatch.setattr(urlcommand, "WAIT_LIMIT", 0.0)
    calls = tmp_path / "calls"
    fresh = FreshUrl("https://h/k?sig=0", counting(calls, "https://h/k?sig="), path="k",
                     name="k")
    assert await fresh.after_refusal("https://h/k?sig=0") == "https://h/k?sig=1"
    for _ in range(50):  # its URL is refused in turn, again and again
        assert await fresh.after_refusal("https://h/k?sig=1") is None
    assert runs(calls) == ["refused"]
    assert fresh.problem is not None and fresh.problem.startswith(
        "--url-command gave a URL that was refused (it ran 1 time(s); the next run is allowed in")


async def test_a_failed_run_keeps_the_old_url_and_is_not_repeated_at_once(
    tmp_path: Path,
) -> None:
    calls = tmp_path / "calls"
    past = f"https://h/k?Expires={int(time.time()) - 5}&Signature=s"
    fresh = FreshUrl(past, sh(f"echo x >> {calls}; exit 1"), path="k", name="k")
    for _ in range(5):
        assert await fresh.current() == past
    assert len(runs(calls)) == 1
    assert fresh.problem is not None and "exited with status 1" in fresh.problem


# -- the reader and the probe with a fresh URL (in-process fake server) -----------------------


class Signed(FakeServer):
    """The fake origin, serving only URLs whose ``sig`` is in ``valid`` (403 otherwise);
    ``other``: URLs served as another version (another ETag)."""

    def __init__(self) -> None:
        super().__init__()
        self.valid = {"good"}
        self.other: set[str] = set()

    def serve(self, request: httpx.Request) -> httpx.Response:
        sig = request.url.params.get("sig", "")
        if sig not in self.valid:
            return self.respond(403, b"<Error><Code>AccessDenied</Code></Error>",
                                content_length=40)
        if sig in self.other:
            self.etag = '"v2"'
            try:
                return super().serve(request)
            finally:
                self.etag = '"v1"'
        return super().serve(request)


@pytest.fixture
def signed() -> Signed:
    return Signed()


@pytest.fixture
async def session(signed: Signed) -> AsyncIterator[HttpSession]:
    async with HttpSession(HttpOptions(), transport=httpx.MockTransport(signed)) as session:
        yield session
    assert all(s.closed for s in signed.streams)


URL0 = "https://files.example.com/data/obj.bin?sig=old"
URL1 = "https://files.example.com/data/obj.bin?sig=good"


async def read(reader: object, rng: ByteRange) -> bytes:
    async with reader.open_range(rng) as body:  # type: ignore[attr-defined]
        return b"".join([chunk async for chunk in body])


async def test_refused_ranges_take_one_fresh_url(
    session: HttpSession, signed: Signed, tmp_path: Path,
) -> None:
    calls = tmp_path / "calls"
    fresh = FreshUrl(URL0, sh(f"echo refused >> {calls}; echo '{URL1}'"), path="obj.bin",
                     name="obj")
    reader = session.reader(URL0, info(URL0), fresh)
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = await read(reader, ByteRange(i * 100, i * 100 + 99))

    async with trio.open_nursery() as nursery:
        for i in range(SIZE // 100):
            nursery.start_soon(one, i)
    assert b"".join(results[i] for i in range(SIZE // 100)) == DATA
    assert runs(calls) == ["refused"]
    statuses = [(r.url.params.get("sig"), r.method) for r in signed.requests]
    assert ("good", "GET") in statuses
    # once refreshed, every request goes to the fresh URL
    assert await read(reader, ByteRange(0, 9)) == DATA[:10]
    assert signed.requests[-1].url.params["sig"] == "good"


async def test_the_probe_takes_a_fresh_url(session: HttpSession, tmp_path: Path) -> None:
    fresh = FreshUrl(URL0, sh(f"echo '{URL1}'"), path="obj.bin", name="obj")
    probed = await session.probe(URL0, fresh=fresh)
    assert probed.size == SIZE and fresh.url == URL1 and fresh.runs == 1


async def test_a_fresh_url_of_another_version_is_a_changed_remote(
    session: HttpSession, signed: Signed,
) -> None:
    signed.valid.add("other")
    signed.other.add("other")
    other = URL0.replace("old", "other")
    fresh = FreshUrl(URL0, sh(f"echo '{other}'"), path="obj.bin", name="obj")
    reader = session.reader(URL0, info(URL0), fresh)
    with pytest.raises(RemoteChanged):
        await read(reader, ByteRange(0, 99))


async def test_a_refusal_the_command_cannot_cure_says_why(session: HttpSession) -> None:
    fresh = FreshUrl(URL0, sh("echo nope >&2; exit 4"), path="obj.bin", name="obj")
    reader = session.reader(URL0, info(URL0), fresh)
    with pytest.raises(PermanentError) as caught:
        await read(reader, ByteRange(0, 99))
    message = str(caught.value)
    assert "HTTP 403" in message and "--url-command exited with status 4: nope" in message
    assert "sig=old" not in message and caught.value.status == 403


async def test_without_a_command_an_expired_url_says_so(session: HttpSession) -> None:
    expired = f"https://files.example.com/data/obj.bin?Expires={int(time.time()) - 60}" \
              "&Signature=s3cr3t"
    with pytest.raises(PermanentError) as caught:
        await session.probe(expired)
    message = str(caught.value)
    assert "HTTP 403" in message and "the URL expired" in message
    assert "give --url-command CMD" in message and "s3cr3t" not in message
    assert "\n" not in message
    reader = session.reader(expired, info(expired))
    with pytest.raises(PermanentError, match=r"the URL expired .* --url-command"):
        await read(reader, ByteRange(0, 99))


# -- against moto's S3 server ------------------------------------------------------------------

BUCKET = "expiring"
MIB = 1 << 20


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Rig]:
    with S3Rig(tmp_path_factory.mktemp("s3")) as rig:
        yield rig


def _payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _expires_at(url: str) -> float:
    """When the rig's front refuses ``url`` (read here as the front does)."""
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return signed.timestamp() + int(query["X-Amz-Expires"])


def _sleep_until(when: float) -> None:
    while time.time() < when:
        time.sleep(min(0.2, max(0.01, when - time.time())))


def _served(rig: S3Rig, path: str) -> list[tuple[int, int]]:
    """The byte ranges moto served of ``path`` (206 answers; the probe's byte 0-0 left out).
    Fails on a whole-object GET (200): it would fetch cached blocks again."""
    ranges = []
    for request in rig.requests(path):
        if request.method != "GET" or request.refused:
            continue
        assert request.status == 206, request
        assert request.range is not None and request.range.startswith("bytes=")
        start, end = (int(x) for x in request.range[6:].split("-"))
        if (start, end) != (0, 0):
            ranges.append((start, end))
    return ranges


def assert_each_byte_served_once(ranges: list[tuple[int, int]], size: int) -> None:
    """Every byte of the object was served, none twice: nothing cached was fetched again."""
    covered = 0
    last_end = -1
    for start, end in sorted(ranges):
        assert start > last_end, f"bytes {start}-{min(end, last_end)} were served twice"
        covered += end - start + 1
        last_end = end
    assert covered == size


def _read_rest(path: Path, offset: int, chunk: int = 128 << 10) -> bytes:
    parts = []
    with open(path, "rb", buffering=0) as fh:
        while data := os.pread(fh.fileno(), chunk, offset):
            parts.append(data)
            offset += len(data)
    return b"".join(parts)


def test_mount_refreshes_an_expiring_url_ahead_of_time_keeping_its_blocks(
    s3: S3Rig, tmp_path: Path, mnt: Path, cache: Path,
) -> None:
    key, size, head = "mount/ahead.bin", 2 * MIB, 512 << 10
    data = _payload(1, size)
    s3.put(BUCKET, key, data)
    url = s3.presign(BUCKET, key, 6)
    calls = tmp_path / "calls"
    script = s3.presign_script(tmp_path / "presign", expires_in=600, calls=calls)
    urls = write_list(tmp_path / "urls", [f"{url} ahead.bin"])
    with mounted(urls, mnt, "--prefetch", "none", "--url-command", str(script),
                 cache_dir=cache) as mount:
        with open(mnt / "ahead.bin", "rb", buffering=0) as fh:
            assert os.pread(fh.fileno(), head, 0) == data[:head]
        before = _served(s3, f"/{BUCKET}/{key}")
        _sleep_until(_expires_at(url) + 0.5)
        assert _read_rest(mnt / "ahead.bin", head) == data[head:]
        log = mount.stderr()
    assert runs(calls) and set(runs(calls)) <= {"expiring", "ahead.bin"}
    requests = s3.requests(f"/{BUCKET}/{key}")
    assert not [r for r in requests if r.refused], "a read paid a refused request"
    served = _served(s3, f"/{BUCKET}/{key}")
    assert_each_byte_served_once(served, size)
    assert before and served[: len(before)] == before
    late = [r.signature for r in requests if r.method == "GET"][len(before):]
    assert late and parse_qs(urlsplit(url).query)["X-Amz-Signature"][0] not in late
    assert "a fresh URL from --url-command (expiring)" in log
    assert parse_qs(urlsplit(url).query)["X-Amz-Signature"][0] not in log


def test_mount_refreshes_a_refused_url_once_keeping_its_blocks(
    s3: S3Rig, tmp_path: Path, mnt: Path, cache: Path,
) -> None:
    key, size, head = "mount/revoked.bin", 2 * MIB, 768 << 10
    data = _payload(2, size)
    s3.put(BUCKET, key, data)
    url = s3.presign(BUCKET, key, 3600)  # far from expiry: no refresh ahead of time
    calls = tmp_path / "calls"
    script = s3.presign_script(tmp_path / "presign", expires_in=3600, calls=calls)
    urls = write_list(tmp_path / "urls", [f"{url} revoked.bin"])
    try:
        with mounted(urls, mnt, "--prefetch", "none", "-o", f"url_command={script}",
                     cache_dir=cache) as mount:
            with open(mnt / "revoked.bin", "rb", buffering=0) as fh:
                assert os.pread(fh.fileno(), head, 0) == data[:head]
            cutoff = math.ceil(time.time()) + 1  # X-Amz-Date counts whole seconds
            s3.revoke_signed_before(cutoff)
            _sleep_until(cutoff)
            assert _read_rest(mnt / "revoked.bin", head) == data[head:]
            log = mount.stderr()
    finally:
        s3.revoke_signed_before(0)
    assert runs(calls) == ["refused", "revoked.bin"], "one run for every refused request"
    refused = [r for r in s3.requests(f"/{BUCKET}/{key}") if r.refused]
    assert refused and all(r.status == 403 for r in refused)
    assert_each_byte_served_once(_served(s3, f"/{BUCKET}/{key}"), size)
    assert "a fresh URL from --url-command (refused)" in log


def test_download_of_an_expired_url_with_a_command(s3: S3Rig, tmp_path: Path) -> None:
    key, size = "download/obj.bin", 3 * MIB
    data = _payload(3, size)
    s3.put(BUCKET, key, data)
    url = s3.presign(BUCKET, key, 1)
    _sleep_until(_expires_at(url) + 0.5)
    calls = tmp_path / "calls"
    script = s3.presign_script(tmp_path / "presign", expires_in=600, calls=calls)
    dest = tmp_path / "out.bin"
    done = run_user("download", url, str(dest), "--url-command", str(script),
                    "--no-from-mounts", "--block-size", "256K")
    assert done.returncode == 0, done.stderr.decode()
    assert dest.read_bytes() == data
    assert runs(calls) == ["expiring", str(dest)]
    assert_each_byte_served_once(_served(s3, f"/{BUCKET}/{key}"), size)
    assert b"X-Amz-Signature=" not in done.stderr.replace(b"X-Amz-Signature=REDACTED", b"")


def test_cat_whose_url_expires_midway(s3: S3Rig, tmp_path: Path) -> None:
    key, size = "cat/obj.bin", 4 * MIB
    data = _payload(4, size)
    s3.put(BUCKET, key, data)
    url = s3.presign(BUCKET, key, 3)
    calls = tmp_path / "calls"
    script = s3.presign_script(tmp_path / "presign", expires_in=600, calls=calls)
    # one 1 MiB request at a time at 512 KiB/s: requests go on well past the expiry
    done = run_user("cat", url, "--url-command", str(script), "--no-from-mounts",
                    "--concurrency", "1", "--max-rate", "512K")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == data
    assert runs(calls)[::2] and set(runs(calls)[::2]) <= {"expiring", "refused"}
    assert runs(calls)[1] == "obj.bin"
    late = [r for r in s3.requests(f"/{BUCKET}/{key}")
            if r.method == "GET" and r.signature != parse_qs(urlsplit(url).query)[
                "X-Amz-Signature"][0]]
    assert late and all(r.status == 206 for r in late)
    assert_each_byte_served_once(_served(s3, f"/{BUCKET}/{key}"), size)


@pytest.mark.parametrize("command", ["download", "cat"])
def test_without_the_option_an_expired_url_is_one_line(
    s3: S3Rig, tmp_path: Path, command: str,
) -> None:
    key = f"plain/{command}.bin"
    s3.put(BUCKET, key, b"x" * 1000)
    url = s3.presign(BUCKET, key, 1)
    _sleep_until(_expires_at(url) + 0.5)
    args = [command, url] + ([str(tmp_path / "out")] if command == "download" else [])
    done = run_user(*args, "--no-from-mounts")
    assert done.returncode == 1
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("rangefs: ") and "HTTP 403" in lines[0]
    assert "the URL expired" in lines[0] and "give --url-command CMD" in lines[0]
    assert parse_qs(urlsplit(url).query)["X-Amz-Signature"][0] not in lines[0]
    assert done.stdout == b""


def test_mount_without_the_option_logs_that_the_url_expired(
    s3: S3Rig, tmp_path: Path, mnt: Path, cache: Path,
) -> None:
    key = "plain/mount.bin"
    s3.put(BUCKET, key, b"y" * 1000)
    url = s3.presign(BUCKET, key, 1)
    _sleep_until(_expires_at(url) + 0.5)
    urls = write_list(tmp_path / "urls", [f"{url} old.bin"])
    with mounted(urls, mnt, cache_dir=cache, warnings_ok=True) as mount:
        with pytest.raises(OSError) as caught:
            (mnt / "old.bin").read_bytes()
        assert caught.value.errno == errno.EIO
        assert answers(mnt)
        log = mount.stderr()
    lines = [ln for ln in log.splitlines() if "the URL expired" in ln]
    assert lines and all("give --url-command CMD" in ln for ln in lines)
    assert parse_qs(urlsplit(url).query)["X-Amz-Signature"][0] not in log


@pytest.mark.parametrize(("body", "needle"), [
    ('echo "no credentials for $RANGEFS_PATH" >&2; exit 3',
     "--url-command exited with status 3: no credentials for bad.bin"),
    ("echo 'here you go: a fresh URL'", "--url-command printed no usable http(s) URL"),
    ("sleep 300", "--url-command did not finish within 1 s (killed)"),
])
def test_mount_with_a_failing_command_stays_up(
    s3: S3Rig, tmp_path: Path, mnt: Path, cache: Path, body: str, needle: str,
) -> None:
    s3.put(BUCKET, "failing/bad.bin", b"b" * 1000)
    s3.put(BUCKET, "failing/good.bin", b"g" * 1000)
    bad = s3.presign(BUCKET, "failing/bad.bin", 1)
    good = s3.presign(BUCKET, "failing/good.bin", 3600)
    _sleep_until(_expires_at(bad) + 0.5)
    calls = tmp_path / "calls"
    script = tmp_path / "cmd.sh"
    script.write_text(f"#!/bin/sh\necho run >> {calls}\n{body}\n")
    script.chmod(0o755)
    urls = write_list(tmp_path / "urls", [f"{bad} bad.bin", f"{good} good.bin"])
    with mounted(urls, mnt, "--url-command", str(script), "--url-command-timeout", "1",
                 "--read-timeout", "30", cache_dir=cache, warnings_ok=True) as mount:
        for _ in range(3):
            with pytest.raises(OSError) as caught:
                (mnt / "bad.bin").read_bytes()
            assert caught.value.errno == errno.EIO
        assert (mnt / "good.bin").read_bytes() == b"g" * 1000
        assert answers(mnt)
        log = mount.stderr()
    assert needle in log
    # the probe at mount and three reads: each waits for at most one run, and runs back
    # off (1, 2, 4, 8 s apart): far fewer runs than refused requests, however fast they come
    refused = [r for r in s3.requests("/expiring/failing/bad.bin") if r.refused]
    assert 1 <= len(runs(calls)) <= 5 and len(refused) >= 4
    assert parse_qs(urlsplit(bad).query)["X-Amz-Signature"][0] not in log

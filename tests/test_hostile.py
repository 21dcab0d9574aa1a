"""Hostile origins (issue 5, "Behaviour required" 1-4): transient faults, Retry-After,
permanent faults, answers that must never be cached, servers without Range, redirects,
refused HEADs and remotes that change.

Each behaviour is proven through the object layer (``ObjectStore``, no kernel) where
tests/test_objects.py, tests/test_source.py and tests/test_http_download.py do not already
cover it, and through ``os.pread`` on a real mount (tests/mountutil.py) against the fault
origin (tests/faultserver.py). Timing assertions compare the origin's request log (when a
request arrived) with what the origin advertised; durations are only bounded generously.
"""

from __future__ import annotations

import errno
import math
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path, PurePosixPath
from typing import TypeVar, cast

import pytest
import trio

from rangefs.errors import PermanentError, RemoteChanged, RetriesExhausted
from rangefs.objects import MountedObject, Prefetch
from rangefs.ratecontrol import BackoffPolicy
from rangefs.source import HttpOptions
from rangefs.urllist import Entry
from tests.content import check, content
from tests.faultserver import Fault, FaultServer, Request, http_date
from tests.mountutil import Mount, is_mounted, mounted, write_list
from tests.test_objects import read_all
from tests.test_objects import running as running_store

BS = 64 << 10
FAST = BackoffPolicy(initial=0.01, maximum=0.05, steps=8)
SLACK = 0.05
"""Seconds a request may arrive before an advertised time: clock granularity, no more."""
HANG_GUARD = 60.0
"""Seconds a blocking call on a mount may take before the test fails: a hang, not a speed."""
T = TypeVar("T")


# -- helpers ----------------------------------------------------------------------------


def entry(server: FaultServer, path: str, size: int | None = None) -> Entry:
    return Entry(url=server.url(path), path=PurePosixPath(path.strip("/")), digest=None,
                 size=size, line=1)


@asynccontextmanager
async def running(entries: list[Entry], cache_dir: Path,
                  **kw: object) -> AsyncIterator[Callable[[Entry], MountedObject]]:
    """test_objects.running with this module's retries and no background fill."""
    kw.setdefault("backoff", FAST)
    kw.setdefault("prefetch", Prefetch.NONE)
    async with running_store(entries, cache_dir, **kw) as get:
        yield get


def whole_answers(server: FaultServer, path: str) -> list[Request]:
    """GETs of ``path`` answered 200 (the whole object)."""
    return [r for r in server.gets(path) if r.status == 200]


def check_one_stream(server: FaultServer, path: str, size: int) -> None:
    """``path``'s server ignored every Range: the object was read by exactly one
    whole-object stream, no range request was sent once the stream had started, and only
    one range was ever asked for twice (the one refusal that is retried as a fluke; the
    other refusals are requests that were on their way concurrently)."""
    gets = server.gets(path)
    streams = [r for r in gets if r.range == f"bytes=0-{size - 1}"]
    assert len(streams) == 1, [r.range for r in gets]
    ranged = [r for r in gets if r is not streams[0]]
    late = [r.range for r in ranged if r.time > streams[0].time + 0.1]
    assert not late, f"range requests after the stream started: {late}"
    assert len(ranged) - len({r.range for r in ranged}) <= 1, [r.range for r in ranged]


def after(requests: list[Request], when: float) -> list[Request]:
    return [r for r in requests if r.time > when]


def wall_offset() -> float:
    """time.time() - time.monotonic(): turns the request log's times into epoch seconds."""
    return time.time() - time.monotonic()


def pread_all(path: Path, key: str, chunk: int = 200_000) -> int:
    """Read ``path`` front to back with os.pread, checking every piece; returns the size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for offset in range(0, size, chunk):
            data = os.pread(fd, chunk, offset)
            assert len(data) == min(chunk, size - offset)
            check(key, offset, data)
        assert os.pread(fd, 10, size) == b""
        return size
    finally:
        os.close(fd)


def pread_errno(path: Path, offset: int, length: int) -> int:
    """The errno of an open + os.pread of ``path`` that must fail (either may)."""
    with pytest.raises(OSError) as info:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.pread(fd, length, offset)
        finally:
            os.close(fd)
    return info.value.errno or 0


def within(seconds: float, call: Callable[[], T]) -> T:
    """``call()`` in a daemon thread: what it returns, or what it raised raised again; fails
    the test if it is still running after ``seconds`` (a hang guard only, never a speed
    figure: a FUSE request that never returns cannot hang the test, and the mount's
    teardown frees the thread)."""
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # raised again below
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still blocked after {seconds:g} s"
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return cast(T, value)


def eio_causes(log: str) -> list[str]:
    """The error class behind each request the mount failed with EIO (its log lines)."""
    return re.findall(r"failed with EIO: (\w+):", log)


def wait_for_version(path: Path, keys: tuple[str, str], timeout: float = 20.0) -> None:
    """Read ``path`` whole, again and again, until every read returns the new version
    (``keys[1]``): the object layer switches in the background, and until then a read is
    EIO or the old version's cached bytes, never a mix (each pread is one version, and
    within one open file the old never follows the new)."""
    old, new = keys
    deadline = time.monotonic() + timeout
    while True:
        seen: list[str] = []
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                offset = 0
                while offset < size:
                    # short when the kernel had a part in its page cache and the rest failed
                    data = os.pread(fd, 200_000, offset)
                    assert data, (offset, size)
                    seen.append(one_key(data, offset, keys))
                    offset += len(data)
            finally:
                os.close(fd)
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
        assert old not in seen[seen.index(new):] if new in seen else True, seen
        if seen and set(seen) == {new}:
            return
        assert time.monotonic() < deadline, f"{path} still not {new}: {seen}"
        time.sleep(0.1)


def one_key(data: bytes, offset: int, keys: tuple[str, ...]) -> str:
    """The one key among ``keys`` whose content ``data`` is at ``offset`` (fails if none
    or several: a read must be the bytes of exactly one version)."""
    matching = [k for k in keys if content(k, offset, len(data)) == data]
    assert len(matching) == 1, f"{len(data)} bytes at {offset} match {matching} of {keys}"
    return matching[0]


@contextmanager
def mount_of(tmp_path: Path, mnt: Path, cache: Path, lines: list[str], *args: str,
             warnings_ok: bool = True) -> Iterator[Mount]:
    urls = write_list(tmp_path / "hostile.urls", lines)
    with mounted(urls, mnt, "--block-size", "64K", *args, cache_dir=cache,
                 warnings_ok=warnings_ok) as mount:
        yield mount
        assert is_mounted(mnt)


# -- the object layer (no kernel) --------------------------------------------------------

TRANSIENT = {
    "500": Fault("status", status=500),
    "502": Fault("status", status=502),
    "503": Fault("status", status=503),
    "504": Fault("status", status=504),
    "429": Fault("status", status=429),
    "reset": Fault("reset"),
    "reset_body": Fault("reset_body", after=BS + 1000),
    "short_body": Fault("short_body", after=3000),
    "stall": Fault("stall", after=BS // 2, seconds=30),  # longer than the read timeout
    "wrong_length+": Fault("wrong_length", delta=1),
    "wrong_length-": Fault("wrong_length", delta=-1),
    "gzip": Fault("gzip"),
    # bodies without Content-Length whose length disagrees with their Content-Range, and
    # a transfer coding other than chunked: refused whole, before a byte is stored
    "overlong_body": Fault("overlong_body", delta=BS),
    "overlong_body+1": Fault("overlong_body", delta=1),
    "undeclared_short": Fault("undeclared_short", after=1),
    "te_gzip": Fault("te_gzip"),
    "wrong_start+": Fault("wrong_start", delta=BS),
    "wrong_start-": Fault("wrong_start", delta=-1),
    "wrong_total": Fault("wrong_total", delta=BS),  # same ETag, another total
    "wrong_total-": Fault("wrong_total", delta=-1),
}


@pytest.mark.parametrize("name", list(TRANSIENT))
async def test_transient_faults_are_retried_and_never_cached(
    origin: FaultServer, tmp_path: Path, name: str
) -> None:
    """Each fault, twice, on the GETs of a demand read inside the object: retried, and the
    bytes are exact, so no byte of a bad answer was cached (and no block is written twice)."""
    size = 6 * BS + 777
    origin.add("/a", size)
    e = entry(origin, "/a")
    fault = TRANSIENT[name]
    async with running([e], tmp_path, http=HttpOptions(read_timeout=0.5)) as get:
        obj = get(e)
        await obj.attrs()
        origin.faults("/a", [Fault.of({**vars(fault), "method": "GET"})] * 2)
        handle = await obj.open()
        check("/a", 2 * BS + 5, await handle.read(2 * BS + 5, 2 * BS))
        handle.release()
        assert origin.gets("/a")[0].range == f"bytes={2 * BS}-{5 * BS - 1}"
        check("/a", 0, await read_all(obj, chunk=size))
        assert origin.pending_faults("/a") == []
        version = obj._version
        assert version is not None
        assert version.fetcher.stats.blocks_written == version.cache.num_blocks
        # a reset before any answer byte on a reused keep-alive connection looks like one
        # the server closed while idle: the HTTP client retries that once by itself
        assert version.fetcher.stats.retries >= (1 if name == "reset" else 2)
    faulted = [r for r in origin.gets("/a") if r.fault is not None]
    assert len(faulted) == 2


@pytest.mark.parametrize(
    ("status", "form"), [(503, "seconds"), (429, "seconds"), (503, "date"), (429, "date")]
)
async def test_retry_after_is_honoured(
    origin: FaultServer, tmp_path: Path, status: int, form: str
) -> None:
    """No GET of the object before the time the server advertised (request log times),
    although the exponential backoff alone would retry within 50 ms."""
    origin.add("/a", 8 * BS)
    origin.add("/b", 8 * BS)
    a, b = entry(origin, "/a"), entry(origin, "/b")
    async with running([a, b], tmp_path, prefetch=Prefetch.OPEN, concurrency=4) as get:
        await get(a).attrs()
        offset = wall_offset()
        if form == "seconds":
            retry_after: str = "2"
            not_before = time.monotonic() + 2  # at least: counted from the answer
        else:
            epoch = math.ceil(time.time()) + 3
            retry_after = http_date(epoch)
            not_before = epoch - offset
        origin.faults("/a", [Fault("status", status=status, retry_after=retry_after,
                                   method="GET")])
        with trio.fail_after(HANG_GUARD):  # a hang guard: the wait is checked below
            check("/a", 0, await read_all(get(a)))
        check("/b", 0, await read_all(get(b)))  # another object is not held
    gets = origin.gets("/a")
    faulted = [r for r in gets if r.fault == "status"]
    assert len(faulted) == 1 and faulted[0].status == status
    if form == "seconds":
        not_before = faulted[0].time + 2
    early = [r for r in after(gets, faulted[0].time + 0.5) if r.time < not_before - SLACK]
    assert not early, [(r.range, r.time - faulted[0].time) for r in early]
    assert after(gets, not_before - SLACK), "no GET after the advertised time"


async def test_retry_after_on_the_probe_is_honoured(origin: FaultServer, tmp_path: Path) -> None:
    """A HEAD answered 503 with Retry-After: the probe asks again, not before that time."""
    origin.add("/a", 3 * BS)
    e = entry(origin, "/a")
    origin.faults("/a", [Fault("status", status=503, retry_after=1, method="HEAD")])
    async with running([e], tmp_path) as get:
        assert (await get(e).attrs()).size == 3 * BS
    first, second = origin.requests("/a", "HEAD")
    assert first.status == 503 and second.status == 200
    assert second.time - first.time >= 1 - SLACK


@pytest.mark.parametrize("retry_after", ["999999999", "Fri, 01 Jan 2100 00:00:00 GMT"])
async def test_retry_after_is_capped(origin: FaultServer, tmp_path: Path, retry_after: str) -> None:
    """A huge Retry-After is honoured only up to the cap (BackoffPolicy.retry_after_cap and
    HttpOptions.retry_after_cap; 120 s by default)."""
    origin.add("/a", 4 * BS)
    e = entry(origin, "/a")
    cap = 1.0
    backoff = BackoffPolicy(initial=0.01, maximum=0.05, steps=8, retry_after_cap=cap)
    async with running([e], tmp_path, backoff=backoff,
                       http=HttpOptions(retry_after_cap=cap)) as get:
        await get(e).attrs()
        origin.faults("/a", [Fault("status", status=503, retry_after=retry_after, method="GET")])
        with trio.fail_after(15):
            check("/a", 0, await read_all(get(e)))
    first, second = origin.gets("/a")[:2]
    assert first.status == 503 and second.status == 206
    assert second.time - first.time >= cap - SLACK


@pytest.mark.parametrize("status", [404, 410, 403])
async def test_permanent_fault_mid_way(origin: FaultServer, tmp_path: Path, status: int) -> None:
    """A permanent status after part of the object was read: a clear PermanentError at once
    (no retry, no waiting for the read timeout); cached blocks still read; others work."""
    origin.add("/a", 16 * BS)
    origin.add("/b", 4 * BS)
    a, b = entry(origin, "/a"), entry(origin, "/b")
    async with running([a, b], tmp_path, read_timeout=30) as get:
        handle = await get(a).open()
        check("/a", 0, await handle.read(0, 4 * BS))
        origin.fault_probability("/a", 1.0, [Fault("status", status=status, method="GET")])
        for _ in range(2):
            with trio.fail_after(5), pytest.raises(PermanentError, match=f"HTTP {status}"):
                await handle.read(8 * BS, BS)
        check("/a", BS, await handle.read(BS, BS))  # cached: served
        check("/b", 0, await read_all(get(b)))
    failed = [r for r in origin.gets("/a") if r.status == status]
    assert len(failed) == 2  # one request per read: never retried


async def test_server_without_range_support_is_read_by_one_stream(
    origin: FaultServer, tmp_path: Path
) -> None:
    """accept_ranges=False: reads at the end wait for the one sequential fill; every byte is
    right; two whole-object answers (the probe's and the fill's), also for a sequential
    reader from the start (whose read-ahead must not ask for ranges)."""
    size = 100 * BS + 5
    origin.add("/a", size, accept_ranges=False)
    origin.add("/b", size, accept_ranges=False)
    a, b = entry(origin, "/a"), entry(origin, "/b")
    async with running([a, b], tmp_path) as get:
        handle = await get(a).open()
        for offset in (size - 10, 17 * BS + 3, 0, 39 * BS):
            check("/a", offset, await handle.read(offset, 2 * BS))
        check("/a", 0, await read_all(get(a)))
        check("/b", 0, await read_all(get(b)))
    for path in ("/a", "/b"):
        assert len(whole_answers(origin, path)) <= 2, [r.range for r in origin.gets(path)]
        assert all(r.status == 200 for r in origin.gets(path))


async def test_server_ignoring_range_is_detected(origin: FaultServer, tmp_path: Path) -> None:
    """A server that advertises ranges but answers every GET with 200 whole: detected, and
    the object is read by one sequential fill."""
    size = 40 * BS + 5
    origin.add("/a", size)
    e = entry(origin, "/a")
    async with running([e], tmp_path) as get:
        handle = await get(e).open()
        origin.fault_probability("/a", 1.0, [Fault("ignore_range", method="GET")])
        for offset in (size - 10, 17 * BS + 3, 0, 39 * BS):
            check("/a", offset, await handle.read(offset, 2 * BS))
        check("/a", 0, await read_all(get(e)))
    check_one_stream(origin, "/a", size)


async def test_background_fill_switches_to_the_stream(
    origin: FaultServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The background fill is what finds out that the server ignores Range: it goes on with
    the one sequential stream (it does not stop with an error) and completes the object."""
    size = 100 * BS + 1  # more than one background request (4 MiB)
    origin.add("/a", size)
    origin.fault_probability("/a", 1.0, [Fault("ignore_range", method="GET")])
    e = entry(origin, "/a")
    # 'all': the fill starts at mount time, before any reader could find it out
    async with running([e], tmp_path, prefetch=Prefetch.ALL, concurrency=1) as get:
        obj = get(e)
        with trio.fail_after(20):
            while obj.xattrs().get("user.rangefs.blocks_cached", b"0") == b"0":  # noqa: ASYNC110
                await trio.sleep(0.01)
        handle = await obj.open()
        with trio.fail_after(20):
            while obj.xattrs()["user.rangefs.complete"] != b"1":  # noqa: ASYNC110 - no event
                await trio.sleep(0.01)
        check("/a", 0, await handle.read(0, size))
        handle.release()
    assert "background fill stopped" not in caplog.text
    check_one_stream(origin, "/a", size)


async def test_cross_origin_redirect_drops_credentials(
    origin: FaultServer, origin_factory: Callable[[], FaultServer], tmp_path: Path
) -> None:
    other = origin_factory()
    other.add("/b", 5 * BS + 1)
    origin.add("/a", 3 * BS)
    origin.redirect("/same", "/a")
    origin.redirect("/cross", other.url("/b"))
    same, cross = entry(origin, "/same"), entry(origin, "/cross")
    http = HttpOptions(headers=(("Authorization", "Bearer SECRET"),))
    async with running([same, cross], tmp_path, http=http) as get:
        check("/a", 0, await read_all(get(same)))
        check("/b", 0, await read_all(get(cross)))
    assert other.log and all("authorization" not in r.headers for r in other.log)
    assert all("SECRET" not in v for r in other.log for v in r.headers.values())
    assert all(r.headers.get("authorization") == "Bearer SECRET" for r in origin.log)


async def test_redirect_to_an_object_of_another_size(
    origin: FaultServer, tmp_path: Path
) -> None:
    """The pinned target goes away and the redirect now names another object (other size,
    other ETag): the old handle fails, a new open reads the new object; never a mix."""
    origin.add("/a", 10 * BS, etag='"a"')
    origin.add("/b", 7 * BS + 5, etag='"b"')
    origin.redirect("/r", "/a")
    e = entry(origin, "/r")
    async with running([e], tmp_path) as get:
        obj = get(e)
        handle = await obj.open()
        check("/a", 0, await handle.read(0, 2 * BS))
        origin.redirect("/r", "/b")
        origin.remove("/a")
        with pytest.raises(RemoteChanged):
            await handle.read(5 * BS, BS)
        with trio.fail_after(10):
            while True:
                try:
                    data = await read_all(obj)
                    break
                except RemoteChanged:
                    await trio.sleep(0.02)
        assert len(data) == 7 * BS + 5
        check("/b", 0, data)


async def test_redirect_to_another_size_with_the_same_etag(
    origin: FaultServer, tmp_path: Path
) -> None:
    """The same, but the new target carries the same strong ETag (a broken origin): its
    206 names another total for that ETag, which is refused as a bad answer (retried, then
    a clear error); the cached bytes of the old object stay readable, never mixed."""
    origin.add("/a", 10 * BS)  # both '"v1"'
    origin.add("/b", 7 * BS + 5)
    origin.redirect("/r", "/a")
    e = entry(origin, "/r")
    async with running([e], tmp_path) as get:
        handle = await get(e).open()
        check("/a", 0, await handle.read(0, 2 * BS))
        origin.redirect("/r", "/b")
        origin.remove("/a")
        with pytest.raises(RetriesExhausted, match="contradicts the size"):
            await handle.read(5 * BS, BS)
        check("/a", BS, await handle.read(BS, BS))


# -- through the kernel: os.pread on a real mount ---------------------------------------

def mount_transient() -> dict[str, list[Fault]]:
    """Object name -> the faults queued on its GETs."""
    return {
        "s500": [Fault("status", status=500), Fault("status", status=502),
                 Fault("status", status=504)],
        "s503": [Fault("status", status=503, retry_after=1), Fault("status", status=503)],
        "s429": [Fault("status", status=429, retry_after=http_date(time.time() + 1))],
        "reset": [Fault("reset"), Fault("reset")],
        "reset_body": [Fault("reset_body", after=BS + 5), Fault("reset_body")],
        "short_body": [Fault("short_body", after=100), Fault("short_body")],
        "stall": [Fault("stall", after=1000, seconds=1.5)],  # shorter than the timeouts
        "wrong_length": [Fault("wrong_length", delta=1), Fault("wrong_length", delta=-7)],
        "gzip": [Fault("gzip"), Fault("gzip")],
        "wrong_start": [Fault("wrong_start", delta=BS), Fault("wrong_start", delta=-3)],
        "wrong_total": [Fault("wrong_total", delta=BS), Fault("wrong_total", delta=-1)],
    }


def test_mount_transient_faults_are_retried(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """One object per kind of fault, its faults queued on its GETs: every pread is exact
    and every fault was met."""
    size = 12 * BS + 4321
    names = list(mount_transient())
    for name in names:
        origin.add(f"/{name}", size)
    lines = [f"{origin.url('/' + name)} {name} size={size}" for name in names]
    with mount_of(tmp_path, mnt, cache, lines, "--prefetch", "none", "--read-timeout", "30"):
        for name, faults in mount_transient().items():
            origin.faults(f"/{name}", [Fault.of({**vars(f), "method": "GET"}) for f in faults])
        for name in names:
            assert pread_all(mnt / name, f"/{name}", chunk=3 * BS + 1) == size
            assert origin.pending_faults(f"/{name}") == [], name


def test_mount_retry_after_is_honoured(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """503 with Retry-After seconds and 429 with an HTTP-date while a reader and the
    background fill both want blocks: no GET of that object arrives (later than the
    requests already on their way) before the advertised time; the reads are exact."""
    size = 48 * BS
    origin.add("/sec", size)
    origin.add("/date", size)
    lines = [origin.url("/sec"), origin.url("/date")]
    with mount_of(tmp_path, mnt, cache, lines, "--read-timeout", "30", "--concurrency", "4"):
        os.stat(mnt / "sec")
        os.stat(mnt / "date")
        offset = wall_offset()
        origin.faults("/sec", [Fault("status", status=503, retry_after=2, method="GET")])
        epoch = math.ceil(time.time()) + 3
        origin.faults("/date", [Fault("status", status=429, retry_after=http_date(epoch),
                                      method="GET")])
        threads = [threading.Thread(target=pread_all, args=(mnt / n, f"/{n}"))
                   for n in ("sec", "date")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        pread_all(mnt / "sec", "/sec")
        pread_all(mnt / "date", "/date")
    for path, not_before in (("/sec", None), ("/date", epoch - offset)):
        gets = origin.gets(path)
        faulted = [r for r in gets if r.fault == "status"]
        assert len(faulted) == 1, path
        when = faulted[0].time
        if not_before is None:
            not_before = when + 2
        early = [r for r in after(gets, when + 0.5) if r.time < not_before - SLACK]
        assert not early, (path, [(r.range, r.time - when) for r in early])
        assert after(gets, not_before - SLACK), path


def test_mount_huge_retry_after_fails_the_read_in_bounded_time(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """Retry-After far beyond --read-timeout: EIO when the read timeout passes (the mount
    caps Retry-After at 120 s, so the object is held at most that long); the mount stays
    up and another file reads."""
    origin.add("/held", 4 * BS)
    origin.add("/free", 4 * BS)
    lines = [origin.url("/held"), origin.url("/free")]
    args = ("--read-timeout", "2", "--prefetch", "none")  # one flight gets the 503
    with mount_of(tmp_path, mnt, cache, lines, *args) as mount:
        os.stat(mnt / "held")
        origin.faults("/held", [Fault("status", status=503, retry_after=10**9, method="GET")])
        assert within(HANG_GUARD, lambda: pread_errno(mnt / "held", 0, 100)) == errno.EIO
        # what ended the wait: --read-timeout (2 s), long before the capped Retry-After
        assert re.search(r"failed with EIO: ReadTimeout: .*after 2 s", mount.stderr())
        assert set(eio_causes(mount.stderr())) == {"ReadTimeout"}
        faulted = [r for r in origin.gets("/held") if r.fault == "status"]
        assert len(faulted) == 1
        # held: nothing but requests that were already on their way
        assert not after(origin.gets("/held"), faulted[0].time + 0.5)
        assert pread_all(mnt / "free", "/free") == 4 * BS
        assert "retry after 120 s" in mount.stderr()


def test_mount_cp_256mib_with_faults_on_20_percent_of_requests(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    size = 256 << 20
    origin.add("/big", size)
    kinds = [
        Fault("status", status=503, method="GET"),
        Fault("status", status=500, method="GET"),
        Fault("status", status=502, method="GET"),
        Fault("status", status=504, method="GET"),
        Fault("status", status=429, retry_after=0, method="GET"),
        Fault("reset", method="GET"),
        Fault("reset_body", method="GET"),
        Fault("short_body", method="GET"),
        Fault("stall", seconds=0.3, method="GET"),
        Fault("wrong_length", method="GET"),
        Fault("gzip", method="GET"),
        Fault("wrong_start", delta=4096, method="GET"),
        Fault("wrong_total", method="GET"),
        Fault("ignore_range", method="GET"),
    ]
    lines = [origin.url("/big")]
    urls = write_list(tmp_path / "big.urls", lines)
    with mounted(urls, mnt, "--block-size", "1M", "--read-timeout", "60", cache_dir=cache,
                 warnings_ok=True):
        os.stat(mnt / "big")
        origin.fault_probability("/big", 0.2, kinds, seed=5)
        out = tmp_path / "copy"
        start = time.monotonic()
        subprocess.run(["cp", str(mnt / "big"), str(out)], check=True, timeout=120)
        elapsed = time.monotonic() - start
        with open(out, "rb") as fh:
            for pos in range(0, size, 16 << 20):
                check("/big", pos, fh.read(16 << 20))
        assert out.stat().st_size == size
    faulted = [r for r in origin.gets("/big") if r.fault is not None]
    assert len(faulted) >= 5, len(faulted)
    assert len({r.fault for r in faulted}) >= 4, {r.fault for r in faulted}
    print(f"256 MiB cp: {elapsed:.1f} s, {len(origin.gets('/big'))} GETs, "
          f"{len(faulted)} faulted")


def test_mount_permanent_faults_give_eio_quickly(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """404, 410 and 403 after part of each object was read: EIO well within the read
    timeout, again on the next read; the cached part still reads; the mount stays up and
    another file reads."""
    size = 16 * BS
    statuses = (404, 410, 403)
    for status in statuses:
        origin.add(f"/p{status}", size)
    origin.add("/ok", size)
    lines = [origin.url(f"/p{s}") for s in statuses] + [origin.url("/ok")]
    timeout = 20.0
    args = ("--prefetch", "none", "--read-timeout", str(timeout))
    with mount_of(tmp_path, mnt, cache, lines, *args) as mount:
        fds = {s: os.open(mnt / f"p{s}", os.O_RDONLY) for s in statuses}
        try:
            for status, fd in fds.items():
                check(f"/p{status}", 0, os.pread(fd, 2 * BS, 0))
                origin.fault_probability(f"/p{status}", 1.0,
                                         [Fault("status", status=status, method="GET")])
            for status, fd in fds.items():
                for offset in (8 * BS, 12 * BS + 5):

                    def pread(fd: int = fd, offset: int = offset) -> bytes:
                        return os.pread(fd, BS, offset)

                    with pytest.raises(OSError) as info:
                        within(HANG_GUARD, pread)
                    assert info.value.errno == errno.EIO
                check(f"/p{status}", 100, os.pread(fd, BS, 100))  # cached: still served
        finally:
            for fd in fds.values():
                os.close(fd)
        assert pread_all(mnt / "ok", "/ok") == size
        log = mount.stderr()
        # quickly: the first answer ends each read (no retry, no waiting for the timeout)
        assert eio_causes(log) and set(eio_causes(log)) == {"PermanentError"}, log
        for status in statuses:
            assert f"HTTP {status}" in log
            assert not [ln for ln in log.splitlines()
                        if f"/p{status}" in ln and "retrying in" in ln], log
            assert all(r.fault is not None for r in after(origin.gets(f"/p{status}"), 0)
                       if r.status == status)


def test_mount_server_without_range(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """An object on a server without Range support (no Accept-Ranges, 200 whole to every
    GET) and one whose server advertises ranges but ignores them: reads far ahead of the
    front wait for the one sequential fill, every byte is right, and the whole object is
    sent a bounded number of times."""
    size = 80 * BS + 17
    origin.add("/norange", size, accept_ranges=False)
    origin.add("/ignores", size)
    origin.fault_probability("/ignores", 1.0, [Fault("ignore_range", method="GET")])
    origin.add("/flaky", size, accept_ranges=False)
    lines = [origin.url("/norange"), origin.url("/ignores"), origin.url("/flaky")]
    args = ("--read-timeout", "30", "--prefetch", "none")
    with mount_of(tmp_path, mnt, cache, lines, *args) as mount:
        # a sequential reader from the start: its read-ahead must not ask for ranges
        assert pread_all(mnt / "norange", "/norange") == size
        fd = os.open(mnt / "ignores", os.O_RDONLY)
        try:  # far ahead first: these reads wait for the stream's front
            for offset in (size - 100, 41 * BS + 7, 3, 79 * BS):
                check("/ignores", offset, os.pread(fd, 2 * BS, offset))
        finally:
            os.close(fd)
        assert pread_all(mnt / "ignores", "/ignores") == size
        assert "ignores Range" in mount.stderr()
        # without Range, a broken stream starts again from byte 0 (writing only what is
        # missing): transient faults still end in exact bytes
        os.stat(mnt / "flaky")
        origin.faults("/flaky", [Fault("reset_body", after=5 * BS + 7, method="GET"),
                                 Fault("status", status=503, method="GET"),
                                 Fault("short_body", after=50 * BS, method="GET")])
        assert pread_all(mnt / "flaky", "/flaky") == size
        assert origin.pending_faults("/flaky") == []
    norange = whole_answers(origin, "/norange")
    assert len(norange) <= 2, [r.range for r in norange]  # the probe's, the fill's
    check_one_stream(origin, "/ignores", size)


def test_mount_redirects_and_credentials(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer,
    origin_factory: Callable[[], FaultServer],
) -> None:
    """Same-origin and cross-origin redirects read the right bytes; the Authorization
    header reaches the first origin and never the second; a redirect loop and a chain
    longer than the limit give EIO (also a stat without size=N); the mount stays up."""
    other = origin_factory()
    other.add("/far/b", 9 * BS + 3)
    origin.add("/a", 7 * BS + 1)
    origin.redirect("/same", "/a")
    origin.redirect("/cross", other.url("/far/b"), status=307)
    origin.redirect("/loop1", "/loop2")
    origin.redirect("/loop2", "/loop1")
    for i in range(12):
        origin.redirect(f"/chain{i}", f"/chain{i + 1}")
    origin.add("/chain12", 100)
    lines = [
        origin.url("/same") + " same",
        origin.url("/cross") + " cross",
        origin.url("/loop1") + " loop",
        origin.url("/loop1") + f" loop-sized size={BS}",
        origin.url("/chain0") + " chain size=100",
    ]
    args = ("--header", "Authorization: Bearer SECRET", "--read-timeout", "20")
    with mount_of(tmp_path, mnt, cache, lines, *args) as mount:
        assert pread_all(mnt / "same", "/a") == 7 * BS + 1
        assert pread_all(mnt / "cross", "/far/b") == 9 * BS + 3
        with pytest.raises(OSError) as info:
            within(HANG_GUARD, lambda: os.stat(mnt / "loop"))
        assert info.value.errno == errno.EIO
        assert within(HANG_GUARD, lambda: pread_errno(mnt / "loop-sized", 0, 10)) == errno.EIO
        assert within(HANG_GUARD, lambda: pread_errno(mnt / "chain", 0, 10)) == errno.EIO
        assert "redirect loop" in mount.stderr()
        assert "more than 10 redirects" in mount.stderr()
        # at once: each is a permanent error (not retried, not waited out until the read
        # timeout), and the loop was followed once per request, not again and again
        log = mount.stderr()
        assert set(eio_causes(log)) == {"PermanentError"}, log
        assert not [ln for ln in log.splitlines()
                    if "retrying in" in ln and ("/loop" in ln or "/chain" in ln)], log
        loops = [r for r in origin.log if r.path in ("/loop1", "/loop2")]
        # loop1 -> loop2 -> loop1 is 2 requests; 3 requests failed (twice if the kernel
        # asks again): 6 seen here, not the dozens of a loop retried until the timeout
        assert len(loops) <= 2 * 3 * 2, [(r.method, r.path) for r in loops]
        assert pread_all(mnt / "same", "/a") == 7 * BS + 1  # still up
    assert other.gets("/far/b")
    for req in other.log:
        assert "authorization" not in req.headers, req
        assert not any("SECRET" in v for v in req.headers.values()), req
    assert origin.log and all(r.headers.get("authorization") == "Bearer SECRET"
                              for r in origin.log)
    assert not origin.requests("/chain11")  # the limit stops the chain


def test_mount_redirect_to_an_object_of_another_size(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """The redirect's target changes to an object of another size (and the old target goes
    away): every read is EIO or the right bytes of one object, never a mix; a new open
    reads the new object whole, with its size."""
    old_size, new_size = 20 * BS, 13 * BS + 9
    origin.add("/old", old_size, etag='"old"')
    origin.add("/new", new_size, etag='"new"')
    origin.redirect("/r", "/old")
    lines = [origin.url("/r") + " r"]
    with mount_of(tmp_path, mnt, cache, lines, "--prefetch", "none") as mount:
        fd = os.open(mnt / "r", os.O_RDONLY)
        try:
            check("/old", 0, os.pread(fd, 3 * BS, 0))
            origin.redirect("/r", "/new")
            origin.remove("/old")
            for offset in (10 * BS, 2 * BS, 15 * BS - 7, 0):
                try:
                    data = os.pread(fd, 2 * BS, offset)
                except OSError as exc:
                    assert exc.errno == errno.EIO
                    continue
                one_key(data, offset, ("/old", "/new"))
        finally:
            os.close(fd)
        deadline = time.monotonic() + 20
        while os.stat(mnt / "r").st_size != new_size:
            assert time.monotonic() < deadline, "the new size never showed"
            time.sleep(0.05)
        assert pread_all(mnt / "r", "/new") == new_size
        assert "changed" in mount.stderr()


def test_mount_head_refused_or_without_length(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """HEAD answered 403 or 405, or without Content-Length: the probe falls back to a
    ranged GET; the size and every byte are right."""
    sizes = {"/h403": 5 * BS + 11, "/h405": 3 * BS, "/nolen": 6 * BS + 1, "/flaky": 2 * BS}
    origin.add("/h403", sizes["/h403"], head_status=403)
    origin.add("/h405", sizes["/h405"], head_status=405)
    origin.add("/nolen", sizes["/nolen"], content_length=False)
    origin.add("/flaky", sizes["/flaky"])
    origin.faults("/flaky", [Fault("reset", method="HEAD"),
                             Fault("status", status=503, retry_after=0, method="HEAD")])
    lines = [origin.url(p) for p in sizes]
    with mount_of(tmp_path, mnt, cache, lines, warnings_ok=False):
        for path, size in sizes.items():
            assert os.stat(mnt / path.lstrip("/")).st_size == size
            assert pread_all(mnt / path.lstrip("/"), path) == size
    for path in ("/h403", "/h405", "/nolen"):
        heads = origin.requests(path, "HEAD")
        assert len(heads) == 1
        probe = origin.gets(path)[0]
        assert probe.range == "bytes=0-0" and probe.status == 206
    assert len(origin.requests("/flaky", "HEAD")) == 3  # a transient HEAD failure is retried


def _versioned_reader(path: Path, keys: tuple[str, str], offsets: list[int], chunk: int,
                      out: list[tuple[int, str]], errors: list[BaseException],
                      deadline: float) -> None:
    """pread ``chunk`` bytes at each of ``offsets`` (retrying one after an EIO with a new
    open); record (offset, key) of every read, "EIO" for a failed one. Each read must be
    the bytes of exactly one of ``keys``."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in offsets:
                while True:
                    assert time.monotonic() < deadline, f"{path} not read within the deadline"
                    try:
                        data = os.pread(fd, chunk, offset)
                        break
                    except OSError as exc:
                        assert exc.errno == errno.EIO, exc
                        out.append((offset, "EIO"))
                        os.close(fd)
                        fd = os.open(path, os.O_RDONLY)
                assert data, offset
                out.append((offset, one_key(data, offset, keys)))
        finally:
            os.close(fd)
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def test_mount_remote_changes_mid_download(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """While readers read two objects (one with an ETag, one with only Last-Modified, which
    also grows), the origin switches both to a new version. Every pread returns the bytes
    of exactly one version, and once a reader saw the new version it never sees the old
    one again; afterwards the files read whole as the new version; the change is logged."""
    size = 96 * BS
    origin.add("/etag", size, key="e1", etag='"e1"')
    origin.add("/lm", size, key="m1", etag=None)
    origin.delay = 0.01  # keep the readers going while the remote changes
    lines = [origin.url("/etag") + " etag", origin.url("/lm") + " lm"]
    versions = {"etag": ("e1", "e2"), "lm": ("m1", "m2")}
    out: dict[str, list[tuple[int, str]]] = {"etag": [], "lm": []}
    errors: list[BaseException] = []
    rng = random.Random(7)
    args = ("--read-timeout", "30", "--prefetch", "none")
    with mount_of(tmp_path, mnt, cache, lines, *args) as mount:
        deadline = time.monotonic() + 60
        threads = []
        for name, chunk in (("etag", BS + 4096), ("lm", 3 * BS - 1)):
            offsets = list(range(0, size - chunk, chunk))
            rng.shuffle(offsets)  # random order: no read-ahead runs away with the object
            threads.append(threading.Thread(
                target=_versioned_reader,
                args=(mnt / name, versions[name], offsets, chunk, out[name], errors, deadline)))
        for t in threads:
            t.start()
        while len(out["etag"]) < 10 or len(out["lm"]) < 5:
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.01)
        origin.set_version("/etag", key="e2", etag='"e2"')
        origin.set_version("/lm", key="m2", size=size + 5 * BS + 3,
                           last_modified="Thu, 02 Jan 2025 00:00:00 GMT")
        for t in threads:
            t.join(90)
        assert not errors, errors[0]
        for name, (old, new) in versions.items():
            keys = [k for _, k in out[name]]
            assert new in keys, keys  # the change was noticed
            assert old not in keys[keys.index(new):], keys  # and never undone
            wait_for_version(mnt / name, (old, new))
        assert os.stat(mnt / "lm").st_size == size + 5 * BS + 3
        assert "the remote object changed" in mount.stderr()


def test_mount_remote_changes_between_mounts(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """Part of v1 is cached; the origin switches to v2 (another ETag, another size) while
    nothing is mounted. On the remount every pread is the bytes of one version (cached v1,
    until the background revalidation drops it, or v2), never a mix; the file ends up v2
    whole with v2's size, and the change is logged."""
    size = 40 * BS
    origin.add("/obj", size, key="v1", etag='"v1"')
    lines = [origin.url("/obj") + " obj"]
    args = ("--prefetch", "none", "--read-timeout", "30")
    with mount_of(tmp_path, mnt, cache, lines, *args, warnings_ok=False):
        fd = os.open(mnt / "obj", os.O_RDONLY)
        try:
            check("v1", 0, os.pread(fd, 8 * BS, 0))
            check("v1", 20 * BS, os.pread(fd, 4 * BS, 20 * BS))
        finally:
            os.close(fd)
    new_size = size - 3 * BS + 11
    origin.set_version("/obj", key="v2", etag='"v2"', size=new_size)
    with mount_of(tmp_path, mnt, cache, lines, *args) as mount:
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while "v2" not in seen[-3:] or len(seen) < 6:
            assert time.monotonic() < deadline, seen
            offset = random.choice([0, 3 * BS + 5, 21 * BS, 30 * BS, 2 * BS - 1])
            try:
                fd = os.open(mnt / "obj", os.O_RDONLY)
                try:
                    data = os.pread(fd, 3 * BS, offset)
                finally:
                    os.close(fd)
            except OSError as exc:
                assert exc.errno == errno.EIO
                seen.append("EIO")
                continue
            seen.append(one_key(data, offset, ("v1", "v2")))
        assert "v1" not in seen[seen.index("v2"):], seen
        deadline = time.monotonic() + 10
        while os.stat(mnt / "obj").st_size != new_size:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert pread_all(mnt / "obj", "v2") == new_size
        assert "the remote object changed" in mount.stderr()


def test_mount_stalled_body_fails_the_read_in_bounded_time(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """A body that stalls for longer than --read-timeout: the pread fails with EIO (the
    kernel may retry a failed read once, so within two read timeouts plus a margin), never
    hangs; the mount stays up and another file reads. (A stall shorter than the read
    timeout is only a delay: test_mount_transient_faults_are_retried.)"""
    origin.add("/stalls", 4 * BS)
    origin.add("/fine", 4 * BS)
    lines = [origin.url("/stalls"), origin.url("/fine")]
    timeout = 2.0
    args = ("--read-timeout", str(timeout), "--prefetch", "none")
    with mount_of(tmp_path, mnt, cache, lines, *args) as mount:
        os.stat(mnt / "stalls")
        # every attempt stalls (each one is dropped after half the read timeout and retried)
        origin.faults("/stalls", [Fault("stall", after=100, seconds=300, method="GET")] * 50)
        assert within(HANG_GUARD, lambda: pread_errno(mnt / "stalls", 0, 100)) == errno.EIO
        # what ended it (each failed read, the kernel's retry too): --read-timeout, not
        # the 300 s stall and not a hang
        log = mount.stderr()
        assert re.search(rf"failed with EIO: ReadTimeout: .*after {timeout:g} s", log), log
        assert set(eio_causes(log)) == {"ReadTimeout"}, log
        assert pread_all(mnt / "fine", "/fine") == 4 * BS


def test_mount_cp_during_a_remote_change(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """The origin switches versions while cp copies (slowly): cp either fails with EIO or
    copies one version whole; what it copied is a prefix of exactly one version."""
    size = 64 * BS
    origin.add("/cp", size, key="c1", etag='"c1"')
    origin.delay = 0.2  # requests are answered with the object as it is after the delay
    lines = [origin.url("/cp") + " cp"]
    out = tmp_path / "copy"
    with mount_of(tmp_path, mnt, cache, lines, "--prefetch", "none") as mount:
        os.stat(mnt / "cp")
        copier = subprocess.Popen(["cp", str(mnt / "cp"), str(out)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not out.exists() or out.stat().st_size == 0:
            assert time.monotonic() < deadline and copier.poll() is None
            time.sleep(0.01)
        origin.set_version("/cp", key="c2", etag='"c2"')
        _, err = copier.communicate(timeout=60)
        data = out.read_bytes()
        assert data
        key = one_key(data, 0, ("c1", "c2"))  # a prefix of one version
        if copier.returncode == 0:
            assert len(data) == size, len(data)
        else:
            assert b"Input/output error" in err, err
            assert "the remote object changed" in mount.stderr()
            assert key == "c1"
            wait_for_version(mnt / "cp", ("c1", "c2"))  # the new version takes over


def test_mount_stalled_body_is_retried_within_the_read_timeout(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """--read-timeout also bounds a stalled body: the connection is dropped and retried
    before the reader's deadline, so the read succeeds."""
    origin.add("/s", 4 * BS)
    with mount_of(tmp_path, mnt, cache, [origin.url("/s")], "--read-timeout", "6",
                  "--prefetch", "none"):
        os.stat(mnt / "s")
        origin.faults("/s", [Fault("stall", after=100, seconds=300, method="GET")])
        assert pread_all(mnt / "s", "/s") == 4 * BS

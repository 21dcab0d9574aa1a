"""The object layer against a real origin on 127.0.0.1 (no kernel): reads, resume,
changed remotes, digests, failures."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import trio
import trio.testing

from rangefs.cache import LocalDownloadCache
from rangefs.cachedir import CacheDir
from rangefs.digests import Digest
from rangefs.errors import (
    DigestMismatch,
    ReadTimeout,
    RemoteChanged,
    RetriesExhausted,
)
from rangefs.objects import MountedObject, ObjectHandle, ObjectStore, Prefetch, StoreConfig
from rangefs.ratecontrol import BackoffPolicy
from rangefs.urllist import Entry
from tests.content import check, digest_of
from tests.faultserver import Fault, FaultServer

BS = 64 << 10
FAST = BackoffPolicy(initial=0.01, maximum=0.05, steps=3)


def entry(server: FaultServer, path: str, **kw: object) -> Entry:
    return Entry(url=server.url(path), path=PurePosixPath(path.strip("/")),
                 digest=kw.get("digest"), size=kw.get("size"), line=1)  # type: ignore[arg-type]


@asynccontextmanager
async def running(entries: list[Entry], cache_dir: Path,
                  **kw: object) -> AsyncIterator[Callable[[Entry], MountedObject]]:
    kw.setdefault("backoff", FAST)
    config = StoreConfig(cache_dir=cache_dir, block_size=BS, **kw)  # type: ignore[arg-type]
    store = ObjectStore(entries, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield store.get
        nursery.cancel_scope.cancel()


async def wait_until(predicate: Callable[[], bool], limit: float = 20) -> None:
    """Poll ``predicate`` (state owned by the store's own tasks) until true, at most
    ``limit`` seconds."""
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - polling state that has no event
            await trio.sleep(0.01)


async def settled() -> None:
    """Return once every task of the store waits (for the network, a timer or a thread):
    whatever the reads so far set off (a fill, read-ahead flights) has started by then, and
    shows in ``filling`` / ``fill_queued`` / ``fills_running`` and the fetcher's flights."""
    with trio.fail_after(20):  # a hang guard
        await trio.testing.wait_all_tasks_blocked()


def assert_no_background_fetch(obj: MountedObject) -> None:
    """No fill running or queued for ``obj`` and no block of it in flight."""
    version = obj._version
    assert version is not None
    assert not version.filling and not version.fill_queued
    assert obj.store.fills_running == 0 and not obj.store.fills_waiting
    assert not version.fetcher._inflight, sorted(version.fetcher._inflight)


async def read_all(obj: MountedObject, chunk: int = 128 << 10) -> bytes:
    handle = await obj.open()
    out = bytearray()
    while True:
        data = await handle.read(len(out), chunk)
        if not data:
            break
        out += data
    handle.release()
    return bytes(out)


async def test_random_reads_are_exact(origin: FaultServer, tmp_path: Path) -> None:
    size = 3 * 1024 * 1024 + 333
    origin.add("/a", size)
    e = entry(origin, "/a")
    async with running([e], tmp_path, prefetch=Prefetch.NONE) as get:
        obj = get(e)
        assert (await obj.attrs()).size == size
        handle = await obj.open()
        rnd = random.Random(1)
        for _ in range(200):
            off = rnd.randrange(0, size + 10)
            n = rnd.choice([1, 7, 4096, BS - 1, BS + 1, 300_000])
            data = await handle.read(off, n)
            assert len(data) == max(0, min(n, size - off))
            check("/a", off, data)
        handle.release()
    # each block was asked for at most once
    got = sorted(r.range or "" for r in origin.gets("/a"))
    assert len(got) == len(set(got))


async def test_remount_serves_cached_blocks_without_the_origin(
    origin: FaultServer, tmp_path: Path
) -> None:
    size = 1 << 20
    origin.add("/a", size)
    e = entry(origin, "/a")
    async with running([e], tmp_path) as get:
        check("/a", 0, await read_all(get(e)))
    origin.stop()
    async with running([e], tmp_path) as get:
        obj = get(e)
        assert obj.attrs_nowait() is not None  # remembered: no probe needed
        check("/a", 0, await read_all(obj))


async def test_remount_fetches_only_missing_blocks(origin: FaultServer, tmp_path: Path) -> None:
    size = 1 << 20
    origin.add("/a", size)
    e = entry(origin, "/a")
    async with running([e], tmp_path, prefetch=Prefetch.NONE) as get:
        handle = await get(e).open()
        check("/a", 0, await handle.read(0, 4 * BS))
        handle.release()
    origin.reset_log()
    async with running([e], tmp_path, prefetch=Prefetch.NONE) as get:
        data = await read_all(get(e))
    check("/a", 0, data)
    assert origin.bytes_sent("/a") <= size - 4 * BS + 4096  # (+ at most a probe's byte)


async def test_open_policy_fills_once_reads_are_sequential(origin: FaultServer,
                                                            tmp_path: Path) -> None:
    size = 2 * 1024 * 1024 + 5
    origin.add("/a", size)
    e = entry(origin, "/a")
    async with running([e], tmp_path, prefetch=Prefetch.OPEN) as get:
        obj = get(e)
        handle = await obj.open()
        check("/a", 100, await handle.read(100, 10))
        await settled()  # one read is not a sequential reader: no fill
        assert_no_background_fetch(obj)
        assert obj.xattrs()["user.rangefs.blocks_cached"] == b"1"
        check("/a", 110, await handle.read(110, 10))  # the second, sequential, starts it
        await wait_until(lambda: obj.xattrs()["user.rangefs.complete"] == b"1")
        handle.release()
    assert sum(r.bytes_sent for r in origin.gets("/a")) <= size + 4096


async def test_objects_read_sequentially_are_filled_one_at_a_time(origin: FaultServer,
                                                                   tmp_path: Path) -> None:
    """A second object read sequentially while another fills waits for its turn (its
    reader keeps read-ahead), then is filled without being read again."""
    origin.add("/a", 256 * BS)  # 16 MiB: 4 fill requests of 4 MiB, one at a time
    origin.add("/b", 128 * BS)  # 8 MiB: twice what its reader's read-ahead asks for
    a, b = entry(origin, "/a"), entry(origin, "/b")
    async with running([a, b], tmp_path, prefetch=Prefetch.OPEN, concurrency=1) as get:
        origin.delay = 0.3  # every answer comes 0.3 s after its request: a fills >= 1.2 s
        obj_a, obj_b = get(a), get(b)
        ha, hb = await obj_a.open(), await obj_b.open()
        check("/a", 0, await ha.read(0, 10))
        check("/a", 10, await ha.read(10, 10))  # sequential: a's fill starts
        check("/b", 0, await hb.read(0, 10))
        check("/b", 10, await hb.read(10, 10))  # sequential too: b waits for its turn
        version_a, version_b = obj_a._version, obj_b._version
        assert version_a is not None and version_b is not None
        assert version_a.filling and not version_a.cache.complete()
        assert version_b.fill_queued and not version_b.filling
        assert obj_a.store.fills_running == 1
        ha.release()
        hb.release()
        await wait_until(lambda: obj_a.xattrs()["user.rangefs.complete"] == b"1"
                         and obj_b.xattrs()["user.rangefs.complete"] == b"1")
        # the last block lands before its fill task has given its turn back: wait for it
        # (a turn never given back fails here, after the hang guard)
        await wait_until(lambda: obj_a.store.fills_running == 0 and not obj_a.store.fills_waiting)
        check("/b", 0, await read_all(obj_b))


async def test_fill_starts_while_the_second_sequential_read_waits(
    origin: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fill's requests go out with the read that starts it, not after its answer: the
    origin holds every answer until a request of the fill has arrived."""
    origin.add("/a", 64 * BS)
    e = entry(origin, "/a")
    answer = threading.Event()

    def held(seconds: float) -> None:  # the origin's pause before each answer
        answer.wait(60)  # a hang guard only: the test opens it

    def fill_requests() -> list[str]:
        ranges = [r.range for r in origin.gets("/a") if r.range]
        return [r for r in ranges if int(r[6:].split("-")[0]) >= 2 * BS]

    async def second_read(handle: ObjectHandle) -> None:
        check("/a", 10, await handle.read(10, BS))  # sequential, and needs block 1

    async with running([e], tmp_path, prefetch=Prefetch.OPEN) as get:
        handle = await get(e).open()
        check("/a", 0, await handle.read(0, 10))
        monkeypatch.setattr(origin, "_pause", held)
        origin.delay = 1  # from now on every answer waits for `answer`
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(second_read, handle)
                await wait_until(lambda: bool(fill_requests()))  # with no answer sent
                answer.set()
        finally:
            answer.set()
        handle.release()


async def test_open_policy_random_reads_fetch_only_their_blocks(origin: FaultServer,
                                                                tmp_path: Path) -> None:
    size = 64 * BS
    origin.add("/a", size)
    e = entry(origin, "/a")
    rng = random.Random(7)
    blocks = rng.sample(range(0, 64, 2), 12)  # never adjacent: no read continues another
    async with running([e], tmp_path, prefetch=Prefetch.OPEN) as get:
        obj = get(e)
        handle = await obj.open()
        for block in blocks:
            offset = block * BS + rng.randrange(BS - 4096)
            check("/a", offset, await handle.read(offset, 4096))
        await settled()
        assert_no_background_fetch(obj)
        assert obj.xattrs()["user.rangefs.blocks_cached"] == str(len(blocks)).encode()
        handle.release()
    assert sum(r.bytes_sent for r in origin.gets("/a")) <= len(blocks) * (BS + 1024)


async def test_transient_faults_are_retried(origin: FaultServer, tmp_path: Path) -> None:
    size = 1 << 20
    origin.add("/a", size)
    origin.faults("/a", [Fault("status", status=503, retry_after=0, method="GET"),
                         Fault("reset_body", after=1000), Fault("short_body", after=70000),
                         Fault("status", status=500), Fault("wrong_start")])
    e = entry(origin, "/a")
    async with running([e], tmp_path, prefetch=Prefetch.NONE,
                       backoff=BackoffPolicy(initial=0.01, maximum=0.05, steps=8)) as get:
        check("/a", 0, await read_all(get(e)))


async def test_permanent_failure_fails_the_read_and_others_work(
    origin: FaultServer, tmp_path: Path
) -> None:
    origin.add("/a", 1 << 20)
    origin.add("/b", 1 << 20)
    a, b = entry(origin, "/a"), entry(origin, "/b")
    async with running([a, b], tmp_path, prefetch=Prefetch.NONE) as get:
        handle = await get(a).open()
        origin.faults("/a", [Fault("status", status=503)] * 20)
        with pytest.raises(RetriesExhausted):
            await handle.read(0, 10)
        check("/b", 0, await read_all(get(b)))


async def test_read_timeout(origin: FaultServer, tmp_path: Path) -> None:
    origin.add("/a", 1 << 20)
    e = entry(origin, "/a")
    async with running([e], tmp_path, prefetch=Prefetch.NONE, read_timeout=0.3) as get:
        handle = await get(e).open()
        origin.faults("/a", [Fault("stall", after=0, seconds=3)])
        with pytest.raises(ReadTimeout):
            await handle.read(0, 10)


async def test_changed_remote_never_mixes_versions(origin: FaultServer, tmp_path: Path) -> None:
    size = 1 << 20
    origin.add("/a", size, key="v1")
    e = entry(origin, "/a")
    async with running([e], tmp_path, prefetch=Prefetch.NONE) as get:
        obj = get(e)
        handle = await obj.open()
        check("v1", 0, await handle.read(0, BS))
        origin.set_version("/a", etag='"v2"', key="v2")
        with pytest.raises(RemoteChanged):
            await handle.read(5 * BS, BS)  # If-Range fails: the old handle gets an error
        with trio.fail_after(10):
            while True:  # the object switches to the new version in the background
                try:
                    new = await obj.open()
                    data = await new.read(0, 2 * BS)
                    break
                except RemoteChanged:
                    await trio.sleep(0.02)
        check("v2", 0, data)
        with pytest.raises(RemoteChanged):
            await handle.read(0, 10)


async def test_changed_remote_between_mounts(origin: FaultServer, tmp_path: Path) -> None:
    size = 1 << 20
    origin.add("/a", size, key="v1")
    e = entry(origin, "/a")
    async with running([e], tmp_path, prefetch=Prefetch.NONE) as get:
        handle = await get(e).open()
        check("v1", 0, await handle.read(0, 4 * BS))
    origin.set_version("/a", etag='"v2"', key="v2")
    async with running([e], tmp_path, prefetch=Prefetch.NONE) as get:
        obj = get(e)
        with trio.fail_after(10):
            while True:
                try:
                    handle = await obj.open()
                    await trio.sleep(0.05)  # background revalidation
                    data = await handle.read(0, 4 * BS)
                    break
                except RemoteChanged:
                    continue
        check("v2", 0, data)


async def test_digest_verified(origin: FaultServer, tmp_path: Path) -> None:
    size = 300_000
    origin.add("/good", size)
    origin.add("/bad", size)
    good = entry(origin, "/good", digest=Digest("sha256", digest_of("/good", size)))
    bad = entry(origin, "/bad", digest=Digest("sha256", bytes(32)))
    async with running([good, bad], tmp_path) as get:
        check("/good", 0, await read_all(get(good)))
        await wait_until(lambda: get(good).xattrs()["user.rangefs.verified"] == b"ok")
        handle = await get(bad).open()
        check("/bad", 0, await handle.read(0, 10))
        check("/bad", 10, await handle.read(10, 10))  # sequential: the fill completes it
        await wait_until(lambda: get(bad).xattrs()["user.rangefs.verified"] == b"mismatch")
        with pytest.raises(DigestMismatch):
            await handle.read(0, 10)


async def test_empty_object(origin: FaultServer, tmp_path: Path) -> None:
    origin.add("/empty", 0)
    e = entry(origin, "/empty")
    async with running([e], tmp_path) as get:
        assert (await get(e).attrs()).size == 0
        assert await read_all(get(e)) == b""


async def test_size_from_the_list_needs_no_probe(origin: FaultServer, tmp_path: Path) -> None:
    origin.add("/a", 5000)
    e = entry(origin, "/a", size=5000)
    async with running([e], tmp_path) as get:
        assert (await get(e).attrs()).size == 5000
    assert origin.log == []


def _allocated(tmp_path: Path, key: str) -> int:
    """Bytes the data file of ``key`` occupies on disk."""
    return (tmp_path / "objects" / key / "data").stat().st_blocks * 512


async def test_cache_size_evicts_least_recently_used(origin: FaultServer,
                                                     tmp_path: Path) -> None:
    """Four objects of 1 MiB under a budget of 3.5 MiB: the blocks of the least recently
    used one are evicted (its data file's space given back), the others stay; reading it
    again fetches it again."""
    mib = 1 << 20
    entries = []
    for i in range(4):
        origin.add(f"/o{i}", mib)
        entries.append(entry(origin, f"/o{i}"))
    async with running(entries, tmp_path, cache_size=3 * mib + mib // 2) as get:
        for e in entries:
            check(f"/{e.path}", 0, await read_all(get(e)))
        await wait_until(lambda: get(entries[0]).cached_bytes() == 0)
        assert [get(e).cached_bytes() for e in entries[1:]] == [mib] * 3
        await wait_until(lambda: _allocated(tmp_path, get(entries[0]).key) == 0)  # punched
        assert all(_allocated(tmp_path, get(e).key) >= mib for e in entries[1:])
        origin.reset_log()
        check("/o0", 0, await read_all(get(entries[0])))  # fetched again
        assert origin.bytes_sent("/o0") >= mib


async def test_cache_size_scans_the_directory_once_and_evicts_by_last_use(
    origin: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One scan of the cache directory per mount, then books in memory in which a read
    counts as a use: o0 read again, so o1 is the least recently used when o3 comes."""
    mib = 1 << 20
    entries = []
    for i in range(4):
        origin.add(f"/o{i}", mib)
        entries.append(entry(origin, f"/o{i}"))
    scans = []
    real_usage = CacheDir.usage

    def counted_usage(cachedir: CacheDir) -> list[tuple[float, int, str]]:
        scans.append(1)
        return real_usage(cachedir)

    monkeypatch.setattr(CacheDir, "usage", counted_usage)
    async with running(entries, tmp_path, cache_size=3 * mib + mib // 2) as get:
        for e in entries[:3]:
            check(f"/{e.path}", 0, await read_all(get(e)))
        check("/o0", 0, await read_all(get(entries[0])))  # o0 used again: o1 is the oldest
        check("/o3", 0, await read_all(get(entries[3])))
        await wait_until(lambda: get(entries[1]).cached_bytes() == 0)
        for e in (entries[0], entries[2], entries[3]):
            assert get(e).cached_bytes() == mib
    assert len(scans) == 1


async def test_object_larger_than_the_cache_budget(
    origin: FaultServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An object twice the budget opens, reads exactly from end to end, is not filled
    whole (one info line says why), and the cache stays within its budget."""
    size = 8 << 20
    origin.add("/big", size)
    e = entry(origin, "/big")
    caplog.set_level(logging.INFO, logger="rangefs.objects")
    async with running([e], tmp_path, cache_size=size // 2, prefetch=Prefetch.OPEN) as get:
        obj = get(e)
        data = await read_all(obj)
        check("/big", 0, data)
        assert len(data) == size
        budget = obj.store.budget
        await wait_until(lambda: budget.used <= budget.limit())
        assert _allocated(tmp_path, obj.key) <= size // 2 + BS
    assert any("does not fit the cache budget" in r.getMessage() for r in caplog.records)


async def test_prefetch_all_fills_every_object_without_a_reader(
    origin: FaultServer, tmp_path: Path
) -> None:
    entries = []
    for i in range(3):
        origin.add(f"/p{i}", 300_000 + i)
        entries.append(entry(origin, f"/p{i}"))
    async with running(entries, tmp_path, prefetch=Prefetch.ALL) as get:
        await wait_until(lambda: all(get(e).xattrs().get("user.rangefs.complete") == b"1"
                                     for e in entries))
        store = get(entries[0]).store
        await wait_until(lambda: store.fills_running == 0, limit=5)  # each fill counted once
    origin.stop()
    async with running(entries, tmp_path, prefetch=Prefetch.NONE) as get:
        for i, e in enumerate(entries):
            check(f"/p{i}", 0, await read_all(get(e)))


@pytest.mark.parametrize("at_mount", [True, False])
async def test_sizes_are_probed_from_mount_time_and_remembered(
    origin: FaultServer, tmp_path: Path, at_mount: bool
) -> None:
    """Without anyone asking, every entry without size=N is probed once, in the
    background; a second store on the same cache knows every size without a request."""
    paths = [f"/p{i}" for i in range(40)]
    for i, path in enumerate(paths):
        origin.add(path, 1000 + i)
    entries = [entry(origin, p) for p in paths] + [entry(origin, "/sized", size=5)]
    origin.add("/sized", 5)
    async with running(entries, tmp_path, probe_at_mount=at_mount) as get:
        if at_mount:
            await wait_until(lambda: all(get(e).attrs_nowait() is not None for e in entries))
            assert len(origin.requests(method="HEAD")) == len(paths)  # once each
            assert origin.requests(path="/sized") == []  # its size was given
        else:
            await settled()  # a probe would have started by now
            assert origin.requests() == []
            for e in entries:
                await get(e).attrs()
    origin.reset_log()
    async with running(entries, tmp_path, probe_at_mount=True) as get:
        for i, e in enumerate(entries[:-1]):
            attrs = get(e).attrs_nowait()
            assert attrs is not None and attrs.size == 1000 + i
        await settled()  # a probe would have started by now
    assert origin.requests() == []


async def test_a_first_read_at_offset_zero_preloads_the_cache_file(
    origin: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cp and cat begin at offset 0: that first read preloads 16 MiB of the cache file
    past it; a first read elsewhere preloads nothing until reads are sequential."""
    size = 24 << 20
    origin.add("/a", size)
    e = entry(origin, "/a")
    async with running([e], tmp_path, prefetch=Prefetch.NONE) as get:
        assert len(await read_all(get(e), chunk=4 << 20)) == size
    preloads: list[tuple[int, int]] = []
    real_preload = LocalDownloadCache.preload

    async def recording_preload(cache: LocalDownloadCache, offset: int, size: int) -> None:
        preloads.append((offset, size))
        await real_preload(cache, offset, size)

    monkeypatch.setattr(LocalDownloadCache, "preload", recording_preload)
    async with running([e], tmp_path, prefetch=Prefetch.NONE) as get:
        obj = get(e)
        handle = await obj.open()
        check("/a", 5 << 20, await handle.read(5 << 20, 1 << 20))  # first read elsewhere
        await settled()
        assert preloads == []
        check("/a", 6 << 20, await handle.read(6 << 20, 1 << 20))  # sequential: read-ahead
        await settled()
        assert preloads == [(7 << 20, size - (7 << 20))]
        handle.release()
        preloads.clear()
        handle = await obj.open()
        check("/a", 0, await handle.read(0, 128 << 10))
        await settled()
        assert preloads == [(128 << 10, 16 << 20)]
        handle.release()


async def test_opening_a_new_cache_does_not_stall_other_readers(
    origin: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating a new object's cache (space reservation, fsyncs) runs off the event loop:
    while it is held up, a read of another object's cached blocks is answered."""
    origin.add("/a", 1 << 20)
    origin.add("/b", 1 << 20)
    a, b = entry(origin, "/a"), entry(origin, "/b")
    entered, release = threading.Event(), threading.Event()
    returned_at: list[float] = []
    real_open = LocalDownloadCache.open

    def held_open(*args: Any, **kwargs: Any) -> LocalDownloadCache:
        if Path(args[0]).name == key_of_b:
            entered.set()
            release.wait(20)  # the old code waited here on the event loop itself
            returned_at.append(time.monotonic())
        return real_open(*args, **kwargs)

    async with running([a, b], tmp_path, prefetch=Prefetch.NONE) as get:
        handle_a = await get(a).open()
        check("/a", 0, await handle_a.read(0, 1 << 20))  # a's blocks are cached now
        key_of_b = get(b).key
        monkeypatch.setattr(LocalDownloadCache, "open", held_open)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get(b).open)
            with trio.fail_after(5):
                while not entered.is_set():  # noqa: ASYNC110 - set by a worker thread
                    await trio.sleep(0.005)
            with trio.fail_after(10):  # a hang guard: the hold lasts until release.set()
                check("/a", 4096, await handle_a.read(4096, 64 << 10))
            answered_at = time.monotonic()
            release.set()
        handle_a.release()
    assert returned_at and answered_at < returned_at[0]

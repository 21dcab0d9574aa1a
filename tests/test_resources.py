"""Resources bounded by use, and background failures contained (issue 16, items 3 and 4).

Store-level tests run a real ObjectStore against the fault server on 127.0.0.1; the
mount tests mount for real in a subprocess and read through the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import resource
import threading
from pathlib import Path

import pytest
import trio

from rangefs import objects
from rangefs.cache import LocalDownloadCache
from rangefs.digests import Digest
from rangefs.errors import NotEnoughSpace, RemoteChanged
from rangefs.objects import Prefetch
from tests.content import check, content, digest_of
from tests.faultserver import FaultServer
from tests.mountutil import mounted, write_list
from tests.test_objects import entry, read_all, running, wait_until

BS = 64 << 10


# -- background failures ------------------------------------------------------------------


def _failures(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "rangefs.tasks" and r.getMessage().startswith(what)
    ]


async def test_a_failing_preload_leaves_the_mount_and_the_reads_alone(
    origin: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """EMFILE in the cache-file preload of a sequential reader: logged once per failure
    with the object's name; the reads stay exact and another object is served."""
    size = 3 * 1024 * 1024 + 5
    origin.add("/a", size)
    origin.add("/b", size)
    a, b = entry(origin, "/a"), entry(origin, "/b")

    async def emfile(self: LocalDownloadCache, offset: int, size: int) -> None:
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(LocalDownloadCache, "preload", emfile)
    caplog.set_level(logging.WARNING)
    async with running([a, b], tmp_path, prefetch=Prefetch.NONE) as get:
        check("/a", 0, await read_all(get(a)))  # reads at 0 and sequential ones preload
        failed = _failures(caplog, f"preload of {get(a).name} failed")
        assert failed and "Too many open files" in failed[0]
        check("/b", 0, await read_all(get(b)))
        check("/a", 0, await read_all(get(a)))  # again, from the cache


async def test_a_failing_digest_check_is_contained(
    origin: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The data file vanishes under the digest check (an eviction racing it): one warning,
    the object stays unverified and readable, the mount and the other objects go on."""
    size = 300_000
    origin.add("/a", size)
    origin.add("/b", size)
    a = entry(origin, "/a", digest=Digest("sha256", digest_of("/a", size)))
    b = entry(origin, "/b")
    calls = 0

    async def vanished(path: Path, algorithm: str) -> bytes:
        nonlocal calls
        calls += 1
        await trio.lowlevel.checkpoint()
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    monkeypatch.setattr(objects, "hash_file", vanished)
    caplog.set_level(logging.WARNING)
    async with running([a, b], tmp_path, prefetch=Prefetch.NONE) as get:
        check("/a", 0, await read_all(get(a), chunk=size))
        await wait_until(lambda: bool(_failures(caplog, f"digest check of {get(a).name}")))
        assert calls == 1
        assert get(a).xattrs()["user.rangefs.verified"] == b"unknown"
        check("/a", 0, await read_all(get(a)))
        check("/b", 0, await read_all(get(b)))


async def test_a_failing_revalidation_drops_the_version_not_the_mount(
    origin: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The remote changes and grows; setting up the new version's cache fails (the cache
    file system is full): one warning, handles of the old version get RemoteChanged, the
    next open starts the object afresh and reads the new version exactly; the other
    object is untouched."""
    size = 1 << 20
    origin.add("/a", size, key="v1")
    origin.add("/b", size)
    a, b = entry(origin, "/a"), entry(origin, "/b")

    def full(self: LocalDownloadCache, identity: object) -> None:
        raise NotEnoughSpace("not enough space to cache the new version (injected)")

    monkeypatch.setattr(LocalDownloadCache, "invalidate", full)
    caplog.set_level(logging.WARNING)
    async with running([a, b], tmp_path, prefetch=Prefetch.NONE) as get:
        handle = await get(a).open()
        check("v1", 0, await handle.read(0, BS))
        origin.set_version("/a", etag='"v2"', key="v2", size=2 * size)
        with pytest.raises(RemoteChanged):
            await handle.read(5 * BS, BS)
        await wait_until(lambda: bool(_failures(caplog, f"revalidation of {get(a).name}")))
        assert "injected" in _failures(caplog, "revalidation of")[0]
        with pytest.raises(RemoteChanged):
            await handle.read(0, 10)
        handle.release()
        data = await read_all(get(a))
        assert len(data) == 2 * size
        check("v2", 0, data)
        check("/b", 0, await read_all(get(b)))


# -- idle caches ----------------------------------------------------------------------------


async def test_idle_caches_are_closed_and_reopened_without_refetching(
    origin: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More idle caches than MAX_IDLE_CACHES are closed at once (oldest first), the rest
    after IDLE_GRACE; a closed cache reopens from its index (nothing fetched again); an
    open/close loop on one file opens its cache once."""
    monkeypatch.setattr(objects, "MAX_IDLE_CACHES", 4)
    monkeypatch.setattr(objects, "IDLE_GRACE", 0.3)
    monkeypatch.setattr(objects, "IDLE_CHECK_PERIOD", 0.05)
    opens: list[Path] = []
    real_open = LocalDownloadCache.open.__func__  # type: ignore[attr-defined]

    def counting_open(cls: type[LocalDownloadCache], directory: Path, *a: object,
                      **kw: object) -> LocalDownloadCache:
        opens.append(directory)
        return real_open(cls, directory, *a, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(LocalDownloadCache, "open", classmethod(counting_open))
    entries = []
    for i in range(12):
        origin.add(f"/f{i}", 10_000 + i)
        entries.append(entry(origin, f"/f{i}"))
    async with running(entries, tmp_path, prefetch=Prefetch.NONE) as get:
        store = get(entries[0]).store
        for i, e in enumerate(entries):
            check(f"/f{i}", 0, await read_all(get(e)))
        # beyond the cap the oldest go at once (the closer is woken; it closes in turn)
        await wait_until(lambda: len(store._active) <= 4)
        assert all(get(e).key not in store._active for e in entries[:8])  # oldest first
        await wait_until(lambda: not store._active)  # and the rest after IDLE_GRACE
        xattrs = get(entries[3]).xattrs()  # what a closed cache holds is still shown
        assert xattrs["user.rangefs.complete"] == b"1"
        assert xattrs["user.rangefs.blocks_cached"] == b"1"
        gets = len(origin.gets())
        for i, e in enumerate(entries):
            check(f"/f{i}", 0, await read_all(get(e)))
        assert len(origin.gets()) == gets  # reopened from the index
        assert len(opens) == 24
        for _ in range(50):
            check("/f0", 0, await read_all(get(entries[0])))
        assert len(opens) == 25


# -- real mounts ----------------------------------------------------------------------------


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _limit_fds(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_3000_files_one_after_another_under_ulimit_1024(
    origin: FaultServer, tmp_path: Path, mnt: Path, cache: Path
) -> None:
    """``ulimit -n 1024`` (soft and hard: the mount cannot raise it): 3,000 files read one
    after another are all exact, and the mount's descriptors stay bounded by the files
    open, not by the files read (sampled all along)."""
    n = 3000
    lines = []
    for i in range(n):
        size = 1000 + (i * 37) % 5000
        origin.add(f"/d/{i}", size)
        lines.append(f"{origin.url(f'/d/{i}')} d/{i:04d} size={size}")
    urls = write_list(tmp_path / "many.urls", lines)
    peak = 0
    done = threading.Event()
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache,
                 preexec_fn=lambda: _limit_fds(1024, 1024)) as mount:

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _open_fds(mount.pid))
                done.wait(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            for i in range(n):
                size = 1000 + (i * 37) % 5000
                data = (mnt / "d" / f"{i:04d}").read_bytes()
                assert len(data) == size
                assert data == content(f"/d/{i}", 0, size), f"file {i}"
        finally:
            done.set()
            sampler.join()
    # 2 per idle cache kept (64), connections (at most 3 x 32), the rest of the process
    assert peak < 2 * objects.MAX_IDLE_CACHES + 3 * 32 + 64, peak


def test_the_mount_raises_its_soft_open_file_limit(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """Started with a soft limit below its hard one (systemd's and many shells' 1024), the
    mount raises the soft limit to the hard one. The hard limit is this machine's (a
    process may lower it, not always raise it): the soft one starts at half of it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        hard = 1 << 20  # lowering a hard limit is always allowed
    origin.add("/a", 1000)
    urls = write_list(tmp_path / "a.urls", [f"{origin.url('/a')} a size=1000"])
    limit = functools.partial(_limit_fds, hard // 2, hard)
    with mounted(urls, mnt, cache_dir=cache, preexec_fn=limit) as m:
        limits = Path(f"/proc/{m.pid}/limits").read_text()
        line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
        assert (mnt / "a").read_bytes() == content("/a", 0, 1000)


async def test_a_verified_object_is_not_hashed_again_after_its_idle_cache_closed(
    origin: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(objects, "IDLE_GRACE", 0.1)
    monkeypatch.setattr(objects, "IDLE_CHECK_PERIOD", 0.05)
    hashed: list[Path] = []
    real_hash = objects.hash_file

    async def counting_hash(path: Path, algorithm: str) -> bytes:
        hashed.append(path)
        return await real_hash(path, algorithm)

    monkeypatch.setattr(objects, "hash_file", counting_hash)
    size = 200_000
    origin.add("/a", size)
    a = entry(origin, "/a", digest=Digest("sha256", digest_of("/a", size)))
    async with running([a], tmp_path, prefetch=Prefetch.NONE) as get:
        obj = get(a)
        check("/a", 0, await read_all(obj, chunk=size))
        await wait_until(lambda: obj.xattrs()["user.rangefs.verified"] == b"ok")
        await wait_until(lambda: not obj.store._active)
        check("/a", 0, await read_all(obj))
        assert obj.xattrs()["user.rangefs.verified"] == b"ok"
        assert len(hashed) == 1


async def test_a_queued_fill_survives_its_cache_being_closed(
    origin: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two files read sequentially and closed: one fills, the other waits for its turn
    with its cache closed (no descriptors held), then is opened again and filled."""
    monkeypatch.setattr(objects, "IDLE_GRACE", 0.05)
    monkeypatch.setattr(objects, "IDLE_CHECK_PERIOD", 0.02)
    size = 4 << 20
    origin.add("/a", size)
    origin.add("/b", size)
    origin.delay = 0.02
    a, b = entry(origin, "/a"), entry(origin, "/b")
    async with running([a, b], tmp_path, prefetch=Prefetch.OPEN, concurrency=1) as get:
        for e in (a, b):
            handle = await get(e).open()
            check(f"/{e.path}", 0, await handle.read(0, BS))
            check(f"/{e.path}", BS, await handle.read(BS, BS))  # sequential: fill starts
            handle.release()
        store = get(a).store
        queued = get(b)
        await wait_until(lambda: queued._version is None)  # closed while it waited
        await wait_until(lambda: all(get(e).xattrs()["user.rangefs.complete"] == b"1"
                                     for e in (a, b)), limit=60)
        await wait_until(lambda: not store._active)
        check("/b", 0, await read_all(queued))


async def test_a_fetcher_that_dies_drops_its_version_not_the_mount(
    origin: FaultServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in an object's fetcher (its read-ahead worker raises): logged with its
    traceback, that version is dropped (its reads fail), the mount goes on, another
    object is exact, and the next open of the first one works again."""
    from rangefs.errors import RangefsError
    from rangefs.fetcher import ObjectFetcher

    size = 4 << 20
    origin.add("/a", size)
    origin.add("/b", size)
    a, b = entry(origin, "/a"), entry(origin, "/b")
    calls = 0

    def boom(self: ObjectFetcher) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("injected bug in read-ahead")

    monkeypatch.setattr(ObjectFetcher, "_claim_prefetch_run", boom)
    caplog.set_level(logging.WARNING)
    async with running([a, b], tmp_path, prefetch=Prefetch.NONE) as get:
        handle = await get(a).open()
        check("/a", 0, await handle.read(0, BS))
        # sequential: read-ahead starts; the dying fetcher may take this read with it
        # (an error, never wrong bytes)
        with contextlib.suppress(RangefsError):
            check("/a", BS, await handle.read(BS, BS))
        await wait_until(lambda: get(a)._version is None)
        assert calls >= 1
        bugs = [r for r in caplog.records if r.getMessage().startswith("BUG in background task")]
        assert bugs and f"fetcher of {get(a).name}" in bugs[0].getMessage()
        with pytest.raises(RemoteChanged):
            await handle.read(2 * BS, BS)
        handle.release()
        monkeypatch.undo()
        check("/b", 0, await read_all(get(b)))
        check("/a", 0, await read_all(get(a)))

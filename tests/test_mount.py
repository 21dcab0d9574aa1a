"""Real mounts through the kernel: a ``rangefs mount --foreground`` subprocess per test.

Metadata tests use ``size=N`` entries (no network needed for stat/readdir); read tests run
against the in-process ``origin`` (tests/faultserver.py), whose content is a pure function
of (key, offset) so every byte read is checked with ``content.check``. Every mount is
unmounted and reaped, and its log must show no bug (see tests/mountutil.py).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import random
import re
import signal
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pyfuse3
import pytest
import trio

from rangefs import errors, ops
from rangefs.cachedir import cache_key
from rangefs.cachefiles import read_index
from rangefs.objects import ObjectStore, StoreConfig
from rangefs.tree import ROOT_INODE, Tree
from rangefs.urllist import parse_url_list
from tests import content
from tests.faultserver import Fault, FaultServer
from tests.mountutil import is_mounted, mount_source, mounted, start_mount, write_list

BS = 64 << 10  # block size of the read tests: many blocks in small objects


# -- the handlers in-process (no kernel): the errno table, bug reports, readdir offsets ----


def test_errno_table() -> None:
    cases: list[tuple[errors.RangefsError, int]] = [
        (errors.ReadTimeout("slow"), errno.EIO),
        (errors.RetriesExhausted("503 x 8"), errno.EIO),
        (errors.PermanentError("404", status=404), errno.EIO),  # never ENOENT
        (errors.RemoteChanged("etag"), errno.EIO),
        (errors.TransientError("reset"), errno.EIO),
        (errors.RangeNotSupported("200"), errno.EIO),
        (errors.NotEnoughSpace("full"), errno.ENOSPC),
        (errors.CacheCorrupt("crc"), errno.EIO),
        (errors.UncachedRange("hole"), errno.EIO),
        (errors.InternalError("disk"), errno.EIO),
        (errors.DigestMismatch("sha"), errno.EIO),
        (errors.UsageError("bad"), errno.EINVAL),
        (errors.UrlListError("f", 1, "r"), errno.EINVAL),
    ]
    for exc, code in cases:
        assert ops.errno_for(exc) == code, exc


@pytest.fixture
async def store_ops(tmp_path: Path) -> AsyncIterator[ops.RangeOperations]:
    """RangeOperations over a running real ObjectStore of size=N entries."""
    entries = parse_url_list(
        "".join(f"http://127.0.0.1:9/f{i} d/f{i:03d} size={i}\n" for i in range(100))
        + "http://127.0.0.1:9/top top size=5\n",
        "test",
    )
    store = ObjectStore(entries, StoreConfig(cache_dir=tmp_path / "cache"))
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        yield ops.RangeOperations(Tree.from_entries(entries), store)
        nursery.cancel_scope.cancel()


async def test_guard_logs_one_line_and_maps(
    store_ops: ops.RangeOperations, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info, store_ops._guard("read", "http://h/x", "[0:9]"):
        raise errors.ReadTimeout("no data after 60 s") from errors.TransientError("503")
    assert info.value.errno == errno.EIO
    [record] = [r for r in caplog.records if r.name == "rangefs.ops"]
    assert record.levelno == logging.WARNING
    line = record.getMessage()
    assert "read http://h/x [0:9]" in line and "EIO" in line
    assert "ReadTimeout: no data after 60 s" in line and "TransientError: 503" in line


async def test_guard_reports_bugs_loudly(
    store_ops: ops.RangeOperations, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info, store_ops._guard("getattr", "x"):
        raise KeyError("oops")
    assert info.value.errno == errno.EIO
    [record] = [r for r in caplog.records if r.name == "rangefs.ops"]
    assert record.levelno == logging.ERROR
    assert record.getMessage().startswith("BUG in FUSE handler getattr x")
    assert record.exc_info is not None


async def test_handlers_fail_with_fuse_errors_only(store_ops: ops.RangeOperations) -> None:
    ctx = None
    for call, code in [
        (store_ops.getattr(999, ctx), errno.ENOENT),
        (store_ops.lookup(1, b"nope", ctx), errno.ENOENT),
        (store_ops.open(1, os.O_RDONLY, ctx), errno.EISDIR),  # type: ignore[arg-type]
        (store_ops.open(102, os.O_WRONLY, ctx), errno.EROFS),  # type: ignore[arg-type]
        (store_ops.read(12345, 0, 10), errno.EBADF),
        (store_ops.mkdir(1, b"d", 0o755, ctx), errno.EROFS),  # type: ignore[arg-type]
        (store_ops.write(1, 0, b"x"), errno.EROFS),
        (store_ops.unlink(1, b"top", ctx), errno.EROFS),  # type: ignore[arg-type]
        (store_ops.getxattr(102, b"user.nope", ctx), pyfuse3.ENOATTR),  # type: ignore[arg-type]
        (store_ops.getxattr(102, b"security.selinux", ctx),  # type: ignore[arg-type]
         errno.EOPNOTSUPP),
        (store_ops.getxattr(999, b"security.selinux", ctx), errno.ENOENT),  # type: ignore[arg-type]
    ]:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await call
        assert info.value.errno == code, call


async def test_readdir_offsets_resume_exactly(
    store_ops: ops.RangeOperations, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies stop when the kernel's buffer is full; the next call starts at the last
    next_id: every entry exactly once, in order, next_id = index + 1."""
    seen: list[tuple[str, int, int]] = []
    budget = [0]

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if budget[0] == 0:
            return False
        budget[0] -= 1
        seen.append((name.decode(), next_id, attr.st_size))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    d = store_ops._tree.lookup(ROOT_INODE, "d")
    assert d is not None
    start = 0
    for _ in range(100):
        budget[0] = 7
        await store_ops.readdir(d.inode, start, None)  # type: ignore[arg-type]
        if not seen or seen[-1][1] == start:
            break
        start = seen[-1][1]
    assert [name for name, _, _ in seen] == [f"f{i:03d}" for i in range(100)]
    assert [next_id for _, next_id, _ in seen] == list(range(1, 101))
    assert [size for _, _, size in seen] == list(range(100))


# -- metadata, no network ----------------------------------------------------------------

TREE = [
    ("http://127.0.0.1:9/a.bin", "a.bin", 1000),
    ("http://127.0.0.1:9/x/b.bin", "sub/dir/b.bin", 5),
    ("http://127.0.0.1:9/c", "sub/c", 0),
    ("http://127.0.0.1:9/big", "big", 5 << 40),  # 5 TiB: sizes are not limited by anything
]


def _tree_list(tmp_path: Path) -> Path:
    return write_list(tmp_path / "tree.urls", [f"{u} {p} size={n}" for u, p, n in TREE])


def test_tree_sizes_modes_and_implied_directories(tmp_path: Path, mnt: Path, cache: Path) -> None:
    before = time.time()
    with mounted(_tree_list(tmp_path), mnt, cache_dir=cache) as mount:
        assert mount_source(mnt) == "fuse.rangefs"
        assert sorted(os.listdir(mnt)) == ["a.bin", "big", "sub"]
        assert sorted(os.listdir(mnt / "sub")) == ["c", "dir"]
        assert os.listdir(mnt / "sub" / "dir") == ["b.bin"]
        for _, path, size in TREE:
            st = os.stat(mnt / path)
            assert stat.S_ISREG(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o444
            assert st.st_size == size
            assert st.st_nlink == 1
            assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
            assert st.st_blksize == 1 << 20
            assert st.st_blocks == 0  # nothing cached yet
            assert before - 5 <= st.st_mtime <= time.time() + 5  # size=N: no Last-Modified
        for directory, links in ((mnt, 3), (mnt / "sub", 3), (mnt / "sub" / "dir", 2)):
            st = os.stat(directory)
            assert stat.S_ISDIR(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o555
            assert st.st_nlink == links
            assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
        out = subprocess.run(["ls", "-l", str(mnt)], capture_output=True, text=True, check=True)
        assert " 1000 " in out.stdout and "-r--r--r--" in out.stdout
        assert os.stat(mnt / "sub" / "..").st_ino == os.stat(mnt).st_ino
        assert mount.stop() == 0


def test_lookup_of_missing_names_is_enoent(tmp_path: Path, mnt: Path, cache: Path) -> None:
    with mounted(_tree_list(tmp_path), mnt, cache_dir=cache):
        for missing in ("nope", "sub/nope", "a.bin/x", "sub/dir/b.bin.part"):
            with pytest.raises(OSError) as info:
                os.stat(mnt / missing)
            assert info.value.errno in (errno.ENOENT, errno.ENOTDIR), missing
        with pytest.raises(NotADirectoryError):
            os.listdir(mnt / "a.bin")


def test_readdir_of_many_entries(tmp_path: Path, mnt: Path, cache: Path) -> None:
    """3000 files in one directory plus 2000 in 40 others: every name exactly once, in
    order, over the many FUSE readdir requests (offsets) a listing takes."""
    lines = [f"http://127.0.0.1:9/f/{i} flat/file-{i:05d}-{'x' * 40} size={i}" for i in range(3000)]
    lines += [f"http://127.0.0.1:9/d/{i} deep/d{i % 40:02d}/f{i} size=7" for i in range(2000)]
    urls = write_list(tmp_path / "many.urls", lines)
    with mounted(urls, mnt, cache_dir=cache) as mount:
        names = os.listdir(mnt / "flat")
        assert len(names) == 3000 and len(set(names)) == 3000
        assert names == sorted(names)
        with os.scandir(mnt / "flat") as it:
            sizes = {e.name: e.stat().st_size for e in it}
        assert sizes == {f"file-{i:05d}-{'x' * 40}": i for i in range(3000)}
        assert sorted(os.listdir(mnt / "deep")) == [f"d{i:02d}" for i in range(40)]
        total = sum(len(os.listdir(mnt / "deep" / d)) for d in os.listdir(mnt / "deep"))
        assert total == 2000
        # how fast: the benchmark's scenario 6 (ls -l of 10,000 entries), not a test
        out = subprocess.run(["ls", "-lR", str(mnt)], capture_output=True, text=True, check=True)
        assert out.stdout.count("-r--r--r--") == 5000
        assert mount.stop() == 0


def test_list_from_stdin(tmp_path: Path, mnt: Path, cache: Path) -> None:
    with mounted("-", mnt, cache_dir=cache, stdin=b"http://127.0.0.1:9/s/t x/y size=3\n"):
        assert os.path.getsize(mnt / "x" / "y") == 3


def test_xattrs_listed_and_credentials_redacted(tmp_path: Path, mnt: Path, cache: Path) -> None:
    urls = write_list(
        tmp_path / "x.urls",
        ["http://user:hunter2@127.0.0.1:9/p/f.bin?token=s3cr3t&v=1 f.bin size=3000000"],
    )
    with mounted(urls, mnt, cache_dir=cache) as mount:
        target = mnt / "f.bin"
        names = set(os.listxattr(target))
        assert {
            "user.rangefs.url", "user.rangefs.size", "user.rangefs.block_size",
            "user.rangefs.blocks_total", "user.rangefs.blocks_cached", "user.rangefs.complete",
            "user.rangefs.etag", "user.rangefs.verified",
        } <= names
        url = os.getxattr(target, "user.rangefs.url").decode()
        assert "hunter2" not in url and "s3cr3t" not in url and "user" not in url
        assert url.startswith("http://127.0.0.1:9/p/f.bin?")
        assert os.getxattr(target, "user.rangefs.size") == b"3000000"
        assert os.getxattr(target, "user.rangefs.block_size") == str(64 << 10).encode()
        assert os.getxattr(target, "user.rangefs.blocks_total") == b"46"  # 3,000,000 / 64 KiB
        assert os.getxattr(target, "user.rangefs.blocks_cached") == b"0"
        assert os.getxattr(target, "user.rangefs.complete") == b"0"
        # user.* names we do not have: ENODATA; other namespaces are not supported at all
        # (EOPNOTSUPP makes ls -l stop asking every file for SELinux labels and ACLs)
        for other, code in (("user.rangefs.nope", errno.ENODATA), ("user.x", errno.ENODATA),
                            ("security.selinux", errno.EOPNOTSUPP),
                            ("system.posix_acl_access", errno.EOPNOTSUPP),
                            ("trusted.x", errno.EOPNOTSUPP)):
            with pytest.raises(OSError) as info:
                os.getxattr(target, other)
            assert info.value.errno == code, other
        # the root names the control socket (rangefs status); nothing else is a file's
        assert os.listxattr(mnt) == ["user.rangefs.control"]
        assert os.getxattr(mnt, "user.rangefs.control") == \
            os.fsencode(cache / f"control.{mount.pid}.sock")
        out = subprocess.run(["getfattr", "-d", str(target)], capture_output=True, text=True)
        if out.returncode == 0:  # getfattr (attr package) is optional on this machine
            assert "user.rangefs.url" in out.stdout
        assert "hunter2" not in mount.stderr() and "s3cr3t" not in mount.stderr()


def test_writes_fail_with_erofs(tmp_path: Path, mnt: Path, cache: Path) -> None:
    with mounted(_tree_list(tmp_path), mnt, cache_dir=cache) as mount:
        f = mnt / "a.bin"
        attempts: dict[str, Callable[[], object]] = {
            "open for writing": lambda: os.open(f, os.O_WRONLY),
            "open read-write": lambda: os.open(f, os.O_RDWR),
            "open append": lambda: os.open(f, os.O_WRONLY | os.O_APPEND),
            "truncate on open": lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
            "create": lambda: os.open(mnt / "new", os.O_CREAT | os.O_WRONLY, 0o644),
            "create in subdir": lambda: os.open(mnt / "sub" / "n", os.O_CREAT | os.O_RDWR),
            "mkdir": lambda: os.mkdir(mnt / "d"),
            "unlink": lambda: os.unlink(f),
            "rmdir": lambda: os.rmdir(mnt / "sub" / "dir"),
            "rename": lambda: os.rename(f, mnt / "renamed"),
            "symlink": lambda: os.symlink("a.bin", mnt / "link"),
            "hard link": lambda: os.link(f, mnt / "hard"),
            "chmod": lambda: os.chmod(f, 0o666),
            "chown": lambda: os.chown(f, 1, 1),
            "utime": lambda: os.utime(f, (0, 0)),
            "truncate": lambda: os.truncate(f, 0),
            "mknod": lambda: os.mkfifo(mnt / "fifo"),
            "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
            "removexattr": lambda: os.removexattr(f, "user.rangefs.url"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as info:
                fd = attempt()
                if isinstance(fd, int):
                    os.close(fd)
            assert info.value.errno in (errno.EROFS, errno.EACCES), (what, info.value)
        assert sorted(os.listdir(mnt)) == ["a.bin", "big", "sub"]
        assert os.path.getsize(f) == 1000
        assert os.statvfs(mnt).f_flag & os.ST_RDONLY
        mount.check_log()


def test_statfs(tmp_path: Path, mnt: Path, cache: Path) -> None:
    urls = _tree_list(tmp_path)
    with mounted(urls, mnt, cache_dir=cache):
        st = os.statvfs(mnt)
        assert st.f_flag & os.ST_RDONLY
        assert st.f_blocks * st.f_frsize >= sum(n for _, _, n in TREE)
        assert st.f_bavail == 0 and st.f_files == len(TREE)
        out = subprocess.run(["df", "--output=source,fstype", str(mnt)],
                             capture_output=True, text=True, check=True)
        assert out.stdout.split()[-2:] == [str(urls), "fuse.rangefs"], out.stdout


FUSECTL = Path("/sys/fs/fuse/connections")


def _fusectl_mounted() -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == str(FUSECTL) for line in f)


@pytest.mark.parametrize("fusectl", ["mounted", "not mounted"])
def test_kernel_read_ahead_and_max_background_are_raised(
    tmp_path: Path, mnt: Path, cache: Path, fusectl: str
) -> None:
    """As root the mount gets 1 MiB read-ahead and 64 background reads and keeps the
    kernel's congestion threshold (9), whether the fusectl file system was mounted before
    (systemd does it at boot) or not (fresh containers, VMs, CI runners: rangefs mounts
    it). Without root, -v says what was left at the kernel's default and what it costs."""
    if os.geteuid() != 0:
        with mounted(_tree_list(tmp_path), mnt, cache_dir=cache) as mount:
            hang_guard = time.monotonic() + 30
            while " rangefs.mount: mounted " not in mount.stderr():
                assert time.monotonic() < hang_guard, mount.stderr()
                time.sleep(0.02)
            log = mount.stderr()
        assert "max_background of the mount left at the kernel's default" in log
        assert "read-ahead (KiB) of the mount left at the kernel's default" in log
        return
    if fusectl == "mounted" and not _fusectl_mounted():
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], check=True)
    if fusectl == "not mounted" and _fusectl_mounted():
        subprocess.run(["umount", str(FUSECTL)], check=True)
    assert _fusectl_mounted() == (fusectl == "mounted")
    with mounted(_tree_list(tmp_path), mnt, cache_dir=cache) as mount:
        # the mount answers before it has raised the settings: wait for its ready line,
        # logged once they are applied (or left)
        hang_guard = time.monotonic() + 30
        while " rangefs.mount: mounted " not in mount.stderr():
            assert time.monotonic() < hang_guard, mount.stderr()
            time.sleep(0.02)
        dev = os.stat(mnt).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        conn = FUSECTL / str((os.major(dev) << 20) | os.minor(dev))
        read_ahead = int(bdi.read_text())
        background = int((conn / "max_background").read_text())
        congestion = int((conn / "congestion_threshold").read_text())
        assert (read_ahead, background, congestion) == (1024, 64, 9)
        assert ("mounted the fusectl file system" in mount.stderr()) == (fusectl == "not mounted")
        assert "left at the kernel's default" not in mount.stderr()


def test_kernel_settings_left_at_default_are_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without root (no fusectl connection to write, not mounted for us) one info line per
    setting says what was left at the kernel's default and what that costs; no mount is
    attempted."""
    from rangefs import mount as mount_module

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(mount_module, "_left_at_default", set())
    attempts: list[Path] = []
    monkeypatch.setattr(mount_module, "_mount_fusectl", attempts.append)
    caplog.set_level(logging.INFO, logger="rangefs.mount")
    for _ in range(3):
        mount_module._raise_max_background(os.makedev(0, 77), 64, fusectl=tmp_path)
    assert attempts == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "max_background of the mount left at the kernel's default" in lines[0]
    assert "13th concurrent reader waits" in lines[0]
    # root, and the connection is there: raised, nothing said
    caplog.clear()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    conn = tmp_path / str(77)
    conn.mkdir()
    (conn / "max_background").write_text("12\n")
    mount_module._raise_max_background(os.makedev(0, 77), 64, fusectl=tmp_path)
    assert (conn / "max_background").read_text() == "64\n"
    assert attempts == [] and not caplog.records


# -- shutdown ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130), (signal.SIGHUP, 0)]
)
def test_signal_unmounts_cleanly(
    tmp_path: Path, mnt: Path, cache: Path, signum: int, code: int
) -> None:
    with mounted(_tree_list(tmp_path), mnt, cache_dir=cache) as mount:
        assert os.path.getsize(mnt / "a.bin") == 1000
        assert mount.stop(signum) == code
        assert "unmounted" in mount.stderr()
        mount.check_log()
    assert not is_mounted(mnt)
    assert os.listdir(mnt) == []  # the mount point is usable again


@pytest.mark.parametrize("command", [["fusermount3", "-u"], ["umount"]])
def test_external_unmount_stops_the_process(
    tmp_path: Path, mnt: Path, cache: Path, command: list[str]
) -> None:
    with mounted(_tree_list(tmp_path), mnt, cache_dir=cache) as mount:
        subprocess.run([*command, str(mnt)], check=True)
        assert mount.wait_exit() == 0
        assert "removed from outside" in mount.stderr()
    assert not is_mounted(mnt)


def test_remount_after_kill_9_clears_the_stale_mount(
    tmp_path: Path, mnt: Path, cache: Path
) -> None:
    urls = _tree_list(tmp_path)
    with mounted(urls, mnt, cache_dir=cache) as mount:
        mount.send(signal.SIGKILL)
        assert mount.wait_exit() == -signal.SIGKILL
        with pytest.raises(OSError) as info:
            os.listdir(mnt)
        assert info.value.errno == errno.ENOTCONN
        with mounted(urls, mnt, cache_dir=cache) as again:
            assert os.path.getsize(mnt / "a.bin") == 1000
            assert again.stop() == 0


# -- reads against a real origin (need the object layer) -----------------------------------


def _read_file(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _claimed_blocks(objdir: Path) -> int:
    """How many blocks the index in ``objdir`` claims (0 before its first flush)."""
    try:
        _, bitmap = read_index(objdir / "index")
    except FileNotFoundError:
        return 0
    return int.from_bytes(bitmap, "little").bit_count()


def _outcome_within(seconds: float, call: Callable[[], object]) -> object:
    """What ``call()`` returned or raised, run in a daemon thread; fails the test if it is
    still running after ``seconds`` (a hang guard only: a FUSE request that never returns
    cannot hang the test, and the mount's teardown frees the thread)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still blocked after {seconds:g} s"
    return outcome[0]


class _Barrier:
    """The origin's pause before each answer (install it as ``origin._pause`` with
    ``origin.delay`` > 0): holds every answer until ``n`` requests wait at once, then lets
    them and every later one through. Requests sent one after another never get an answer;
    answers that come prove that ``n`` requests were in flight together, on any machine."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.opened = threading.Event()
        self._waiting = 0
        self._lock = threading.Lock()

    def __call__(self, seconds: float) -> None:
        with self._lock:
            self._waiting += 1
            if self._waiting >= self.n:
                self.opened.set()
        try:
            self.opened.wait(20)  # a hang guard only (then the answer goes out unopened)
        finally:
            with self._lock:
                self._waiting -= 1


def _wait_complete(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.getxattr(path, "user.rangefs.complete") == b"1":
            return
        time.sleep(0.05)
    pytest.fail(f"{path} not complete after {timeout} s: {_xattrs(path)}")


def _xattrs(path: Path) -> dict[str, str]:
    return {n: os.getxattr(path, n).decode() for n in os.listxattr(path)}


def _fetched_blocks(origin: FaultServer, path: str, block_size: int) -> list[int]:
    """Block indexes covered by the GET ranges the origin served for ``path``, with
    repetitions (a block fetched twice appears twice)."""
    blocks: list[int] = []
    for req in origin.gets(path):
        if req.status not in (200, 206) or not req.bytes_sent:
            continue
        start, _, end = (req.range or "bytes=0-").removeprefix("bytes=").partition("-")
        first = int(start) // block_size
        last = (int(start) + req.bytes_sent - 1) // block_size
        blocks.extend(range(first, last + 1))
        assert not end or int(end) >= int(start)
    return blocks


def test_cp_whole_file_is_byte_exact(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    size = 24 * BS + 12345
    origin.add("/data/obj.bin", size)
    urls = write_list(tmp_path / "r.urls", [origin.url("/data/obj.bin")])
    with mounted(urls, mnt, "--block-size", "64K", cache_dir=cache) as mount:
        assert os.path.getsize(mnt / "obj.bin") == size
        out = tmp_path / "copy.bin"
        subprocess.run(["cp", str(mnt / "obj.bin"), str(out)], check=True, timeout=60)
        data = out.read_bytes()
        assert len(data) == size
        content.check("/data/obj.bin", 0, data)
        subprocess.run(["cmp", str(mnt / "obj.bin"), str(out)], check=True, timeout=60)
        digest = subprocess.run(
            ["sha256sum", str(mnt / "obj.bin")], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        assert digest == content.sha256_of("/data/obj.bin", size)
        with open(mnt / "obj.bin", "rb") as fh, mmap.mmap(
            fh.fileno(), 0, access=mmap.ACCESS_READ
        ) as mapped:
            assert len(mapped) == size
            content.check("/data/obj.bin", 3 * BS - 7, mapped[3 * BS - 7 : 9 * BS + 3])
            content.check("/data/obj.bin", size - 100, mapped[size - 100 :])
        _wait_complete(mnt / "obj.bin")
        xattrs = _xattrs(mnt / "obj.bin")
        assert xattrs["user.rangefs.blocks_cached"] == xattrs["user.rangefs.blocks_total"] == "25"
        deadline = time.monotonic() + 8  # st_blocks follows the cache (attributes live 3 s)
        while os.stat(mnt / "obj.bin").st_blocks * 512 < size:
            assert time.monotonic() < deadline, os.stat(mnt / "obj.bin")
            time.sleep(0.1)
        assert os.stat(mnt / "obj.bin").st_mtime == 1735689600  # the origin's Last-Modified
        assert mount.stop() == 0


def test_random_preads_are_exact(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    sizes = {"/zero": 0, "/one": 1, "/almost": BS - 1, "/exact": BS, "/over": BS + 1,
             "/many": 37 * BS + 4321}
    for path, size in sizes.items():
        origin.add(path, size)
    urls = write_list(tmp_path / "r.urls", [origin.url(p) for p in sizes])
    rng = random.Random(4)
    with mounted(urls, mnt, "--block-size", "64K", "--prefetch", "none", cache_dir=cache):
        for path, size in sizes.items():
            fd = os.open(mnt / path.lstrip("/"), os.O_RDONLY)
            try:
                assert os.fstat(fd).st_size == size
                assert os.pread(fd, 10, size) == b""  # at EOF
                assert os.pread(fd, 10, size + 5 * BS) == b""  # past EOF
                reads = 2000 if path == "/many" else 50
                for _ in range(reads):
                    offset = rng.randrange(0, size + 2) if size else 0
                    length = rng.choice([1, 7, BS // 2, BS, BS + 1, 3 * BS])
                    if rng.random() < 0.3:
                        length = rng.randrange(1, 300000)
                    data = os.pread(fd, length, offset)
                    assert len(data) == max(0, min(length, size - offset))
                    content.check(path, offset, data)
                for offset in (BS - 1, BS, BS + 1, size - 1):  # around block edges and EOF
                    if 0 <= offset < size:
                        content.check(path, offset, os.pread(fd, BS + 2, offset))
            finally:
                os.close(fd)


def test_concurrent_readers_fetch_each_block_once(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    size = 64 * BS
    origin.add("/shared", size)
    origin.delay = 0.02  # keep fetches in flight while readers pile up
    urls = write_list(tmp_path / "r.urls", [origin.url("/shared")])
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with open(mnt / "shared", "rb", buffering=0) as fh:
                for _ in range(40):
                    offset = rng.randrange(0, size)
                    data = os.pread(fh.fileno(), rng.randrange(1, 4 * BS), offset)
                    content.check("/shared", offset, data)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with mounted(urls, mnt, "--block-size", "64K", cache_dir=cache):
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
        content.check("/shared", 0, _read_file(mnt / "shared"))
        _wait_complete(mnt / "shared")
        blocks = _fetched_blocks(origin, "/shared", BS)
        repeated = sorted({b for b in blocks if blocks.count(b) > 1})
        assert not repeated, f"blocks fetched more than once: {repeated}"
        assert sorted(blocks) == list(range(64))


def test_remount_with_origin_stopped_serves_from_cache(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    size = 40 * BS + 3
    origin.add("/keep", size)
    urls = write_list(tmp_path / "r.urls", [origin.url("/keep") + " k/keep.bin"])
    with mounted(urls, mnt, "--block-size", "64K", cache_dir=cache) as mount:
        content.check("/keep", 0, _read_file(mnt / "k" / "keep.bin"))
        _wait_complete(mnt / "k" / "keep.bin")
        assert mount.stop() == 0
    origin.stop()
    with mounted(urls, mnt, "--block-size", "64K", "--read-timeout", "5", cache_dir=cache):
        target = mnt / "k" / "keep.bin"
        assert os.path.getsize(target) == size  # remembered metadata: no probe needed
        content.check("/keep", 0, _read_file(target))
        fd = os.open(target, os.O_RDONLY)
        try:
            for offset in (0, BS - 1, 17 * BS + 5, size - 1):
                content.check("/keep", offset, os.pread(fd, 2 * BS, offset))
        finally:
            os.close(fd)


def test_kill_9_during_copy_then_remount(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """kill -9 mid-copy; the remount serves exact bytes and fetches none of the blocks
    that the index had persisted (it is flushed at least every second)."""
    blocks = 1024
    size = blocks * BS  # 64 MiB at 1 MiB/s: far from done when killed
    origin.add("/slow", size)
    urls = write_list(tmp_path / "r.urls", [origin.url("/slow")])
    args = ("--block-size", "64K", "--max-rate", "1M", "--prefetch", "none")
    mount = start_mount(urls, mnt, *args, cache_dir=cache)
    partial = tmp_path / "partial"
    try:
        mount.wait_mounted()
        copier = subprocess.Popen(
            ["cp", str(mnt / "slow"), str(partial)], stderr=subprocess.DEVNULL
        )
        objdir = cache / "objects" / cache_key(origin.url("/slow"))
        deadline = time.monotonic() + 60  # a hang guard
        while _claimed_blocks(objdir) < 16:  # the index claims some: kill mid-copy
            assert time.monotonic() < deadline and copier.poll() is None, mount.stderr()
            time.sleep(0.05)
        mount.send(signal.SIGKILL)
        assert mount.wait_exit() == -signal.SIGKILL
        assert copier.wait(20) != 0
    finally:
        mount.cleanup()
    assert partial.stat().st_size < size
    origin.reset_log()
    with mounted(urls, mnt, "--block-size", "64K", "--prefetch", "none", cache_dir=cache):
        target = mnt / "slow"
        fd = os.open(target, os.O_RDONLY)
        try:
            cached_at_start = int(os.getxattr(target, "user.rangefs.blocks_cached"))
            data = _read_file(target)
        finally:
            os.close(fd)
        assert len(data) == size
        content.check("/slow", 0, data)
        assert 0 < cached_at_start < blocks
        refetched = _fetched_blocks(origin, "/slow", BS)
        assert len(refetched) == len(set(refetched)), "a block was fetched twice"
        assert len(refetched) == blocks - cached_at_start, (cached_at_start, len(refetched))


def test_failing_origin_gives_eio_within_the_read_timeout(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    origin.add("/bad", 8 * BS)
    origin.add("/good", 8 * BS)
    origin.fault_probability("/bad", 1.0, [Fault("status", status=503, method="GET")])
    urls = write_list(tmp_path / "r.urls", [origin.url("/bad"), origin.url("/good")])
    timeout = 2.0
    with mounted(
        urls, mnt, "--block-size", "64K", "--read-timeout", str(timeout),
        cache_dir=cache, warnings_ok=True,
    ) as mount:

        def read_bad() -> bytes:
            with open(mnt / "bad", "rb", buffering=0) as fh:
                return fh.read(100)

        outcome = _outcome_within(60, read_bad)  # a hang guard
        assert isinstance(outcome, OSError) and outcome.errno == errno.EIO, outcome
        # what ended the wait (the kernel may retry a failed read-ahead once with a plain
        # read): --read-timeout, although the 503s alone are retried without end
        assert re.search(rf"failed with EIO: ReadTimeout: .*after {timeout:g} s",
                         mount.stderr())
        assert is_mounted(mnt)
        content.check("/good", 0, _read_file(mnt / "good"))  # other files keep working
        log = mount.stderr()
        assert "/bad" in log and "EIO" in log
        assert os.path.getsize(mnt / "bad") == 8 * BS


def test_origin_down_gives_eio_and_the_mount_stays(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    origin.add("/gone", 4 * BS)
    urls = write_list(tmp_path / "r.urls", [origin.url("/gone") + f" gone size={4 * BS}"])
    origin.stop()
    args = ("--block-size", "64K", "--read-timeout", "2")
    with mounted(urls, mnt, *args, cache_dir=cache, warnings_ok=True) as mount:
        assert os.path.getsize(mnt / "gone") == 4 * BS  # size=N: stat needs no network
        outcome = _outcome_within(60, lambda: _read_file(mnt / "gone"))
        assert isinstance(outcome, OSError) and outcome.errno == errno.EIO, outcome
        # what ended it: the real cause (the origin refuses connections: two quick
        # retries of the probe), named in the EIO line, not a timeout that hides it
        assert re.search(r"failed with EIO: .*connection refused", mount.stderr())
        assert is_mounted(mnt) and os.listdir(mnt) == ["gone"]


def test_missing_object_is_eio_not_enoent(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    urls = write_list(tmp_path / "r.urls", [origin.url("/missing") + " m size=10"])
    with mounted(urls, mnt, "--read-timeout", "2", cache_dir=cache, warnings_ok=True):
        with pytest.raises(OSError) as info:
            _read_file(mnt / "m")
        assert info.value.errno == errno.EIO


def test_ls_probes_sizes_concurrently(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without size=N, a listing probes the objects, concurrently: the origin answers no
    probe until 16 wait at once (probes one after another would get no answer: EIO); a
    404 still lists, and only a stat of it fails (EIO, never ENOENT)."""
    for i in range(200):
        origin.add(f"/p/{i}", i * 1000)
    barrier = _Barrier(16)
    monkeypatch.setattr(origin, "_pause", barrier)
    origin.delay = 1  # every answer waits in the barrier
    lines = [origin.url(f"/p/{i}") + f" f{i:03d}" for i in range(200)]
    urls = write_list(tmp_path / "p.urls", [*lines, origin.url("/p/missing") + " zz-missing"])
    try:
        with mounted(urls, mnt, "--read-timeout", "10", cache_dir=cache,
                     warnings_ok=True) as mount:
            with os.scandir(mnt) as it:
                entries = {e.name: e for e in it}
            assert len(entries) == 201
            sizes = {name: e.stat().st_size for name, e in entries.items()
                     if name != "zz-missing"}
            assert barrier.opened.is_set()
            assert sizes == {f"f{i:03d}": i * 1000 for i in range(200)}
            assert os.stat(mnt / "f007").st_mtime == 1735689600  # Last-Modified
            with pytest.raises(OSError) as info:
                os.stat(mnt / "zz-missing")
            assert info.value.errno == errno.EIO
            assert "zz-missing" not in mount.stderr()  # logs name the (redacted) URL
            assert "/p/missing" in mount.stderr()
    finally:
        barrier.opened.set()  # no origin thread left waiting


def test_sigterm_during_a_blocked_read(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read waiting for a stalled origin does not hold up the unmount: SIGTERM exits 0
    while the origin still holds the answer, and the reader gets an error instead of
    hanging."""
    origin.add("/stuck", 4 * BS)
    origin.faults("/stuck", [Fault("delay", seconds=30, method="GET")])
    answer = threading.Event()
    monkeypatch.setattr(origin, "_pause", lambda seconds: answer.wait(60))  # the delay
    urls = write_list(tmp_path / "r.urls", [origin.url("/stuck")])
    outcome: list[BaseException | bytes] = []

    def reader() -> None:
        try:
            outcome.append(_read_file(mnt / "stuck"))
        except BaseException as exc:  # reported below
            outcome.append(exc)

    with mounted(urls, mnt, "--read-timeout", "60", cache_dir=cache) as mount:
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30  # a hang guard
        while not origin.gets("/stuck"):  # the read waits for the origin's answer
            assert time.monotonic() < deadline and thread.is_alive(), outcome
            time.sleep(0.01)
        assert thread.is_alive(), outcome
        try:
            assert mount.stop() == 0  # fails after 20 s if the exit waits for the answer
        finally:
            answer.set()
        thread.join(30)
        assert not thread.is_alive(), "the reader still hangs after the unmount"
        assert len(outcome) == 1 and isinstance(outcome[0], OSError), outcome


def test_changed_remote_drops_the_kernel_page_cache(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """v1's first block is in the kernel's page cache; the origin switches to v2 (another
    size); a read of an uncached block finds out (EIO for the handle of v1). A stat shows
    the new size and a new open reads v2 only: never a page of v1 (the object layer
    invalidated the inode through ops)."""
    size = 8 * BS
    origin.add("/v", size, key="v1")
    urls = write_list(tmp_path / "r.urls", [origin.url("/v")])
    args = ("--block-size", "64K", "--prefetch", "none")
    with mounted(urls, mnt, *args, cache_dir=cache, warnings_ok=True) as mount:
        with open(mnt / "v", "rb", buffering=0) as fh:
            content.check("v1", 0, fh.read(4096))
            assert os.fstat(fh.fileno()).st_size == size  # the kernel caches the attributes
            origin.set_version("/v", key="v2", etag='"v2"', size=size + BS)
            with pytest.raises(OSError) as info:
                os.pread(fh.fileno(), 4096, 6 * BS)
            assert info.value.errno == errno.EIO
        hang_guard = time.monotonic() + 30
        while "the kernel dropped its pages and attributes of 1 file" not in mount.stderr():
            assert time.monotonic() < hang_guard, mount.stderr()
            time.sleep(0.05)
        # once the kernel dropped them, a stat asks again: the new size, not the cached one
        assert os.stat(mnt / "v").st_size == size + BS
        assert os.getxattr(mnt / "v", "user.rangefs.etag") == b'"v2"'
        content.check("v2", 0, _read_file(mnt / "v"))


def test_headers_are_sent_and_never_logged(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    origin.add("/private", 3 * BS)
    urls = write_list(tmp_path / "r.urls", [origin.url("/private")])
    headers = tmp_path / "headers"
    headers.write_text("X-File-Token: FILESECRET123\n")
    with mounted(
        urls, mnt, "--debug", "--header", "Authorization: Bearer ARGSECRET456",
        "--header-file", str(headers), "--block-size", "64K", cache_dir=cache,
    ) as mount:
        content.check("/private", 0, _read_file(mnt / "private"))
        gets = origin.gets("/private")
        assert gets and all(r.headers.get("authorization") == "Bearer ARGSECRET456" for r in gets)
        assert all(r.headers.get("x-file-token") == "FILESECRET123" for r in gets)
        assert mount.stop() == 0
        log = mount.stderr()
    assert "DEBUG" in log
    assert "ARGSECRET456" not in log and "FILESECRET123" not in log


def test_digest_is_verified(tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer) -> None:
    size = 10 * BS + 1
    origin.add("/sum", size)
    urls = write_list(
        tmp_path / "r.urls", [f"{origin.url('/sum')} sum sha256:{content.sha256_of('/sum', size)}"]
    )
    with mounted(urls, mnt, "--block-size", "64K", cache_dir=cache):
        content.check("/sum", 0, _read_file(mnt / "sum"))
        deadline = time.monotonic() + 20
        while os.getxattr(mnt / "sum", "user.rangefs.verified") != b"ok":
            assert time.monotonic() < deadline, _xattrs(mnt / "sum")
            time.sleep(0.05)


def test_mount_log_has_no_bug_reports(tmp_path: Path, mnt: Path, cache: Path) -> None:
    """check_log() itself must be able to fail: feed it a log with a bug report."""
    with mounted(_tree_list(tmp_path), mnt, cache_dir=cache, check_log=False) as mount:
        with open(mount.stderr_path, "a") as fh:
            fh.write("ERROR rangefs.ops: BUG in FUSE handler read x: unexpected KeyError\n")
        with pytest.raises(pytest.fail.Exception):
            mount.check_log()

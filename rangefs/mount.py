"""Wire one mount: tree, object store, FUSE session, signals, clean shutdown.

:func:`run_mount` owns every task of a mount. Start-up order: check the mount point,
build the tree, start the object store (``nursery.start``: a cache directory that cannot
be used fails here, before anything is mounted), ``pyfuse3.init`` (the mount(2) itself),
run ``pyfuse3.main``, wait until a stat of the mount point is answered, raise the kernel's
read-ahead and the number of reads FUSE passes on at once, then ``on_ready()``.

Shutdown, whatever the cause (SIGTERM, SIGINT, SIGHUP, the mount removed from outside with
``fusermount3 -u``/``umount``, or an error): stop the FUSE main loop, cancel the object
store (it flushes every index, shielded), then ``pyfuse3.close(unmount=True)``. After
SIGINT the function raises KeyboardInterrupt once everything is clean (exit code 130).

FUSE options (libfuse 3.14, pyfuse3 3.5, checked by experiment): ``max_read=N`` is rejected
("init() and fuse_session_new() requested different maximum read size") because pyfuse3's
init callback leaves ``conn->max_read`` at 0, so it is not passed. libfuse already
negotiates max_pages = 256 (1 MiB requests); what limits the size of page-cache reads is
the FUSE bdi's read-ahead (128 KiB by default), which is raised through
``/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`` when permitted (root), giving 1 MiB reads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import resource
import signal
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from . import control, service
from .errors import InternalError, RangefsError, ReadTimeout, UsageError
from .listings import DEFAULT_TTL, Listings
from .metrics import CacheGauges, MetricsServer
from .mountctl import MountControl
from .objects import ObjectHandle, ObjectStore, StoreConfig
from .ops import RangeOperations
from .recording import Player, Recorder, read_list
from .tree import FileNode, Tree
from .urllist import Entry

log = logging.getLogger(__name__)

BASE_FUSE_OPTIONS = frozenset({"subtype=rangefs", "ro", "default_permissions"})
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# pyfuse3 reads one request per task and starts a task for the next request only after a
# read (one per scheduler pass): idle readers kept waiting let a burst of requests from
# many readers in faster (with max_background 64 and twice the demand slots, the p99 of 16
# readers went from 126 to 88-98 ms in one harness). Idle tasks cost a few KiB each.
IDLE_REQUEST_READERS = 32


@dataclass(frozen=True)
class MountConfig:
    """One mount; times in seconds."""

    urllist: str  # where the URL list came from ('-' = stdin), for messages
    mountpoint: Path
    store: StoreConfig
    allow_other: bool = False
    debug_fuse: bool = False  # libfuse's own request trace on stderr
    foreground: bool = True
    read_ahead_kb: int = 1024  # kernel read-ahead for the mount; 0 = leave the default
    max_background: int = 64  # FUSE reads the kernel passes on at once; 0 = leave (12)
    ready_timeout: float = 30.0  # the mount must answer a stat within this
    metrics: str | None = None  # --metrics ADDRESS: serve Prometheus metrics there
    record: Path | None = None  # --record FILE: append the ranges reads touch first
    prefetch_list: Path | None = None  # --prefetch-list FILE: fetch those ranges at mount
    listing_ttl: float = DEFAULT_TTL  # --listing-ttl: seconds a directory listing is used


def fsname(urllist: str) -> str:
    """The mount's source (mountinfo, ``df``, ``findmnt``): the URL list's real path, so
    that ``mount -a`` sees the fstab line ``LIST MOUNTPOINT fuse.rangefs ...`` as mounted
    (libmount compares sources) instead of mounting it again; ``rangefs`` for a list read
    from stdin or a path pyfuse3 cannot pass (it encodes options as ASCII) or that has
    white space. libfuse splits options on commas: commas and backslashes are escaped."""
    if urllist == "-":
        return "rangefs"
    path = os.path.realpath(urllist)
    if not path.isascii() or not path.isprintable() or any(c.isspace() for c in path):
        return "rangefs"
    return path.replace("\\", "\\\\").replace(",", "\\,")


def fuse_options(config: MountConfig) -> set[str]:
    """The option set handed to ``pyfuse3.init``."""
    options = set(BASE_FUSE_OPTIONS)
    options.add(f"fsname={fsname(config.urllist)}")
    if config.allow_other:
        options.add("allow_other")
    if config.debug_fuse:
        options.add("debug")
    return options


def check_mountpoint(path: Path) -> None:
    """UsageError (one line saying what to do) unless ``path`` is an empty, unmounted dir.

    Sync; call before mounting (it stats ``path``, which must not be our own mount).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(
            f"mount point {path} does not exist: create it first (mkdir -p {path})"
        ) from None
    except NotADirectoryError:
        raise UsageError(f"mount point {path} is not a directory") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise UsageError(
                f"mount point {path} is a stale FUSE mount: clear it with "
                f"'fusermount3 -u -z {path}'"
            ) from None
        raise UsageError(f"mount point {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(
            f"{path} is already a mount point: unmount it first (fusermount3 -u {path})"
        )
    try:
        with os.scandir(path) as it:
            nonempty = any(True for _ in it)
    except OSError as exc:
        raise UsageError(f"mount point {path}: {exc.strerror}") from None
    if nonempty:
        raise UsageError(f"mount point {path} is not empty: mount on an empty directory")


class _Shutdown:
    """Who stops what: a signal cancels the FUSE loop if it runs, else everything."""

    def __init__(self, everything: trio.CancelScope) -> None:
        self.everything = everything
        self.fuse: trio.CancelScope | None = None
        self.signal: int | None = None

    def stop(self) -> None:
        (self.fuse or self.everything).cancel()


async def _watch_signals(signals: AsyncIterator[int], shutdown: _Shutdown) -> None:
    async for signum in signals:
        if shutdown.signal is None:
            shutdown.signal = signum
            log.info("received %s: unmounting", signal.Signals(signum).name)
        shutdown.stop()


async def _fuse_main(shutdown: _Shutdown, scope: trio.CancelScope) -> None:
    """pyfuse3's main loop; returning means the mount was removed from outside."""
    await pyfuse3.main(min_tasks=IDLE_REQUEST_READERS)
    if shutdown.signal is None:
        log.info("the mount was removed from outside (fusermount3 -u / umount): stopping")
    scope.cancel()


def _mounted_device(path: str) -> int | None:
    """st_dev of ``path`` if it is a mount point, else None. Blocks: run in a thread."""
    st = os.stat(path)
    parent = os.stat(os.path.dirname(os.path.abspath(path)))
    return st.st_dev if st.st_dev != parent.st_dev else None


async def _wait_live(path: Path, limit: float) -> int:
    """Wait until the kernel answers a stat of the mount through our FUSE loop; st_dev."""
    try:
        with trio.fail_after(limit):
            dev = await trio.to_thread.run_sync(
                _mounted_device, os.fspath(path), abandon_on_cancel=True
            )
    except trio.TooSlowError:
        raise InternalError(f"the mount at {path} did not answer within {limit:g} s") from None
    except OSError as exc:
        raise InternalError(f"the mount at {path} does not work: {exc.strerror}") from exc
    if dev is None:
        raise InternalError(f"{path} is not a mount point after mounting")
    return dev


FUSECTL = Path("/sys/fs/fuse/connections")


def _raise_read_ahead(dev: int, kb: int) -> None:
    """Let page-cache reads reach FUSE as ``kb`` KiB requests (root only). Sync (sysfs)."""
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    _raise_kernel_setting(
        path,
        kb,
        "read-ahead (KiB)",
        "sequential reads reach rangefs as 128 KiB requests instead of 1 MiB ones "
        "(more round trips per MiB)",
    )


def _raise_max_background(dev: int, count: int, fusectl: Path = FUSECTL) -> None:
    """Let the kernel pass up to ``count`` page-cache reads to the daemon at once (root
    only). Its default, 12, queues the reads of a 13th concurrent reader in the kernel
    behind the others' fetches. ``congestion_threshold`` is left as it is (9): above it the
    kernel still skips its speculative read-ahead requests, so the extra slots go to reads
    that someone waits for. The setting lives in the fusectl file system; as root it is
    mounted at ``fusectl`` when it is not (systemd does so at boot; containers, VMs and CI
    runners often do not). Sync (sysfs, mount(2))."""
    if count <= 0:
        return
    # the fusectl directory is named after the kernel's dev_t of the mount (MKDEV)
    conn = fusectl / str((os.major(dev) << 20) | os.minor(dev))
    if not conn.exists() and os.geteuid() == 0:
        _mount_fusectl(fusectl)
    _raise_kernel_setting(
        conn / "max_background",
        count,
        "max_background",
        "at most 12 reads reach rangefs at once; a 13th concurrent reader waits in the "
        "kernel behind the others' fetches",
    )


def _mount_fusectl(where: Path) -> None:
    """``mount -t fusectl fusectl WHERE`` through mount(2); a failure is logged (info)."""
    if os.path.ismount(where):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"fusectl", os.fsencode(where), b"fusectl", 0, None) != 0:
        err = ctypes.get_errno()
        log.info("cannot mount the fusectl file system at %s: %s", where, os.strerror(err))
        return
    log.info("mounted the fusectl file system at %s (it was not mounted)", where)


# What was left at the kernel's default, said once per process at -v.
_left_at_default: set[str] = set()


def _raise_kernel_setting(path: Path, value: int, what: str, cost: str) -> None:
    """Write ``value`` to the sysfs file ``path`` if it holds less; 0 or less: leave it.

    Best effort: without the right (not root) or the file, one info line (-v) per process
    says what was left at the kernel's default and what that costs (``cost``).
    """
    if value <= 0:
        return
    try:
        current = int(path.read_text().strip())
        if current < value:
            path.write_text(f"{value}\n")
            log.debug("%s of the mount raised from %d to %d", what, current, value)
    except (OSError, ValueError) as exc:
        if what not in _left_at_default:
            _left_at_default.add(what)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.info(
                "%s of the mount left at the kernel's default (%s: %s): %s",
                what, path, reason, cost,
            )


async def run_mount(
    config: MountConfig, entries: Sequence[Entry], *, on_ready: Callable[[], None]
) -> None:
    """Mount ``entries`` at ``config.mountpoint``; return once cleanly unmounted.

    Raises UsageError (bad mount point, unusable cache directory) or another RangefsError
    before anything is mounted; KeyboardInterrupt after a clean unmount caused by SIGINT.
    ``on_ready`` is called once, on the trio thread, when the mount answers requests.
    """
    try:
        await _run_mount(config, entries, on_ready=on_ready)
    except BaseExceptionGroup as group:
        # trio nurseries wrap every error in a group: hand one RangefsError to the CLI as
        # itself (its exit code and one-line message); anything else stays a loud group.
        leaf = _sole_error(group)
        if isinstance(leaf, RangefsError):
            raise leaf from None
        raise


def _start_metrics(config: MountConfig, store: ObjectStore) -> MetricsServer | None:
    """The --metrics endpoint, listening (UsageError if it cannot), or None."""
    if config.metrics is None:
        return None
    budget = store.budget
    server = MetricsServer(config.metrics, store.stats, CacheGauges(
        used=lambda: budget.used,
        limit=budget.last_limit,
        evicted=lambda: budget.evicted_bytes,
        open_objects=store.open_caches,
    ))
    server.start()
    return server


def _start_control(config: MountConfig, store: ObjectStore, tree: Tree,
                   ops: RangeOperations, listings: Listings) -> None:
    """Listen on the control socket (``rangefs status``, ``prefetch``, ``evict``) and name
    it in the root's ``user.rangefs.control``. A socket that cannot be made costs those
    commands only: one warning, and the mount goes on."""
    path = control.socket_path(store.cachedir.root)
    try:
        sock = control.bind(path)
    except (OSError, UsageError) as exc:
        log.warning("no control socket (rangefs status/prefetch/evict will not reach this "
                    "mount): %s: %s", path, getattr(exc, "strerror", None) or exc)
        return
    commands = MountControl(mountpoint=config.mountpoint, urllist=config.urllist, tree=tree,
                            store=store, listings=listings, forgotten=ops.forgotten)
    store.tasks.start("control socket", control.serve, sock, path, commands.handlers)
    store.tasks.start("origin rate sampler", commands.sample_rate)
    ops.control_socket = os.fspath(path)


def _start_recording(config: MountConfig, store: ObjectStore, listings: Listings,
                     ops: RangeOperations, stack: contextlib.ExitStack) -> None:
    """--record (the recorder, flushed every second and at unmount) and --prefetch-list
    (its ranges fetched from now on, in order; ``recording.py``). UsageError if a file
    cannot be opened or read."""
    if config.record is not None:
        recorder = Recorder(config.record)
        stack.callback(recorder.close)
        ops.recorder = recorder
        store.tasks.start("recorder", recorder.run)
    if config.prefetch_list is not None:
        player = Player(read_list(config.prefetch_list), config.store.concurrency)
        store.tasks.start("recorded prefetch", player.run,
                          functools.partial(_fetch_range, store, listings))


async def _fetch_range(store: ObjectStore, listings: Listings, path: str, offset: int,
                       length: int) -> bool:
    """Bring bytes ``offset..offset+length-1`` of the file at ``path`` into the cache,
    as a read would (bounded by the read timeout; the listed directories on the way are
    listed as a lookup would); False if there is no such file."""
    with trio.move_on_after(store.config.read_timeout) as scope:
        node = await listings.resolve(path)
    if scope.cancelled_caught or not isinstance(node, FileNode):
        return False
    obj = store.get(node.entry)
    with trio.move_on_after(store.config.read_timeout) as scope:
        handle = await obj.open()
        try:
            if isinstance(handle, ObjectHandle):
                held = await handle.hold(offset, length)
                if held is not None:
                    version, token, _, _ = held
                    version.unpin(token)
            else:
                await handle.read(offset, length)  # through the process that owns it
        finally:
            handle.release()
    if scope.cancelled_caught:
        raise ReadTimeout(f"{path} [{offset}:{offset + length}]: no data after "
                          f"{store.config.read_timeout:g} s")
    return True


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one leaf exception of ``group`` (nested groups flattened), or None if several."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None


def raise_fd_limit() -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (systemd's services and
    many shells start with a soft 1024). The mount needs 2 descriptors per cache in use
    and one per connection; idle caches are closed (objects.IDLE_GRACE), so the limit
    bounds the files open at once, not the files ever read."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as exc:
        log.info("the open-file limit stays at %d: %s", soft, exc)
        return
    log.debug("open-file limit raised from %d to %d", soft, want)


async def _run_mount(
    config: MountConfig, entries: Sequence[Entry], *, on_ready: Callable[[], None]
) -> None:
    check_mountpoint(config.mountpoint)
    raise_fd_limit()
    tree = Tree.from_entries(entries)
    store = ObjectStore(entries, config.store)
    listings = Listings(tree, store, ttl=config.listing_ttl)
    ops = RangeOperations(tree, store, block_size=config.store.block_size, listings=listings)
    mountpoint = os.fspath(config.mountpoint)
    initialised = False
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals, \
            contextlib.ExitStack() as stack:
        try:
            async with trio.open_nursery() as nursery:
                shutdown = _Shutdown(nursery.cancel_scope)
                nursery.start_soon(_watch_signals, signals, shutdown)
                await nursery.start(store.run)
                metrics = _start_metrics(config, store)
                if metrics is not None:
                    stack.callback(metrics.stop)
                _start_control(config, store, tree, ops, listings)
                _start_recording(config, store, listings, ops, stack)
                async with trio.open_nursery() as fuse:
                    try:
                        pyfuse3.init(ops, mountpoint, fuse_options(config))
                    except RuntimeError as exc:
                        raise InternalError(
                            f"cannot mount at {mountpoint}: {exc} (is /dev/fuse usable and "
                            "fusermount3 installed?)"
                        ) from exc
                    initialised = True
                    shutdown.fuse = fuse.cancel_scope
                    fuse.start_soon(ops.invalidate_changed, store.changed,
                                    name="kernel cache invalidation")
                    fuse.start_soon(ops.forget_queued, name="kernel name invalidation")
                    fuse.start_soon(_fuse_main, shutdown, fuse.cancel_scope)
                    dev = await _wait_live(config.mountpoint, config.ready_timeout)
                    _raise_read_ahead(dev, config.read_ahead_kb)
                    _raise_max_background(dev, config.max_background)
                    log.info(
                        "mounted %d entries of %s at %s", len(entries), config.urllist, mountpoint
                    )
                    on_ready()
                    await trio.sleep_forever()
                # The FUSE loop has stopped (signal or external unmount): stop the store,
                # which flushes every index before this nursery exits.
                nursery.cancel_scope.cancel()
        finally:
            if initialised:
                service.notify("STOPPING=1")
                pyfuse3.close(unmount=True)
                log.info("unmounted %s", mountpoint)
    if shutdown.signal == signal.SIGINT:
        raise KeyboardInterrupt

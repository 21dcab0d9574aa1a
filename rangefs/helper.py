"""A second process for ``rangefs download``: the machine's second CPU core.

Why by hand: above ~700 MiB/s a download is bound by its one event-loop thread (receiving,
and writing into the page cache); Python threads share one interpreter lock, so a second
process is the way to a second core (measured on the bench's fast link: two processes on
the halves of 1 GiB, 855-908 MiB/s; one on the whole, 547-599). ``multiprocessing`` would
import everything again in a spawned process (0.15-0.25 s) and forking inside ``trio.run``
is unsafe, so the command line forks the helper once, before ``trio.run``, and the helper
waits on a pipe for its job.

Protocol (two pipes, this process family only). Parent to helper: one pickled
:class:`HelperJob` (the URL, what the parent's probe found, the data file, the runs of
blocks to fetch), then end of file; end of file alone means "no job" (the helper exits
0). Helper to parent: 16 bytes per run of blocks written (first block, count; one write
each, so atomic on a pipe), then its exit status: 0 when every block of the job was
written, 1 otherwise.

Who owns what: the parent holds the partial directory's lock and the only
``LocalDownloadCache``; it alone claims blocks in the index (``adopt_blocks`` after each
report), flushes, verifies and renames, and afterwards fetches whatever the helper left.
The helper only writes its blocks into the data file (opened by path) and reports them.
A block the helper wrote but did not report is never claimed (fetched again on a resume):
nothing it did is trusted without its report. The helper dies with its parent
(``PR_SET_PDEATHSIG``); Ctrl-C reaches both (one process group).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import trio
import trio.lowlevel

from .cachefiles import open_data_file, pwritev_all, start_writeback
from .download import (
    WRITE_BEHIND_BYTES,
    CachingDownloader,
    DownloadOptions,
)
from .fasthttp import BULK_RECEIVE_SIZE, receive_size
from .ranges import ByteRanges
from .ratecontrol import ConcurrencyController, ConcurrencyPlan, Limiter
from .source import HttpSession, RemoteInfo

log = logging.getLogger(__name__)

_REPORT = struct.Struct("<QQ")  # first block, count
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class HelperJob:
    """What the helper fetches: ``runs`` (inclusive block indices) of the object ``info``
    describes, into ``data``; at most ``streams`` requests at once of ``request_bytes``;
    ``max_rate`` bytes/s (None: unlimited)."""

    url: str
    info: RemoteInfo
    data: Path
    block_size: int
    runs: tuple[tuple[int, int], ...]
    streams: int
    request_bytes: int
    max_rate: float | None


class Helper:
    """The parent's end of a forked helper. Create with :meth:`fork` before ``trio.run``;
    :meth:`run_job` or :meth:`close` once (both reap it)."""

    def __init__(self, pid: int, job_fd: int, report_fd: int) -> None:
        self.pid = pid
        self._job_fd = job_fd
        self._report_fd = report_fd
        self.exit_status: int | None = None

    @classmethod
    def fork(cls, options: DownloadOptions) -> Helper | None:
        """Fork a helper that waits for a job; None where it would not help (one CPU this
        process may run on; a URL command, which the helper could not share) or fork
        fails. Call before trio.run, from the only thread."""
        if len(os.sched_getaffinity(0)) < 2 or options.url_command is not None:
            return None
        job_r, job_w = os.pipe()
        report_r, report_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            log.info("no helper process: fork failed: %s", exc)
            for fd in (job_r, job_w, report_r, report_w):
                os.close(fd)
            return None
        if pid == 0:  # the helper
            os.close(job_w)
            os.close(report_r)
            _helper_main(parent, job_r, report_w, options)
        os.close(job_r)
        os.close(report_w)
        return cls(pid, job_w, report_r)

    async def run_job(self, job: HelperJob, on_written: Callable[[int, int], None]) -> int:
        """Send ``job``; call ``on_written(first block, count)`` for every run the helper
        reports, until it exits; return its exit status (0: the whole job written; a
        helper already gone when the job is sent has its own status, or 1). An exception
        of ``on_written``, or cancellation, stops the helper (SIGTERM) and reaps it. Once."""
        try:
            data = pickle.dumps(job)
            async with trio.lowlevel.FdStream(self._job_fd) as out:
                self._job_fd = -1
                try:
                    await out.send_all(data)
                except trio.BrokenResourceError:  # it died before reading its job
                    log.info("the download helper (pid %d) is gone", self.pid)
            async with trio.lowlevel.FdStream(self._report_fd) as reports:
                self._report_fd = -1
                pending = b""
                while chunk := await reports.receive_some(64 << 10):
                    pending += chunk
                    whole = len(pending) - len(pending) % _REPORT.size
                    for first, count in _REPORT.iter_unpack(pending[:whole]):
                        on_written(first, count)
                    pending = pending[whole:]
            self.exit_status = await trio.to_thread.run_sync(self._reap)
            return self.exit_status
        finally:
            if self.exit_status is None:
                self.close()

    def close(self) -> None:
        """Stop the helper (no job, or the job abandoned) and reap it. Idempotent."""
        for name in ("_job_fd", "_report_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)
        if self.exit_status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            self.exit_status = self._reap()

    def _reap(self) -> int:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return 1
        return os.waitstatus_to_exitcode(status)


def _helper_main(parent: int, job_fd: int, report_fd: int, options: DownloadOptions) -> NoReturn:
    """The helper process: wait for the job, fetch it, report; never returns."""
    code = 1
    try:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl
            os._exit(1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        chunks = []
        while chunk := os.read(job_fd, 1 << 16):
            chunks.append(chunk)
        os.close(job_fd)
        if not chunks:
            code = 0
        else:
            job = pickle.loads(b"".join(chunks))
            code = trio.run(_fetch, job, report_fd, options)
    except KeyboardInterrupt:
        code = 130
    except BaseException as exc:  # nothing of it may escape into the parent's code
        with contextlib.suppress(Exception):
            log.warning("download helper: %s", exc)
    finally:
        os._exit(code)


async def _fetch(job: HelperJob, report_fd: int, options: DownloadOptions) -> int:
    sink = _Sink(job, report_fd)
    try:
        with receive_size(BULK_RECEIVE_SIZE):
            session = HttpSession(options.http)
        async with session:
            downloader = CachingDownloader(
                sink,  # type: ignore[arg-type]  # the subset of a cache a download uses
                session.reader(job.url, job.info),
                controller=ConcurrencyController(ConcurrencyPlan(
                    initial=min(ConcurrencyPlan.initial, job.streams), maximum=job.streams)),
                request_bytes=job.request_bytes,
                limiter=Limiter(bytes_per_second=job.max_rate),
                backoff=options.backoff,
                wait_for_completion=True,
                max_passes=options.max_passes,
                pass_delay=options.pass_delay,
            )
            status = await downloader.run()
    finally:
        sink.close()
    return 0 if status.complete else 1


class _Sink:
    """What a CachingDownloader uses of a cache, for the helper: the blocks outside the job
    count as cached; written blocks go into the data file and are reported. Trio thread."""

    def __init__(self, job: HelperJob, report_fd: int) -> None:
        self.size = job.info.size
        self.block_size = job.block_size
        self.bitmap = ByteRanges(self.size, self.block_size)
        self.num_blocks = self.bitmap.num_blocks
        after = 0  # every block outside the job's runs counts as done
        for first, last in (*job.runs, (self.num_blocks, self.num_blocks)):
            for index in range(after, first):
                self.bitmap.set_block(index)
            after = last + 1
        self.directory = job.data.parent
        self.closed = False
        self._fd = open_data_file(job.data)
        self._report_fd = report_fd
        self._unhanded = 0

    def write_blocks(self, first: int, parts: Sequence[bytes | memoryview]) -> int:
        """Write the run's blocks that belong to the job and report them; the others (a
        fetcher that streams the whole object from a server ignoring Range brings them
        too) are left to the parent. Returns how many were written."""
        views = [memoryview(part).cast("B") for part in parts]
        length = sum(len(view) for view in views)
        bs = self.block_size
        count = -(-length // bs)
        if self.bitmap.first_set(first, first + count) is None:  # all of it is ours
            self._write(first, count, views, length)
            return count
        data = memoryview(b"".join(views))
        written = 0
        index = first
        while index < first + count:
            start = self.bitmap.first_clear(index, first + count)
            if start is None:
                break
            stop = self.bitmap.first_set(start, first + count)
            stop = first + count if stop is None else stop
            piece = data[(start - first) * bs : min((stop - first) * bs, length)]
            self._write(start, stop - start, [piece], len(piece))
            written += stop - start
            index = stop
        return written

    def _write(self, first: int, count: int, views: list[memoryview], length: int) -> None:
        pwritev_all(self._fd, views, first * self.block_size)
        for index in range(first, first + count):
            self.bitmap.set_block(index)
        os.write(self._report_fd, _REPORT.pack(first, count))
        self._unhanded += length
        if self._unhanded >= WRITE_BEHIND_BYTES:
            self._unhanded = 0
            start_writeback(self._fd)

    def complete(self) -> bool:
        return self.bitmap.complete()

    def cached_bytes_and_blocks(self) -> tuple[int, int]:
        return self.bitmap.cached_bytes(), self.bitmap.count_set()

    def needs_flush(self) -> bool:
        return False  # the parent makes the blocks durable

    async def flush(self) -> None:
        return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)
            os.close(self._report_fd)

"""`rangefs download`'s helper process (rangefs/helper.py), as a user runs the command:
a subprocess against a real origin (tests/faultserver.py), signals included."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rangefs.download import HELPER_MIN_BYTES, partial_dir
from tests.content import check
from tests.daemons import alive
from tests.faultserver import FaultServer
from tests.test_cli_download import AT_A_TERMINAL, claims_a_block

RANGEFS = [sys.executable, "-m", "rangefs.cli"]
MiB = 1 << 20
HELPED = re.compile(rb"helper process \(pid (\d+)\) fetched (\d+) bytes and ended with status "
                    rb"(-?\d+)")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def _wait(condition: object, what: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit  # a hang guard, not a timing assertion
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_the_helper_fetches_its_half_exactly(origin: FaultServer, tmp_path: Path) -> None:
    size = 96 * MiB + 12345
    origin.add("/big", size)
    dest = tmp_path / "big"
    done = subprocess.run([*RANGEFS, "download", "-v", origin.url("/big"), str(dest)],
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    check("/big", 0, dest.read_bytes())
    found = HELPED.search(done.stderr)
    assert found is not None, done.stderr
    pid, helped, status = (int(g) for g in found.groups())
    assert status == 0 and 0 < helped < size and not alive(pid)
    assert origin.bytes_sent("/big") <= size + 2 * MiB  # nothing fetched twice but retries
    assert os.listdir(tmp_path) == ["big"]


@pytest.mark.parametrize(("size", "flags"), [(HELPER_MIN_BYTES - 1, []),
                                            (HELPER_MIN_BYTES + 5 * MiB, ["--no-helper"])])
def test_no_helper_below_the_threshold_or_when_refused(origin: FaultServer, tmp_path: Path,
                                                        size: int, flags: list[str]) -> None:
    origin.add("/small", size)
    dest = tmp_path / "small"
    done = subprocess.run([*RANGEFS, "download", "-v", *flags, origin.url("/small"),
                           str(dest)], capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    check("/small", 0, dest.read_bytes())
    assert HELPED.search(done.stderr) is None


def _slow_download(origin: FaultServer, tmp_path: Path) -> tuple[subprocess.Popen[bytes],
                                                                  Path, list[str], int]:
    size = 80 * MiB
    origin.add("/big", size)
    origin.delay = 0.02
    dest = tmp_path / "big"
    args = [*AT_A_TERMINAL, "download", "-v", "--block-size", "256K", "--max-rate", "24M",
            origin.url("/big"), str(dest)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    _wait(lambda: _children(proc.pid) and origin.bytes_sent("/big") > 8 * MiB,
          "the download did not start with its helper")
    return proc, dest, args, size


def test_a_killed_helper_leaves_its_blocks_to_the_parent(origin: FaultServer,
                                                         tmp_path: Path) -> None:
    proc, dest, _, _ = _slow_download(origin, tmp_path)
    (helper,) = _children(proc.pid)
    os.kill(helper, signal.SIGKILL)
    origin.delay = 0
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    check("/big", 0, dest.read_bytes())
    found = HELPED.search(stderr)
    assert found is not None and int(found.group(3)) == -signal.SIGKILL, stderr


def test_the_helper_dies_with_its_parent_and_a_rerun_resumes(origin: FaultServer,
                                                            tmp_path: Path) -> None:
    proc, dest, args, size = _slow_download(origin, tmp_path)
    (helper,) = _children(proc.pid)
    _wait(lambda: claims_a_block(partial_dir(dest)), "the index claimed nothing")
    proc.kill()
    proc.wait()
    _wait(lambda: not alive(helper), "the helper outlived its parent")
    assert not dest.exists() and partial_dir(dest).exists()
    origin.delay = 0
    origin.reset_log()
    rerun = subprocess.run(args, capture_output=True, timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    check("/big", 0, dest.read_bytes())
    resumed = int(rerun.stderr.split(b"downloaded, ")[1].split(b" resumed")[0])
    assert resumed > 0 and origin.bytes_sent("/big") <= size - resumed + 2 * MiB


def test_ctrl_c_stops_both(origin: FaultServer, tmp_path: Path) -> None:
    proc, dest, _, _ = _slow_download(origin, tmp_path)
    (helper,) = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole process group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    _wait(lambda: not alive(helper), "the helper outlived Ctrl-C")
    assert not dest.exists() and partial_dir(dest).exists()


def test_the_helper_takes_the_second_half_of_what_is_missing(tmp_path: Path) -> None:
    from rangefs.cache import LocalDownloadCache
    from rangefs.cachefiles import ObjectIdentity
    from rangefs.download import _helper_share

    bs = 1 * MiB
    size = HELPER_MIN_BYTES + 20 * bs + 7  # 85 blocks, the last one 7 bytes
    identity = ObjectIdentity(url="https://example.org/o", size=size, block_size=bs,
                              etag='"1"', last_modified=None)
    with LocalDownloadCache.open(tmp_path / "o", identity, reserve=False) as cache:
        assert _helper_share(cache) == ((43, 84),)  # 85 missing: 43 here, 42 to the helper
        for index in [*range(0, 10), *range(50, 60)]:
            cache.write_block(index, bytes(bs))
        # 65 missing (10-49, 60-84): 33 here (10-42), 32 to the helper
        assert _helper_share(cache) == ((43, 49), (60, 84))
        for index in range(10, 30):
            cache.write_block(index, bytes(bs))
        assert _helper_share(cache) == ()  # 45 MiB missing: below HELPER_MIN_BYTES


def test_a_helper_gone_before_its_job_is_a_status_not_an_error(tmp_path: Path) -> None:
    """A helper that died before reading its job (killed, out of memory): run_job returns
    its status, so the parent fetches everything itself."""
    import trio

    from rangefs.download import DownloadOptions
    from rangefs.helper import Helper, HelperJob
    from rangefs.source import RemoteInfo

    helper = Helper.fork(DownloadOptions())
    assert helper is not None, "this test needs 2 CPUs (as CI has)"
    os.kill(helper.pid, signal.SIGKILL)
    _wait(lambda: not alive(helper.pid), "the helper did not die")
    info = RemoteInfo(url="http://127.0.0.1:1/x", size=MiB, etag='"1"', last_modified=None,
                      mtime=None, accept_ranges=True, digest=None)
    job = HelperJob(url=info.url, info=info, data=tmp_path / "data", block_size=MiB,
                    runs=((0, 0),), streams=1, request_bytes=MiB, max_rate=None)
    written: list[tuple[int, int]] = []
    status = trio.run(helper.run_job, job, lambda first, count: written.append((first, count)))
    assert status == -signal.SIGKILL and written == [] and helper.exit_status == status
    helper.close()  # idempotent

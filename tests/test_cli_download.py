"""`rangefs download` and `rangefs cat` as a user runs them (subprocess, real origin)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rangefs.cachefiles import read_index
from rangefs.download import partial_dir
from tests.content import check, sha256_of
from tests.faultserver import FaultServer

RANGEFS = [sys.executable, "-m", "rangefs.cli"]
# rangefs as started from a terminal, where Ctrl-C interrupts it: a process started in the
# background by a non-interactive shell (a CI runner's) inherits SIGINT ignored, and then
# Python leaves it ignored
AT_A_TERMINAL = [sys.executable, "-c",
                 "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)"
                 "; from rangefs.cli import main; sys.argv[0] = 'rangefs'; main()"]


def rangefs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*RANGEFS, *args], capture_output=True, timeout=timeout, check=False)


def test_download_and_cat(origin: FaultServer, tmp_path: Path) -> None:
    size = 5 * 1024 * 1024 + 1
    origin.add("/dir/a.bin", size)
    done = rangefs("download", "--block-size", "256K", origin.url("/dir/a.bin"), str(tmp_path))
    assert done.returncode == 0, done.stderr
    check("/dir/a.bin", 0, (tmp_path / "a.bin").read_bytes())
    assert b"5242881 bytes" in done.stderr
    cat = rangefs("cat", origin.url("/dir/a.bin"))
    assert cat.returncode == 0, cat.stderr
    check("/dir/a.bin", 0, cat.stdout)
    assert len(cat.stdout) == size


def test_download_checks_the_given_sha256(origin: FaultServer, tmp_path: Path) -> None:
    origin.add("/a", 100_000)
    dest = tmp_path / "a"
    bad = rangefs("download", "--sha256", "0" * 64, origin.url("/a"), str(dest))
    assert bad.returncode == 1
    assert bad.stderr.decode().count("\n") == 1 and b"expected 0000" in bad.stderr
    assert not dest.exists()
    good = rangefs("download", "--sha256", sha256_of("/a", 100_000), origin.url("/a"), str(dest))
    assert good.returncode == 0, good.stderr
    assert b"sha256 verified" in good.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--block-size", "12K"], b"power of two"),
        (["--concurrency", "0"], b"concurrency"),
        (["--sha256", "xyz"], b"--sha256"),
        (["--header", "no colon"], b"Name: value"),
    ],
)
def test_bad_options_exit_2(origin: FaultServer, tmp_path: Path, args: list[str],
                            message: bytes) -> None:
    result = rangefs("download", *args, origin.url("/a"), str(tmp_path / "x"))
    assert result.returncode == 2
    assert message in result.stderr


def test_missing_object_exits_1_with_one_line(origin: FaultServer, tmp_path: Path) -> None:
    result = rangefs("download", origin.url("/missing?sig=SECRET"), str(tmp_path / "x"))
    assert result.returncode == 1
    line = result.stderr.decode()
    assert line.startswith("rangefs: ") and line.count("\n") == 1 and "404" in line
    assert "SECRET" not in line
    assert os.listdir(tmp_path) == []


def test_an_object_larger_than_the_disk_is_refused_and_leaves_nothing(
    origin: FaultServer, tmp_path: Path
) -> None:
    origin.add("/huge", shutil.disk_usage(tmp_path).free + (1 << 40))
    result = rangefs("download", origin.url("/huge"), str(tmp_path / "huge"))
    assert result.returncode == 1
    line = result.stderr.decode()
    assert line.startswith("rangefs: ") and line.count("\n") == 1, line
    assert "not enough space" in line and "give a DEST on a larger file system" in line, line
    assert os.listdir(tmp_path) == []  # no DEST.rangefs-part/ with a lock file in it


def test_existing_dest_is_a_usage_error(origin: FaultServer, tmp_path: Path) -> None:
    origin.add("/a", 10)
    (tmp_path / "a").write_bytes(b"mine")
    result = rangefs("download", origin.url("/a"), str(tmp_path / "a"))
    assert result.returncode == 2 and b"--force" in result.stderr
    assert rangefs("download", "--force", origin.url("/a"), str(tmp_path / "a")).returncode == 0
    check("/a", 0, (tmp_path / "a").read_bytes())


def claims_a_block(directory: Path) -> bool:
    """True once the index in ``directory`` claims a block (False before its first flush)."""
    try:
        _, bitmap = read_index(directory / "index")
    except FileNotFoundError:
        return False
    return any(bitmap)


def test_kill_9_then_rerun_resumes(origin: FaultServer, tmp_path: Path) -> None:
    size = 48 * 1024 * 1024
    origin.add("/big", size)
    origin.delay = 0.02
    dest = tmp_path / "big"
    args = [*RANGEFS, "download", "--block-size", "256K", "--concurrency", "2",
            "--max-rate", "16M", origin.url("/big"), str(dest)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60  # a hang guard
    # a third sent, and the index on disk claims some of it: a kill now leaves a resumable
    # download (the rate limit keeps it from finishing meanwhile)
    while origin.bytes_sent("/big") < size // 3 or not claims_a_block(partial_dir(dest)):
        assert time.monotonic() < deadline and proc.poll() is None, origin.bytes_sent("/big")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dest.exists() and partial_dir(dest).exists()
    first = origin.bytes_sent("/big")
    origin.reset_log()
    origin.delay = 0
    rerun = subprocess.run(args, capture_output=True, timeout=60, check=False)
    assert rerun.returncode == 0, rerun.stderr
    check("/big", 0, dest.read_bytes())
    resumed = int(rerun.stderr.split(b"downloaded, ")[1].split(b" resumed")[0])
    assert resumed > 0
    assert origin.bytes_sent("/big") <= size - resumed + 64 * 1024
    assert first + origin.bytes_sent("/big") >= size
    assert os.listdir(tmp_path) == ["big"]


def test_ctrl_c_exits_130_without_a_traceback_and_a_rerun_resumes(
    origin: FaultServer, tmp_path: Path
) -> None:
    """SIGINT to the process group (what a terminal's Ctrl-C sends) while requests run."""
    size = 48 * 1024 * 1024
    origin.add("/big", size)
    origin.delay = 0.02
    dest = tmp_path / "big"
    args = [*AT_A_TERMINAL, "download", "--block-size", "256K", "--max-rate", "16M",
            origin.url("/big"), str(dest)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 60  # a hang guard
    while origin.bytes_sent("/big") < size // 4 or not claims_a_block(partial_dir(dest)):
        assert time.monotonic() < deadline and proc.poll() is None, origin.bytes_sent("/big")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert b"Traceback" not in stderr, stderr
    origin.delay = 0
    rerun = subprocess.run(args, capture_output=True, timeout=60, check=False)
    assert rerun.returncode == 0, rerun.stderr
    check("/big", 0, dest.read_bytes())
    assert int(rerun.stderr.split(b"downloaded, ")[1].split(b" resumed")[0]) > 0


def test_256_mib_with_faults_on_a_fifth_of_requests(origin: FaultServer, tmp_path: Path) -> None:
    size = 256 * 1024 * 1024
    origin.add("/big", size)
    origin.fault_probability(
        "/big", 0.2,
        ["status", "reset", "reset_body", "short_body", "wrong_start", "wrong_total",
         "wrong_length", "ignore_range", "gzip"],
        seed=5,
    )
    dest = tmp_path / "big"
    result = rangefs("download", "--sha256", sha256_of("/big", size), "--retries", "12",
                     origin.url("/big"), str(dest), timeout=240)
    assert result.returncode == 0, result.stderr
    faulted = [r for r in origin.gets("/big") if r.fault is not None]
    assert len(faulted) >= 5  # the faults really happened
    check("/big", 0, dest.read_bytes())

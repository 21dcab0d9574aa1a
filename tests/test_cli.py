"""The command line: option parsing, errors before anything is mounted, exit codes, daemon mode.

Most tests run the real CLI in a subprocess (exit codes and stderr are the interface);
value parsers are tested in-process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from rangefs import cli
from rangefs.errors import UsageError
from tests.daemons import alive
from tests.mountutil import (
    is_mounted,
    mounted,
    rangefs_pids,
    require_fuse,
    run_rangefs,
    unmount,
    write_list,
)

# -- start-up -----------------------------------------------------------------------------


def test_download_and_cat_do_not_import_the_mount_stack() -> None:
    """`rangefs download`/`cat`/`status` import neither the mount's modules nor FUSE nor
    prometheus (every start of the command pays for what it imports); `mount --help` still
    lists the choices that settings.py holds for it."""
    probe = ("import sys, rangefs.cli; print(' '.join(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('rangefs', 'pyfuse3', 'prometheus_client'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.split()
    assert "rangefs.download" in loaded and "rangefs.settings" in loaded
    for heavy in ("rangefs.mount", "rangefs.objects", "rangefs.listings", "rangefs.ops",
                  "rangefs.metrics", "pyfuse3", "prometheus_client"):
        assert heavy not in loaded
    helptext = CliRunner().invoke(cli.rangefs, ["mount", "--help"]).output
    assert "[open|none|all]" in helptext and "3600" in helptext


# -- value parsers (in-process) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("4K", 4096),
        ("256k", 256 << 10),
        ("1M", 1 << 20),
        ("1MiB", 1 << 20),
        ("1mb", 1 << 20),
        ("20G", 20 << 30),
        ("1.5K", 1536),
        (" 2T ", 2 << 40),
        ("0", 0),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert cli.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "K", "1X", "-1M", "1.0000001K", "1 M B", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        cli.parse_size(text)


def test_parse_header() -> None:
    assert cli.parse_header("Authorization: Bearer abc:def ") == ("Authorization", "Bearer abc:def")
    assert cli.parse_header("X-Empty:") == ("X-Empty", "")
    for bad in ("no colon here", ": value", "Bad Name: x", "Range: bytes=0-1"):
        with pytest.raises(ValueError) as info:
            cli.parse_header(bad)
        assert "value" not in str(info.value) or "Name: value" in str(info.value)


def test_parse_header_error_never_shows_the_value() -> None:
    with pytest.raises(ValueError) as info:
        cli.parse_header("X-Token: sec\nret")
    assert "sec" not in str(info.value)


def test_read_header_file(tmp_path: Path) -> None:
    path = tmp_path / "headers"
    path.write_text("# secrets\n\nAuthorization: Bearer T0KEN\nX-A: b\n")
    assert cli.read_header_file(str(path)) == [("Authorization", "Bearer T0KEN"), ("X-A", "b")]
    path.write_text("X-A: b\nnot a header SECRETVALUE\n")
    with pytest.raises(UsageError) as info:
        cli.read_header_file(str(path))
    assert str(info.value).startswith(f"{path}:2: ")
    assert "SECRETVALUE" not in str(info.value)


def test_default_cache_dir(tmp_path: Path) -> None:
    assert cli.default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "rangefs"
    home = Path(os.path.expanduser("~"))
    assert cli.default_cache_dir({}) == home / ".cache" / "rangefs"


def test_prepare_cache_dir(tmp_path: Path) -> None:
    made = cli.prepare_cache_dir(tmp_path / "a" / "b")
    assert made.is_dir()
    assert made.stat().st_mode & 0o777 == 0o700
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="--cache-dir"):
        cli.prepare_cache_dir(blocker / "sub")


# -- help ----------------------------------------------------------------------------------


def test_mount_help_explains_every_option_with_units_and_defaults() -> None:
    result = CliRunner().invoke(cli.rangefs, ["mount", "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for option in (
        "--cache-dir", "--cache-size", "--block-size", "--concurrency", "--max-rate",
        "--prefetch", "--read-timeout", "--header", "--header-file", "--allow-other",
        "--foreground", "--log-file", "--verbose", "--debug",
    ):
        assert option in text
    for fact in (
        "RANGEFS_CACHE_DIR", "RANGEFS_HEADER_FILE", "~/.cache/rangefs", "default: 64K",
        "4K to 64M", "bytes per second", "default: 60.0", "default: open", "default: 32",
        "default: unlimited", "-v info, -vv debug", "Never logged",
    ):
        assert fact in text, fact


def test_group_help_lists_mount() -> None:
    result = CliRunner().invoke(cli.rangefs, ["--help"])
    assert result.exit_code == 0
    assert "mount" in result.output


# -- usage errors: exit 2, one line, nothing mounted ---------------------------------------


def _assert_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("lines", "line", "reason"),
    [
        (["http://h/a size=1", "ftp://h/b"], 2, "scheme"),
        (["# c", "", "http://h/a ../x size=1"], 3, ".."),
        (["http://h/a x size=1", "http://h/b x size=2"], 2, "x"),
        (["http://h/a /abs size=1"], 1, "abs"),
        (["http://h/a d size=1", "http://h/b d/e size=1"], 2, "d"),
        (["http://h/a sha256:zz"], 1, "sha256"),
        (["http://h/a size=-4"], 1, "size"),
    ],
)
def test_bad_url_list_exits_2_with_file_and_line(
    tmp_path: Path, mnt: Path, lines: list[str], line: int, reason: str
) -> None:
    urls = write_list(tmp_path / "list.urls", lines)
    result = run_rangefs(["mount", "-f", "--cache-dir", str(tmp_path / "c"), str(urls), str(mnt)])
    _assert_usage_error(result, f"rangefs: {urls}:{line}: ")
    assert reason.lower() in result.stderr.lower()
    assert len(result.stderr.strip().splitlines()) == 1
    assert not is_mounted(mnt)
    assert not (tmp_path / "c").exists(), "nothing may be created for a bad list"


def test_bad_url_list_on_stdin(tmp_path: Path, mnt: Path) -> None:
    result = run_rangefs(
        ["mount", "-f", "--cache-dir", str(tmp_path / "c"), "-", str(mnt)],
        input=b"http://h/a size=1\n\nfile:///etc/passwd\n",
    )
    _assert_usage_error(result, "rangefs: ", ":3: ")
    assert not is_mounted(mnt)


def test_missing_url_list(tmp_path: Path, mnt: Path) -> None:
    result = run_rangefs(["mount", "-f", str(tmp_path / "nope.urls"), str(mnt)])
    _assert_usage_error(result, "nope.urls")


@pytest.mark.parametrize("case", ["missing", "file", "nonempty"])
def test_bad_mount_point_exits_2(tmp_path: Path, case: str) -> None:
    urls = write_list(tmp_path / "list.urls", ["http://127.0.0.1:9/a size=10"])
    target = tmp_path / "target"
    if case == "file":
        target.write_text("x")
    elif case == "nonempty":
        target.mkdir()
        (target / "something").write_text("x")
    result = run_rangefs(
        ["mount", "-f", "--cache-dir", str(tmp_path / "c"), str(urls), str(target)]
    )
    expected = {"missing": "does not exist", "file": "not a directory", "nonempty": "not empty"}
    _assert_usage_error(result, f"rangefs: mount point {target}", expected[case])
    assert len(result.stderr.strip().splitlines()) == 1
    assert not is_mounted(target)
    assert not (tmp_path / "c").exists(), "nothing may be created for a bad mount point"


def test_already_mounted_mount_point_exits_2(tmp_path: Path, mnt: Path) -> None:
    urls = write_list(tmp_path / "list.urls", ["http://127.0.0.1:9/a size=10"])
    with mounted(urls, mnt, cache_dir=tmp_path / "c1"):
        result = run_rangefs(
            ["mount", "-f", "--cache-dir", str(tmp_path / "c2"), str(urls), str(mnt)]
        )
        _assert_usage_error(result, "already a mount point", "fusermount3 -u")
        assert is_mounted(mnt), "the first mount must survive"


def test_unusable_cache_dir_exits_2(tmp_path: Path, mnt: Path) -> None:
    urls = write_list(tmp_path / "list.urls", ["http://127.0.0.1:9/a size=10"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_rangefs(
        ["mount", "-f", "--cache-dir", str(blocker / "cache"), str(urls), str(mnt)]
    )
    _assert_usage_error(result, "rangefs: cache directory", "--cache-dir")
    assert not is_mounted(mnt)


def test_cache_dir_from_environment(tmp_path: Path, mnt: Path) -> None:
    urls = write_list(tmp_path / "list.urls", ["http://127.0.0.1:9/a size=10"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_rangefs(
        ["mount", "-f", str(urls), str(mnt)], env={"RANGEFS_CACHE_DIR": str(blocker / "c")}
    )
    _assert_usage_error(result, str(blocker / "c"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--block-size", "3000"], "--block-size"),
        (["--block-size", "2K"], "--block-size"),
        (["--block-size", "128M"], "--block-size"),
        (["--block-size", "1Q"], "--block-size"),
        (["--cache-size", "lots"], "--cache-size"),
        (["--max-rate", "fast"], "--max-rate"),
        (["--concurrency", "0"], "--concurrency"),
        (["--prefetch", "some"], "--prefetch"),
        (["--read-timeout", "0"], "--read-timeout"),
        (["--read-timeout", "soon"], "--read-timeout"),
        (["--header", "Authorization Bearer SECRETVALUE"], "--header"),
        (["--no-such-option"], "no-such-option"),
    ],
)
def test_bad_options_exit_2(tmp_path: Path, mnt: Path, args: list[str], needle: str) -> None:
    urls = write_list(tmp_path / "list.urls", ["http://127.0.0.1:9/a size=10"])
    result = run_rangefs(["mount", "-f", *args, str(urls), str(mnt)])
    _assert_usage_error(result, needle)
    assert "SECRETVALUE" not in result.stderr
    assert not is_mounted(mnt)


def test_bad_header_file_exits_2_without_the_secret(tmp_path: Path, mnt: Path) -> None:
    urls = write_list(tmp_path / "list.urls", ["http://127.0.0.1:9/a size=10"])
    headers = tmp_path / "headers"
    headers.write_text("Authorization Bearer SECRETVALUE\n")
    result = run_rangefs(
        ["mount", "-f", str(urls), str(mnt)], env={"RANGEFS_HEADER_FILE": str(headers)}
    )
    _assert_usage_error(result, f"{headers}:1:")
    assert "SECRETVALUE" not in result.stderr


def test_good_options_are_accepted(tmp_path: Path, mnt: Path) -> None:
    urls = write_list(tmp_path / "list.urls", ["http://127.0.0.1:9/a size=10"])
    headers = tmp_path / "headers"
    headers.write_text("X-From-File: 1\n")
    args = [
        "--block-size", "256K", "--cache-size", "1G", "--concurrency", "4", "--max-rate", "50M",
        "--prefetch", "none", "--read-timeout", "2.5", "--header", "X-A: b",
        "--header-file", str(headers), "--log-file", str(tmp_path / "log"), "--allow-other",
    ]
    with mounted(urls, mnt, *args, cache_dir=tmp_path / "c") as mount:
        assert os.path.getsize(mnt / "a") == 10
        [line] = [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                  if f" {mnt} " in ln]
        assert "allow_other" in line.split(" - ")[1], line
        assert "default_permissions" in line and " ro" in line
        assert mount.stop() == 0
    assert "mounted 1 entries" in (tmp_path / "log").read_text()


# -- daemon mode -------------------------------------------------------------------------


def _wait_gone(pids: list[int], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{pid}") and alive(pid) for pid in pids):
            return
        time.sleep(0.05)
    pytest.fail(f"daemon {pids} still running")


def test_daemon_mode_returns_0_once_mounted(tmp_path: Path, mnt: Path) -> None:
    require_fuse()
    urls = write_list(tmp_path / "list.urls", ["http://127.0.0.1:9/a size=10"])
    pids: list[int] = []
    try:
        result = run_rangefs(["mount", "--cache-dir", str(tmp_path / "c"), str(urls), str(mnt)])
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt), "daemon mode must return only once the mount is live"
        assert os.path.getsize(mnt / "a") == 10
        pids = rangefs_pids(mnt)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGTERM)
        _wait_gone(pids)
        assert not is_mounted(mnt)
    finally:
        unmount(mnt)
        for pid in rangefs_pids(mnt):
            os.kill(pid, signal.SIGKILL)


def test_daemon_mode_reports_the_child_error(tmp_path: Path, mnt: Path) -> None:
    """An error after the fork (the --metrics port is taken) is printed by the foreground
    parent, which exits with the child's code; nothing stays mounted."""
    require_fuse()
    urls = write_list(tmp_path / "list.urls", ["http://127.0.0.1:9/a size=10"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_rangefs(["mount", "--cache-dir", str(tmp_path / "c"), "--metrics",
                              f"127.0.0.1:{port}", str(urls), str(mnt)])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rangefs: --metrics 127.0.0.1:"), lines
    assert "cannot listen" in lines[0]
    assert not is_mounted(mnt)
    _wait_gone(rangefs_pids(mnt))


def test_daemon_mode_unmount_with_fusermount_stops_the_daemon(tmp_path: Path, mnt: Path) -> None:
    require_fuse()
    urls = write_list(tmp_path / "list.urls", ["http://127.0.0.1:9/a size=10"])
    try:
        result = run_rangefs(["mount", "--cache-dir", str(tmp_path / "c"), str(urls), str(mnt)])
        assert result.returncode == 0, result.stderr
        pids = rangefs_pids(mnt)
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        _wait_gone(pids)
        assert not is_mounted(mnt)
    finally:
        unmount(mnt)
        for pid in rangefs_pids(mnt):
            os.kill(pid, signal.SIGKILL)

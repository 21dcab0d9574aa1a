"""Service integration: sd_notify, stale mounts, and the systemd unit file."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rangefs import service
from tests.mountutil import (
    ROOT,
    is_mounted,
    mounted,
    require_fuse,
    run_rangefs,
    unmount,
    write_list,
)

UNIT = ROOT / "systemd" / "rangefs@.service"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket, as systemd's; its path is ``sock.getsockname()``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(20)
    try:
        yield sock
    finally:
        sock.close()


def _receive_until(sock: socket.socket, needle: str) -> list[str]:
    """Datagrams received until one contains ``needle`` (fails on timeout)."""
    messages: list[str] = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pytest.fail(f"no {needle!r} from rangefs; got {messages}")
        if needle in messages[-1]:
            return messages


# -- sd_notify -------------------------------------------------------------------------------


def test_notify_to_a_path_socket(notify_socket: socket.socket) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.getsockname()}
    assert service.notify("READY=1\nSTATUS=x", environ=env)
    assert notify_socket.recv(100) == b"READY=1\nSTATUS=x"


def test_notify_to_an_abstract_socket() -> None:
    name = f"rangefs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert service.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"STOPPING=1"


def test_notify_without_socket_does_nothing(tmp_path: Path) -> None:
    assert not service.notify("READY=1", environ={})
    assert not service.notify("READY=1", environ={"NOTIFY_SOCKET": "relative/path"})
    assert not service.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "none")})


def test_foreground_mount_sends_ready_then_stopping(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    urls = write_list(tmp_path / "l.urls", ["http://127.0.0.1:9/a size=10"])
    mnt = tmp_path / "mnt"
    env = {"NOTIFY_SOCKET": notify_socket.getsockname()}
    with mounted(urls, mnt, cache_dir=tmp_path / "c", env=env) as mount:
        messages = _receive_until(notify_socket, "READY=1")
        assert is_mounted(mnt), "READY=1 must come only once the mount is live"
        assert os.path.getsize(mnt / "a") == 10
        assert mount.stop() == 0
        messages += _receive_until(notify_socket, "STOPPING=1")
    assert sum("READY=1" in m for m in messages) == 1


def test_daemon_mode_hands_systemd_the_child_pid(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """Without --foreground the parent (systemd's main PID) sends READY=1 with MAINPID=
    the child that serves the mount, then exits 0."""
    require_fuse()
    urls = write_list(tmp_path / "l.urls", ["http://127.0.0.1:9/a size=10"])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    child = None
    try:
        result = run_rangefs(
            ["mount", "--cache-dir", str(tmp_path / "c"), str(urls), str(mnt)],
            env={"NOTIFY_SOCKET": notify_socket.getsockname()},
        )
        assert result.returncode == 0, result.stderr
        messages = _receive_until(notify_socket, "READY=1")
        fields = dict(line.split("=", 1) for line in messages[-1].splitlines())
        child = int(fields["MAINPID"])
        assert Path(f"/proc/{child}/cmdline").read_bytes().count(str(mnt).encode()) == 1
        assert is_mounted(mnt)
        os.kill(child, signal.SIGTERM)
        _receive_until(notify_socket, "STOPPING=1")
    finally:
        unmount(mnt)
        if child is not None:
            for _ in range(200):
                try:
                    os.kill(child, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                os.kill(child, signal.SIGKILL)
    assert not is_mounted(mnt)


# -- stale mounts ------------------------------------------------------------------------------


def test_clear_stale_mount(tmp_path: Path) -> None:
    urls = write_list(tmp_path / "l.urls", ["http://127.0.0.1:9/a size=10"])
    mnt = tmp_path / "mnt"
    assert not service.is_stale_mount(tmp_path)
    assert not service.clear_stale_mount(tmp_path)  # not a mount at all
    with mounted(urls, mnt, cache_dir=tmp_path / "c") as mount:
        assert not service.is_stale_mount(mnt)
        assert not service.clear_stale_mount(mnt)  # live: left alone
        assert is_mounted(mnt)
        mount.send(signal.SIGKILL)
        mount.wait_exit()
        assert service.is_stale_mount(mnt)
        assert not service.clear_stale_mount(mnt, fstype="fuse.other")  # not ours: left
        assert is_mounted(mnt)
        assert service.clear_stale_mount(mnt)
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == []


def test_mountinfo_unescape() -> None:
    assert service._unescape(r"/mnt/with\040space\011tab\134back") == "/mnt/with space\ttab\\back"
    assert service._unescape("/plain") == "/plain"
    assert service._unescape("/odd\\04") == "/odd\\04"


# -- the systemd unit ----------------------------------------------------------------------------


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def _values(key: str) -> list[str]:
    """Every value of ``key`` in [Service] (systemd allows repeated keys)."""
    values = []
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line.startswith(key + "="):
            values.append(line[len(key) + 1 :])
    return values


def test_unit_file_keys() -> None:
    unit = _unit()
    svc = unit["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert svc["ExecStart"].split() == [
        "/usr/local/bin/rangefs", "mount", "--foreground", "$RANGEFS_OPTS",
        "/etc/rangefs/%i.urls", "/mnt/%i",
    ]
    assert "-/etc/rangefs/%i.env" in _values("EnvironmentFile")
    assert "RANGEFS_CACHE_DIR=/var/cache/rangefs/%i" in _values("Environment")
    assert svc["CacheDirectory"] == "rangefs/%i"
    stop_post = _values("ExecStopPost")
    assert any(v.startswith("-") and "fusermount3 -u -z /mnt/%i" in v for v in stop_post)
    assert svc["Restart"] == "on-failure"
    namespacing = {
        "PrivateTmp", "ProtectSystem", "ProtectHome", "PrivateMounts", "PrivateDevices",
        "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem",
        "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountFlags",
        "ProtectKernelTunables", "ProtectControlGroups", "ProtectKernelModules",
        "ProtectKernelLogs", "ProtectProc", "ProcSubset", "PrivateUsers", "DynamicUser",
        "ProtectClock", "ProtectHostname", "PrivateNetwork", "NetworkNamespacePath",
    }
    for section in unit.sections():
        used = namespacing & set(unit[section])
        assert not used, f"options that give a private mount namespace: {used}"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` of an instance; the rangefs path is swapped for an
    executable that exists here (verify insists that ExecStart's binary does)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # not installed: the key test above is all we can do
        test_unit_file_keys()
        return
    fake = tmp_path / "rangefs"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = UNIT.read_text().replace("/usr/local/bin/rangefs", str(fake))
    (tmp_path / "rangefs@.service").write_text(text)
    (tmp_path / "rangefs@demo.service").symlink_to("rangefs@.service")
    for name in ("rangefs@demo.service", "rangefs@.service"):
        result = subprocess.run(
            [analyze, "verify", str(tmp_path / name)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == "", result.stderr  # unknown keys only warn
    bad = text.replace("NotifyAccess=main", "NotifyAcess=main")
    (tmp_path / "rangefs@.service").write_text(bad)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "rangefs@demo.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert "NotifyAcess" in result.stderr, "verify must be able to catch a bad key"


def test_readme_documents_install_and_use() -> None:
    text = (ROOT / "systemd" / "README.md").read_text()
    for needle in (
        "rangefs@.service", "/etc/systemd/system", "systemctl daemon-reload",
        "systemctl enable --now rangefs@", "/etc/rangefs/", ".urls", ".env", "RANGEFS_OPTS",
        "/var/cache/rangefs/", "journalctl", "--allow-other", "fusermount3",
    ):
        assert needle in text, needle


def test_a_detached_mount_without_log_file_logs_where_help_says(tmp_path: Path) -> None:
    """Without --foreground and --log-file, stderr is /dev/null: the log goes to syslog
    (the journal) where /dev/log exists, else to CACHE_DIR/rangefs.log (0600), so the
    reason for an EIO is always written somewhere a user can find."""
    require_fuse()
    urls = write_list(tmp_path / "l.urls", ["http://127.0.0.1:9/a bad"])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "c"
    log_path = cache / "rangefs.log"
    try:
        result = run_rangefs(["mount", "--cache-dir", str(cache), str(urls), str(mnt)])
        assert result.returncode == 0, result.stderr
        with pytest.raises(OSError):
            os.stat(mnt / "bad")
    finally:
        unmount(mnt)
    if os.path.exists("/dev/log"):
        assert not log_path.exists()  # syslog has it
        return
    hang_guard = time.monotonic() + 30
    while "connection refused" not in (log_path.read_text() if log_path.exists() else ""):
        assert time.monotonic() < hang_guard, "the probe failure was not logged"
        time.sleep(0.05)
    assert log_path.stat().st_mode & 0o777 == 0o600
    assert "127.0.0.1:9" in log_path.read_text()

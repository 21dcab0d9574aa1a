"""mount(8), fstab lines and mount.fuse3 for real: ``mount -t fuse.rangefs LIST MOUNTPOINT
-o ...`` and ``mount --fstab FILE MOUNTPOINT`` mount through /sbin/mount.fuse3, a file is
read through the mount and checked against the origin, ``umount`` unmounts.

mount(8) (util-linux 2.38) removes PATH from the environment of its helpers, so
mount.fuse3's ``/bin/sh -c 'rangefs ...'`` finds ``rangefs`` on the shell's default PATH
(/usr/local/sbin first). Each test therefore runs mount(8) in a private mount namespace
(:class:`HelperNamespace`) where a directory holding a ``rangefs`` wrapper (this checkout,
the test's Python) is bind-mounted on /usr/local/sbin and a tmpfs on /run/mount (libmount's
utab): nothing of the machine is changed, /etc/fstab is never read. The test reads the
mount through /proc/PID/root of a process in that namespace.

Root is required (mount(8) runs helpers for root only): without it the tests fail, never
skip.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rangefs import mount as rangefs_mount
from tests import content
from tests.faultserver import FaultServer
from tests.mountutil import (
    ROOT,
    child_env,
    mounted,
    rangefs_argv,
    rangefs_pids,
    require_fuse,
    run_rangefs,
    unmount,
    write_list,
)

SIZE = 3 * (1 << 20) + 12345  # several blocks of every block size used, and a partial one
WAIT = 30.0  # how long to wait for a daemon to exit after its unmount (no timing asserted)


def require_root_and_tools() -> None:
    """Fail (never skip) when mount(8) cannot run helpers here."""
    require_fuse()
    if os.geteuid() != 0:
        pytest.fail("the mount(8)/fstab tests need root (mount runs helpers for root only)")
    for tool in ("mount", "umount", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install util-linux")
    if not os.path.exists("/sbin/mount.fuse3"):
        pytest.fail("/sbin/mount.fuse3 is missing: install the fuse3 package")


class HelperNamespace:
    """A private mount namespace whose /usr/local/sbin holds a ``rangefs`` wrapper running
    this checkout (and logging its argv), held open by a ``sleep`` process."""

    def __init__(self, tmp_path: Path) -> None:
        self.bindir = tmp_path / "sbin"
        self.bindir.mkdir()
        self.argv_log = tmp_path / "helper-argv"
        env = child_env()
        wrapper = self.bindir / "rangefs"
        wrapper.write_text(
            "#!/bin/sh\n"
            f"printf '%s\\n' \"$*\" >> {shlex.quote(str(self.argv_log))}\n"
            f"export PYTHONPATH={shlex.quote(env['PYTHONPATH'])}\n"
            f"exec {shlex.join(rangefs_argv())} \"$@\"\n"
        )
        wrapper.chmod(0o755)
        script = (
            'mount --bind "$1" /usr/local/sbin && mount -t tmpfs tmpfs /run/mount '
            "&& echo ready && exec sleep 3600"
        )
        os.makedirs("/run/mount", exist_ok=True)
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", script, "sh", str(self.bindir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line != b"ready\n":
            self.holder.kill()
            _, err = self.holder.communicate(timeout=10)
            pytest.fail(f"cannot set up a mount namespace: {err.decode(errors='replace')}")

    @property
    def pid(self) -> int:
        return self.holder.pid

    def run(self, *cmd: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``cmd`` in the namespace (mount(8) there gets a clean environment anyway)."""
        return subprocess.run(
            ["nsenter", "--target", str(self.pid), "--mount", "--", *cmd],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            check=False, cwd="/",
        )

    def path(self, path: Path) -> Path:
        """``path`` as seen in the namespace."""
        return Path(f"/proc/{self.pid}/root") / path.relative_to("/")

    def mounts(self, mountpoint: Path) -> list[tuple[str, str, str]]:
        """(fstype, source, mount options) of each mount at ``mountpoint`` there."""
        found = []
        for line in Path(f"/proc/{self.pid}/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == str(mountpoint):
                sep = fields.index("-")
                found.append((fields[sep + 1], fields[sep + 2], fields[5]))
        return found

    def helper_argv(self) -> list[str]:
        """How the wrapper was run, one line per run (its arguments, joined by spaces)."""
        if not self.argv_log.exists():
            return []
        return self.argv_log.read_text().splitlines()

    def close(self, mountpoint: Path) -> None:
        """Unmount what is left at ``mountpoint``, stop its daemon, end the namespace."""
        try:
            if self.mounts(mountpoint):
                self.run("umount", "-l", str(mountpoint))
            for pid in rangefs_pids(mountpoint):
                os.kill(pid, signal.SIGKILL)
        finally:
            self.holder.kill()
            self.holder.communicate(timeout=10)


def _wait_daemon_gone(mountpoint: Path) -> None:
    deadline = time.monotonic() + WAIT
    while rangefs_pids(mountpoint):
        if time.monotonic() > deadline:
            pytest.fail(f"the rangefs daemon of {mountpoint} still runs after the unmount")
        time.sleep(0.05)


@pytest.fixture
def ns(tmp_path: Path, mnt: Path) -> Iterator[HelperNamespace]:
    require_root_and_tools()
    namespace = HelperNamespace(tmp_path)
    try:
        yield namespace
    finally:
        namespace.close(mnt)


def _read_and_check(ns: HelperNamespace, path: Path, key: str) -> None:
    data = ns.path(path).read_bytes()
    assert len(data) == SIZE
    content.check(key, 0, data)


def _umount(ns: HelperNamespace, mountpoint: Path) -> None:
    result = ns.run("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert ns.mounts(mountpoint) == []
    _wait_daemon_gone(mountpoint)


def test_mount_t_fuse_rangefs(
    ns: HelperNamespace, origin: FaultServer, tmp_path: Path, mnt: Path, cache: Path
) -> None:
    origin.add("/data/obj.bin", SIZE)
    urls = write_list(tmp_path / "m.urls", [origin.url("/data/obj.bin") + " d/obj.bin"])
    options = f"cache_dir={cache},cache_size=64M,block_size=256K,allow_other,read_timeout=30"
    result = ns.run("mount", "-t", "fuse.rangefs", str(urls), str(mnt), "-o", options)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # mount(8) returned with the mount live and its daemon detached
    [(fstype, source, mount_options)] = ns.mounts(mnt)
    assert fstype == "fuse.rangefs" and source == str(urls)
    assert mount_options.split(",")[:1] == ["ro"], mount_options
    [argv] = ns.helper_argv()  # as mount.fuse3 ran it: rw added by mount(8), dev,suid by it
    assert argv == f"{urls} {mnt} -o rw,{options},dev,suid"
    _read_and_check(ns, mnt / "d" / "obj.bin", "/data/obj.bin")
    assert (cache / "objects").is_dir(), "the cache of cache_dir= holds the object"
    assert not (mnt / "d").exists(), "the mount is in the namespace only"
    _umount(ns, mnt)


def test_fstab_line(
    ns: HelperNamespace, origin: FaultServer, tmp_path: Path, mnt: Path, cache: Path
) -> None:
    """A line as it would be in /etc/fstab, from a temporary fstab (``mount --fstab``):
    generic options beside rangefs' own; ``mount -a`` then finds it mounted (the mount's
    source is the list's path) and leaves it alone."""
    origin.add("/f.bin", SIZE)
    urls = write_list(tmp_path / "f.urls", [origin.url("/f.bin")])
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# a test fstab\n"
        f"{urls} {mnt} fuse.rangefs defaults,_netdev,nofail,noatime,x-systemd.automount,"
        f"x-systemd.idle-timeout=600,comment=rangefs,cache_dir={cache},cache_size=1G,"
        'prefetch=none,concurrency=4,header="X-Fstab:\\040a,b" 0 0\n'
    )
    result = ns.run("mount", "--fstab", str(fstab), str(mnt))
    assert result.returncode == 0, result.stderr
    assert [m[:2] for m in ns.mounts(mnt)] == [("fuse.rangefs", str(urls))]
    _read_and_check(ns, mnt / "f.bin", "/f.bin")
    # a quoted value keeps its comma; fstab's \040 is a space
    assert {r.headers.get("x-fstab") for r in origin.gets("/f.bin")} == {"a,b"}
    again = ns.run("mount", "-a", "--fstab", str(fstab))
    assert again.returncode == 0, again.stderr
    assert len(ns.mounts(mnt)) == 1, "mount -a must not mount it a second time"
    [argv] = ns.helper_argv()
    assert "prefetch=none,concurrency=4" in argv and "x-systemd" not in argv
    _umount(ns, mnt)


def test_errors_come_back_through_mount(
    ns: HelperNamespace, tmp_path: Path, mnt: Path, cache: Path
) -> None:
    """A bad list, an unknown option, an error after the fork (the --metrics port is
    taken): rangefs' one line on mount(8)'s stderr, a failed mount, nothing mounted."""
    bad = write_list(tmp_path / "bad.urls", ["http://127.0.0.1:9/a size=1", "ftp://h/b"])
    result = ns.run("mount", "-t", "fuse.rangefs", str(bad), str(mnt), "-o", f"cache_dir={cache}")
    assert result.returncode != 0
    assert f"rangefs: {bad}:2: " in result.stderr, result.stderr
    assert ns.mounts(mnt) == []

    good = write_list(tmp_path / "good.urls", ["http://127.0.0.1:9/a size=10"])
    result = ns.run("mount", "-t", "fuse.rangefs", str(good), str(mnt), "-o", "allow_root")
    assert result.returncode != 0
    assert "rangefs: unknown mount option 'allow_root'" in result.stderr, result.stderr
    assert ns.mounts(mnt) == []

    with socket.socket() as taken:  # the --metrics port is taken: the forked child fails
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = ns.run("mount", "-t", "fuse.rangefs", str(good), str(mnt), "-o",
                        f"cache_dir={cache},metrics=127.0.0.1:{port}")
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("rangefs: ") and "cannot listen" in line, line
    assert ns.mounts(mnt) == []


# -- without mount(8): the helper's command line and -o with `rangefs mount` ------------------


def test_helper_command_line_mounts_in_the_background(
    origin: FaultServer, tmp_path: Path, mnt: Path, cache: Path
) -> None:
    """``rangefs LIST MOUNTPOINT -o ...`` as mount.fuse3 runs it: returns once mounted."""
    require_fuse()
    origin.add("/h.bin", SIZE)
    urls = write_list(tmp_path / "h.urls", [origin.url("/h.bin")])
    try:
        result = run_rangefs([str(urls), str(mnt), "-o",
                              f"rw,cache_dir={cache},block_size=128K,dev,suid"])
        assert result.returncode == 0, result.stderr
        data = (mnt / "h.bin").read_bytes()
        content.check("/h.bin", 0, data)
        assert len(data) == SIZE
        assert (cache / "objects").is_dir()
    finally:
        unmount(mnt)
        _wait_daemon_gone(mnt)


def test_o_with_the_mount_command(tmp_path: Path, mnt: Path, cache: Path) -> None:
    urls = write_list(tmp_path / "o.urls", ["http://127.0.0.1:9/a size=10"])
    with mounted(urls, mnt, "-o", "ro,allow_other,block_size=128K", cache_dir=cache) as mount:
        assert os.path.getsize(mnt / "a") == 10
        [line] = [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                  if f" {mnt} " in ln]
        assert "allow_other" in line.split(" - ")[1], line
        assert mount.stop() == 0


def test_fsname_is_the_lists_real_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real.urls").write_text("")
    (tmp_path / "link.urls").symlink_to("real.urls")
    assert rangefs_mount.fsname("link.urls") == str(tmp_path / "real.urls")
    assert rangefs_mount.fsname("-") == "rangefs"
    assert rangefs_mount.fsname("/a,b\\c.urls") == "/a\\,b\\\\c.urls"
    assert rangefs_mount.fsname("/les listes/x.urls") == "rangefs"
    assert rangefs_mount.fsname("/données.urls") == "rangefs"


def test_wrapper_runs_this_checkout() -> None:
    """The subprocesses above import rangefs from this tree, not another install."""
    result = subprocess.run(
        [sys.executable, "-c", "import rangefs; print(rangefs.__file__)"],
        env=child_env(), cwd="/", capture_output=True, text=True, check=True,
    )
    assert result.stdout.strip() == str(ROOT / "rangefs" / "__init__.py")

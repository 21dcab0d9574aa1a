"""Real mounts for tests: run ``rangefs mount --foreground`` in a subprocess, wait for the
mount while checking that the process lives, and ALWAYS unmount and reap it.

FUSE is required: a missing /dev/fuse or fusermount3 fails the test loudly (no skips).
The mount's stderr goes to a file (no pipe to fill); :meth:`Mount.stderr` reads it and
:meth:`Mount.check_log` fails on a bug report (``BUG in FUSE handler``, a traceback).
Waiting for the mount reads /proc/self/mountinfo (which never blocks on a hung FUSE server)
and then confirms with ``os.path.ismount``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MOUNT_TIMEOUT = 20.0
EXIT_TIMEOUT = 20.0
BUG_MARKERS = ("BUG in FUSE handler", "Traceback (most recent call last)")


def require_fuse() -> None:
    """Fail (never skip) when this machine cannot mount FUSE file systems."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: FUSE tests need the fuse kernel module")
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is missing: install the fuse3 package")


def rangefs_argv() -> list[str]:
    """How to run the CLI: the venv's console script if installed, else ``python -m``."""
    script = Path(sys.executable).parent / "rangefs"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "rangefs.cli"]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a rangefs subprocess: repo importable, no inherited systemd."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("RANGEFS_HEADER_FILE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def run_rangefs(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``rangefs ARGS`` to completion (for commands that return: errors, daemon mode)."""
    return subprocess.run(
        [*rangefs_argv(), *args],
        env=child_env(env),
        cwd=ROOT,
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_user(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120, hint: str = ""
) -> subprocess.CompletedProcess[bytes]:
    """``rangefs ARGS`` as a user runs it (no stdin); stdout and stderr as bytes. A run past
    ``timeout`` fails the test with its stderr so far (``hint``: what may be hanging)."""
    try:
        return subprocess.run(
            [*rangefs_argv(), *args], env=child_env(env), cwd=ROOT, capture_output=True,
            stdin=subprocess.DEVNULL, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        why = f" ({hint})" if hint else ""
        pytest.fail(f"rangefs {' '.join(args)} still running after {timeout:g} s{why}; "
                    f"stderr so far:\n{(exc.stderr or b'').decode(errors='replace')[-3000:]}")


def _mountinfo(mountpoint: Path) -> tuple[int, str] | None:
    """(mount id, fstype) of the topmost mount at exactly ``mountpoint``, or None.
    Reads /proc/self/mountinfo only, so it never blocks on a hung FUSE server."""
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split()
            point = fields[4].replace("\\040", " ").replace("\\011", "\t")
            point = point.replace("\\134", "\\")
            if point == target:
                found = (int(fields[0]), fields[fields.index("-") + 1])
    return found


def mount_source(mountpoint: Path) -> str | None:
    """The fstype of the mount at ``mountpoint`` (e.g. 'fuse.rangefs'), or None."""
    info = _mountinfo(mountpoint)
    return info[1] if info else None


def answers(mountpoint: Path, timeout: float = 2.0) -> bool:
    """True if a statfs of ``mountpoint`` (which always reaches a FUSE server) succeeds
    within ``timeout``: a live mount, not a stale one (ENOTCONN) left by a dead server.
    Runs in a daemon thread so that a hung server cannot hang the test."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.statvfs(mountpoint)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def is_mounted(mountpoint: Path) -> bool:
    """True if something is mounted at ``mountpoint`` (mountinfo; never blocks)."""
    return _mountinfo(mountpoint) is not None


def unmount(mountpoint: Path) -> None:
    """``fusermount3 -u``, then ``-u -z`` if that did not work. Never raises."""
    for args in (["-u"], ["-u", "-z"]):
        if not is_mounted(mountpoint):
            return
        subprocess.run(
            ["fusermount3", *args, str(mountpoint)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )


def reap(process: subprocess.Popen[bytes], timeout: float = EXIT_TIMEOUT) -> int:
    """Wait for ``process``; SIGKILL it if it does not exit within ``timeout``."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(10)


class Mount:
    """A running ``rangefs mount --foreground`` and its mount point."""

    def __init__(
        self, process: subprocess.Popen[bytes], mountpoint: Path, stderr_path: Path
    ) -> None:
        self.process = process
        self.mountpoint = mountpoint
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        """Everything the process wrote to stderr (and stdout) so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_log(self, *, warnings_ok: bool = False) -> None:
        """Fail if the log shows a bug (an unexpected exception in a handler, a traceback),
        or any WARNING/ERROR line unless ``warnings_ok`` (a test that provokes failures)."""
        text = self.stderr()
        for marker in BUG_MARKERS:
            if marker in text:
                pytest.fail(f"rangefs logged {marker!r}:\n{text}")
        if not warnings_ok:
            bad = [ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln]
            if bad:
                pytest.fail("unexpected warnings in the rangefs log:\n" + "\n".join(bad))

    def wait_mounted(self, timeout: float = MOUNT_TIMEOUT) -> None:
        """Wait until the mount answers, failing early (with stderr) if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"rangefs exited with {self.process.returncode} before mounting:\n"
                    f"{self.stderr()}"
                )
            if is_mounted(self.mountpoint) and answers(self.mountpoint):
                assert os.path.ismount(self.mountpoint)
                return
            time.sleep(0.05)
        pytest.fail(f"{self.mountpoint} was not mounted within {timeout:g} s:\n{self.stderr()}")

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit code; fails (with stderr) if the process does not exit in time."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rangefs did not exit within {timeout:g} s:\n{self.stderr()}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send ``signum`` and wait: the exit code (the mount must be gone)."""
        self.send(signum)
        code = self.wait_exit()
        assert not is_mounted(self.mountpoint), f"still mounted after exit:\n{self.stderr()}"
        return code

    def cleanup(self) -> None:
        """Unmount (if mounted) and reap the process, whatever state they are in."""
        try:
            if self.process.poll() is None and is_mounted(self.mountpoint):
                unmount(self.mountpoint)
        finally:
            if self.process.poll() is None:
                self.process.terminate()
            reap(self.process)
            unmount(self.mountpoint)


def start_mount(
    urllist: Path | str,
    mountpoint: Path,
    *args: str,
    cache_dir: Path,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    log_path: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Mount:
    """Start ``rangefs mount --foreground -v ARGS URLLIST MOUNTPOINT`` (does not wait).
    ``preexec_fn`` runs in the child before rangefs (e.g. to lower its resource limits)."""
    require_fuse()
    mountpoint.mkdir(parents=True, exist_ok=True)
    stderr_path = log_path or mountpoint.parent / f"{mountpoint.name}.stderr"
    extra = {"RANGEFS_CACHE_DIR": str(cache_dir)}
    if env:
        extra.update(env)
    with open(stderr_path, "ab") as err:
        process = subprocess.Popen(
            [*rangefs_argv(), "mount", "--foreground", "-v", *args, str(urllist), str(mountpoint)],
            env=child_env(extra),
            cwd=ROOT,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            preexec_fn=preexec_fn,
        )
    if stdin is not None:
        assert process.stdin is not None
        process.stdin.write(stdin)
        process.stdin.close()
    return Mount(process, mountpoint, stderr_path)


@contextlib.contextmanager
def mounted(
    urllist: Path | str,
    mountpoint: Path,
    *args: str,
    cache_dir: Path,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    check_log: bool = True,
    warnings_ok: bool = False,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[Mount]:
    """A live mount for the ``with`` body; always unmounted and reaped afterwards. When the
    body succeeds, the log is checked (``check_log``): no bug report ever, and no warning
    unless ``warnings_ok``."""
    mount = start_mount(
        urllist, mountpoint, *args, cache_dir=cache_dir, env=env, stdin=stdin,
        preexec_fn=preexec_fn,
    )
    try:
        mount.wait_mounted()
        yield mount
        if check_log:
            mount.check_log(warnings_ok=warnings_ok)
    finally:
        mount.cleanup()


def write_list(path: Path, lines: Sequence[str]) -> Path:
    """Write a URL list file; returns ``path``."""
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def rangefs_pids(mountpoint: Path) -> list[int]:
    """Live (not zombie) rangefs processes whose command line names ``mountpoint``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and str(mountpoint).encode() in argv and any(
            b"rangefs" in a for a in argv
        ):
            found.append(int(entry))
    return found


def wait_for(condition: Callable[[], object], what: str, limit: float = 15.0) -> None:
    """Wait until ``condition()`` is true (a hang guard, not a timing assertion); the test
    fails after ``limit`` seconds, saying ``what`` never happened."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.02)


def file_sizes(top: Path) -> dict[str, int]:
    """Every file under ``top`` (walked through whatever file system holds it): its path
    relative to ``top`` -> st_size."""
    found = {}
    for directory, _, names in os.walk(top):
        for name in names:
            path = Path(directory, name)
            found[path.relative_to(top).as_posix()] = path.stat().st_size
    return found

"""Running as a service: sd_notify, daemonizing after the mount is ready, stale mounts.

No libsystemd: ``notify`` sends one AF_UNIX datagram to ``$NOTIFY_SOCKET`` (a path, or an
abstract name written with a leading '@'). ``Daemon`` forks *after* argument parsing and
before trio starts: the child mounts and reports readiness (or a one-line error) over a
pipe; the parent exits 0 once the mount is live, or prints the child's error and exits
with the child's code. Everything here is sync and called from the main thread.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

_READY = b"READY\n"
_ERROR = b"ERROR "


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, newline-separated assignments) to systemd.

    Returns False without doing anything when ``$NOTIFY_SOCKET`` is unset; a send that
    fails is logged at WARNING and returns False (systemd's own failure, not ours).
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract name; ignored", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify %s failed: %s", state.split("\n", 1)[0], exc)
        return False
    return True


def _mount_fstype(path: Path) -> str | None:
    """The file system type of the mount whose mount point is exactly ``path``, if any."""
    target = os.path.abspath(path)
    fstype: str | None = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                # id parent major:minor root MOUNTPOINT opts... - FSTYPE source superopts
                fields = line.split()
                try:
                    sep = fields.index("-")
                except ValueError:
                    continue
                mountpoint = _unescape(fields[4])
                if mountpoint == target and sep + 1 < len(fields):
                    fstype = fields[sep + 1]  # the last one listed is on top
    except OSError:
        return None
    return fstype


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for space, \\011, \\012, \\134)."""
    out: list[str] = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_stale_mount(path: Path) -> bool:
    """True if ``path`` is a FUSE mount whose process is gone (ENOTCONN).

    Uses statfs, which always reaches the FUSE server: a plain stat of the mount's root
    can be answered from the kernel's attribute cache even after the server died.
    """
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def clear_stale_mount(path: Path, *, fstype: str | None = "fuse.rangefs") -> bool:
    """Lazily unmount ``path`` if it is a stale FUSE mount; True if one was cleared.

    Only a mount of type ``fstype`` is touched (None: any stale mount). Runs
    ``fusermount3 -u -z PATH``; a failure is logged and returns False.
    """
    if not is_stale_mount(path):
        return False
    found = _mount_fstype(path)
    if fstype is not None and found != fstype:
        log.warning("%s is a stale mount of type %s, not %s: left alone", path, found, fstype)
        return False
    result = subprocess.run(
        ["fusermount3", "-u", "-z", os.fspath(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        log.warning("could not clear the stale mount at %s: %s", path, result.stderr.strip())
        return False
    log.info("cleared a stale mount at %s (a previous rangefs did not unmount)", path)
    return True


class Daemon:
    """Fork into a background child that mounts; the foreground parent waits for it.

    Use::

        daemon = Daemon()
        if daemon.fork():      # in the child from here on
            ... mount, calling daemon.ready() once live, or daemon.fail(msg, code) ...
        # the parent never returns from fork(): it exits with the child's outcome

    Call before any thread or trio run exists. The child starts a new session and keeps
    its working directory (paths are resolved before forking anyway).
    """

    def __init__(self) -> None:
        self._wfd: int | None = None

    def fork(self) -> bool:
        """Fork; True in the child. The parent waits and ``sys.exit``s (never returns)."""
        rfd, wfd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            os.setsid()
            self._wfd = wfd
            return True
        os.close(wfd)
        sys.exit(self._parent(pid, rfd))

    @staticmethod
    def _parent(pid: int, rfd: int) -> int:
        """Wait for the child's report; the exit code for the parent."""
        chunks: list[bytes] = []
        with os.fdopen(rfd, "rb") as reader:
            while True:
                chunk = reader.read(4096)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"".join(chunks).startswith(_READY):
                    # Inherit systemd's duty: the child is the service now.
                    notify(f"READY=1\nMAINPID={pid}")
                    return 0
        message = b"".join(chunks)
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 1
        if code < 0:  # killed by a signal
            code = 128 - code
        if message.startswith(_ERROR):
            sys.stderr.write(message[len(_ERROR) :].decode(errors="replace").rstrip("\n") + "\n")
        else:
            sys.stderr.write(f"rangefs: the mount process exited with code {code} "
                             "before the mount was ready\n")
        return code if code != 0 else 1

    def ready(self) -> None:
        """In the child, once the mount is live: release the parent, detach stdio."""
        if self._wfd is None:
            return
        os.write(self._wfd, _READY)
        os.close(self._wfd)
        self._wfd = None
        _detach_stdio()

    def fail(self, message: str) -> bool:
        """In the child, before ready(): the parent prints ``message`` (one line) and exits
        with the child's exit code. False (nothing sent) after ready() or in the parent."""
        if self._wfd is None:
            return False
        line = message.replace("\n", " ").strip()
        os.write(self._wfd, _ERROR + line.encode(errors="replace") + b"\n")
        os.close(self._wfd)
        self._wfd = None
        return True


def _detach_stdio() -> None:
    """Point stdin/stdout/stderr at /dev/null (log handlers on them go quiet)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)

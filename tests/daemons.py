"""Start and stop the test rigs' servers (nginx, tinyproxy): one process in its own
session, ready when the server says so, stopped with SIGTERM and, if stuck, SIGKILL to its
whole session; a free port found by trying; nginx's common configuration and start;
whether a process is alive. Used by tests/tlsrig.py, tests/tierrig.py, tests/proxyrig.py,
tests/bench/httpcpu.py and the tests that watch rangefs's processes end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

PORT_ATTEMPTS = 8
"""Ports tried before a rig gives up (another process may take a free port first)."""
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

Proc = subprocess.Popen[bytes]


def start_daemon(
    argv: Sequence[str],
    stderr_log: Path,
    *,
    ready: Callable[[Proc], bool],
    logs: Callable[[], str],
    port_taken: str,
    error: type[Exception],
    name: str,
) -> Proc | None:
    """Run ``argv`` (stdout and stderr appended to ``stderr_log``) until ``ready(proc)``;
    the process, or None if it exited because its port was taken (``port_taken`` in
    ``logs()``: the caller tries another). Raises ``error`` (with the logs) if it exited
    otherwise or was not ready within START_TIMEOUT seconds (it is stopped then)."""
    with open(stderr_log, "ab") as err:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            if port_taken in logs():
                return None
            raise error(f"{name} exited with {code}:\n{logs()}")
        if ready(proc):
            return proc
        time.sleep(0.02)
    stop_daemon(proc)
    raise error(f"{name} did not start within {START_TIMEOUT:g} s:\n{logs()}")


def stop_daemon(proc: Proc | None) -> None:
    """SIGTERM, then SIGKILL to the whole session if it does not exit within
    STOP_TIMEOUT seconds; never raises; None is a no-op."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)  # nginx: fast shutdown, the master stops its workers
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)


def pid_file_ready(pidfile: Path) -> Callable[[Proc], bool]:
    """nginx's readiness: it writes its pid file once its listening socket listens."""

    def ready(proc: Proc) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return int(pidfile.read_text().strip()) == proc.pid
        return False

    return ready


class NginxLogs:
    """Reading the access and error logs of a rig's nginx (``access_log``, ``error_log``:
    set by the rig)."""

    access_log: Path
    error_log: Path

    def access_lines(self) -> list[str]:
        """Every request nginx finished so far (one line each; logged when it ends)."""
        try:
            return self.access_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def requests(self, path: str | None = None, method: str | None = None) -> list[str]:
        """Access-log lines, of ``path`` only and/or ``method`` only when given."""
        lines = self.access_lines()
        if path is not None:
            lines = [ln for ln in lines if f' "{path}" ' in ln]
        if method is not None:
            lines = [ln for ln in lines if f" {method} " in ln]
        return lines

    def error_lines(self) -> list[str]:
        try:
            return self.error_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def free_port() -> int:
    """A port nobody listens on right now (the kernel's choice for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def on_a_free_port(
    start_on: Callable[[int], bool], logs: Callable[[], str], error: type[Exception], name: str
) -> None:
    """Call ``start_on(port)`` with free ports until it returns True (the server listens);
    False means another process took the port first. ``error`` with the last logs after
    PORT_ATTEMPTS."""
    failures = []
    for _ in range(PORT_ATTEMPTS):
        if start_on(free_port()):
            return
        failures.append(logs())
    raise error(f"{name} did not start:\n" + "\n".join(failures[-2:]))


class Rig:
    """A server for the body of a ``with`` block: :meth:`start` on entry (stopped again if
    starting fails), :meth:`stop` on exit whatever happened."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def nginx_main(work: Path, error_level: str) -> str:
    """The top of an nginx configuration for a rig in ``work``: foreground, one worker
    (as root: running as root, to read the rig's 0700 directories), pid and error log in
    ``work``."""
    user = "user root root;" if os.geteuid() == 0 else ""
    return (f"daemon off;\nmaster_process on;\nworker_processes 1;\n{user}\n"
            f"pid {work}/nginx.pid;\nerror_log {work}/error.log {error_level};\n")


def nginx_temp_paths(work: Path) -> str:
    """The ``http {}`` lines that keep nginx's temporary files in ``work/tmp``."""
    return "".join(f"    {kind}_temp_path {work}/tmp/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def start_nginx(
    exe: str, work: Path, conf: Path, text: str, stderr_log: Path, *,
    logs: Callable[[], str], error: type[Exception],
) -> Proc | None:
    """Write ``text`` to ``conf`` and run nginx with it (prefix ``work``) until its pid
    file says it listens: the process, or None if its port was taken (see start_daemon)."""
    conf.write_text(text)
    pidfile = work / "nginx.pid"
    pidfile.unlink(missing_ok=True)
    return start_daemon(
        [exe, "-p", str(work), "-c", str(conf), "-e", str(stderr_log)],
        stderr_log, ready=pid_file_ready(pidfile), logs=logs,
        port_taken="Address already in use", error=error, name="nginx",
    )

"""The machine side of the benchmark: installing tools, page cache, processes, FUSE mounts.

Everything that can block on a peer is bounded: subprocesses get a timeout (then SIGKILL of
their process group), mount waits poll /proc/self/mountinfo (which never blocks on a hung
FUSE server), and a mount that does not go away is aborted through fusectl and lazily
unmounted.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

# command -> Debian package that provides it
TOOLS = {
    "nginx": "nginx",
    "aria2c": "aria2",
    "rclone": "rclone",
    "httpdirfs": "httpdirfs",
    "curl": "curl",
    "fusermount3": "fuse3",
}
LUA_MODULE = Path("/usr/lib/nginx/modules/ngx_http_lua_module.so")
NGINX_MODULES = LUA_MODULE.parent


def log(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def ensure_tools(commands: Sequence[str]) -> None:
    """apt-get install the packages of ``commands`` that are missing (update once first)."""
    missing = sorted({TOOLS[c] for c in commands if shutil.which(c) is None})
    if not LUA_MODULE.exists():
        missing.append("libnginx-mod-http-lua")
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"bench: missing {' '.join(missing)}; install them (needs root)")
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *missing],
        check=True, env=env, timeout=1200, stdout=subprocess.DEVNULL,
    )
    # the Debian nginx package may start the system nginx (port 80); it is not ours
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["systemctl", "disable", "--now", "nginx"], timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


# Python module -> PyPI distribution: the bench's optional peers that are PyPI packages,
# installed into the benchmark's own environment (sys.executable's) when a run needs them
PIP_PEERS = {"hf_transfer": "hf-transfer", "safetensors": "safetensors", "numpy": "numpy"}


def ensure_pip(modules: Sequence[str]) -> None:
    """``pip install`` the PyPI packages of ``modules`` that this Python cannot import
    (into its own environment, like ``.venv/bin/pip install py-spy`` for --profile); the
    suite never needs them."""
    import importlib.util

    missing = sorted({PIP_PEERS[m] for m in modules if importlib.util.find_spec(m) is None})
    if not missing:
        return
    log(f"installing {' '.join(missing)} with pip into {sys.prefix}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *missing], check=True, timeout=1200)


def drop_page_cache() -> bool:
    """sync, then drop the page cache (root only). True if it was dropped."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    mem_kib = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem_kib / (1 << 20):.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load at start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    }


def tool_versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        lines = (out.stdout + out.stderr).strip().splitlines()
        mine = [line for line in lines if argv[0].lower().rstrip("c") in line.lower()]
        return (mine or lines or ["?"])[0]

    return {
        "nginx": first_line(["nginx", "-v"]),
        "aria2c": first_line(["aria2c", "--version"]),
        "curl": first_line(["curl", "--version"]),
        "rclone": first_line(["rclone", "version"]),
        "httpdirfs": first_line(["httpdirfs", "--version"]),
    }


# -- processes ---------------------------------------------------------------------------


def run(
    argv: Sequence[str], *, timeout: float, stdout: int | None = subprocess.DEVNULL,
    cwd: Path | None = None, env: dict[str, str] | None = None,
) -> tuple[int | None, float, str]:
    """Run ``argv`` in its own process group: (exit code or None on timeout, seconds, stdout).

    On timeout, or when interrupted, the whole group is SIGKILLed."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(argv), stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
        cwd=cwd, env=env, text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return None, time.perf_counter() - start, ""
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): the child goes too
        kill_group(proc)
        raise
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 and err:
        log(f"{argv[0]} exited {proc.returncode}: {err.strip()[-400:]}")
    return proc.returncode, elapsed, out or ""


def kill_group(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of ``pid`` in KiB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of ``pid`` so far (all its threads), or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_cpu_seconds(pid: int) -> float:
    """:func:`cpu_seconds` of a daemon being measured; RuntimeError if it is gone."""
    seconds = cpu_seconds(pid)
    if seconds is None:
        raise RuntimeError(f"the daemon (pid {pid}) is gone")
    return seconds


# -- FUSE mounts -------------------------------------------------------------------------


def _mountinfo(mountpoint: Path) -> tuple[str, str] | None:
    """(major:minor, fstype) of the topmost mount at ``mountpoint``; never blocks."""
    target = os.path.abspath(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            fields = line.split()
            if fields[4].replace("\\040", " ") == target:
                found = (fields[2], fields[fields.index("-") + 1])
    return found


def is_mounted(mountpoint: Path) -> bool:
    return _mountinfo(mountpoint) is not None


def wait_mounted(mountpoint: Path, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll until ``mountpoint`` is a FUSE mount (True) or the process died / time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _mountinfo(mountpoint)
        if info is not None and info[1].startswith("fuse"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def abort_fuse(mountpoint: Path) -> None:
    """Abort the FUSE connection of ``mountpoint`` (fusectl): every blocked request fails."""
    info = _mountinfo(mountpoint)
    if info is None:
        return
    conn = Path("/sys/fs/fuse/connections")
    if conn.is_dir() and not any(conn.iterdir()):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(conn)], timeout=10,
                           check=False, stderr=subprocess.DEVNULL)
    minor = info[0].split(":")[1]
    with contextlib.suppress(OSError):
        (conn / minor / "abort").write_text("1\n")


def unmount(mountpoint: Path, proc: subprocess.Popen[bytes] | None, *, grace: float = 20.0) -> None:
    """fusermount3 -u, then -u -z (after aborting a hung connection); reap the daemon."""
    for args in (["-u"], ["-u", "-z"]):
        if not is_mounted(mountpoint):
            break
        if args == ["-u", "-z"]:
            abort_fuse(mountpoint)
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["fusermount3", *args, str(mountpoint)], timeout=30, check=False,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        time.sleep(0.05)
    if proc is None:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        log(f"{proc.args[0] if isinstance(proc.args, list) else proc.args} did not exit after "
            "unmount: SIGTERM, then SIGKILL")
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            kill_group(proc)
    if is_mounted(mountpoint):
        abort_fuse(mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], timeout=30, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_rusage(
    argv: Sequence[str], *, timeout: float, cwd: Path | None = None,
) -> tuple[int | None, float, float | None]:
    """Run ``argv`` (own process group, output discarded): (exit code or None on timeout,
    seconds, peak RSS in MiB). See :func:`run_measured`."""
    code, elapsed, rss, _ = run_measured(argv, timeout=timeout, cwd=cwd)
    return code, elapsed, rss


def run_measured(
    argv: Sequence[str], *, timeout: float, cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int | None, float, float | None, float]:
    """Run ``argv`` (own process group, output discarded): (exit code or None on timeout,
    seconds, peak RSS in MiB, CPU seconds: user + system of the child and of the children
    it waited for, wait4's rusage). On timeout the group is SIGKILLed and the figures are
    those up to then. The peak is the child's VmHWM polled every 5 ms (not wait4's
    ru_maxrss, which on Linux keeps the pre-exec peak of this Python process)."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=cwd,
                            env=env)
    deadline = start + timeout
    peak: int | None = None
    code: int | None = None
    cpu = 0.0
    try:
        while True:
            hwm = peak_rss_kib(proc.pid)  # None once it is a zombie
            if hwm is not None:
                peak = max(peak or 0, hwm)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                code = os.waitstatus_to_exitcode(status)
                cpu = usage.ru_utime + usage.ru_stime
                break
            if time.perf_counter() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                _, _, usage = os.wait4(proc.pid, 0)
                cpu = usage.ru_utime + usage.ru_stime
                break
            time.sleep(0.005)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): the child goes too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    elapsed = time.perf_counter() - start
    proc.returncode = -1 if code is None else code  # already reaped
    return code, elapsed, (peak / 1024 if peak is not None else None), cpu


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction (0..1) of all CPUs busy over the next ``interval`` seconds (/proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    span = total1 - total0
    return 0.0 if span <= 0 else 1 - (idle1 - idle0) / span


def wait_quiet(limit: float, threshold: float = 0.25) -> float:
    """Before a measurement: wait (at most ``limit`` s) until the CPUs are mostly idle, so
    another job's burst does not land in a figure. Returns the busy fraction at the end."""
    deadline = time.monotonic() + limit
    busy = cpu_busy()
    waited = False
    while busy > threshold and time.monotonic() < deadline:
        if not waited:
            log(f"  CPU {busy:.0%} busy with another job: waiting (at most {limit:g} s)")
            waited = True
        time.sleep(2)
        busy = cpu_busy()
    return busy


def disk_bytes(root: Path) -> int:
    """Bytes allocated on disk under ``root`` (sum of st_blocks × 512, what ``du`` counts:
    the holes of sparse files are free). Files that vanish while it walks are skipped."""
    total = 0
    stack = [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return total


class DiskPeak:
    """Samples :func:`disk_bytes` of a directory every ``interval`` s in a thread, as a
    context manager: ``peak`` is the largest sample (one is taken at start and at stop)."""

    def __init__(self, root: Path, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="disk-peak", daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, disk_bytes(self.root))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> DiskPeak:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

"""The control channel of a mount: a Unix socket, one JSON request and answer per line.

Server (in the mount, on the trio thread): :func:`serve` binds ``CACHE_DIR/control.PID.sock``
(0600, in the 0700 cache directory; when that path is too long for a Unix socket, a
private ``$TMPDIR/rangefs-UID/`` directory holds it instead), accepts only peers of the
same uid or root (``SO_PEERCRED``) and answers each request line with one line. No
network port: nothing outside this machine reaches it.

Protocol (version 1): a request is a JSON object ``{"cmd": NAME, ...arguments}``; the
answer is ``{"ok": true, ...result}`` or ``{"ok": false, "error": ONE_LINE}``. Lines are
UTF-8, at most :data:`MAX_LINE` bytes, ``\\n``-terminated; a connection may carry many
requests (``status --watch``). The commands are the handlers a :class:`Handlers` mapping
names (``mountctl.py``).

Client (the CLI, plain blocking sockets): :func:`find_mounts` lists the rangefs mounts in
``/proc/self/mountinfo`` and reads each one's socket path from the ``user.rangefs.control``
attribute of its root; :func:`request` sends one request and returns the answer.

Why by hand: the protocol is a line of JSON each way over a local socket; a library
(JSON-RPC, HTTP over a Unix socket) would add a dependency and more code than this.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from .errors import UsageError

log = logging.getLogger(__name__)

MAX_LINE: Final = 1 << 20
"""Longest request or answer line, in bytes."""
XATTR: Final = "user.rangefs.control"
"""The attribute of a mount's root that names its control socket."""
CLIENT_TIMEOUT: Final = 10.0
"""Seconds the CLI waits for a mount to answer one request."""
_SUN_PATH_MAX: Final = 107  # bytes of a socket path, without the NUL

class Session:
    """One client connection, as its handlers see it: what must be undone when it closes
    (a pin on an object, ...) is registered with :meth:`on_close` and runs however the
    client goes away (closes, crashes, is killed)."""

    def __init__(self) -> None:
        self._cleanups: list[Callable[[], None]] = []
        self.state: dict[str, Any] = {}  # what handlers keep between requests

    def on_close(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def close(self) -> None:
        """Run the registered cleanups, newest first; a failing one is logged, the rest
        still run."""
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception:
                log.exception("control connection cleanup failed")


Handler = Callable[[Mapping[str, Any], Session], Awaitable[dict[str, Any]]]
Handlers = Mapping[str, Handler]


class ControlError(Exception):
    """A request the mount refused or could not answer: the message is one line for the
    user."""


def socket_path(cache_root: Path, pid: int | None = None) -> Path:
    """Where the control socket of the mount with ``pid`` (default: this process) using
    ``cache_root`` lives: ``CACHE_DIR/control.PID.sock`` (mounts may share a cache
    directory), or, when that is too long for a Unix socket, a private directory of
    ``$TMPDIR``."""
    pid = os.getpid() if pid is None else pid
    path = cache_root / f"control.{pid}.sock"
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path
    digest = hashlib.sha256(os.fsencode(cache_root)).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"rangefs-{os.getuid()}" / f"{digest}.{pid}.sock"


def _remove_stale(directory: Path) -> None:
    """Remove the control sockets of processes that are gone (killed mounts)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            name = entry.name
            if not (name.startswith("control.") and name.endswith(".sock")):
                continue
            pid = name[len("control."):-len(".sock")]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _private_dir(path: Path) -> None:
    """Create ``path`` 0700 if missing; UsageError unless it is ours and private."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UsageError(f"{path} must be a private directory of this user (for the "
                         "control socket); remove it or set TMPDIR")


def bind(path: Path) -> trio.socket.SocketType:
    """The listening control socket at ``path`` (0600; a stale one of a crashed mount is
    replaced: the cache lock says no one else serves there). OSError or UsageError."""
    if path.parent.name.startswith("rangefs-"):
        _private_dir(path.parent)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a dead process of the same PID's
    _remove_stale(path.parent)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # the socket file takes the socket inode's mode (less the umask) when bound:
        # 0600 from its creation, whatever the umask, with no window before a chmod
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(os.fspath(path))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


async def serve(sock: trio.socket.SocketType, path: Path, handlers: Handlers) -> None:
    """Answer requests on the bound ``sock`` until cancelled; then close it and remove
    ``path``."""
    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_connection, conn, handlers, name="control connection")
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()


def _peer_allowed(conn: trio.socket.SocketType) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)


async def _connection(conn: trio.socket.SocketType, handlers: Handlers) -> None:
    """Answer the requests of one client until it closes; errors end the connection only."""
    session = Session()
    with conn:
        try:
            if not _peer_allowed(conn):
                await _send(conn, {"ok": False, "error": "permission denied"})
                return
            buf = b""
            while True:
                while b"\n" not in buf:
                    if len(buf) > MAX_LINE:
                        await _send(conn, {"ok": False, "error": "request too long"})
                        return
                    data = await conn.recv(65536)
                    if not data:
                        return
                    buf += data
                line, _, buf = buf.partition(b"\n")
                await _send(conn, await _answer(line, handlers, session))
        except OSError as exc:  # the client went away
            log.debug("control connection: %s", exc)
        finally:
            session.close()


async def _answer(line: bytes, handlers: Handlers, session: Session) -> dict[str, Any]:
    try:
        req = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "the request is not JSON"}
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        return {"ok": False, "error": 'a request is a JSON object with a "cmd" string'}
    handler = handlers.get(req["cmd"])
    if handler is None:
        return {"ok": False, "error": f"unknown command {req['cmd']!r}; this mount knows "
                                      f"{', '.join(sorted(handlers))}"}
    try:
        result = await handler(req, session)
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a bug in a handler must not take the mount down
        log.exception("control command %s failed", req["cmd"])
        return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
    return {"ok": True, **result}


async def _send(conn: trio.socket.SocketType, answer: dict[str, Any]) -> None:
    data = json.dumps(answer, separators=(",", ":")).encode() + b"\n"
    view = memoryview(data)
    while view:
        sent = await conn.send(view)
        view = view[sent:]


# -- client ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MountInfo:
    """A rangefs mount seen in /proc/self/mountinfo."""

    mountpoint: Path
    source: str  # what mount(8) shows as the source (the URL list)
    uid: int | None  # the user_id= of the FUSE mount

    def control_socket(self, timeout: float = CLIENT_TIMEOUT) -> Path:
        """The socket named by the root's ``user.rangefs.control``; ControlError if the
        mount's process is gone, does not answer within ``timeout`` seconds (the
        ``getxattr`` is left blocked in a daemon thread: a FUSE call cannot be cancelled),
        or is too old to have one."""
        result: list[bytes | OSError] = []

        def ask() -> None:
            try:
                result.append(os.getxattr(self.mountpoint, XATTR))
            except OSError as exc:
                result.append(exc)

        thread = threading.Thread(target=ask, name="getxattr", daemon=True)
        thread.start()
        thread.join(timeout)
        if not result:
            raise ControlError(f"{self.mountpoint}: the mount did not answer within "
                               f"{timeout:g} s (is its process stopped?)")
        value = result[0]
        if isinstance(value, OSError):
            if value.errno == errno.ENOTCONN:
                raise ControlError(f"{self.mountpoint}: the rangefs process of this mount is "
                                   f"gone ('fusermount3 -u -z {self.mountpoint}' clears it)")
            raise ControlError(f"{self.mountpoint}: the mount does not name its control "
                               f"socket ({value.strerror or value})")
        return Path(os.fsdecode(value))


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (\\040 for a space) undone."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[MountInfo]:
    """Every ``fuse.rangefs`` mount, in mount order."""
    mounts = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            head, sep, tail = line.partition(" - ")
            if not sep:
                continue
            fields, rest = head.split(), tail.split()
            if len(fields) < 5 or len(rest) < 3 or rest[0] != "fuse.rangefs":
                continue
            uid = None
            for opt in rest[2].split(","):
                if opt.startswith("user_id="):
                    with contextlib.suppress(ValueError):
                        uid = int(opt[8:])
            mounts.append(MountInfo(Path(_unescape(fields[4])), _unescape(rest[1]), uid))
    return mounts


def mount_of(path: Path, mounts: list[MountInfo]) -> tuple[MountInfo, str] | None:
    """The mount holding ``path`` and the path inside it ('' for its root), or None."""
    resolved = Path(os.path.abspath(path))
    best: tuple[MountInfo, str] | None = None
    for m in mounts:
        with contextlib.suppress(ValueError):
            inner = resolved.relative_to(m.mountpoint)
            if best is None or len(m.mountpoint.parts) >= len(best[0].mountpoint.parts):
                best = (m, "" if str(inner) == "." else inner.as_posix())
    return best


class Client:
    """One connection to a mount's control socket (blocking; the CLI's side)."""

    def __init__(self, path: Path, timeout: float = CLIENT_TIMEOUT) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buf = b""
        try:
            self._sock.connect(os.fspath(path))
        except OSError as exc:
            self._sock.close()
            raise ControlError(f"cannot reach the mount's control socket {path}: "
                               f"{exc.strerror or exc} (is the mount still running?)") from exc

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request; the answer without ``ok``. ControlError with the mount's
        one-line reason if it refused, or if it did not answer in time."""
        try:
            self._sock.sendall(_encode(cmd, args))
            while b"\n" not in self._buf:
                data = self._sock.recv(65536)
                if not data:
                    raise ControlError(f"{self.path}: the mount closed the control connection")
                self._buf += data
                if len(self._buf) > 64 * MAX_LINE:
                    raise ControlError(f"{self.path}: answer too long")
        except TimeoutError as exc:
            raise ControlError(f"the mount did not answer {cmd!r} within "
                               f"{self._sock.gettimeout():g} s") from exc
        except OSError as exc:
            raise ControlError(f"{self.path}: {exc.strerror or exc}") from exc
        line, _, self._buf = self._buf.partition(b"\n")
        return _decode(line)


def _encode(cmd: str, args: Mapping[str, Any]) -> bytes:
    """One request line."""
    return json.dumps({"cmd": cmd, **args}).encode() + b"\n"


def _decode(line: bytes) -> dict[str, Any]:
    """The result of one answer line; ControlError with the mount's reason if it refused."""
    try:
        answer = json.loads(line)
    except ValueError as exc:
        raise ControlError(f"malformed answer: {exc}") from exc
    if not isinstance(answer, dict):
        raise ControlError("malformed answer")
    if not answer.pop("ok", False):
        raise ControlError(str(answer.get("error", "the mount refused the request")))
    result: dict[str, Any] = answer
    return result


class AsyncClient:
    """One connection to a mount's control socket, from the trio thread (a mount reading
    an object through the process that owns its cache). Requests raise ControlError
    when refused and OSError / trio.BrokenResourceError / EOFError when the other
    process is gone."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = b""

    @classmethod
    async def connect(cls, path: Path) -> AsyncClient:
        return cls(await trio.open_unix_socket(os.fspath(path)))

    async def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        await self._stream.send_all(_encode(cmd, args))
        while b"\n" not in self._buf:
            data = await self._stream.receive_some(65536)
            if not data:
                raise EOFError("the other process closed the control connection")
            self._buf += data
            if len(self._buf) > 64 * MAX_LINE:
                raise ControlError("answer too long")
        line, _, self._buf = self._buf.partition(b"\n")
        return _decode(line)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.aclose()

"""A real forward proxy for tests: Debian's ``tinyproxy`` (package ``tinyproxy-bin``, the
executable without the system service) on 127.0.0.1.

:class:`ProxyRig` (a context manager) writes its own ``tinyproxy.conf`` in its own
directory and runs ``tinyproxy -d -c CONF`` (foreground, no daemon, no pid file) as a child
process in its own session, listening on 127.0.0.1 on a free port (a port lost to a race is
retried with another one) and allowing 127.0.0.1 only. There is no ``ConnectPort`` line, so
tinyproxy (1.11) allows CONNECT to every port; ``connect_ports=(443,)`` allows only those
(CONNECT elsewhere: ``403 Access violation``). ``auth=("user", "password")`` adds
``BasicAuth``: a request without credentials gets ``407 Proxy Authentication Required``, one
with wrong credentials ``401 Unauthorized`` (tinyproxy's choice).

tinyproxy handles one request per client connection (it answers every request, then
closes), so every proxied request -- a plain http GET/HEAD in absolute form, or the CONNECT
of an https tunnel -- is one ``Request`` line in ``tinyproxy.log`` (``LogLevel Info``),
written when tinyproxy has read the request head, i.e. before it answers or forwards it::

    CONNECT   Dec 06 15:40:12.623 [17476]: Request (file descriptor 5): GET
              http://127.0.0.1:38124/a HTTP/1.1
    CONNECT   Dec 06 15:40:12.635 [17476]: Request (file descriptor 5): CONNECT
              127.0.0.1:38124 HTTP/1.1

(one line each, wrapped here; ``CONNECT`` in the first column is tinyproxy's name of the
log level). A request refused by the proxy (407/401 auth, 403 CONNECT port) is logged as
well; one that tinyproxy forwards is followed (same thread, before the forwarding) by::

    INFO      Dec 06 15:40:12.623 [17476]: opensock: opening connection to 127.0.0.1:38124

so :meth:`ProxyRig.requests` counts what reached the proxy and
:meth:`ProxyRig.upstream_connections` what it passed on. A refused CONNECT port logs
``Refused CONNECT method on port N``. Leaving the ``with`` block stops tinyproxy (SIGTERM,
then SIGKILL of its session) whatever happened in the body.

Nothing here skips: a missing ``tinyproxy`` raises :class:`ProxyRigError` (``bash .ci/dev
setup`` installs it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote, urlsplit

from tests.daemons import Rig, free_port, on_a_free_port, start_daemon, stop_daemon

READY = "Starting main loop. Accepting connections."
PORT_TAKEN = "Could not create listening sockets"

REQUEST_RE = re.compile(
    r"Request \(file descriptor \d+\): (?P<method>[A-Z]+) (?P<target>\S+) HTTP/\d\.\d"
)
UPSTREAM_RE = re.compile(r"opensock: opening connection to (?P<hostport>\S+)$")

CONF = """\
# tests/proxyrig.py
Port {port}
Listen 127.0.0.1
Timeout 60
LogFile "{log}"
LogLevel Info
MaxClients 200
Allow 127.0.0.1
DisableViaHeader Yes
{extra}"""


class ProxyRigError(RuntimeError):
    """The proxy could not be set up (tinyproxy missing or failing)."""


def tinyproxy_path() -> str:
    """The tinyproxy executable; :class:`ProxyRigError` (a loud failure) if missing."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/bin:/sbin"
    exe = shutil.which("tinyproxy", path=path)
    if exe is None:
        raise ProxyRigError("tinyproxy missing: run `bash .ci/dev setup` (installs tinyproxy-bin)")
    return exe


def refused_port() -> int:
    """A port on 127.0.0.1 where a connection is refused (nothing listens: a proxy that is
    down). Bound but never listening while we pick it, then released."""
    return free_port()


def _hostport(target: str, method: str) -> str:
    """``host:port`` of a request target: CONNECT's authority, or an absolute URL's."""
    if method == "CONNECT":
        return target
    parts = urlsplit(target)
    if parts.port is not None:
        return f"{parts.hostname}:{parts.port}"
    default = {"http": 80, "https": 443}.get(parts.scheme, 0)
    return f"{parts.hostname}:{default}"


class ProxyRig(Rig):
    """tinyproxy on 127.0.0.1 (see the module doc).

    ``with ProxyRig(tmp_path / "proxy") as proxy:`` -- then ``proxy.url`` (no credentials),
    ``proxy.url_with_credentials()``, ``proxy.requests("127.0.0.1:PORT", "GET")``,
    ``proxy.upstream_connections("127.0.0.1:PORT")``, ``proxy.logs()``."""

    def __init__(
        self,
        work: Path,
        *,
        auth: tuple[str, str] | None = None,
        connect_ports: Sequence[int] | None = None,
    ) -> None:
        self.work = Path(os.path.abspath(work))
        self.auth = auth
        self.connect_ports = tuple(connect_ports) if connect_ports is not None else None
        self.conf = self.work / "tinyproxy.conf"
        self.log = self.work / "tinyproxy.log"
        self.stderr_log = self.work / "stderr.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no credentials)."""
        return f"http://{self.hostport}"

    def url_with_credentials(self, user: str | None = None, password: str | None = None) -> str:
        """``http://USER:PASSWORD@127.0.0.1:PORT`` (default: the rig's own ``auth``)."""
        if self.auth is not None:
            user = self.auth[0] if user is None else user
            password = self.auth[1] if password is None else password
        if user is None or password is None:
            raise ValueError("no credentials: the rig has no auth and none were given")
        return f"http://{quote(user, safe='')}:{quote(password, safe='')}@{self.hostport}"

    # -- the log ---------------------------------------------------------------------------

    def log_lines(self) -> list[str]:
        """Every line tinyproxy logged so far."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return text.replace("\0", "").splitlines()

    def request_lines(self, hostport: str | None = None, method: str | None = None) -> list[str]:
        """The ``Request (file descriptor N): METHOD TARGET HTTP/1.x`` lines, of requests
        for ``hostport`` (``"127.0.0.1:8080"``: a CONNECT to it, or an absolute URL on it)
        and/or of ``method`` only when given."""
        found = []
        for line in self.log_lines():
            match = REQUEST_RE.search(line)
            if match is None:
                continue
            if method is not None and match["method"] != method:
                continue
            if hostport is not None and _hostport(match["target"], match["method"]) != hostport:
                continue
            found.append(line)
        return found

    def requests(self, hostport: str | None = None, method: str | None = None) -> int:
        """How many requests (as :meth:`request_lines`) reached the proxy."""
        return len(self.request_lines(hostport, method))

    def targets(self, hostport: str | None = None, method: str | None = None) -> list[str]:
        """``METHOD TARGET`` of each request line (for assertion messages)."""
        out = []
        for line in self.request_lines(hostport, method):
            match = REQUEST_RE.search(line)
            assert match is not None
            out.append(f"{match['method']} {match['target']}")
        return out

    def upstream_connections(self, hostport: str | None = None) -> int:
        """How many connections the proxy opened to ``hostport`` (any when None): requests it
        passed on (a GET it forwarded, a CONNECT tunnel it opened)."""
        count = 0
        for line in self.log_lines():
            match = UPSTREAM_RE.search(line)
            if match is not None and (hostport is None or match["hostport"] == hostport):
                count += 1
        return count

    def logs(self) -> str:
        """The config, stderr and the log, for failure messages."""
        parts = []
        for path in (self.conf, self.stderr_log, self.log):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").replace("\0", "")
                parts.append(f"--- {path.name}\n{text[-6000:]}")
        return "\n".join(parts)

    # -- a client --------------------------------------------------------------------------

    def fetch(self, url: str, *, credentials: bool = True, timeout: float = 10) -> bytes:
        """GET ``url`` through the proxy with urllib (with the rig's credentials when it has
        them and ``credentials``): the body; ``urllib.error.HTTPError`` on an error status."""
        proxy = self.url_with_credentials() if self.auth and credentials else self.url
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": proxy, "https": proxy})
        )
        with opener.open(url, timeout=timeout) as response:
            body: bytes = response.read()
            return body

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ProxyRig:
        exe = tinyproxy_path()
        self.work.mkdir(parents=True, exist_ok=True)
        on_a_free_port(lambda port: self._start_on(exe, port), self.logs, ProxyRigError,
                       "tinyproxy")
        return self

    def _config(self, port: int) -> str:
        extra = []
        if self.auth is not None:
            user, password = self.auth
            if any(c.isspace() or c == '"' for c in user + password):
                raise ValueError("tinyproxy BasicAuth: no spaces or quotes in user or password")
            extra.append(f"BasicAuth {user} {password}")
        for port_ in self.connect_ports or ():
            extra.append(f"ConnectPort {int(port_)}")
        return CONF.format(port=port, log=self.log, extra="".join(f"{e}\n" for e in extra))

    def _start_on(self, exe: str, port: int) -> bool:
        """Start tinyproxy on ``port``: True once it accepts, False if the port was taken."""
        self.port = port
        self.conf.write_text(self._config(port))
        self.log.unlink(missing_ok=True)  # a fresh log per attempt (no process writes it now)
        self.stderr_log.unlink(missing_ok=True)
        self._proc = start_daemon(
            [exe, "-d", "-c", str(self.conf)], self.stderr_log,
            # logged right after listen(): the port accepts from now on
            ready=lambda proc: any(READY in line for line in self.log_lines()),
            logs=self.logs, port_taken=PORT_TAKEN, error=ProxyRigError, name="tinyproxy",
        )
        return self._proc is not None

    def stop(self) -> None:
        """Stop tinyproxy; never raises. Safe to call twice."""
        proc, self._proc = self._proc, None
        stop_daemon(proc)

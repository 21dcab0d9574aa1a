"""A real https origin for tests: Debian's nginx with certificates made by the openssl CLI.

:class:`TlsRig` (a context manager) makes, in its own directory,

- a private CA (``ca.key`` + self-signed ``ca.pem``, CA:TRUE, keyCertSign),
- a server key and certificate signed by that CA, by default for ``IP:127.0.0.1`` and
  ``DNS:localhost`` (``server_names`` picks other names, e.g. a wrong one),
- ``www/``: the served directory; :meth:`TlsRig.add` writes a file there whose bytes are
  ``tests.content.content(path, 0, size)``, so ``tests.content.check(path, ...)`` verifies
  any read of it,

and runs ``nginx -p PREFIX -c PREFIX/nginx.conf -e PREFIX/stderr.log`` in the foreground
(``daemon off;``) as a child process in its own session, listening with ``ssl`` on
127.0.0.1 on a free port (a port lost to a race is retried with another one). nginx serves
static files with Range support natively. ``access.log`` gets one line per request
(:meth:`TlsRig.requests`), ``error.log`` is at level ``info`` so that every failed TLS
handshake is logged (:meth:`TlsRig.failed_handshakes`, see :data:`FAILED_HANDSHAKE`).
Leaving the ``with`` block stops nginx (SIGTERM, then SIGKILL of its process group)
whatever happened in the body; the directory itself is the caller's (``tmp_path``), which
pytest cleans.

Nothing here skips: a missing ``nginx`` or ``openssl`` raises :class:`RigError` (``bash
.ci/dev setup`` installs both).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.content import iter_content
from tests.daemons import (
    NginxLogs,
    Rig,
    nginx_main,
    nginx_temp_paths,
    on_a_free_port,
    start_nginx,
    stop_daemon,
)

DEFAULT_NAMES = ("127.0.0.1", "localhost")

FAILED_HANDSHAKE = "while SSL handshaking"
"""What nginx (1.22, OpenSSL 3, ``error_log ... info``) says of every connection that never
completed its TLS handshake, whatever the client did, e.g.

- ``SSL_do_handshake() failed (SSL: error:0A000418:SSL routines::tlsv1 alert unknown ca:SSL
  alert number 48) while SSL handshaking`` (a client that sends an alert: Python's ssl
  sockets, curl),
- ``peer closed connection in SSL handshake while SSL handshaking`` (a client that just
  closes once it distrusts the certificate: trio's SSLStream, i.e. rangefs),
- ``client closed connection while SSL handshaking`` (a connect without a ClientHello).

So the count of such lines is the number of connection attempts refused."""

CONF = """\
# tests/tlsrig.py: an https origin serving {root}
{main}
events {{
    worker_connections 256;
}}

http {{
    default_type application/octet-stream;
    log_format rig '$msec $status $request_method "$uri" "$http_range" '
                   '$body_bytes_sent $connection $ssl_protocol';
    access_log {work}/access.log rig;

{temp_paths}
    sendfile on;
    etag on;
    keepalive_timeout 60s;
    max_ranges 1;

    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
        location / {{ }}
    }}
}}
"""


class RigError(RuntimeError):
    """The rig could not be set up (a tool missing, openssl or nginx failing)."""


def require_tools() -> None:
    """Raise :class:`RigError` (a loud failure, never a skip) when nginx or openssl is missing."""
    missing = [tool for tool in ("nginx", "openssl") if _which(tool) is None]
    if missing:
        raise RigError(
            f"{' and '.join(missing)} missing: run `bash .ci/dev setup` (installs them)"
        )


def _which(tool: str) -> str | None:
    # nginx lives in /usr/sbin, which a non-root PATH may lack
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return shutil.which(tool, path=path)


def openssl(*args: str, cwd: Path | None = None) -> str:
    """Run ``openssl ARGS``: its stdout; :class:`RigError` with stderr if it fails."""
    exe = _which("openssl")
    if exe is None:
        raise RigError("openssl missing: run `bash .ci/dev setup`")
    done = subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise RigError(f"openssl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def make_ca(directory: Path, name: str = "rangefs test CA") -> tuple[Path, Path]:
    """A CA key and self-signed CA certificate in ``directory``: (ca.pem, ca.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "ca.pem", directory / "ca.key"
    openssl(
        "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3650", "-sha256",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )
    return cert, key


def _san(names: Iterable[str]) -> str:
    parts = []
    for name in names:
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
            parts.append(f"IP:{name}")
        except OSError:
            parts.append(f"DNS:{name}")
    return ",".join(parts)


def make_server_cert(
    directory: Path, ca_cert: Path, ca_key: Path, names: Sequence[str] = DEFAULT_NAMES,
    stem: str = "server",
) -> tuple[Path, Path]:
    """A server key and certificate for ``names`` (IPs and DNS names, all in the
    subjectAltName) signed by the CA: (STEM.pem, STEM.key)."""
    if not names:
        raise ValueError("a server certificate needs at least one name")
    cert, key, csr = (directory / f"{stem}.{ext}" for ext in ("pem", "key", "csr"))
    ext = directory / f"{stem}.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        f"subjectAltName={_san(names)}\n"
    )
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}",
    )
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-CAserial", str(directory / "ca.srl"), "-out", str(cert),
        "-days", "825", "-sha256", "-extfile", str(ext),
    )
    return cert, key


def hashed_ca_dir(directory: Path, ca_cert: Path) -> Path:
    """``directory`` holding ``ca_cert`` under its OpenSSL subject-hash name (``HASH.0``, made
    by ``openssl rehash``): what ``SSL_CERT_DIR`` / ``-CApath`` expect."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_cert, directory / "rig-ca.pem")
    openssl("rehash", str(directory))
    subject_hash = openssl("x509", "-in", str(ca_cert), "-noout", "-subject_hash").strip()
    if not (directory / f"{subject_hash}.0").exists():
        raise RigError(f"openssl rehash made no {subject_hash}.0 in {directory}")
    return directory


def write_content(path: Path, key: str, size: int) -> None:
    """Write ``content(key, 0, size)`` to ``path`` (in 1 MiB pieces)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for part in iter_content(key, 0, size):
            fh.write(part)


class TlsRig(NginxLogs, Rig):
    """nginx over TLS on 127.0.0.1 with a private CA (see the module doc).

    ``with TlsRig(tmp_path / "tls") as rig:`` -- then ``rig.add("/a.bin", size)``,
    ``rig.url("/a.bin")``, ``rig.ca_cert`` (the PEM to trust), ``rig.requests("/a.bin")``,
    ``rig.failed_handshakes()``."""

    def __init__(self, work: Path, *, server_names: Sequence[str] = DEFAULT_NAMES) -> None:
        self.work = Path(os.path.abspath(work))
        self.server_names = tuple(server_names)
        self.root = self.work / "www"
        self.access_log = self.work / "access.log"
        self.error_log = self.work / "error.log"
        self.stderr_log = self.work / "stderr.log"
        self.conf = self.work / "nginx.conf"
        self.ca_cert = self.work / "ca.pem"
        self.ca_key = self.work / "ca.key"
        self.cert = self.work / "server.pem"
        self.key = self.work / "server.key"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses and content -----------------------------------------------------------

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """The https URL of ``path`` (``host``: 127.0.0.1 or localhost; both are certified)."""
        return f"https://{host}:{self.port}/{path.lstrip('/')}"

    def add(self, path: str, size: int) -> Path:
        """Serve ``content(path, 0, size)`` at ``path`` (e.g. ``"/dir/a.bin"``)."""
        target = self.root / path.lstrip("/")
        write_content(target, path, size)
        return target

    # -- logs ----------------------------------------------------------------------------

    def failed_handshakes(self) -> int:
        """How many TLS handshakes failed so far (e.g. the client did not trust us)."""
        return sum(FAILED_HANDSHAKE in line for line in self.error_lines())

    def settled_failed_handshakes(self, quiet: float = 0.3, limit: float = 5.0) -> int:
        """:meth:`failed_handshakes` once nginx has logged those of clients that have
        already gone: a trusted handshake after them is a barrier (one worker, one event
        loop), then the count must hold still for ``quiet`` seconds (at most ``limit``)."""
        self.handshake(trust=True, host=self.server_names[0])
        count, since = self.failed_handshakes(), time.monotonic()
        deadline = since + limit
        while time.monotonic() < deadline and time.monotonic() - since < quiet:
            time.sleep(0.05)
            now = self.failed_handshakes()
            if now != count:
                count, since = now, time.monotonic()
        return count

    def handshake_failures(self) -> list[str]:
        return [line for line in self.error_lines() if FAILED_HANDSHAKE in line]

    def logs(self) -> str:
        """stderr + error log, for failure messages."""
        parts = []
        for path in (self.stderr_log, self.error_log):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    # -- clients -------------------------------------------------------------------------

    def client_context(self, *, trust: bool = True) -> ssl.SSLContext:
        """A verifying client context that trusts our CA only (``trust=False``: nothing)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        if trust:
            context.load_verify_locations(cafile=str(self.ca_cert))
        return context

    def handshake(self, *, trust: bool = True, host: str = "127.0.0.1") -> None:
        """One TLS handshake with us (raises ``ssl.SSLCertVerificationError`` if refused)."""
        context = self.client_context(trust=trust)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            pass

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> TlsRig:
        require_tools()
        self.work.mkdir(parents=True, exist_ok=True)
        for sub in ("www", "tmp"):
            (self.work / sub).mkdir(exist_ok=True)
        make_ca(self.work)
        make_server_cert(self.work, self.ca_cert, self.ca_key, self.server_names)
        on_a_free_port(self._start_on, self.logs, RigError, "nginx")
        return self

    def _start_on(self, port: int) -> bool:
        """Start nginx on ``port``: True once it listens, False if the port was taken."""
        self.port = port
        nginx = _which("nginx")
        assert nginx is not None
        text = CONF.format(
            main=nginx_main(self.work, "info"), temp_paths=nginx_temp_paths(self.work),
            work=self.work, root=self.root, port=port, cert=self.cert, key=self.key,
        )
        self._proc = start_nginx(nginx, self.work, self.conf, text, self.stderr_log,
                                 logs=self.logs, error=RigError)
        return self._proc is not None

    def stop(self) -> None:
        """Stop nginx (master and workers); never raises. Safe to call twice."""
        proc, self._proc = self._proc, None
        stop_daemon(proc)

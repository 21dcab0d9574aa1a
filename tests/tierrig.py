"""An HTTP caching tier for tests: Debian's nginx as a slice-caching reverse proxy in front
of an upstream (the in-process :class:`tests.faultserver.FaultServer`), on 127.0.0.1.

What many machines put between themselves and the origin (issue 17 item 5): every client
request is cut by nginx's ``slice`` module into aligned 1 MiB slices, each fetched from the
upstream with ``Range: $slice_range`` and cached under its own key (``$uri$is_args$args
$slice_range``), so one machine's reads fill the cache and the next machine's reads of the
same bytes never reach the origin. ``proxy_cache_lock`` makes concurrent misses of one
slice wait for the first fetch instead of each going upstream. HEAD is served too: nginx
turns it into a GET of the first slice (``proxy_cache_convert_head``, on by default), which
the slice module answers with the whole object's length and the ETag/Last-Modified of the
origin.

:class:`TierRig` (a context manager) writes ``nginx.conf`` in its own directory
(``cache/`` is the slice cache, ``access.log`` one line per client request, see
:data:`LOG_FORMAT`; ``error.log`` at level ``notice``) and runs ``nginx -p DIR -c
DIR/nginx.conf -e DIR/stderr.log`` in the foreground (``daemon off;``) as a child process
in its own session, listening on a free port of 127.0.0.1 (a port lost to a race is
retried with another), like ``tests/tlsrig.py`` (whose ``free_port`` it uses). Leaving the
``with`` block stops nginx (SIGTERM, then SIGKILL of its session) whatever happened; the
directory is the caller's (``tmp_path``).

Nothing here skips: a missing nginx, or an nginx built without the slice module, raises
:class:`TierRigError` (``bash .ci/dev setup`` installs Debian's nginx, which has it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from tests.daemons import (
    NginxLogs,
    Rig,
    nginx_main,
    nginx_temp_paths,
    on_a_free_port,
    start_nginx,
    stop_daemon,
)

SLICE = 1 << 20
"""The tier's slice size (``slice 1m;``)."""

LOG_FORMAT = (
    "'$msec $status $request_method \"$uri\" \"$http_range\" \"$http_if_range\" '\n"
    "                    '$body_bytes_sent $upstream_cache_status \"$sent_http_etag\" "
    "$connection $request_time'"
)
"""One access-log line per client request (slice subrequests are not logged):
time, status, method, path, the client's Range and If-Range, body bytes sent to the client,
the cache status of the request's first slice (HIT, MISS, ...), the ETag sent, connection,
seconds the request took (a wait for another request's fetch of the same slice,
``proxy_cache_lock``, shows here: nginx looks again every 500 ms)."""

CONF = """\
# tests/tierrig.py: a slice-caching tier in front of {upstream}
{main}
events {{
    worker_connections 1024;
}}

http {{
    default_type application/octet-stream;
    log_format tier {log_format};
    access_log {work}/access.log tier;

{temp_paths}
    proxy_cache_path {work}/cache levels=1:2 keys_zone=tier:10m max_size=4g inactive=1h
                     use_temp_path=off;

    upstream origin {{
        server {upstream};
        keepalive 16;
    }}

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;

        location / {{
            slice 1m;
            proxy_cache tier;
            proxy_cache_key $uri$is_args$args$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 1h;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 120s;
            proxy_cache_lock_age 120s;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://origin;
        }}
    }}
}}
"""


class TierRigError(RuntimeError):
    """The tier could not be set up (nginx missing, without the slice module, failing)."""


def nginx_path() -> str:
    """Debian's nginx (in /usr/sbin, which a non-root PATH may lack)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    exe = shutil.which("nginx", path=path)
    if exe is None:
        raise TierRigError("nginx missing: run `bash .ci/dev setup` (installs it)")
    return exe


def require_slice_module(exe: str) -> None:
    """Raise :class:`TierRigError` unless ``nginx -V`` lists the slice module."""
    done = subprocess.run(
        [exe, "-V"], capture_output=True, text=True, timeout=30, check=False,
        stdin=subprocess.DEVNULL,
    )
    flags = done.stdout + done.stderr  # nginx -V writes to stderr
    if "--with-http_slice_module" not in flags:
        raise TierRigError(
            f"{exe} was built without the slice module (--with-http_slice_module): "
            f"the caching tier cannot be set up; nginx -V says:\n{flags}"
        )


class TierRig(NginxLogs, Rig):
    """nginx as a slice-caching reverse proxy of ``upstream`` (see the module doc).

    ``with TierRig(tmp_path / "tier", origin.base_url) as tier:`` -- then
    ``tier.url("/a.bin")``, ``tier.requests("/a.bin")``, ``tier.cache_files()``,
    ``tier.get("/a.bin", {"Range": "bytes=0-9"})``."""

    def __init__(self, work: Path, upstream: str) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or parts.port is None:
            raise ValueError(f"upstream must be http://HOST:PORT, not {upstream!r}")
        self.upstream = f"{parts.hostname}:{parts.port}"
        self.work = Path(os.path.abspath(work))
        self.cache_dir = self.work / "cache"
        self.access_log = self.work / "access.log"
        self.error_log = self.work / "error.log"
        self.stderr_log = self.work / "stderr.log"
        self.conf = self.work / "nginx.conf"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """The URL of the upstream's ``path`` through the tier."""
        return f"{self.base_url}/{path.lstrip('/')}"

    # -- logs and cache --------------------------------------------------------------------

    def cache_files(self) -> list[Path]:
        """The cached entries (one file per slice) now on disk."""
        if not self.cache_dir.exists():
            return []
        return [p for p in self.cache_dir.rglob("*") if p.is_file()]

    def logs(self) -> str:
        """stderr + error log + config, for failure messages."""
        parts = []
        for path in (self.stderr_log, self.error_log, self.conf):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    # -- a client --------------------------------------------------------------------------

    def get(
        self, path: str, headers: dict[str, str] | None = None, *, method: str = "GET",
        timeout: float = 30,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request through the tier: (status, headers with lower-case names, body).
        Any status is returned, not raised; no proxy (the tier is on 127.0.0.1)."""
        request = urllib.request.Request(self.url(path), headers=headers or {}, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            response = opener.open(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            response = exc
        with response:
            body = response.read()
            fields = {k.lower(): v for k, v in response.headers.items()}
            return response.status, fields, body

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> TierRig:
        exe = nginx_path()
        require_slice_module(exe)
        self.work.mkdir(parents=True, exist_ok=True)
        for sub in ("tmp", "cache"):
            (self.work / sub).mkdir(exist_ok=True)
        on_a_free_port(lambda port: self._start_on(exe, port), self.logs, TierRigError, "nginx")
        return self

    def _config(self, port: int) -> str:
        return CONF.format(
            main=nginx_main(self.work, "notice"), temp_paths=nginx_temp_paths(self.work),
            work=self.work, port=port, upstream=self.upstream, log_format=LOG_FORMAT,
        )

    def _start_on(self, exe: str, port: int) -> bool:
        """Start nginx on ``port``: True once it listens, False if the port was taken."""
        self.port = port
        self._proc = start_nginx(exe, self.work, self.conf, self._config(port),
                                 self.stderr_log, logs=self.logs, error=TierRigError)
        return self._proc is not None

    def stop(self) -> None:
        """Stop nginx (master, workers, cache manager and loader); never raises; idempotent."""
        proc, self._proc = self._proc, None
        stop_daemon(proc)

"""Real servers of HTML directory indexes for the listing tests, each serving a directory
on 127.0.0.1 on a free port, as Debian (or PyPI) ships them with their default index
format:

- ``nginx``: ``autoindex on`` (exact sizes in bytes, dates in GMT), an access log,
- ``apache``: Apache httpd 2.4 (``apache2-bin``), ``mod_autoindex`` with Debian's
  ``IndexOptions FancyIndexing HTMLTable`` (rounded sizes),
- ``lighttpd``: ``dir-listing.activate`` (rounded sizes),
- ``python``: ``python -m http.server`` (no sizes),
- ``rclone``: ``rclone serve http`` (exact sizes in a ``<size>`` element).

:class:`IndexServer` is a context manager (``tests.daemons.Rig``): it starts the server,
waits until its port answers, and stops it (SIGTERM, then SIGKILL) on exit. Nothing here
skips: a missing server raises :class:`IndexRigError` (``bash .ci/dev setup`` installs
them all).
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

from tests.daemons import (
    NginxLogs,
    Proc,
    Rig,
    nginx_main,
    nginx_temp_paths,
    on_a_free_port,
    start_daemon,
    start_nginx,
    stop_daemon,
)

KINDS = ("nginx", "apache", "lighttpd", "python", "rclone")
#: the servers whose index gives every file's exact size
EXACT_SIZES = frozenset({"nginx", "rclone"})


class IndexRigError(RuntimeError):
    """A server could not be started."""


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _exe(name: str, *candidates: str) -> str:
    for candidate in (name, *candidates):
        found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if found:
            return found
    raise IndexRigError(f"{name} is not installed: run 'bash .ci/dev setup'")


class IndexServer(Rig, NginxLogs):
    """``kind`` (one of :data:`KINDS`) serving ``root`` at :attr:`url` (ending with '/')."""

    def __init__(self, kind: str, root: Path, work: Path) -> None:
        if kind not in KINDS:
            raise ValueError(kind)
        self.kind = kind
        self.root = root
        self.work = work
        self.port = 0
        self.proc: Proc | None = None
        self.access_log = work / "access.log"
        self.error_log = work / "error.log"
        self._stderr = work / "stderr.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def logs(self) -> str:
        try:
            return self._stderr.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def start(self) -> IndexServer:
        self.work.mkdir(parents=True, exist_ok=True)
        on_a_free_port(self._start_on, self.logs, IndexRigError, self.kind)
        return self

    def stop(self) -> None:
        stop_daemon(self.proc)
        self.proc = None

    def _start_on(self, port: int) -> bool:
        self.port = port
        if self.kind == "nginx":
            self.proc = self._nginx(port)
        else:
            argv, taken = self._argv(port)
            self.proc = start_daemon(
                argv, self._stderr, ready=lambda proc: _listening(port), logs=self.logs,
                port_taken=taken, error=IndexRigError, name=self.kind)
        return self.proc is not None

    def _nginx(self, port: int) -> Proc | None:
        exe = _exe("nginx", "/usr/sbin/nginx")
        (self.work / "tmp").mkdir(exist_ok=True)
        text = (
            f"{nginx_main(self.work, 'warn')}\nevents {{ worker_connections 256; }}\n"
            "http {\n    default_type application/octet-stream;\n"
            "    log_format rig '$request_method \"$uri\" $status $body_bytes_sent';\n"
            f"    access_log {self.access_log} rig;\n{nginx_temp_paths(self.work)}"
            f"    server {{\n        listen 127.0.0.1:{port};\n"
            f"        root {self.root};\n        autoindex on;\n    }}\n}}\n"
        )
        return start_nginx(exe, self.work, self.work / "nginx.conf", text, self._stderr,
                           logs=self.logs, error=IndexRigError)

    def _argv(self, port: int) -> tuple[list[str], str]:
        """The command line of a server other than nginx, and what it logs when its port
        is taken."""
        if self.kind == "python":
            return ([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                     "--directory", str(self.root)], "Address already in use")
        if self.kind == "rclone":
            return ([_exe("rclone"), "serve", "http", str(self.root), "--addr",
                     f"127.0.0.1:{port}", "--config", "/dev/null"], "address already in use")
        if self.kind == "lighttpd":
            conf = self.work / "lighttpd.conf"
            conf.write_text(
                f'server.document-root = "{self.root}"\nserver.bind = "127.0.0.1"\n'
                f"server.port = {port}\n"
                f'server.errorlog = "{self.error_log}"\n'
                'server.modules += ("mod_dirlisting")\n'
                'dir-listing.activate = "enable"\n'
                'mimetype.assign = ("" => "application/octet-stream")\n')
            return [_exe("lighttpd", "/usr/sbin/lighttpd"), "-D", "-f", str(conf)], \
                "Address already in use"
        conf = self.work / "apache2.conf"
        modules = "/usr/lib/apache2/modules"
        conf.write_text(
            f"ServerRoot {self.work}\nServerName 127.0.0.1\nListen 127.0.0.1:{port}\n"
            f"PidFile {self.work}/apache2.pid\nDefaultRuntimeDir {self.work}\n"
            f"Mutex file:{self.work} default\nErrorLog {self.error_log}\n"
            f"LoadModule mpm_event_module {modules}/mod_mpm_event.so\n"
            f"LoadModule authz_core_module {modules}/mod_authz_core.so\n"
            f"LoadModule dir_module {modules}/mod_dir.so\n"
            f"LoadModule autoindex_module {modules}/mod_autoindex.so\n"
            f"DocumentRoot {self.root}\n"
            f"<Directory {self.root}>\n  Options +Indexes\n  Require all granted\n"
            "</Directory>\nIndexOptions FancyIndexing HTMLTable VersionSort\n")
        return [_exe("apache2", "/usr/sbin/apache2"), "-f", str(conf), "-DFOREGROUND"], \
            "could not bind"

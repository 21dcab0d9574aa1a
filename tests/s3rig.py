"""An S3 server for tests: moto's (PyPI ``moto[server]``) on 127.0.0.1, behind a front that
enforces what moto does not and records what was asked.

moto 5.x serves a presigned URL without looking at its signature or its expiry: an expired
(or wrongly signed) presigned GET is answered like a valid one (checked with moto 5.2.6;
its IAM checks read only an ``Authorization`` header, which presigned URLs do not have).
So presigned URLs point at :attr:`S3Rig.url_endpoint`, a threaded reverse proxy in this
process (:class:`Front`) that

- refuses a presigned URL whose time has passed as S3 does: 403, ``AccessDenied``,
  ``Request has expired`` (SigV4: ``X-Amz-Date`` + ``X-Amz-Expires``; SigV2: ``Expires``),
  read here on its own, independently of rangefs' parser;
- refuses URLs signed before :meth:`S3Rig.revoke_signed_before` (as S3 does once the
  credentials that signed them are gone): 403 ``AccessDenied``, without any expiry;
- forwards everything else to moto unchanged (bodies streamed) and records each request
  (:class:`Request`: method, path, query, Range, status), which moto does not.

Buckets, objects and listings (``ListObjectsV2``) are moto's: use :meth:`S3Rig.client`
(talking to moto directly, not recorded) or :meth:`S3Rig.url`/:meth:`S3Rig.presign` (URLs
through the front). Credentials are moto's defaults (``testing``/``testing``).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from tests.daemons import Proc, Rig, on_a_free_port, start_daemon, stop_daemon

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer",
                         "upgrade", "proxy-connection"})


class S3RigError(Exception):
    """The S3 rig could not start."""


def moto_argv(port: int) -> list[str]:
    """moto's server on 127.0.0.1:``port``: the venv's ``moto_server``, else ``-m``."""
    script = Path(sys.executable).parent / "moto_server"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    return [*head, "-H", "127.0.0.1", "-p", str(port)]


def answers(port: int) -> bool:
    """moto's management API answers on ``port`` (and it is moto's: JSON about its state)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/moto-api/data.json")
        response = connection.getresponse()
        body = response.read()
        return response.status == 200 and body.startswith(b"{")
    except OSError:
        return False
    finally:
        connection.close()


@dataclass(frozen=True)
class Request:
    """One request the front answered. ``query`` maps each parameter to its first value;
    ``refused``: the front answered it itself (expired or revoked), moto never saw it."""

    method: str
    path: str
    query: dict[str, str]
    range: str | None
    status: int
    refused: bool

    @property
    def signature(self) -> str | None:
        return self.query.get("X-Amz-Signature") or self.query.get("Signature")


def _signed_at(query: dict[str, str]) -> float | None:
    date = query.get("X-Amz-Date")
    if date is None:
        return None
    try:
        return datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _expires_at(query: dict[str, str]) -> float | None:
    """When a presigned URL expires (SigV4 or SigV2); None if it is not one."""
    signed = _signed_at(query)
    lifetime = query.get("X-Amz-Expires")
    if signed is not None and lifetime is not None and lifetime.isdigit():
        return signed + int(lifetime)
    expires = query.get("Expires")
    if expires is not None and expires.isdigit() and "Signature" in query:
        return float(expires)
    return None


def _error_body(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message><RequestId>{uuid.uuid4().hex[:16]}</RequestId>"
            "</Error>").encode()


class Front:
    """The reverse proxy in front of moto (see the module docstring). Thread-safe."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.revoked_before: float | None = None  # refuse URLs signed before this
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                front.handle(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-front",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def requests(self, path: str | None = None) -> list[Request]:
        """Every request answered so far (of ``path`` only, when given), in order."""
        with self._lock:
            found = list(self._requests)
        return [r for r in found if path is None or r.path == path]

    def _record(self, handler: http.server.BaseHTTPRequestHandler, query: dict[str, str],
                status: int, refused: bool) -> None:
        request = Request(handler.command, urlsplit(handler.path).path, query,
                          handler.headers.get("Range"), status, refused)
        with self._lock:
            self._requests.append(request)

    def handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        query = {k: v[0] for k, v in
                 parse_qs(urlsplit(handler.path).query, keep_blank_values=True).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        refusal = self._refusal(query)
        if refusal is not None:
            payload = _error_body("AccessDenied", refusal)
            handler.send_response(403)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(payload)
            self._record(handler, query, 403, True)
            return
        self._forward(handler, query, body)

    def _refusal(self, query: dict[str, str]) -> str | None:
        expires = _expires_at(query)
        if expires is not None and time.time() > expires:
            return "Request has expired"
        signed = _signed_at(query)
        revoked = self.revoked_before
        if revoked is not None and signed is not None and signed < revoked:
            return "The credentials that signed this request were revoked"
        return None

    def _forward(self, handler: http.server.BaseHTTPRequestHandler, query: dict[str, str],
                 body: bytes) -> None:
        backend = http.client.HTTPConnection("127.0.0.1", self.backend_port, timeout=30)
        try:
            headers = {k: v for k, v in handler.headers.items()
                       if k.lower() not in _HOP_BY_HOP}
            backend.request(handler.command, handler.path, body=body or None, headers=headers)
            response = backend.getresponse()
            length = response.getheader("Content-Length")
            handler.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP:
                    handler.send_header(name, value)
            if length is None and handler.command != "HEAD":
                handler.send_header("Connection", "close")
                handler.close_connection = True
            handler.end_headers()
            self._record(handler, query, response.status, False)
            if handler.command != "HEAD":
                while chunk := response.read(64 << 10):
                    handler.wfile.write(chunk)
        except OSError:
            handler.close_connection = True  # the client or moto went away
        finally:
            backend.close()


class S3Rig(Rig):
    """moto's S3 server and its front for the body of a ``with`` block; logs in ``work``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.log_path = work / "moto.log"
        self.port = 0
        self._proc: Proc | None = None
        self.front: Front | None = None

    @property
    def endpoint(self) -> str:
        """moto itself: for clients (not recorded, nothing refused)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url_endpoint(self) -> str:
        """The front: where :meth:`url` and :meth:`presign` URLs point."""
        assert self.front is not None, "the rig is not started"
        return f"http://127.0.0.1:{self.front.port}"

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def start(self) -> S3Rig:
        if shutil.which(moto_argv(0)[0]) is None and not Path(moto_argv(0)[0]).exists():
            raise S3RigError("moto_server is missing: pip install 'moto[server]'")
        self.work.mkdir(parents=True, exist_ok=True)
        on_a_free_port(self._start_on, self.logs, S3RigError, "moto_server")
        self.front = Front(self.port)
        return self

    def _start_on(self, port: int) -> bool:
        proc = start_daemon(
            moto_argv(port), self.log_path, ready=lambda p: answers(port), logs=self.logs,
            port_taken="Address already in use", error=S3RigError, name="moto_server",
        )
        if proc is None:
            return False
        self._proc, self.port = proc, port
        return True

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
            self.front = None
        stop_daemon(self._proc)
        self._proc = None

    # -- S3 --------------------------------------------------------------------------------

    def client(self, endpoint: str | None = None, *, signature_version: str = "s3v4") -> Any:
        """A boto3 S3 client of ``endpoint`` (default: moto itself), path-style."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            config=Config(signature_version=signature_version,
                          s3={"addressing_style": "path"}),
        )

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` unless it exists."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)

    def put(self, bucket: str, key: str, data: bytes) -> str:
        """Store ``data`` at ``bucket``/``key`` (the bucket created if needed); its ETag."""
        self.create_bucket(bucket)
        return str(self.client().put_object(Bucket=bucket, Key=key, Body=data)["ETag"])

    def url(self, bucket: str, key: str) -> str:
        """The unsigned URL of ``bucket``/``key`` through the front."""
        return f"{self.url_endpoint}/{bucket}/{quote(key)}"

    def presign(self, bucket: str, key: str, expires_in: int, *,
                signature_version: str = "s3v4") -> str:
        """A presigned GET URL of ``bucket``/``key`` through the front, valid for
        ``expires_in`` seconds (``s3v4``: from its X-Amz-Date, a whole second; ``s3``:
        SigV2, an ``Expires`` time)."""
        client = self.client(self.url_endpoint, signature_version=signature_version)
        return str(client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_in))

    def revoke_signed_before(self, when: float) -> None:
        """From now on, refuse every URL signed (X-Amz-Date) before ``when`` (epoch)."""
        assert self.front is not None
        self.front.revoked_before = when

    def requests(self, path: str | None = None) -> list[Request]:
        """What the front answered (see :class:`Front`)."""
        assert self.front is not None
        return self.front.requests(path)

    def presign_script(self, path: Path, *, expires_in: int, calls: Path) -> Path:
        """Write an executable ``--url-command`` program at ``path``: it appends
        ``RANGEFS_REASON RANGEFS_PATH`` to ``calls`` and prints a fresh presigned URL (valid
        ``expires_in`` seconds) of the object that ``RANGEFS_URL`` names (path-style)."""
        path.write_text(
            f"#!{sys.executable}\n"
            "import os, sys, urllib.parse\n"
            "import boto3\n"
            "from botocore.config import Config\n"
            f"with open({str(calls)!r}, 'a') as log:\n"
            "    log.write(f\"{os.environ['RANGEFS_REASON']} {os.environ['RANGEFS_PATH']}\\n\")\n"
            "path = urllib.parse.urlsplit(os.environ['RANGEFS_URL']).path\n"
            "bucket, _, key = urllib.parse.unquote(path).lstrip('/').partition('/')\n"
            f"client = boto3.client('s3', endpoint_url={self.url_endpoint!r}, "
            f"region_name={REGION!r},\n"
            f"    aws_access_key_id={ACCESS_KEY!r}, aws_secret_access_key={SECRET_KEY!r},\n"
            "    config=Config(signature_version='s3v4', s3={'addressing_style': 'path'}))\n"
            "print(client.generate_presigned_url('get_object', "
            f"Params={{'Bucket': bucket, 'Key': key}}, ExpiresIn={expires_in}))\n"
        )
        path.chmod(0o755)
        return path

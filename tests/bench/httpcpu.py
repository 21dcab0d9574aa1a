"""CPU cost of the HTTP client: per request and per MiB, side by side (issue 17, item 3).

``python -m tests.bench.httpcpu`` starts Debian's nginx on 127.0.0.1 serving one file
from a temporary directory (no delay, no rate limit: the client's CPU is what is measured,
nginx runs in its own process) and measures, in this process, with ``time.process_time``:

* **per request**: ``--requests`` sequential ``GET`` s of a 4 KiB range over one
  keep-alive connection (serialize the request, parse the head, build the
  ``httpx.Response``, read the 4 KiB body): CPU microseconds per request;
* **per MiB**: the whole file read in 4 MiB ranges, bodies consumed with ``aiter_raw``
  (what the fetcher does): CPU milliseconds per MiB.

for each client: rangefs's :class:`rangefs.fasthttp.FastTransport` (``fast``) and httpx's
default transport (httpcore + h11: ``httpx``). Each figure is the median of ``--runs``
interleaved runs; the ratio is httpx / fast. The ``head`` line times the response-head
parse alone: llhttp through httptools (what fasthttp uses) and h11 (what httpcore uses),
on a 10-field nginx 206 head.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h11
import httptools
import httpx
import trio

from rangefs.fasthttp import FastTransport
from tests.daemons import (
    Rig,
    nginx_main,
    nginx_temp_paths,
    on_a_free_port,
    start_nginx,
    stop_daemon,
)

CONF = """\
{main}
events {{ worker_connections 64; }}
http {{
    default_type application/octet-stream;
    access_log off;
{temp_paths}    sendfile on;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {work}/www;
        location / {{ }}
    }}
}}
"""

HEAD = (
    b"HTTP/1.1 206 Partial Content\r\nServer: nginx/1.26.3\r\n"
    b"Date: Sun, 06 Dec 2026 17:00:00 GMT\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Length: 4096\r\nLast-Modified: Sun, 06 Dec 2026 10:00:00 GMT\r\n"
    b'Connection: keep-alive\r\nETag: "6752b0a0-10000000"\r\n'
    b"Content-Range: bytes 0-4095/268435456\r\n\r\n"
)
RANGE = 4 << 20


class Nginx(Rig):
    def __init__(self, work: Path, size: int) -> None:
        self.work = work
        (work / "www").mkdir(parents=True)
        (work / "tmp").mkdir()
        with open(work / "www" / "obj.bin", "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
        self.size = size
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def logs(self) -> str:
        path = self.work / "stderr.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> Nginx:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"

        def start_on(port: int) -> bool:
            self.port = port
            text = CONF.format(main=nginx_main(self.work, "warn"),
                               temp_paths=nginx_temp_paths(self.work), work=self.work,
                               port=port)
            self.proc = start_nginx(nginx, self.work, self.work / "nginx.conf", text,
                                    self.work / "stderr.log", logs=self.logs,
                                    error=RuntimeError)
            return self.proc is not None

        on_a_free_port(start_on, self.logs, RuntimeError, "nginx")
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_daemon(proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/obj.bin"


def _client(kind: str) -> httpx.AsyncClient:
    if kind == "fast":
        return httpx.AsyncClient(transport=FastTransport(), timeout=30.0)
    return httpx.AsyncClient(timeout=30.0, trust_env=False)


async def _per_request(kind: str, url: str, n: int) -> float:
    """CPU microseconds per 4 KiB ranged GET."""
    async with _client(kind) as client:
        headers = {"Range": "bytes=0-4095"}
        await client.get(url, headers=headers)  # connect outside the measurement
        t0 = time.process_time()
        for _ in range(n):
            r = await client.get(url, headers=headers)
            assert r.status_code == 206 and len(r.content) == 4096, r
        return (time.process_time() - t0) / n * 1e6


async def _per_mib(kind: str, url: str, size: int) -> float:
    """CPU milliseconds per MiB of body, read in 4 MiB ranges."""
    async with _client(kind) as client:
        await client.get(url, headers={"Range": "bytes=0-0"})
        t0 = time.process_time()
        got = 0
        for start in range(0, size, RANGE):
            headers = {"Range": f"bytes={start}-{start + RANGE - 1}"}
            async with client.stream("GET", url, headers=headers) as r:
                assert r.status_code == 206, r
                async for chunk in r.aiter_raw():
                    got += len(chunk)
        assert got == size, (got, size)
        return (time.process_time() - t0) / (size >> 20) * 1e3


def _head_us(parse: Callable[[], object], n: int = 20000) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(n):
            parse()
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return best


class _Sink:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


def _llhttp_head() -> object:
    sink = _Sink()
    parser = httptools.HttpResponseParser(sink)
    parser.feed_data(HEAD)
    return parser.get_status_code(), sink.headers


def _h11_head() -> object:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/obj.bin", headers=[("Host", "h")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(HEAD)
    return conn.next_event()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.httpcpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--size-mib", type=int, default=256)
    args = ap.parse_args(argv)
    kinds = ("fast", "httpx")
    per_req: dict[str, list[float]] = {k: [] for k in kinds}
    per_mib: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="rangefs-httpcpu-") as tmp, \
            Nginx(Path(tmp), args.size_mib << 20) as nginx:
        for run in range(args.runs):
            for kind in kinds if run % 2 == 0 else reversed(kinds):
                per_req[kind].append(trio.run(_per_request, kind, nginx.url, args.requests))
                per_mib[kind].append(trio.run(_per_mib, kind, nginx.url, nginx.size))
    fast_req, httpx_req = (statistics.median(per_req[k]) for k in kinds)
    fast_mib, httpx_mib = (statistics.median(per_mib[k]) for k in kinds)
    print(f"medians of {args.runs} runs; CPU of this process (nginx excluded)")
    print(f"{'':24}{'fast':>10}{'httpx':>10}{'httpx/fast':>12}")
    print(f"{'per request, us':24}{fast_req:10.1f}{httpx_req:10.1f}{httpx_req / fast_req:11.2f}x")
    print(f"{'per MiB, ms':24}{fast_mib:10.3f}{httpx_mib:10.3f}{httpx_mib / fast_mib:11.2f}x")
    print(f"head parse alone, us: llhttp (httptools) {_head_us(_llhttp_head):.1f}, "
          f"h11 {_head_us(_h11_head):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

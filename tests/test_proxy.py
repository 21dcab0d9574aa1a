"""Proxies, as curl and httpx users expect (issue 17 item 1), through a real forward proxy:
Debian's tinyproxy on 127.0.0.1 (``tests/proxyrig.py``).

rangefs (mount, download, cat) honours HTTP_PROXY / HTTPS_PROXY / ALL_PROXY / NO_PROXY in
either case, ``--proxy URL`` (every request, overriding the environment) and ``--no-proxy``
(ignore the environment). Plain http goes to the proxy in absolute form, https through
CONNECT; ``user:password@`` in the proxy URL is sent as ``Proxy-Authorization: Basic`` and
never logged. A proxy that refuses or cannot be reached: one line that names the proxy
(credentials redacted) and contains "proxy"; exit 1 for cat and download.

What went through the proxy is read from tinyproxy's own log: one ``Request (file
descriptor N): GET http://127.0.0.1:PORT/a HTTP/1.1`` line per proxied http request (tinyproxy
serves one request per client connection) and one ``Request (file descriptor N): CONNECT
127.0.0.1:PORT HTTP/1.1`` line per https tunnel. The origin's own log (``origin.requests()``)
must show exactly as many requests: every request came through the proxy, none went direct.
"""

from __future__ import annotations

import base64
import socket
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.content import check
from tests.faultserver import Fault, FaultServer
from tests.mountutil import mounted, run_user, wait_for, write_list
from tests.proxyrig import ProxyRig, refused_port
from tests.tlsrig import TlsRig

PROXY_ENV = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
    "REQUEST_METHOD",  # urllib and httpx ignore HTTP_PROXY under CGI
)
SIZE = 2 * 1024 * 1024 + 12_345  # several 1 MiB blocks of cat
USER, PASSWORD = "rangefs", "Pr0xyPassw0rd"
TOKEN = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.fixture(autouse=True)
def _no_inherited_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children inherit os.environ (tests.mountutil.child_env copies it whole): the
    machine's own proxy variables must not reach them; each test sets its own."""
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyRig]:
    """tinyproxy on 127.0.0.1, no authentication, CONNECT to any port; always stopped."""
    with ProxyRig(tmp_path / "proxy") as rig:
        yield rig


@pytest.fixture
def auth_proxy(tmp_path: Path) -> Iterator[ProxyRig]:
    """tinyproxy with ``BasicAuth USER PASSWORD``; always stopped."""
    with ProxyRig(tmp_path / "auth-proxy", auth=(USER, PASSWORD)) as rig:
        yield rig


run = run_user


def hostport(server: FaultServer | TlsRig) -> str:
    return f"127.0.0.1:{server.port}"


def assert_all_through(proxy: ProxyRig, origin: FaultServer, before: int = 0) -> int:
    """Every request the origin saw came through the proxy (and the proxy passed on every
    request it got): as many ``Request`` lines for the origin in the proxy's log (beyond
    ``before``) as requests in the origin's log. Returns that number (> 0)."""
    targets = proxy.targets(hostport(origin))[before:]
    seen = origin.requests()
    assert len(targets) == len(seen) > 0, (
        f"proxy: {targets}\n"
        f"origin: {[(r.method, r.path, r.range) for r in seen]}\n{proxy.logs()}"
    )
    assert sum(t.startswith("GET ") for t in targets) == len(origin.gets()) >= 1, targets
    return len(targets)


def one_line(stderr: bytes) -> str:
    text = stderr.decode(errors="replace")
    lines = text.splitlines()
    assert len(lines) == 1 and text.endswith("\n"), f"want one line on stderr, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


# -- the rig itself ------------------------------------------------------------------------


def _connect_tunnel(proxy: ProxyRig, target: str, headers: str = "") -> tuple[socket.socket, bytes]:
    """Open a CONNECT tunnel by hand: (the socket, the proxy's answer head)."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def test_rig_forwards_get_and_connect_and_logs_them(
    proxy: ProxyRig, origin: FaultServer
) -> None:
    origin.add("/a", 100_000)
    # an absolute-form GET (urllib with a ProxyHandler)
    check("/a", 0, proxy.fetch(origin.url("/a")))
    assert proxy.targets(hostport(origin)) == [f"GET {origin.url('/a')}"]
    assert proxy.upstream_connections(hostport(origin)) == 1
    assert len(origin.gets("/a")) == 1
    # a CONNECT to a port that is not 443 (no ConnectPort line: every port allowed), and a
    # plain HTTP/1.1 request inside the tunnel
    sock, head = _connect_tunnel(proxy, hostport(origin))
    with sock:
        assert head.split(b"\r\n")[0].split(b" ")[1] == b"200", head
        sock.sendall(f"GET /a HTTP/1.1\r\nHost: {hostport(origin)}\r\nRange: bytes=10-19\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 206"), answer[:200]
    check("/a", 10, answer.split(b"\r\n\r\n", 1)[1])
    assert proxy.targets(hostport(origin), "CONNECT") == [f"CONNECT {hostport(origin)}"]
    assert proxy.requests(hostport(origin)) == 2
    assert [r.range for r in origin.gets("/a")] == [None, "bytes=10-19"]
    # nothing for other host:ports
    assert proxy.requests("127.0.0.1:1") == 0


def test_rig_auth_and_connect_ports(tmp_path: Path, origin: FaultServer) -> None:
    origin.add("/a", 1000)
    with ProxyRig(tmp_path / "p", auth=(USER, PASSWORD), connect_ports=(443,)) as rig:
        with pytest.raises(urllib.error.HTTPError) as refused:
            rig.fetch(origin.url("/a"), credentials=False)
        assert refused.value.code == 407
        assert rig.requests(hostport(origin), "GET") == 1
        assert rig.upstream_connections() == 0 and origin.requests() == []
        check("/a", 0, rig.fetch(origin.url("/a")))
        assert rig.requests(hostport(origin), "GET") == 2
        assert rig.upstream_connections(hostport(origin)) == 1
        # tinyproxy does not pass the proxy's credentials on to the origin
        assert "proxy-authorization" not in origin.gets("/a")[0].headers
        # CONNECT to a port other than 443 is refused with 403 (with credentials)
        sock, head = _connect_tunnel(
            rig, hostport(origin), f"Proxy-Authorization: Basic {TOKEN}\r\n"
        )
        sock.close()
        assert head.split(b"\r\n")[0].split(b" ")[1] == b"403", head
        assert rig.upstream_connections() == 1
        assert any(f"Refused CONNECT method on port {origin.port}" in ln for ln in rig.log_lines())


# -- cat through the environment's proxy --------------------------------------------------


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
def test_cat_through_the_proxy_of_the_environment(
    proxy: ProxyRig, origin: FaultServer, variable: str
) -> None:
    origin.add("/a", SIZE)
    done = run("cat", origin.url("/a"), env={variable: proxy.url})
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == SIZE
    check("/a", 0, done.stdout)
    assert_all_through(proxy, origin)
    assert proxy.requests(hostport(origin), "CONNECT") == 0  # plain http: absolute form
    assert all(t.startswith(("GET http://", "HEAD http://"))
               for t in proxy.targets(hostport(origin))), proxy.targets()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NO_PROXY", "127.0.0.1"),
        ("no_proxy", "example.org, 127.0.0.1"),
        ("NO_PROXY", "*"),
    ],
)
def test_no_proxy_bypasses_the_proxy(
    proxy: ProxyRig, origin: FaultServer, variable: str, value: str
) -> None:
    origin.add("/a", SIZE)
    done = run("cat", origin.url("/a"), env={"HTTP_PROXY": proxy.url, variable: value})
    assert done.returncode == 0, done.stderr
    check("/a", 0, done.stdout)
    assert len(done.stdout) == SIZE
    assert proxy.requests() == 0, proxy.targets()
    assert origin.gets("/a")


def test_no_proxy_for_other_hosts_still_proxies(proxy: ProxyRig, origin: FaultServer) -> None:
    origin.add("/a", SIZE)
    done = run("cat", origin.url("/a"),
               env={"HTTP_PROXY": proxy.url, "NO_PROXY": "example.org,.example.net,10.0.0.1"})
    assert done.returncode == 0, done.stderr
    check("/a", 0, done.stdout)
    assert_all_through(proxy, origin)


def test_https_proxy_variable_is_not_used_for_http(proxy: ProxyRig, origin: FaultServer) -> None:
    """As curl: HTTPS_PROXY is for https URLs only; an http URL goes direct."""
    origin.add("/a", SIZE)
    done = run("cat", origin.url("/a"), env={"HTTPS_PROXY": proxy.url})
    assert done.returncode == 0, done.stderr
    check("/a", 0, done.stdout)
    assert proxy.requests() == 0, proxy.targets()


# -- --proxy and --no-proxy ----------------------------------------------------------------


def test_proxy_option_without_environment(proxy: ProxyRig, origin: FaultServer) -> None:
    origin.add("/a", SIZE)
    done = run("cat", "--proxy", proxy.url, origin.url("/a"))
    assert done.returncode == 0, done.stderr
    check("/a", 0, done.stdout)
    assert len(done.stdout) == SIZE
    assert_all_through(proxy, origin)


def test_proxy_option_overrides_the_environment(proxy: ProxyRig, origin: FaultServer) -> None:
    origin.add("/a", SIZE)
    dead = f"http://127.0.0.1:{refused_port()}"
    done = run("cat", "--proxy", proxy.url, origin.url("/a"),
               env={"HTTP_PROXY": dead, "ALL_PROXY": dead, "NO_PROXY": "127.0.0.1"})
    assert done.returncode == 0, done.stderr
    check("/a", 0, done.stdout)
    assert_all_through(proxy, origin)


def test_no_proxy_option_ignores_the_environment(proxy: ProxyRig, origin: FaultServer) -> None:
    origin.add("/a", SIZE)
    done = run("cat", "--no-proxy", origin.url("/a"),
               env={"HTTP_PROXY": proxy.url, "http_proxy": proxy.url, "ALL_PROXY": proxy.url})
    assert done.returncode == 0, done.stderr
    check("/a", 0, done.stdout)
    assert proxy.requests() == 0, proxy.targets()
    assert origin.gets("/a")


# -- download ------------------------------------------------------------------------------


def test_download_through_the_proxy_resumes(
    proxy: ProxyRig, origin: FaultServer, tmp_path: Path
) -> None:
    size = 6 * 1024 * 1024 + 123
    origin.add("/big", size)
    # the first run: the first GET breaks off (TCP reset) after half the object, the next
    # one is a 404 (not retried): exit 1, what arrived stays in DEST.rangefs-part
    origin.faults("/big", [Fault("reset_body", method="GET", after=size // 2),
                           *[Fault("status", method="GET", status=404)] * 20])
    dest = tmp_path / "big"
    args = ["download", "--block-size", "256K", "--concurrency", "1", "--retries", "0",
            origin.url("/big"), str(dest)]
    env = {"HTTP_PROXY": proxy.url}
    first = run(*args, env=env)
    assert first.returncode == 1, first.stderr
    assert not dest.exists() and (tmp_path / "big.rangefs-part").is_dir()
    assert_all_through(proxy, origin)
    wait_for(lambda: proxy.requests(hostport(origin)) == len(origin.requests()),
             "the proxy passed on every request of the first run")
    before = proxy.requests(hostport(origin))
    origin.clear_faults()
    origin.reset_log()

    again = run(*args, env=env)
    assert again.returncode == 0, again.stderr
    check("/big", 0, dest.read_bytes())
    resumed = int(again.stderr.split(b"downloaded, ")[1].split(b" resumed")[0])
    assert resumed > 0, again.stderr
    gets = origin.gets("/big")
    assert gets and all(r.range is not None and r.range.startswith("bytes=") for r in gets), [
        r.range for r in gets]
    assert origin.bytes_sent("/big") <= size - resumed
    assert_all_through(proxy, origin, before)


# -- https through CONNECT -----------------------------------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[TlsRig]:
    with TlsRig(tmp_path / "tls") as rig:
        rig.add("/data/blob.bin", SIZE)
        yield rig


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
def test_https_through_connect(proxy: ProxyRig, tls: TlsRig, variable: str) -> None:
    done = run("cat", "--cacert", str(tls.ca_cert), tls.url("/data/blob.bin"),
               env={variable: proxy.url})
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == SIZE
    check("/data/blob.bin", 0, done.stdout)
    tunnels = proxy.requests(hostport(tls), "CONNECT")
    assert tunnels >= 1, proxy.logs()
    assert proxy.targets(hostport(tls)) == [f"CONNECT {hostport(tls)}"] * tunnels
    assert proxy.upstream_connections(hostport(tls)) == tunnels
    wait_for(lambda: len(tls.requests("/data/blob.bin", "GET")) >= 1, "nginx logged the GETs")


def test_http_proxy_variable_is_not_used_for_https(proxy: ProxyRig, tls: TlsRig) -> None:
    """As curl: HTTP_PROXY is for http URLs only; an https URL goes direct."""
    done = run("cat", "--cacert", str(tls.ca_cert), tls.url("/data/blob.bin"),
               env={"HTTP_PROXY": proxy.url})
    assert done.returncode == 0, done.stderr
    check("/data/blob.bin", 0, done.stdout)
    assert proxy.requests() == 0, proxy.targets()


def test_connect_refused_by_the_proxy_is_one_line(tmp_path: Path, tls: TlsRig) -> None:
    with ProxyRig(tmp_path / "strict", connect_ports=(443,)) as strict:
        done = run("cat", "--cacert", str(tls.ca_cert), tls.url("/data/blob.bin"),
                   env={"HTTPS_PROXY": strict.url})
        assert done.returncode == 1, done.stderr
        line = one_line(done.stderr)
        assert "proxy" in line.lower() and "403" in line, line
        assert strict.hostport in line, line
        assert done.stdout == b""
        # a refusal is not transient: no retry loop (a probe and perhaps one fallback)
        assert 1 <= strict.requests(hostport(tls), "CONNECT") <= 2, strict.targets()
        assert strict.upstream_connections() == 0


# -- proxy authentication ------------------------------------------------------------------


def test_proxy_credentials_work_and_are_never_shown(
    auth_proxy: ProxyRig, origin: FaultServer
) -> None:
    origin.add("/a", SIZE)
    with_env = run("cat", "-v", origin.url("/a"),
                   env={"HTTP_PROXY": auth_proxy.url_with_credentials()})
    assert with_env.returncode == 0, with_env.stderr
    check("/a", 0, with_env.stdout)
    assert_all_through(auth_proxy, origin)
    before = auth_proxy.requests(hostport(origin))
    origin.reset_log()
    with_option = run("cat", "-v", "--proxy", auth_proxy.url_with_credentials(), origin.url("/a"))
    assert with_option.returncode == 0, with_option.stderr
    check("/a", 0, with_option.stdout)
    assert_all_through(auth_proxy, origin, before)
    for done in (with_env, with_option):
        err = done.stderr.decode(errors="replace")
        assert PASSWORD not in err and TOKEN not in err, err
    for request in origin.requests():
        assert "proxy-authorization" not in request.headers


def _auth_target(
    scheme: str, origin: FaultServer, request: pytest.FixtureRequest
) -> tuple[list[str], str, Callable[[], int]]:
    """cat arguments for an object on the http origin or (CONNECT) the https nginx, the
    origin's host:port, and how many requests that origin has seen."""
    if scheme == "http":
        origin.add("/a", SIZE)
        return [origin.url("/a")], hostport(origin), lambda: len(origin.requests())
    tls: TlsRig = request.getfixturevalue("tls")
    return (["--cacert", str(tls.ca_cert), tls.url("/data/blob.bin")],
            hostport(tls), lambda: len(tls.access_lines()))


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_missing_proxy_credentials_are_one_line(
    auth_proxy: ProxyRig, origin: FaultServer, request: pytest.FixtureRequest, scheme: str
) -> None:
    args, target, seen = _auth_target(scheme, origin, request)
    done = run("cat", *args, env={"ALL_PROXY": auth_proxy.url})
    assert done.returncode == 1, done.stderr
    line = one_line(done.stderr)
    assert "proxy" in line.lower(), line
    assert "407" in line or "authentication" in line.lower(), line
    assert auth_proxy.hostport in line, line  # names the proxy
    assert done.stdout == b""
    assert seen() == 0  # never went around the proxy
    assert auth_proxy.requests(target) >= 1
    assert auth_proxy.upstream_connections() == 0


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_wrong_proxy_password_is_one_line_without_it(
    auth_proxy: ProxyRig, origin: FaultServer, request: pytest.FixtureRequest, scheme: str
) -> None:
    """tinyproxy answers wrong credentials with 401 (not 407). To an absolute-form GET that
    401 cannot be told from an origin's, so only the https case (a 401 to CONNECT can only
    be the proxy's) must say "proxy"; both are one line without the password."""
    args, target, seen = _auth_target(scheme, origin, request)
    wrong = "Wr0ngSecret"
    env = {"ALL_PROXY": auth_proxy.url_with_credentials(password=wrong)}
    done = run("cat", *args, env=env)
    assert done.returncode == 1, done.stderr
    line = one_line(done.stderr)
    verbose = run("cat", "-v", *args, env=env)
    assert verbose.returncode == 1, verbose.stderr
    for text in (line, verbose.stderr.decode(errors="replace")):
        assert wrong not in text, text
        assert base64.b64encode(f"{USER}:{wrong}".encode()).decode() not in text, text
    if scheme == "https":
        assert "proxy" in line.lower() and "401" in line, line
        assert auth_proxy.hostport in line, line
        # a refusal is not transient: no retry loop (two runs above: one CONNECT each, and
        # perhaps a fallback probe)
        assert auth_proxy.requests(target, "CONNECT") <= 4, auth_proxy.targets()
    assert done.stdout == b""
    assert seen() == 0
    assert auth_proxy.requests(target) >= 1
    assert auth_proxy.upstream_connections() == 0


# -- a proxy that is down ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["env", "option"])
def test_unreachable_proxy_is_one_line(origin: FaultServer, how: str) -> None:
    origin.add("/a", SIZE)
    dead = f"http://{USER}:{PASSWORD}@127.0.0.1:{refused_port()}"
    if how == "env":
        done = run("cat", origin.url("/a"), env={"HTTP_PROXY": dead})
    else:
        done = run("cat", "--proxy", dead, origin.url("/a"))
    assert done.returncode == 1, done.stderr
    line = one_line(done.stderr)
    assert "proxy" in line.lower(), line
    assert dead.rsplit("@", 1)[1] in line, line  # names the proxy ...
    assert PASSWORD not in line  # ... with its credentials redacted
    assert done.stdout == b""
    assert origin.requests() == []  # no fallback to a direct connection


# -- a real mount --------------------------------------------------------------------------


def _two_entries(origin: FaultServer, tmp_path: Path) -> Path:
    origin.add("/one.bin", SIZE)
    origin.add("/dir/two.bin", 700_001)
    return write_list(tmp_path / "list", [origin.url("/one.bin"),
                                          f"{origin.url('/dir/two.bin')} sub/two.bin"])


def _read_both(mnt: Path) -> None:
    one = (mnt / "one.bin").read_bytes()
    assert len(one) == SIZE
    check("/one.bin", 0, one)
    two = (mnt / "sub" / "two.bin").read_bytes()
    assert len(two) == 700_001
    check("/dir/two.bin", 0, two)


def test_mount_through_the_proxy(
    proxy: ProxyRig, origin: FaultServer, tmp_path: Path, mnt: Path, cache: Path
) -> None:
    urllist = _two_entries(origin, tmp_path)
    with mounted(urllist, mnt, cache_dir=cache, env={"HTTP_PROXY": proxy.url}) as mount:
        _read_both(mnt)
        log = mount.stderr()
    # in-flight background requests end with the mount; then every request the origin saw
    # came through the proxy, and the proxy passed on all it got
    wait_for(lambda: proxy.requests(hostport(origin)) == len(origin.requests()),
             f"proxy and origin agree: {proxy.targets()} vs "
             f"{[(r.method, r.path) for r in origin.requests()]}")
    assert_all_through(proxy, origin)
    gets = proxy.requests(hostport(origin), "GET")
    assert gets == len(origin.gets()) >= 2
    for path in ("/one.bin", "/dir/two.bin"):
        assert origin.gets(path)
        assert any(t.endswith(path) for t in proxy.targets(hostport(origin), "GET"))
    assert "Traceback" not in log


def test_mount_with_no_proxy_goes_direct(
    proxy: ProxyRig, origin: FaultServer, tmp_path: Path, mnt: Path, cache: Path
) -> None:
    urllist = _two_entries(origin, tmp_path)
    env = {"HTTP_PROXY": proxy.url, "NO_PROXY": "localhost,127.0.0.1"}
    with mounted(urllist, mnt, cache_dir=cache, env=env):
        _read_both(mnt)
    assert proxy.requests() == 0, proxy.targets()
    assert origin.gets("/one.bin") and origin.gets("/dir/two.bin")


def test_mount_never_logs_the_proxy_password(
    auth_proxy: ProxyRig, origin: FaultServer, tmp_path: Path, mnt: Path, cache: Path
) -> None:
    urllist = _two_entries(origin, tmp_path)
    env = {"HTTP_PROXY": auth_proxy.url_with_credentials()}
    with mounted(urllist, mnt, cache_dir=cache, env=env) as mount:
        _read_both(mnt)
    wait_for(lambda: auth_proxy.requests(hostport(origin)) == len(origin.requests()),
             "proxy and origin agree")
    assert_all_through(auth_proxy, origin)
    log = mount.stderr()
    assert PASSWORD not in log and TOKEN not in log, log

"""TLS trust (issue 17 item 2) against a real https origin: Debian's nginx with a private CA
made by the openssl CLI (``tests/tlsrig.py``), on 127.0.0.1.

rangefs trusts the system's store (OpenSSL default paths: ``SSL_CERT_FILE``,
``SSL_CERT_DIR``), certifi's bundle and ``--cacert FILE``. A certificate it does not trust
is not a transient fault: the command fails at once, without retries, with one line that
names the host and says "use --cacert FILE or SSL_CERT_FILE"; in a mount, the file's stat
or read fails with EIO and the log has that line.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import trio

from tests.content import check
from tests.faultserver import FaultServer
from tests.mountutil import mounted, run_user, write_list
from tests.tlsrig import FAILED_HANDSHAKE, TlsRig, hashed_ca_dir

SIZE = 3 * 1024 * 1024 + 4321  # several 1 MiB transfer blocks and 64 KiB cache blocks
KEY = "/data/blob.bin"
TRUST_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR", "RANGEFS_CACERT")
MAX_HANDSHAKES = 2  # "fails at once": a size probe and perhaps one fallback, no retry loop


@pytest.fixture(autouse=True)
def _no_inherited_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children inherit os.environ (tests.mountutil.child_env): no CA may come from there."""
    for name in TRUST_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[TlsRig]:
    """nginx over TLS (certificate for 127.0.0.1 and localhost) serving KEY; always stopped."""
    with TlsRig(tmp_path / "tls") as server:
        server.add(KEY, SIZE)
        yield server


def run(*args: str, env: Mapping[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return run_user(*args, env=env, timeout=timeout,
                    hint="retrying an untrusted certificate?")


def settled_handshake_failures(rig: TlsRig) -> int:
    """Failed handshakes logged so far, once those of an exited client are in the log."""
    return rig.settled_failed_handshakes()


def assert_one_certificate_line(stderr: bytes, host: str = "127.0.0.1",
                                hint: bool = True) -> str:
    text = stderr.decode(errors="replace")
    lines = text.splitlines()
    assert len(lines) == 1 and text.endswith("\n"), f"want one line on stderr, got:\n{text}"
    line = lines[0]
    assert "certificate" in line, line
    assert host in line, line
    if hint:
        assert "--cacert" in line, line
    assert "Traceback" not in text
    return line


# -- the rig itself ------------------------------------------------------------------------


def test_rig_serves_ranges_over_tls_to_who_trusts_its_ca(rig: TlsRig) -> None:
    """The rig works (checked with Python's ssl module, which every machine has): a client
    that trusts the CA gets exact bytes for 127.0.0.1 and localhost, with Range; one that
    does not is refused, and each refusal is one FAILED_HANDSHAKE line in the error log."""
    import http.client
    import ssl

    for host in ("127.0.0.1", "localhost"):
        conn = http.client.HTTPSConnection(host, rig.port, context=rig.client_context(),
                                           timeout=30)
        try:
            conn.request("GET", KEY, headers={"Range": "bytes=1000-70999"})
            answer = conn.getresponse()
            body = answer.read()
            assert answer.status == 206, (answer.status, body[:200])
            assert answer.getheader("Content-Range") == f"bytes 1000-70999/{SIZE}"
            check(KEY, 1000, body)
            assert len(body) == 70_000
            conn.request("GET", KEY)
            whole = conn.getresponse()
            assert whole.status == 200
            data = whole.read()
            assert len(data) == SIZE
            check(KEY, 0, data)
        finally:
            conn.close()
    # nginx logs a request once it has sent the answer: the client may see the last byte
    # a moment before the line is written
    deadline = time.monotonic() + 10  # a hang guard
    while len(rig.requests(KEY, "GET")) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(rig.requests(KEY, "GET")) == 4, rig.access_lines()
    assert settled_handshake_failures(rig) == 0, rig.logs()
    for _ in range(3):  # a client that sends an alert (unknown ca)
        with pytest.raises(ssl.SSLCertVerificationError):
            rig.handshake(trust=False)
    assert settled_handshake_failures(rig) == 3, rig.logs()
    trio.run(_trio_refuses, rig)  # like rangefs: trio's SSLStream just closes
    assert settled_handshake_failures(rig) == 4, rig.logs()
    socket.create_connection(("127.0.0.1", rig.port), timeout=10).close()  # no ClientHello
    assert settled_handshake_failures(rig) == 5, rig.logs()
    assert len(rig.requests(KEY)) == 4  # refused handshakes make no request
    assert all(FAILED_HANDSHAKE in line for line in rig.handshake_failures())


async def _trio_refuses(rig: TlsRig) -> None:
    """One handshake the way rangefs makes it (trio.SSLStream), with a context that trusts
    nothing: refused by the client."""
    import ssl

    stream = await trio.open_tcp_stream("127.0.0.1", rig.port)
    tls = trio.SSLStream(stream, rig.client_context(trust=False), server_hostname="127.0.0.1")
    try:
        with pytest.raises(trio.BrokenResourceError) as refused:
            await tls.do_handshake()
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
    finally:
        await stream.aclose()


def test_rig_with_a_wrong_name_certificate(tmp_path: Path) -> None:
    """The rig can serve a certificate for another name: trusted CA, refused hostname."""
    import ssl

    with TlsRig(tmp_path / "wrong", server_names=["example.org"]) as wrong:
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            wrong.handshake(trust=True)
        wrong.handshake(trust=True, host="example.org")  # the certificate itself is fine
        assert settled_handshake_failures(wrong) == 1, wrong.logs()


# -- rangefs download -----------------------------------------------------------------------


def test_download_untrusted_fails_at_once_with_one_line(rig: TlsRig, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "blob.bin"
    dest.parent.mkdir()
    result = run("download", rig.url(KEY), str(dest))
    assert result.returncode == 1, result.stderr
    line = assert_one_certificate_line(result.stderr)
    assert "SSL_CERT_FILE" in line, line
    assert not dest.exists()
    assert result.stdout == b""
    # not retried: each attempt is one refused handshake at the server
    failures = settled_handshake_failures(rig)
    assert 1 <= failures <= MAX_HANDSHAKES, rig.handshake_failures()
    assert rig.requests(KEY) == []


def test_download_with_cacert(rig: TlsRig, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    result = run("download", "--cacert", str(rig.ca_cert), rig.url(KEY), str(dest))
    assert result.returncode == 0, result.stderr
    data = dest.read_bytes()
    assert len(data) == SIZE
    check(KEY, 0, data)
    assert rig.requests(KEY, "GET")  # it really came from nginx, over TLS
    assert settled_handshake_failures(rig) == 0, rig.handshake_failures()


def test_download_via_localhost_name_with_cacert(rig: TlsRig, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    result = run("download", "--cacert", str(rig.ca_cert), rig.url(KEY, host="localhost"),
                 str(dest))
    assert result.returncode == 0, result.stderr
    check(KEY, 0, dest.read_bytes())
    assert dest.stat().st_size == SIZE


def test_download_trusts_ssl_cert_file(rig: TlsRig, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    result = run("download", rig.url(KEY), str(dest), env={"SSL_CERT_FILE": str(rig.ca_cert)})
    assert result.returncode == 0, result.stderr
    data = dest.read_bytes()
    assert len(data) == SIZE
    check(KEY, 0, data)


def test_download_trusts_ssl_cert_dir(rig: TlsRig, tmp_path: Path) -> None:
    certs = hashed_ca_dir(tmp_path / "certs", rig.ca_cert)
    dest = tmp_path / "blob.bin"
    result = run("download", rig.url(KEY), str(dest), env={"SSL_CERT_DIR": str(certs)})
    assert result.returncode == 0, result.stderr
    data = dest.read_bytes()
    assert len(data) == SIZE
    check(KEY, 0, data)


def test_wrong_name_certificate_is_refused_even_with_the_right_ca(tmp_path: Path) -> None:
    with TlsRig(tmp_path / "wrong", server_names=["example.org"]) as wrong:
        wrong.add(KEY, 100_000)
        dest = tmp_path / "blob.bin"
        result = run("download", "--cacert", str(wrong.ca_cert), wrong.url(KEY), str(dest))
        assert result.returncode == 1, result.stderr
        assert_one_certificate_line(result.stderr, hint=False)
        assert not dest.exists()
        assert wrong.requests(KEY) == []
        assert 1 <= settled_handshake_failures(wrong) <= MAX_HANDSHAKES, wrong.logs()


# -- rangefs cat ----------------------------------------------------------------------------


def test_cat_with_cacert_streams_exact_bytes(rig: TlsRig) -> None:
    result = run("cat", rig.url(KEY), "--cacert", str(rig.ca_cert))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == SIZE
    check(KEY, 0, result.stdout)


def test_cat_untrusted_fails_with_one_line(rig: TlsRig) -> None:
    result = run("cat", rig.url(KEY))
    assert result.returncode == 1, result.stderr
    assert_one_certificate_line(result.stderr)
    assert result.stdout == b""
    assert 1 <= settled_handshake_failures(rig) <= MAX_HANDSHAKES, rig.handshake_failures()


# -- a real mount ---------------------------------------------------------------------------


def _https_file_fails_with_eio(path: Path) -> None:
    """stat, or else the first read, of ``path`` fails with EIO."""
    with pytest.raises(OSError) as failure:
        os.stat(path)
        with open(path, "rb") as fh:
            fh.read(4096)
    assert failure.value.errno == errno.EIO, failure.value


def test_mount_untrusted_https_entry_is_eio_and_logged(
    rig: TlsRig, origin: FaultServer, tmp_path: Path, mnt: Path, cache: Path,
) -> None:
    origin.add("/plain.bin", 700_000)
    urls = write_list(tmp_path / "list", [
        f"{rig.url(KEY)} secure.bin",
        f"{origin.url('/plain.bin')} plain.bin",
    ])
    with mounted(urls, mnt, cache_dir=cache, warnings_ok=True) as mount:
        _https_file_fails_with_eio(mnt / "secure.bin")
        data = (mnt / "plain.bin").read_bytes()
        assert len(data) == 700_000
        check("/plain.bin", 0, data)
        log = mount.stderr()
        lines = [ln for ln in log.splitlines() if "certificate" in ln and "--cacert" in ln]
        assert lines, f"no certificate line in the mount log:\n{log}"
        assert any("127.0.0.1" in ln for ln in lines), lines
    assert rig.requests(KEY) == []


def test_mount_with_cacert_reads_every_https_byte(
    rig: TlsRig, origin: FaultServer, tmp_path: Path, mnt: Path, cache: Path,
) -> None:
    origin.add("/plain.bin", 700_000)
    urls = write_list(tmp_path / "list", [
        f"{rig.url(KEY)} secure.bin",
        f"{origin.url('/plain.bin')} plain.bin",
    ])
    with mounted(urls, mnt, "--cacert", str(rig.ca_cert), cache_dir=cache):
        assert os.stat(mnt / "secure.bin").st_size == SIZE
        data = (mnt / "secure.bin").read_bytes()
        assert len(data) == SIZE
        check(KEY, 0, data)
        check("/plain.bin", 0, (mnt / "plain.bin").read_bytes())
    assert rig.requests(KEY, "GET")
    assert settled_handshake_failures(rig) == 0, rig.handshake_failures()

"""Which proxy a request goes through (``rangefs/proxies.py``): pure parsing, no network."""

from __future__ import annotations

import base64

import pytest

from rangefs.errors import UsageError
from rangefs.proxies import Proxy, ProxyConfig


def test_a_proxy_url_with_credentials() -> None:
    proxy = Proxy.from_url("http://al%40ice:s3cr%3At@proxy.corp:3128", "HTTP_PROXY")
    assert (proxy.host, proxy.port, proxy.name) == ("proxy.corp", 3128, "http://proxy.corp:3128")
    assert proxy.authorization == b"Basic " + base64.b64encode(b"al@ice:s3cr:t")
    assert "s3cr" not in repr(proxy)


def test_host_and_port_alone_mean_http() -> None:
    assert Proxy.from_url("proxy.corp:8080", "HTTPS_PROXY").port == 8080
    assert Proxy.from_url("http://proxy.corp", "HTTPS_PROXY").port == 80


@pytest.mark.parametrize("url", ["socks5://p:1080", "https://p:443", "http://", "http://p:x"])
def test_unsupported_or_malformed_proxies_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError, match="ALL_PROXY"):
        Proxy.from_url(url, "ALL_PROXY")


def test_the_environment_either_case_and_all_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "http://all:1")
    monkeypatch.setenv("https_proxy", "http://tls:2")
    config = ProxyConfig.resolve(None)
    assert config.for_origin("http", "h", 80) == Proxy("all", 1, "http://all:1")
    assert config.for_origin("https", "h", 443) == Proxy("tls", 2, "http://tls:2")
    assert ProxyConfig.resolve(None, trust_env=False).for_origin("http", "h", 80) is None
    assert ProxyConfig.resolve("http://cli:3").for_origin("https", "h", 443) == Proxy(
        "cli", 3, "http://cli:3")


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [
        ("*", "any.example", 80, True),
        ("example.org", "example.org", 80, True),
        ("example.org", "files.example.org", 80, True),
        (".example.org", "files.example.org", 80, True),
        ("example.org", "notexample.org", 80, False),
        ("127.0.0.1", "127.0.0.1", 8080, True),
        ("127.0.0.1:8080", "127.0.0.1", 8080, True),
        ("127.0.0.1:8080", "127.0.0.1", 9090, False),
        (" a.example , B.Example ", "b.example", 80, True),
        ("", "b.example", 80, False),
    ],
)
def test_no_proxy_as_curl_reads_it(no_proxy: str, host: str, port: int, bypassed: bool) -> None:
    proxy = Proxy("p", 1, "http://p:1")
    config = ProxyConfig(proxy, proxy, no_proxy)
    assert (config.for_origin("http", host, port) is None) == bypassed

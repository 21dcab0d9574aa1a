"""Which forward proxy a request goes through, as curl and httpx users expect.

Sources, in order: ``--proxy URL`` (every request), else the environment unless
``--no-proxy``: ``HTTP_PROXY`` / ``HTTPS_PROXY`` per URL scheme, ``ALL_PROXY`` for
both, either case (lower case first, as urllib and curl read them), and ``NO_PROXY``
(comma-separated host names, domain suffixes, IP addresses, optional ``:port``, or
``*``) for the hosts that are reached directly. Only ``http://`` proxies are supported
(plain http goes to them in absolute form, https through ``CONNECT``); any other
scheme is a UsageError naming the variable. Credentials in a proxy URL become a
``Proxy-Authorization: Basic`` field and appear nowhere else (``Proxy.name`` is
redacted).

Pure: no I/O. Written here because httpx reads proxy settings only for its own
transports, and rangefs uses its own (``fasthttp.py``); the environment parsing and the
``NO_PROXY`` match are urllib's.
"""

from __future__ import annotations

import base64
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from .errors import UsageError
from .redact import redact_url


@dataclass(frozen=True)
class Proxy:
    """One http:// forward proxy."""

    host: str
    port: int
    name: str  # the URL without credentials, for messages
    authorization: bytes | None = field(default=None, repr=False)  # a secret

    @classmethod
    def from_url(cls, url: str, source: str) -> Proxy:
        """Parse ``url`` (from ``source``, for the message); UsageError if unusable."""
        text = url.strip()
        if "://" not in text:
            text = "http://" + text  # curl's reading of 'host:port'
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port or 80
        except ValueError:
            raise UsageError(f"{source}: malformed proxy URL {redact_url(text)!r}") from None
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise UsageError(
                f"{source}: only http:// proxies are supported, not "
                f"{redact_url(text)!r} (use --no-proxy to ignore the environment)"
            )
        authorization = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            authorization = f"Basic {token}".encode("ascii")
        return cls(parts.hostname, port, f"http://{parts.hostname}:{port}", authorization)


@dataclass(frozen=True)
class ProxyConfig:
    """The proxies of a session (see the module docstring)."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: str = ""

    @classmethod
    def resolve(cls, proxy: str | None, trust_env: bool = True) -> ProxyConfig:
        """``--proxy`` if given, else the environment (unless not ``trust_env``)."""
        if proxy is not None:
            one = Proxy.from_url(proxy, "--proxy")
            return cls(one, one)
        if not trust_env:
            return cls()
        env = urllib.request.getproxies_environment()
        every = env.get("all")
        http = env.get("http") or every
        https = env.get("https") or every
        return cls(
            Proxy.from_url(http, "HTTP_PROXY") if http else None,
            Proxy.from_url(https, "HTTPS_PROXY") if https else None,
            env.get("no", ""),
        )

    def __bool__(self) -> bool:
        return self.http is not None or self.https is not None

    def for_origin(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for requests to ``scheme://host:port``; None: go directly."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or _bypassed(self.no_proxy, host.lower(), port):
            return None
        return proxy


def _bypassed(no_proxy: str, host: str, port: int) -> bool:
    """``host`` (lower case) matches an entry of ``NO_PROXY`` as curl reads it: ``*``, the
    name itself, a parent domain (``example.org`` or ``.example.org``), an IP address,
    each optionally with ``:port``."""
    for entry in no_proxy.lower().split(","):
        entry = entry.strip().strip("[]")
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, want_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if want_port and (not want_port.isdigit() or int(want_port) != port):
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False

"""HTTP access to remote objects: probing, and validated, bounded range requests.

The only module of rangefs that imports httpx. One :class:`HttpSession` owns one
``httpx.AsyncClient`` (one connection pool) for a whole mount or download; it probes objects
(:meth:`HttpSession.probe`) and hands out one :class:`HttpReader` per object version.

Rules this module keeps (DESIGN.md §2, seed W1-W3, W5, W7, W16, W17):

- Every request carries ``Accept-Encoding: identity`` (httpx would ask for gzip) and a
  non-identity ``Content-Encoding`` in an answer is refused.
- Redirects are followed here, by hand: at most ``max_redirects`` hops, a loop is an error,
  the final URL is pinned for ranged GETs (and resolved again from the original URL, once,
  when a pinned target answers 403/404/410: presigned URLs expire). User headers
  (``HttpOptions.headers``) and credentials from the URL's userinfo are sent only to the
  origin (scheme, host, port) of the original URL.
- With a :class:`~rangefs.urlcommand.FreshUrl` (``--url-command``), probes and readers
  start from its current URL (replaced before it expires) and send a refused request
  (:func:`~rangefs.urlcommand.is_refusal`) once more with the fresh URL its command
  prints; the version stays the one probed. Without one, a refusal of a URL whose query
  says it expired says so in its message.
- A range answer is checked completely before its first byte is handed out: status,
  ``Content-Range`` (start, end, total), ``Content-Length``, validator, content and
  transfer codings (``chunked`` is the only transfer coding accepted). Bodies are bounded
  by the requested length; responses are always closed.
- A body whose length disagrees with its range never yields a byte: with a
  ``Content-Length`` (checked against the range) the connection frames it, and bytes past
  it are an error; without one (``chunked``, or delimited by the close) the body is held
  until its end and handed out only when its length is exactly the range's — an answer
  that is longer or shorter is a transient fault. The one exception is a whole-object
  ``200`` without a length (a server without Range support) larger than
  :data:`_HOLD_LIMIT`: it is streamed, and cut with an error at the first byte too many.
- httpx exceptions and HTTP statuses become :mod:`rangefs.errors` classes here, with
  ``raise ... from exc``: 408/429/5xx/transport/timeouts are ``TransientError`` (with the
  server's ``Retry-After``, capped), other 4xx ``PermanentError``.
- Messages name the object by its redacted URL (:func:`redact_url`) and the byte range; they
  never contain credentials or header values, and nothing here logs headers.

Everything is async and runs on the trio thread; cancellation at any ``await`` is safe and
closes whatever response was open.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC
from types import TracebackType
from typing import Final, Protocol

import httpx
import trio

from rangefs.digests import Digest, parse_legacy_digest, parse_repr_digest
from rangefs.errors import (
    PermanentError,
    RangeNotSupported,
    RemoteChanged,
    SourceError,
    TransientError,
    Unreachable,
)
from rangefs.fasthttp import FastTransport, ProxyRefused
from rangefs.proxies import ProxyConfig
from rangefs.ranges import ByteRange
from rangefs.redact import redact_url
from rangefs.stats import MountStats, error_kind
from rangefs.urlcommand import FreshUrl, expired_hint, is_refusal

log = logging.getLogger(__name__)

USER_AGENT: Final = "rangefs/0.1"
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_HEAD_REFUSED: Final = frozenset({403, 405, 501})  # HEAD not allowed: probe with GET instead
_EXPIRED: Final = frozenset({403, 404, 410})  # a pinned (presigned) target that went away
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# After a complete body (or for a redirect / error answer), read at most this much more, for
# at most this long, so the connection can go back to the pool; otherwise it is closed.
_DRAIN_BYTES: Final = 64 * 1024
_DRAIN_SECONDS: Final = 1.0
# A body without Content-Length is held in memory up to this size before any byte of it is
# handed out (the ranges rangefs asks for are at most a few MiB; see the module docstring).
_HOLD_LIMIT: Final = 64 * 1024 * 1024

_CONTENT_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19})", re.ASCII | re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d{1,19})", re.ASCII | re.IGNORECASE)
_DIGITS = re.compile(r"\d+", re.ASCII)


@dataclass(frozen=True)
class RemoteInfo:
    """What a probe learnt about one version of a remote object.

    ``url`` is the final URL after redirects, without userinfo (it may still carry a
    presigned query: show it only through :func:`redact_url`). ``size`` in bytes; ``mtime``
    in seconds since the epoch (from ``Last-Modified``); ``accept_ranges`` is True when the
    server advertises ``Accept-Ranges: bytes`` or answered a range request with 206.
    """

    url: str
    size: int
    etag: str | None
    last_modified: str | None
    mtime: float | None
    accept_ranges: bool
    digest: Digest | None


def other_version(
    ours: RemoteInfo, size: object, etag: object, last_modified: object, *, strong: bool
) -> str | None:
    """Why what another source says of the object (a mirror's probe, another process's
    cache) is not version ``ours``; None if it is. Equal sizes, and equal ETags when either
    has one, else equal Last-Modified. ``strong`` (a source that is not ``ours``'s own
    server, or bytes to be copied): the ETag must be a strong one, and without ETags a
    Last-Modified must be given."""
    if size != ours.size:
        return f"its size is {size}, not {ours.size}"
    if etag is not None or ours.etag is not None:
        if etag != ours.etag or (strong and (ours.etag is None or ours.etag.startswith("W/"))):
            return f"another (or a weak) ETag: {etag}, not {ours.etag}"
        return None
    if last_modified != ours.last_modified or (strong and last_modified is None):
        return "no ETag, and no Last-Modified that agrees"
    return None


@dataclass(frozen=True)
class Document:
    """A whole small resource (a directory listing): the URL that answered (after
    redirects, without userinfo; it may hold a signed query: show it redacted), the status,
    the media type (lower case, no parameters) and the body."""

    url: str
    status: int
    content_type: str
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class HttpOptions:
    """Settings of one :class:`HttpSession`. Timeouts in seconds.

    ``headers`` are sent with every request to the origin of the object's URL, never after
    a redirect to another origin. ``read_timeout`` bounds each socket read (a stalled body),
    and is also used for writes and for waiting for a free pooled connection.
    ``retry_after_cap`` bounds the delay a server may ask for with ``Retry-After``.
    """

    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # secrets: no repr
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_connections: int = 128
    max_redirects: int = 10
    retry_after_cap: float = 120.0
    cacert: str | None = None  # PEM file of CA certificates trusted beside the system's
    proxy: str | None = field(default=None, repr=False)  # --proxy URL (may hold secrets)
    trust_env: bool = True  # read HTTP_PROXY & co. (--no-proxy: False)


def tls_context(cacert: str | None = None) -> ssl.SSLContext:
    """The TLS client context of a session: the system's trust store (OpenSSL's default
    paths, which honour ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``), certifi's bundle where
    the system has none of its CAs, and ``cacert`` (a PEM file of CA certificates).
    Hostnames are checked. Raises OSError / ssl.SSLError for an unusable ``cacert``."""
    context = ssl.create_default_context()
    try:
        import certifi

        context.load_verify_locations(cafile=certifi.where())
    except (ImportError, OSError, ssl.SSLError) as exc:  # pragma: no cover - httpx has it
        log.debug("certifi's CA bundle not loaded: %s", exc)
    if cacert is not None:
        context.load_verify_locations(cafile=cacert)
    context.set_alpn_protocols(["http/1.1"])
    return context


class Reader(Protocol):
    """Ranged access to one version of one remote object (the fetcher's view).

    ``name`` is the object's redacted URL, ``info`` the version being read.
    ``open_range(rng)`` is an async context manager yielding an async iterator of ``bytes``
    chunks that together are exactly the bytes of ``rng``, or that raises: the answer is
    checked before the first chunk, and a body that ends early raises ``TransientError``
    from the iterator. Exiting the context (normally, by an exception or by cancellation)
    releases the request. Errors are :class:`rangefs.errors.SourceError` subclasses.
    """

    name: str
    info: RemoteInfo

    def open_range(self, rng: ByteRange) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Open ``rng`` (inclusive, within ``info.size``) for streaming; see the class."""
        ...


class HttpSession:
    """Owns one ``httpx.AsyncClient``: probes objects and creates their readers.

    Use as ``async with HttpSession(options) as session:`` (or call :meth:`aclose`). Every
    method is called from the trio thread; readers share the session's connection pool.
    ``transport`` replaces the network (tests pass an ``httpx.MockTransport``).
    """

    def __init__(
        self,
        options: HttpOptions | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        stats: MountStats | None = None,
    ) -> None:
        self.options = options if options is not None else HttpOptions()
        self.stats = stats if stats is not None else MountStats()  # counted here: answers
        # by status, failures by kind, ranged body bytes, ranged requests in flight
        opts = self.options
        # Requests go straight to our lean HTTP/1.1 transport (~0.1 ms of CPU each, instead
        # of ~1.5 ms in httpcore's pool and ~0.15 ms more in AsyncClient.send: a list of
        # 10,000 URLs is probed in seconds). With basic auth they go through the client.
        # Proxies are the transport's affair (httpx would ignore the environment's once a
        # transport is given); UsageError here for an unusable proxy setting.
        self._direct: FastTransport | None = None
        if transport is None:
            transport = FastTransport(
                max_connections=opts.max_connections,
                ssl_context_factory=functools.partial(tls_context, opts.cacert),
                proxies=ProxyConfig.resolve(opts.proxy, opts.trust_env),
            )
            self._direct = transport
        self._client = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            timeout=httpx.Timeout(
                connect=opts.connect_timeout,
                read=opts.read_timeout,
                write=opts.read_timeout,
                pool=opts.read_timeout,
            ),
            limits=httpx.Limits(
                max_connections=opts.max_connections,
                max_keepalive_connections=opts.max_connections,
            ),
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )
        self._header_secrets = [v for _, v in opts.headers if len(v) >= 4]
        # what build_request would add to every request of the direct path
        self._base_fields = {name.lower(): (name, value)
                             for name, value in self._client.headers.items()}
        self._extensions = {"timeout": self._client.timeout.as_dict()}

    async def __aenter__(self) -> HttpSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool. Readers of this session are unusable afterwards."""
        await self._client.aclose()

    def reader(self, url: str, info: RemoteInfo, fresh: FreshUrl | None = None) -> HttpReader:
        """A reader of version ``info`` of the object at ``url`` (the original URL, as the
        user gave it; ``info.url`` is where ranged GETs go first; ``fresh``: its current URL,
        see :class:`HttpReader`). PermanentError for a URL that is not http(s)."""
        return HttpReader(self, url, info, fresh)

    # -- probing --------------------------------------------------------------------------

    async def probe(self, url: str, *, fresh: FreshUrl | None = None) -> RemoteInfo:
        """Size, validators, digest and range support of the object at ``url``.

        ``HEAD`` first; if the server refuses it (403/405/501), gives no usable
        ``Content-Length``, or does not say whether it accepts ranges, one
        ``GET Range: bytes=0-0`` decides (its ``Content-Range`` total is the size; a 200 gives
        the size from ``Content-Length`` and ``accept_ranges=False``; 416 ``bytes */0`` is an
        empty object). Raises TransientError / PermanentError.

        With ``fresh`` (``urlcommand.py``) the requests go to its current URL, and a refusal
        of it is tried once more with the URL its command prints; headers and ``url``'s
        userinfo still go only to ``url``'s origin.
        """
        original = _parse_url(url)
        name = redact_url(url)
        if fresh is None:
            return await self._probe(original, original, name)
        start = await fresh.current()
        try:
            info = await self._probe(_parse_url(start), original, name, hint=False)
        except PermanentError as exc:
            if not is_refusal(exc.status, start):
                raise
            retry = await fresh.after_refusal(start)
            if retry is None:
                raise PermanentError(f"{exc}: {fresh.problem}", status=exc.status) from exc
            start = retry
            info = await self._probe(_parse_url(start), original, name, hint=False)
        fresh.worked(start)
        return info

    async def _probe(
        self, start: httpx.URL, original: httpx.URL, name: str, *, hint: bool = True
    ) -> RemoteInfo:
        """:meth:`probe` of the object at ``start`` (``original``: the user's URL, ``name``
        its redacted form); ``hint``: a refusal of an expired URL suggests --url-command."""
        label = f"HEAD {name}"
        response, final = await self._send("HEAD", start, original, {}, label)
        try:
            status, headers = response.status_code, _fields(response)
            if status == 200:
                length = _content_length_or_none(headers)
                if not _identity_encoded(headers):
                    reason = "HEAD answered with a Content-Encoding"
                elif length is None:
                    reason = "HEAD gave no usable Content-Length"
                elif length == 0 or "accept-ranges" in headers:
                    return self._info(final, length, headers, accept_ranges=_accepts_bytes(headers))
                else:
                    reason = "HEAD did not say whether ranges are accepted"
            elif status in _HEAD_REFUSED or 200 <= status < 300:
                reason = f"HEAD answered {status}"
            else:
                raise self._status_error(response, label, final, original, hint=hint)
        finally:
            await _discard(response)
        log.debug("%s: %s; probing with GET bytes=0-0", label, reason)
        return await self._probe_get(start, original, name, hint)

    async def _probe_get(
        self, start: httpx.URL, original: httpx.URL, name: str, hint: bool
    ) -> RemoteInfo:
        label = f"GET {name} bytes=0-0"
        response, final = await self._send("GET", start, original, {"Range": "bytes=0-0"}, label)
        try:
            status, headers = response.status_code, _fields(response)
            at = _at(final, original)
            if status in (200, 206):
                self._require_identity(headers, label, at)
            if status == 206:
                parsed = _parse_content_range(headers.get("content-range"))
                if parsed is None or parsed[:2] != (0, 0):
                    raise PermanentError(
                        f"{label}: 206 answer without a valid Content-Range for bytes 0-0{at}",
                        status=status,
                    )
                return self._info(final, parsed[2], headers, accept_ranges=True)
            if status == 200:
                length = _content_length_or_none(headers)
                if length is None:
                    raise PermanentError(
                        f"{label}: the server gives no size (no Content-Length, no "
                        f"Content-Range){at}",
                        status=status,
                    )
                return self._info(final, length, headers, accept_ranges=False)
            if status == 416:
                match = _UNSATISFIED_RANGE.fullmatch(headers.get("content-range", "").strip())
                if match is not None and int(match[1]) == 0:
                    return self._info(final, 0, headers, accept_ranges=_accepts_bytes(headers))
                raise PermanentError(f"{label}: HTTP 416 for the first byte{at}", status=status)
            raise self._status_error(response, label, final, original, hint=hint)
        finally:
            await _discard(response, limit=1)

    def _info(
        self, final: httpx.URL, size: int, headers: Mapping[str, str], *, accept_ranges: bool
    ) -> RemoteInfo:
        last_modified = headers.get("last-modified") or None
        digest = parse_repr_digest(headers.get("repr-digest"))
        if digest is None:
            digest = parse_legacy_digest(headers.get("digest"))
        return RemoteInfo(
            url=str(final),
            size=size,
            etag=headers.get("etag") or None,
            last_modified=last_modified,
            mtime=_http_date(last_modified),
            accept_ranges=accept_ranges,
            digest=digest,
        )

    # -- documents ------------------------------------------------------------------------

    async def fetch_document(self, url: str, *, limit: int) -> Document:
        """GET the whole of ``url``, following redirects: any answer but a redirect, 408,
        429 or 5xx (those raise TransientError) is returned for the caller to judge, 4xx
        included (an S3 error document says what the server is). PermanentError for a body
        over ``limit`` bytes or a Content-Encoding; transport errors as for probes."""
        original = _parse_url(url)
        label = f"GET {redact_url(url)}"
        response, final = await self._send("GET", original, original, {}, label)
        try:
            status, headers = response.status_code, _fields(response)
            if status in (408, 429) or status >= 500:
                raise self._status_error(response, label, final, original)
            self._require_identity(headers, label, _at(final, original))
            length = _content_length_or_none(headers)
            if length is not None and length > limit:
                raise PermanentError(f"{label}: {length} bytes, more than the {limit} "
                                     f"a listing may have{_at(final, original)}", status=status)
            parts: list[bytes] = []
            received = 0
            try:
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    if received > limit:
                        raise PermanentError(f"{label}: more than the {limit} bytes a "
                                             f"listing may have{_at(final, original)}",
                                             status=status)
                    parts.append(chunk)
            except httpx.TransportError as exc:
                self.stats.error(error_kind(exc))
                raise self._transport_error(exc, label, final, original) from exc
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            return Document(str(final), status, media, b"".join(parts))
        finally:
            await response.aclose()

    # -- requests -------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        original: httpx.URL,
        headers: Mapping[str, str],
        label: str,
    ) -> tuple[httpx.Response, httpx.URL]:
        """Send ``method`` to ``url``, following redirects; returns the first non-redirect
        answer (streaming, open: the caller closes it) and the URL that gave it. User
        headers and userinfo credentials of ``original`` go only to ``original``'s origin."""
        url = _strip_userinfo(url)
        seen = {str(url)}
        hops = 0
        while True:
            response = await self._send_once(method, url, original, headers, label)
            status = response.status_code
            if status not in _REDIRECTS:
                return response, url
            location = response.headers.get("location")
            await _discard(response)
            if location is None:
                raise PermanentError(
                    f"{label}: HTTP {status} without a Location{_at(url, original)}",
                    status=status,
                )
            try:
                target = _strip_userinfo(url.join(location))
            except httpx.InvalidURL as exc:
                raise PermanentError(
                    f"{label}: unusable redirect target{_at(url, original)}", status=status
                ) from exc
            if target.scheme not in _DEFAULT_PORTS:
                raise PermanentError(
                    f"{label}: redirect to a {target.scheme or 'relative'} URL{_at(url, original)}",
                    status=status,
                )
            if str(target) in seen:
                raise PermanentError(
                    f"{label}: redirect loop at {redact_url(str(target))}", status=status
                )
            hops += 1
            if hops > self.options.max_redirects:
                limit = self.options.max_redirects
                raise PermanentError(
                    f"{label}: more than {limit} redirects{_at(url, original)}", status=status
                )
            seen.add(str(target))
            log.debug("%s: %d redirect to %s", label, status, redact_url(str(target)))
            url = target

    async def _send_once(
        self,
        method: str,
        url: httpx.URL,
        original: httpx.URL,
        extra: Mapping[str, str],
        label: str,
    ) -> httpx.Response:
        same_origin = _origin(url) == _origin(original)
        auth: httpx.Auth | None = None
        if same_origin and original.userinfo:
            auth = httpx.BasicAuth(original.username, original.password)
        direct = self._direct if auth is None else None
        if direct is not None:
            # what the branch below builds, without build_request's cost: the user's fields
            # (repeated names kept), ours replacing theirs, the client's under all of them
            ours = [*extra.items(), ("Accept-Encoding", "identity")]
            our_names = {name.lower() for name, _ in ours}
            user = [f for f in self.options.headers if f[0].lower() not in our_names] \
                if same_origin else []
            given = our_names | {name.lower() for name, _ in user}
            client = [f for key, f in self._base_fields.items() if key not in given]
            request = httpx.Request(method, _strip_userinfo(url), headers=client + user + ours,
                                    extensions=self._extensions)
        else:
            headers = httpx.Headers(list(self.options.headers) if same_origin else [])
            for name, value in extra.items():
                headers[name] = value
            headers["Accept-Encoding"] = "identity"
            request = self._client.build_request(method, _strip_userinfo(url), headers=headers)
        try:
            if direct is not None:
                response = await direct.handle_async_request(request)
                if log.isEnabledFor(logging.DEBUG):  # redacting costs more than the request
                    log.debug("%s %s: HTTP %d", method, redact_url(str(request.url)),
                              response.status_code)
            else:
                response = await self._client.send(request, stream=True, auth=auth)
        except httpx.TransportError as exc:
            self.stats.error("tls" if _tls_failure(exc) is not None else error_kind(exc))
            raise self._transport_error(exc, label, url, original) from exc
        self.stats.response(response.status_code)
        return response

    def _require_identity(self, headers: Mapping[str, str], label: str, at: str) -> None:
        if not _identity_encoded(headers):
            raise TransientError(
                f"{label}: the server misbehaves: it sent an encoded body (Content-Encoding) "
                f"although only identity was accepted{at}"
            )

    def _status_error(
        self, response: httpx.Response, label: str, url: httpx.URL, original: httpx.URL,
        *, hint: bool = True,
    ) -> SourceError:
        """The error for an unexpected status: 408/429/5xx transient, anything else permanent.
        ``hint``: a refusal of a URL whose query says it expired says so, and what to do."""
        status = response.status_code
        text = f"{label}: HTTP {status} {response.reason_phrase}".rstrip()
        if hint and is_refusal(status, str(url)):
            expired = expired_hint(str(url)) or expired_hint(str(original))
            if expired is not None:
                text += f": {expired}"
        if status == 407:
            proxy = response.extensions.get("rangefs_proxy") or "the proxy"
            text += f" from {proxy}: give user:password in the proxy URL"
        if status in (408, 429) or status >= 500:
            retry_after = _retry_after(
                response.headers.get("retry-after"), self.options.retry_after_cap
            )
            if retry_after is not None:
                text += f", retry after {retry_after:g} s"
            return TransientError(text + _at(url, original), retry_after=retry_after)
        return PermanentError(text + _at(url, original), status=status)

    def _transport_error(
        self, exc: httpx.TransportError, label: str, url: httpx.URL, original: httpx.URL
    ) -> SourceError:
        """A transport failure: permanent for an unusable URL or request, else transient."""
        if isinstance(exc, ProxyRefused):
            text = f"{label}: {exc}"
            if exc.status in (403, 407) or (exc.status is not None and 400 <= exc.status < 500):
                return PermanentError(text, status=exc.status)
            why = _unreachable(exc) if exc.status is None else None
            if why is not None:
                return Unreachable(f"{label}: cannot connect to the proxy {exc.proxy}: {why}")
            return TransientError(text)
        tls = _tls_failure(exc)
        if tls is not None:  # not transient: retrying cannot make a certificate trusted
            host = url.host
            if isinstance(tls, ssl.SSLCertVerificationError):
                reason = tls.verify_message or tls.reason or "verification failed"
                return PermanentError(
                    f"{label}: the TLS certificate of {host} is not trusted ({reason}): "
                    f"use --cacert FILE or SSL_CERT_FILE to trust its CA{_at(url, original)}"
                )
            return PermanentError(
                f"{label}: the TLS handshake with {host} failed "
                f"({tls.reason or type(tls).__name__}): is it an https server?"
                f"{_at(url, original)}"
            )
        text = f"{label}: {self._describe(exc, url, original)}{_at(url, original)}"
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
            return PermanentError(text)
        why = _unreachable(exc) if isinstance(exc, httpx.ConnectError) else None
        if why is not None:
            port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
            return Unreachable(f"{label}: cannot connect to {url.host}:{port}: {why}"
                               f"{_at(url, original)}")
        return TransientError(text)

    def _describe(self, exc: BaseException, *urls: httpx.URL) -> str:
        """Class name and message of ``exc`` with every credential we know of removed."""
        name = type(exc).__name__
        if isinstance(exc, httpx.LocalProtocolError | httpx.UnsupportedProtocol):
            return name  # may quote our own URL or header values
        text = str(exc)
        secrets = list(self._header_secrets)
        for url in urls:
            secrets.extend(_url_secrets(url))
        for secret in sorted(secrets, key=len, reverse=True):
            text = text.replace(secret, "REDACTED")
        return f"{name}: {text}" if text else name


class HttpReader(Reader):
    """Range requests for one version (``info``) of the object at one URL.

    Created by :meth:`HttpSession.reader`; many tasks may use one reader at once (each
    ``open_range`` is its own request). The pinned URL (``info.url`` at first) is replaced
    when a redirect or a re-resolution finds another final URL. With ``fresh``
    (``urlcommand.py``) requests start from its current URL instead of ``url``, and a
    refused one is tried once more with the URL its command prints; the version read stays
    ``info`` (every answer's validators are checked as always).
    """

    def __init__(
        self, session: HttpSession, url: str, info: RemoteInfo, fresh: FreshUrl | None = None
    ) -> None:
        self.name = redact_url(url)
        self.info = info
        self._session = session
        self._original = _parse_url(url)  # whose origin gets the headers and userinfo
        self._fresh = fresh
        self._start_text = url if fresh is None else fresh.url
        self._start = _strip_userinfo(_parse_url(self._start_text))  # where GETs resolve from
        self._url = _strip_userinfo(_parse_url(info.url))
        self._if_range = _if_range_value(info)

    @asynccontextmanager
    async def open_range(self, rng: ByteRange) -> AsyncIterator[AsyncIterator[bytes]]:
        """``GET`` ``rng`` with ``Range``, ``If-Range`` (strong ETag, else Last-Modified) and
        ``Accept-Encoding: identity``; yields the checked, bounded body (see :class:`Reader`).

        Raises on entry: RemoteChanged (412, 416, other validator, size or total),
        RangeNotSupported (200 to a partial request), TransientError (408/429/5xx, transport,
        encoded body), PermanentError (other statuses, a malformed 206). The iterator raises
        TransientError for a body cut short or a failure mid-body. ValueError if ``rng`` is
        empty or not within the object.
        """
        if rng.start < 0 or rng.end < rng.start or rng.end >= self.info.size:
            raise ValueError(f"{self.name}: range {rng} outside the object ({self.info.size} B)")
        label = f"GET {self.name} {rng}"
        headers = {"Range": f"bytes={rng.start}-{rng.end}"}
        if self._if_range is not None:
            headers["If-Range"] = self._if_range
        stats = self._session.stats
        stats.in_flight += 1
        try:
            response, url, note = await self._get(headers, label)
        except BaseException:
            stats.in_flight -= 1
            raise
        try:
            at = _at(url, self._original)
            try:
                self._check(response, rng, label, url, note)
            except SourceError:
                await _discard(response)
                raise
            declared = "content-length" in response.headers
            hold = not declared and rng.size <= _HOLD_LIMIT
            body = _Body(self._session, response, rng.size, label, at, url, self._original, hold)
            try:
                yield body
            except BaseException:
                await body.aclose(drain=False)
                raise
            # Read the rest (empty for a correct server) so that the connection can be reused,
            # but only if its length was declared (and checked): an undeclared rest may be
            # anything, and closing the connection is cheaper than reading it.
            await body.aclose(drain="content-length" in response.headers)
        finally:
            stats.in_flight -= 1
            await response.aclose()

    async def _get(
        self, headers: Mapping[str, str], label: str
    ) -> tuple[httpx.Response, httpx.URL, str | None]:
        """The answer to a GET of the pinned URL (resolved again from the start URL when it
        went away, and, with ``fresh``, from a fresh URL when refused), the URL that gave it,
        and why a refusal was not cured (or None)."""
        fresh = self._fresh
        if fresh is not None:
            self._follow(await fresh.current())
        response, url = await self._get_pinned(headers, label)
        note = None
        if fresh is not None and is_refusal(response.status_code, self._start_text):
            retry = await fresh.after_refusal(self._start_text)
            if retry is None:
                note = fresh.problem
            else:
                await _discard(response)
                self._follow(retry)
                response, url = await self._get_pinned(headers, label)
        if response.status_code in (200, 206):
            if url != self._url:
                self._url = url
            if fresh is not None:
                fresh.worked(self._start_text)
        return response, url, note

    def _follow(self, start: str) -> None:
        """Requests start from ``start`` (a fresh URL) from now on. No await."""
        if start != self._start_text:
            self._start_text = start
            self._start = self._url = _strip_userinfo(_parse_url(start))

    async def _get_pinned(
        self, headers: Mapping[str, str], label: str
    ) -> tuple[httpx.Response, httpx.URL]:
        session, original, start, pinned = self._session, self._original, self._start, self._url
        response, url = await session._send("GET", pinned, original, headers, label)
        if response.status_code in _EXPIRED and pinned != start:
            log.debug(
                "%s: %s answered %d; resolving the original URL again",
                label,
                redact_url(str(url)),
                response.status_code,
            )
            await _discard(response)
            response, url = await session._send("GET", start, original, headers, label)
        return response, url

    def _check(self, response: httpx.Response, rng: ByteRange, label: str, url: httpx.URL,
               note: str | None = None) -> None:
        """Raise unless ``response`` is exactly the bytes of ``rng`` of our version
        (``note``: why a refusal was not cured by a fresh URL, for the message)."""
        status, headers, size = response.status_code, _fields(response), self.info.size
        at = _at(url, self._original)
        if status == 412:
            raise RemoteChanged(f"{label}: the remote object changed (HTTP 412){at}")
        if status == 416:
            raise RemoteChanged(
                f"{label}: the remote object changed (HTTP 416: the range is past its end){at}"
            )
        if status not in (200, 206):
            error = self._session._status_error(response, label, url, self._original,
                                                 hint=self._fresh is None)
            if note is not None and isinstance(error, PermanentError):
                error = PermanentError(f"{error}: {note}", status=status)
            raise error
        changed = self._validator_change(headers)
        if changed is not None:
            raise RemoteChanged(f"{label}: the remote object changed ({changed}){at}")
        self._session._require_identity(headers, label, at)
        codings = _transfer_codings(headers)
        if codings not in ([], ["chunked"]):
            raise TransientError(
                f"{label}: the server misbehaves: it sent the body with the transfer coding "
                f"{', '.join(codings)!r} (only chunked is accepted){at}"
            )
        try:
            length = _content_length(headers)
        except ValueError:
            raise TransientError(
                f"{label}: malformed Content-Length in the {status} answer{at}"
            ) from None
        parsed = _parse_content_range(headers.get("content-range"))
        if status == 200:
            if rng.start == 0 and rng.end == size - 1:
                if length is not None and length != size:
                    raise RemoteChanged(
                        f"{label}: the remote object changed (the server sends {length} "
                        f"bytes, expected {size}){at}"
                    )
                return  # the whole object was asked for, and that is what comes
            if parsed == (rng.start, rng.end, size) and length == rng.size:
                return  # a 200 that is in fact exactly the range (seed scenario 43)
            raise RangeNotSupported(
                f"{label}: the server ignored the Range and answered 200 with the whole object{at}"
            )
        if parsed is None:
            raise TransientError(f"{label}: 206 answer without a valid Content-Range{at}")
        start, end, total = parsed
        etag = headers.get("etag")
        if total != size and etag and self.info.etag and not etag.startswith("W/"):
            # the same strong ETag with another total: a broken answer, not a new version
            raise TransientError(
                f"{label}: Content-Range total {total} contradicts the size {size} of the "
                f"same ETag{at}"
            )
        if total != size:
            raise RemoteChanged(
                f"{label}: the remote object changed (the server says {total} bytes, "
                f"expected {size}){at}"
            )
        if (start, end) != (rng.start, rng.end):
            raise TransientError(f"{label}: the server sent bytes [{start}:{end}] instead{at}")
        if length is not None and length != rng.size:
            raise TransientError(
                f"{label}: Content-Length {length} does not match the {rng.size} bytes of "
                f"the Content-Range{at}"
            )

    def _validator_change(self, headers: Mapping[str, str]) -> str | None:
        """What differs between the answer's validators and ``info``'s, or None."""
        etag = headers.get("etag")
        if etag and self.info.etag and etag != self.info.etag:
            return "another ETag"
        modified = headers.get("last-modified")
        known = self.info.last_modified
        if modified and known and modified != known:
            when, known_when = _http_date(modified), _http_date(known)
            if when is None or known_when is None or when != known_when:
                return "another Last-Modified"
        return None


class _Body:
    """The async iterator :meth:`HttpReader.open_range` yields: exactly ``expected`` bytes
    of ``response``'s raw body, in the chunks the connection delivers (up to 64 KiB), or a
    TransientError. With ``hold`` (a body without Content-Length) nothing is handed out
    until the whole body has arrived and its length is exactly ``expected``; otherwise
    (the connection frames the body by its checked Content-Length) chunks are handed out as
    they come and a byte past ``expected`` raises."""

    def __init__(
        self,
        session: HttpSession,
        response: httpx.Response,
        expected: int,
        label: str,
        at: str,
        url: httpx.URL,
        original: httpx.URL,
        hold: bool = False,
    ) -> None:
        self._session = session
        self._chunks = response.aiter_raw()  # as received: no re-chunking copies
        self._expected = expected
        self._remaining = expected
        self._label = label
        self._at = at
        self._urls = (url, original)
        self._closed = False
        self._hold = hold
        self._held: list[bytes] | None = None

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise RuntimeError(f"{self._label}: body used after its open_range() ended")
        if self._hold:
            if self._held is None:
                self._held = await self._receive_whole()
                self._held.reverse()
            if self._held:
                return self._held.pop()
            raise StopAsyncIteration
        while self._remaining > 0:
            chunk = await self._receive()
            if chunk is None:
                raise self._short()
            if len(chunk) > self._remaining:
                raise self._long()
            self._remaining -= len(chunk)
            if chunk:
                self._session.stats.bytes_fetched += len(chunk)
                return chunk
        raise StopAsyncIteration

    async def _receive_whole(self) -> list[bytes]:
        """Every chunk of the body, once its end shows its length is exactly right."""
        chunks: list[bytes] = []
        while True:
            chunk = await self._receive()
            if chunk is None:
                if self._remaining:
                    raise self._short()
                return chunks
            if len(chunk) > self._remaining:
                raise self._long()
            self._remaining -= len(chunk)
            if chunk:
                self._session.stats.bytes_fetched += len(chunk)
                chunks.append(chunk)

    async def _receive(self) -> bytes | None:
        """The next chunk as received; None at the end of the body."""
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return None
        except httpx.TransportError as exc:
            self._session.stats.error(error_kind(exc))
            received = self._expected - self._remaining
            detail = self._session._describe(exc, *self._urls)
            raise TransientError(
                f"{self._label}: {detail} after {received} of {self._expected} bytes{self._at}"
            ) from exc

    def _short(self) -> TransientError:
        received = self._expected - self._remaining
        return TransientError(
            f"{self._label}: short body: got {received} of {self._expected} bytes{self._at}"
        )

    def _long(self) -> TransientError:
        return TransientError(
            f"{self._label}: the server misbehaves: the body is longer than the "
            f"{self._expected} bytes of its range{self._at}"
        )

    async def aclose(self, *, drain: bool) -> None:
        """Stop reading. With ``drain`` and every byte delivered, read the (normally empty)
        rest of the body first, bounded, so that the connection can be reused."""
        if self._closed:
            return
        self._closed = True
        self._held = None
        if drain and self._remaining == 0:
            await _drain(self._chunks, _DRAIN_BYTES)
        await _aclose_iterator(self._chunks)


# -- helpers ------------------------------------------------------------------------------


async def _discard(response: httpx.Response, *, limit: int = _DRAIN_BYTES) -> None:
    """Read and drop at most about ``limit`` bytes of ``response``'s body, then close it."""
    try:
        if not response.is_stream_consumed:
            chunks = response.aiter_raw()
            try:
                await _drain(chunks, limit)
            finally:
                await _aclose_iterator(chunks)
    finally:
        await response.aclose()


async def _drain(chunks: AsyncIterator[bytes], limit: int) -> None:
    """Consume ``chunks`` to its end unless that takes more than ``limit`` bytes or
    :data:`_DRAIN_SECONDS`; errors are ignored (the caller closes the response anyway)."""
    received = 0
    with trio.move_on_after(_DRAIN_SECONDS):
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received > limit:
                    return
        except httpx.TransportError as exc:
            log.debug("discarding a body failed: %s", type(exc).__name__)


async def _aclose_iterator(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


# TLS failures that say the server is not an https server as we asked for (a plain http
# port, another protocol): permanent. Others (an EOF in the handshake) may be transient.
_NOT_TLS: Final = frozenset({
    "WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST", "UNKNOWN_PROTOCOL",
    "PACKET_LENGTH_TOO_LONG", "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION",
})


def _unreachable(exc: BaseException, depth: int = 0) -> str | None:
    """Why no connection could be made, if ``exc`` says the name does not resolve or the
    connection was refused (every address tried, for trio's happy eyeballs: an exception
    group); None for anything else."""
    if depth > 8:
        return None
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, BaseExceptionGroup):
        reasons = {_unreachable(member, depth + 1) for member in exc.exceptions}
        return None if None in reasons else ", ".join(sorted(r for r in reasons if r))
    cause = exc.__cause__ or exc.__context__
    return None if cause is None else _unreachable(cause, depth + 1)


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The certificate error, or the "not an https server" error, behind a transport
    error (its causes followed), if there is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError) or (
            isinstance(current, ssl.SSLError) and current.reason in _NOT_TLS
        ):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _parse_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise PermanentError(f"{redact_url(url)}: not a valid URL") from exc
    if parsed.scheme not in _DEFAULT_PORTS or not parsed.host:
        raise PermanentError(f"{redact_url(url)}: not an http(s) URL")
    return parsed


def _strip_userinfo(url: httpx.URL) -> httpx.URL:
    return url.copy_with(username=None, password=None) if url.userinfo else url


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def _at(url: httpx.URL, original: httpx.URL) -> str:
    """`` (at REDACTED-URL)`` when a request went elsewhere than the original URL."""
    if _strip_userinfo(url) == _strip_userinfo(original):
        return ""
    return f" (at {redact_url(str(url))})"


def _url_secrets(url: httpx.URL) -> Iterable[str]:
    """Every part of ``url`` that may be a credential (4 characters or more)."""
    candidates = [url.username, url.password, url.userinfo.decode("ascii", "replace")]
    query = url.query.decode("ascii", "replace")
    candidates.append(query)
    for parameter in query.split("&"):
        name, sep, value = parameter.partition("=")
        candidates.append(value if sep else name)
    for _, value in url.params.multi_items():
        candidates.append(value)
    return [c for c in candidates if len(c) >= 4]


def _if_range_value(info: RemoteInfo) -> str | None:
    """The If-Range value for ``info``: a strong ETag, else Last-Modified, else None."""
    if info.etag and not info.etag.startswith("W/"):
        return info.etag
    return info.last_modified or None


def _fields(response: httpx.Response) -> dict[str, str]:
    """The answer's header fields by lower-case name, repeated fields joined with ", " (as
    ``httpx.Headers.get`` gives them), decoded once: a lookup in ``httpx.Headers`` decodes
    and scans every field, and a probe makes about ten."""
    fields: dict[str, str] = {}
    for name, value in response.headers.multi_items():
        known = fields.get(name)
        fields[name] = value if known is None else f"{known}, {value}"
    return fields


def _identity_encoded(headers: Mapping[str, str]) -> bool:
    encodings = [e.strip().lower() for e in headers.get("content-encoding", "").split(",")]
    return all(e in ("", "identity") for e in encodings)


def _transfer_codings(headers: Mapping[str, str]) -> list[str]:
    """The answer's transfer codings, lower-cased, in order (``[]`` without any)."""
    value = headers.get("transfer-encoding", "")
    return [c.strip().lower() for c in value.split(",") if c.strip()]


def _accepts_bytes(headers: Mapping[str, str]) -> bool:
    units = [u.strip().lower() for u in headers.get("accept-ranges", "").split(",")]
    return "bytes" in units


def _content_length(headers: Mapping[str, str]) -> int | None:
    """``Content-Length`` as an int; None if absent, ValueError if malformed."""
    value = headers.get("content-length")
    if value is None:
        return None
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1:
        raise ValueError("conflicting Content-Length values")
    text = values.pop()
    if not _DIGITS.fullmatch(text) or len(text) > 19:
        raise ValueError("malformed Content-Length")
    return int(text)


def _content_length_or_none(headers: Mapping[str, str]) -> int | None:
    try:
        return _content_length(headers)
    except ValueError:
        return None


def _parse_content_range(value: str | None) -> tuple[int, int, int] | None:
    """``bytes a-b/total`` as (a, b, total); None if absent, malformed or inconsistent."""
    if value is None:
        return None
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        return None
    start, end, total = (int(g) for g in match.groups())
    if end < start or end >= total:
        return None
    return start, end, total


def _http_date(value: str | None) -> float | None:
    """An HTTP date as seconds since the epoch; None if absent or unparseable."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _retry_after(value: str | None, cap: float) -> float | None:
    """``Retry-After`` (delay-seconds or HTTP-date) in seconds, at most ``cap``; None if
    absent or unusable (negative, garbage). A date in the past gives 0."""
    if value is None:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return cap if len(value) > 12 else min(float(int(value)), cap)
    when = _http_date(value)
    if when is None:
        return None
    return min(max(0.0, when - time.time()), cap)

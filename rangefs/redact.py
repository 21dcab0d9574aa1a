"""URLs fit for logs, messages, xattrs and the cache directory: no credentials."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit


@functools.lru_cache(maxsize=1 << 14)  # the same URL is named again by every message
def redact_url(url: str) -> str:
    """``url`` fit for a message or a log: no userinfo, every query value replaced by
    ``REDACTED`` (a query item without ``=`` is replaced whole), no fragment. Never raises."""
    try:
        parts = urlsplit(url)
    except ValueError:
        # Unparseable (e.g. a broken IPv6 literal): keep only what surely holds no secret.
        head, _, _ = url.partition("?")
        head, _, _ = head.partition("#")
        scheme, sep, rest = head.partition("://")
        if sep:
            authority, slash, path = rest.partition("/")
            head = f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
        return head + ("?REDACTED" if "?" in url else "")
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        items = []
        for item in query.split("&"):
            key, sep, _ = item.partition("=")
            items.append(f"{key}=REDACTED" if sep else "REDACTED")
        query = "&".join(items)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


# userinfo of an absolute URL anywhere in a text: 'scheme://user:pass@'
_USERINFO_IN_TEXT = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#@'\"<>]*@")
# the query of a URL or of a path anywhere in a text: '?' after a non-blank character, up to
# a blank, a quote, '<', '>' or '#'; punctuation that ends it (the ':' of "URL: error", a
# ',', '.', ';', ')' or ']') stays outside, so that the message keeps it
# (that is done in _redact_query: a lazy pattern for it backtracks quadratically)
_QUERY_IN_TEXT = re.compile(r"(?<=[^\s'\"(\[<])\?([^\s'\"<>#]+)")
_TRAILING = ":;,.)]"


def _redact_query(match: re.Match[str]) -> str:
    query = match.group(1)
    kept = query.rstrip(_TRAILING)
    if not kept:
        return match.group(0)  # '?' then punctuation only: no query
    items = []
    for item in kept.split("&"):
        key, sep, _ = item.partition("=")
        items.append(f"{key}=REDACTED" if sep else "REDACTED")
    return "?" + "&".join(items) + query[len(kept):]


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` (a log line, a message) with every URL userinfo and every query value
    replaced (as :func:`redact_url` does, for URLs and relative paths found anywhere in the
    text), and every string of ``secrets`` replaced by ``REDACTED``. Never raises."""
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "REDACTED")
    if "@" in text:
        text = _USERINFO_IN_TEXT.sub(r"\1", text)
    if "?" in text:
        text = _QUERY_IN_TEXT.sub(_redact_query, text)
    return text

"""URLs fit for logs, messages, xattrs and the cache directory: no credentials."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


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

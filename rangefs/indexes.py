"""What a server's directory listing says: HTML directory indexes and S3 bucket listings.

Pure functions over a body that ``listings.py`` fetched; nothing here does I/O. Both
formats come from servers we do not control, so every name is checked (:func:`usable_name`)
and whatever cannot be a file name in the mount is skipped, never guessed at.

- **HTML indexes** (nginx ``autoindex``, Apache ``mod_autoindex``, lighttpd
  ``mod_dirlisting``, ``python -m http.server``, ``rclone serve http``): every ``<a href>``
  whose target, resolved against the directory's URL, is one path segment below it (a
  trailing '/' marks a subdirectory). Links with a query (sort orders), to parents, to other
  hosts or deeper down are not children. Sizes are taken only where a server prints them in
  bytes: nginx's ``autoindex`` (the default ``autoindex_exact_size on``: bytes after the
  date) and rclone's ``<size>`` element; Apache and lighttpd print rounded sizes ("1.2M")
  and ``http.server`` none, so those files are probed when first looked at. The standard
  library's ``html.parser`` does the tokenising (it copes with unquoted attributes,
  entities and broken markup, which a regular expression would not).
- **S3 ListObjectsV2** (``ListBucketResult`` XML, AWS S3 and compatible stores such as
  MinIO, Ceph or moto): ``Contents`` (Key, Size, LastModified) and ``CommonPrefixes``
  under a ``delimiter=/`` listing, paginated with ``NextContinuationToken``. Parsed with
  ``xml.etree`` (expat: no external entities, and entity expansion is bounded).
"""

from __future__ import annotations

import calendar
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from html.parser import HTMLParser
from urllib.parse import SplitResult, quote, unquote, urlencode, urlsplit

from rangefs.urllist import MAX_NAME_BYTES

#: Most children one directory may have: beyond it the listing is refused, not cut.
MAX_CHILDREN = 1_000_000

_BAD_NAME_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff/]")
# nginx autoindex, after </a>: "   06-Dec-2026 19:56          123457" (or "-" for a dir)
_NGINX_ROW = re.compile(r"\s+(\d{2}-[A-Z][a-z]{2}-\d{4} \d{2}:\d{2})\s+(\d+|-)\s*(?:\n|$)")
_S3_NS = re.compile(r"^\{[^}]*\}")


@dataclass(frozen=True, slots=True)
class Child:
    """One child of a listed directory. ``segment`` is its last URL path segment as the
    server spells it (percent-encoded, '/' at the end for a directory): its URL is the
    directory's URL + ``segment``. ``size`` in bytes and ``mtime`` (seconds since the
    epoch) only when the listing says them exactly, else None."""

    name: str
    segment: str
    is_dir: bool
    size: int | None = None
    mtime: float | None = None


def usable_name(name: str) -> bool:
    """Whether ``name`` can be a file name in the mount: not empty, '.' or '..', no '/',
    no control character, at most 255 bytes of UTF-8."""
    return (name not in ("", ".", "..") and not _BAD_NAME_CHARACTER.search(name)
            and len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES)


# -- HTML ------------------------------------------------------------------------------


class _Anchors(HTMLParser):
    """Each ``<a href>`` with what follows it up to the next anchor or end of row: the
    text, an rclone ``<size>`` element's text, an rclone ``<time datetime>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[dict[str, str]] = []
        self._row: dict[str, str] | None = None
        self._in_size = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            self._row = {"href": href, "after": ""} if href else None
            if self._row is not None:
                self.rows.append(self._row)
                self._row["in_anchor"] = "1"
        elif self._row is not None:
            if tag == "size":
                self._in_size = True
                self._row["size"] = ""
            elif tag == "time":
                self._row["time"] = dict(attrs).get("datetime") or ""

    def handle_endtag(self, tag: str) -> None:
        if self._row is None:
            return
        if tag == "a":
            self._row.pop("in_anchor", None)
        elif tag == "size":
            self._in_size = False
        elif tag in ("tr", "li"):
            self._row = None

    def handle_data(self, data: str) -> None:
        row = self._row
        if row is None or "in_anchor" in row:
            return
        if self._in_size:
            row["size"] += data
        row["after"] += data


def parse_html_index(body: str, base: str) -> list[Child]:
    """The children that the HTML page ``body``, served at URL ``base`` (a directory URL
    ending with '/', after redirects), links to. Unusable names are skipped."""
    parser = _Anchors()
    parser.feed(body)
    parser.close()
    here = urlsplit(base)
    origin = (here.scheme.lower(), (here.hostname or "").lower(), _port(here))
    children: list[Child] = []
    seen: set[str] = set()
    for row in parser.rows:
        segment = _child_segment(row["href"], here, origin)
        if segment is None:
            continue
        is_dir = segment.endswith("/")
        try:
            name = unquote(segment.rstrip("/"), errors="strict")
        except UnicodeDecodeError:
            continue
        if not usable_name(name) or name in seen:
            continue
        seen.add(name)
        size, mtime = (None, None) if is_dir else _row_size(row)
        children.append(Child(name, segment, is_dir, size, mtime))
        if len(children) > MAX_CHILDREN:
            raise ValueError(f"more than {MAX_CHILDREN} entries")
    return children


def _port(parts: SplitResult) -> int | None:
    try:
        port = parts.port
    except ValueError:
        return None
    return port if port is not None else {"http": 80, "https": 443}.get(parts.scheme.lower())


def _child_segment(href: str, here: SplitResult,
                   origin: tuple[str, str, int | None]) -> str | None:
    """The one path segment that ``href`` adds to the directory ``here``, or None if it
    does not name a child (query, fragment only, parent, elsewhere, deeper)."""
    href = href.strip()
    if not href or href.startswith(("#", "?")):
        return None
    target = urlsplit(href)
    if target.query:
        return None
    base_path = here.path
    if target.scheme or target.netloc:
        if (target.scheme.lower(), (target.hostname or "").lower(), _port(target)) != origin:
            return None
        path = target.path
    elif target.path.startswith("/"):
        path = target.path
    else:
        path = base_path + target.path
    if not path.startswith(base_path):
        return None
    rest = path[len(base_path):]
    if rest.startswith("./"):
        rest = rest[2:]
    name = rest[:-1] if rest.endswith("/") else rest
    if not name or "/" in name or name in (".", ".."):
        return None
    return rest


def _row_size(row: dict[str, str]) -> tuple[int | None, float | None]:
    """(size, mtime) that a listing row states exactly, else None for either."""
    if "size" in row:  # rclone: <size>123</size>, <time datetime="2026-12-06 19:56:53.6 +0000 UTC">
        text = row["size"].strip()
        size = int(text) if text.isdigit() else None
        return size, _rclone_time(row.get("time", ""))
    match = _NGINX_ROW.match(row["after"])
    if match is None or match[2] == "-":
        return None, None
    try:
        mtime = float(calendar.timegm(time.strptime(match[1], "%d-%b-%Y %H:%M")))
    except ValueError:
        mtime = None
    return int(match[2]), mtime


def _rclone_time(text: str) -> float | None:
    # "2026-12-06 19:56:53.620709084 +0000 UTC": Go's time.String(); keep to microseconds
    match = re.match(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:\.(\d+))? ([+-]\d{4})", text)
    if match is None:
        return None
    try:
        stamp = datetime.strptime(f"{match[1]} {match[3]}", "%Y-%m-%d %H:%M:%S %z")
    except ValueError:
        return None
    fraction = float(f"0.{match[2]}") if match[2] else 0.0
    return stamp.timestamp() + fraction


# -- S3 --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Page:
    """One page of a ListObjectsV2 answer: the children below ``prefix`` and the token
    of the next page (None on the last)."""

    children: list[Child]
    next_token: str | None


def is_bucket_listing(body: bytes) -> bool:
    """Whether ``body`` is an S3 ``ListBucketResult`` document (V1 or V2)."""
    head = body[:4096].lstrip()
    return (head.startswith(b"<?xml") and b"<ListBucketResult" in head) or \
        head.startswith(b"<ListBucketResult")


def s3_list_query(prefix: str, token: str | None) -> str:
    """The query string of a ListObjectsV2 request for the children of ``prefix``."""
    fields = [("list-type", "2"), ("delimiter", "/"), ("prefix", prefix)]
    if token is not None:
        fields.append(("continuation-token", token))
    return urlencode(fields, quote_via=quote)


def parse_s3_page(body: bytes, prefix: str) -> S3Page:
    """The children of ``prefix`` in one ListObjectsV2 answer. ValueError if ``body`` is
    not one. Keys are relative to ``prefix``; a key equal to ``prefix`` (a "directory
    marker" object) and unusable names are skipped."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from None
    if _S3_NS.sub("", root.tag) != "ListBucketResult":
        raise ValueError(f"not a bucket listing: <{_S3_NS.sub('', root.tag)}>")
    children: list[Child] = []
    token: str | None = None
    truncated = False
    for element in root:
        tag = _S3_NS.sub("", element.tag)
        if tag == "Contents":
            fields = {_S3_NS.sub("", f.tag): (f.text or "") for f in element}
            child = _s3_child(fields.get("Key", ""), prefix, fields)
        elif tag == "CommonPrefixes":
            fields = {_S3_NS.sub("", f.tag): (f.text or "") for f in element}
            child = _s3_child(fields.get("Prefix", ""), prefix, None)
        elif tag == "IsTruncated":
            truncated = (element.text or "").strip().lower() == "true"
            continue
        elif tag == "NextContinuationToken":
            token = (element.text or "").strip() or None
            continue
        else:
            continue
        if child is not None:
            children.append(child)
    if truncated and token is None:
        raise ValueError("a truncated listing without a NextContinuationToken")
    return S3Page(children, token if truncated else None)


def _s3_child(key: str, prefix: str, fields: dict[str, str] | None) -> Child | None:
    if not key.startswith(prefix):
        return None
    rest = key[len(prefix):]
    is_dir = fields is None
    name = rest[:-1] if is_dir and rest.endswith("/") else rest
    if not usable_name(name):
        return None
    segment = quote(name, safe="~") + ("/" if is_dir else "")
    if fields is None:
        return Child(name, segment, True)
    size_text = fields.get("Size", "").strip()
    size = int(size_text) if size_text.isdigit() else None
    return Child(name, segment, False, size, _iso_time(fields.get("LastModified", "")))


def _iso_time(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None

"""The URL list: which remote objects appear where under the mount point (DESIGN.md §5).

Plain text, UTF-8, one entry a line; blank lines and lines whose first non-blank character
is ``#`` are ignored. Tokens are separated by spaces or tabs::

    URL [PATH] [sha256:HEX | sha512:HEX | sha1:HEX | md5:HEX | size=N | mirror=URL
              | url-command=PROGRAM] ...

- URL: ``http://`` or ``https://`` with a host. It is kept exactly as given (it may carry
  ``user:pass@`` or a signed query), so it never appears in a message: :func:`redact_url`.
- PATH: where the file appears, relative to the mount point; directories are implied. By
  default the URL's last path segment, percent-decoded. An explicit PATH is taken literally
  (no percent-decoding). The second token is a PATH unless it looks like an option.
- Options: at most one digest (hex or base64, any of :mod:`rangefs.digests`' spellings),
  at most one ``size=N`` (decimal bytes), mirrors (``mirror=URL``), and at most one
  ``url-command=PROGRAM``: the absolute path of a program that prints a fresh URL when this
  one expires (``urlcommand.py``; whether it exists is the caller's check).
- A URL whose path ends with ``/`` is a *listing*: the directory at PATH shows the tree
  under it, listed from the server (an HTML directory index or an S3 bucket listing,
  ``listings.py``). Its default PATH is the URL's last non-empty segment; PATH ``.`` puts the
  tree at the mount point (then it must be the list's only entry). It takes no options, and
  no other entry may lie inside it.

Everything wrong is rejected with :class:`~rangefs.errors.UrlListError` (file, line,
reason) before anything is mounted: other schemes, empty, ``.`` or ``..`` components,
absolute PATHs, control characters, lines over 64 KiB, two entries with one PATH, a PATH that
is both a file and a directory, a malformed digest or size, unknown or repeated options.
Pure and synchronous, except that :func:`read_url_list` reads a file or standard input.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from rangefs.digests import DIGEST_SIZES, Digest, parse_digest
from rangefs.errors import UrlListError, UsageError
from rangefs.redact import redact_url

#: The longest line accepted, in bytes of UTF-8 (without the line ending).
MAX_LINE_BYTES = 64 * 1024
#: The longest path component accepted, in bytes of UTF-8 (NAME_MAX).
MAX_NAME_BYTES = 255
#: The largest size=N accepted (the largest off_t).
MAX_SIZE = (1 << 63) - 1

STDIN_SOURCE = "<stdin>"

_TOKEN_SEPARATOR = re.compile(r"[ \t]+")
# C0 and C1 controls except TAB, DEL, and lone surrogates (only possible from a str caller).
_BAD_CHARACTER = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")
_DIGEST_OPTION = re.compile(r"(?i)(?:sha-?256|sha-?512|sha-?1|md5)[:=]")
_BAD_COMPONENT = re.compile(r"(?:^|/)(\.{0,2})(?:/|\Z)")  # an empty, '.' or '..' component
_HEX_DIGEST = re.compile(r"(sha256|sha512|sha1|md5):([0-9a-fA-F]+)")  # the common spelling
_SIZE_OPTION = re.compile(r"(?i)size=")
_MIRROR_OPTION = re.compile(r"(?i)mirror=")
_URL_COMMAND_OPTION = re.compile(r"(?i)url-command=")
_DECIMAL = re.compile(r"[0-9]+")
# http(s)://[userinfo@]host[:port] followed by the path, query, fragment or the end: a
# registered name or IPv4 host (no IPv6 literal), accepted without urlsplit for speed.
_PLAIN_HTTP_URL = re.compile(
    r"(?i:https?)://(?:[^/?#@\[\]]*@)?[A-Za-z0-9._~%!$&'()*+,;=-]+(?::([0-9]{1,5}))?(?=[/?#]|\Z)"
)
_OPTIONS_HELP = ("sha256:HEX, sha512:HEX, sha1:HEX, md5:HEX, size=N, mirror=URL or "
                 "url-command=PROGRAM")
MAX_MIRRORS = 16


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of a URL list: the object at ``url`` appears at ``path`` (relative, clean).

    ``url`` is exactly as given and may hold credentials: never log it, use
    :func:`redact_url` (``repr()`` already does). ``digest`` and ``size`` are what the line
    claims, if anything; ``line`` is the 1-based line number in the list. ``mirrors`` are
    other URLs of the same object (``mirror=URL``), credentials and all, in line order.
    ``url_command`` is the program that prints a fresh URL (``url-command=PROGRAM``).
    """

    url: str = field(repr=False)
    path: PurePosixPath
    digest: Digest | None
    size: int | None
    line: int
    mirrors: tuple[str, ...] = field(default=(), repr=False)
    url_command: str | None = None
    #: a directory listed from the server (the URL ends with '/'): ``path`` is where it
    #: appears ('.': the mount point); no digest, size or mirrors
    listing: bool = False
    #: the entry came from a listing: ``size`` is what the listing said (a hint, not a
    #: claim: the server's answer wins) and ``mtime`` its modification time, if it gave one
    listed: bool = False
    mtime: float | None = None

    def __repr__(self) -> str:
        mirrors = f", mirrors={[redact_url(m) for m in self.mirrors]!r}" if self.mirrors else ""
        command = f", url_command={self.url_command!r}" if self.url_command else ""
        return (
            f"Entry(url={redact_url(self.url)!r}, path={str(self.path)!r}, "
            f"digest={self.digest!s}, size={self.size!r}, line={self.line!r}{mirrors}"
            f"{command}{', listing=True' if self.listing else ''}"
            f"{', listed=True' if self.listed else ''})"
        )


def _url_path(url: str) -> tuple[str | None, str]:
    """The path component of ``url`` (possibly empty), or (None, why the URL is unusable)."""
    fast = _PLAIN_HTTP_URL.match(url)
    if fast and (fast.group(1) is None or 0 < int(fast.group(1)) <= 65535):
        # the common case, without urlsplit (see _PLAIN_HTTP_URL)
        return url[fast.end() :].partition("#")[0].partition("?")[0], ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None, f"malformed URL {redact_url(url)!r}"
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number, or above 65535
        port_ok = False
    if parts.scheme not in ("http", "https"):
        shown = f"{parts.scheme}://" if parts.scheme else "none"
        return None, (
            f"unsupported URL scheme {shown!r} in {redact_url(url)!r}: "
            "only http:// and https:// URLs are supported"
        )
    if not parts.hostname:
        return None, f"URL {redact_url(url)!r} has no host"
    if not port_ok:
        return None, f"URL {redact_url(url)!r} has an invalid port"
    return parts.path, ""


def _default_path(url: str, url_path: str) -> tuple[str | None, str]:
    """The last segment of ``url``'s path ``url_path``, percent-decoded, or (None, reason)."""
    segment = url_path.rpartition("/")[2]
    if not segment:
        return None, f"URL {redact_url(url)!r} has no file name at the end; give a PATH"
    try:
        name = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        return None, (
            f"the last segment of URL {redact_url(url)!r} is not UTF-8 once percent-decoded; "
            "give a PATH"
        )
    if "/" in name:
        return None, (
            f"the last segment of URL {redact_url(url)!r} decodes to a name with '/'; "
            "give a PATH"
        )
    if _BAD_CHARACTER.search(name):
        return None, (
            f"the last segment of URL {redact_url(url)!r} decodes to a name with a control "
            "character; give a PATH"
        )
    if name in (".", ".."):
        return None, f"the last segment of URL {redact_url(url)!r} is {name!r}; give a PATH"
    return name, ""


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be fetched (not http(s), no host, bad port, a control character),
    or None. The reason shows the URL redacted."""
    bad = _BAD_CHARACTER.search(url)
    if bad:
        return f"control character U+{ord(bad.group()):04X} in the URL"
    url_path, problem = _url_path(url)
    return problem if url_path is None else None


def default_name(url: str) -> tuple[str | None, str]:
    """The file name the URL list gives ``url`` when no PATH is given (its last path
    segment, percent-decoded), or (None, why there is none: no segment, '.', '..', a '/'
    or a control character once decoded, not UTF-8). The reason shows the URL redacted."""
    url_path, problem = _url_path(url)
    if url_path is None:
        return None, problem
    return _default_path(url, url_path)


def _check_path(path: str) -> str | None:
    """Why ``path`` (control characters already excluded) is unusable, or None."""
    if "://" in path:
        return f"PATH {redact_url(path)!r} looks like a URL: give one URL per line"
    if path.startswith("/"):
        return f"absolute PATH {path!r}: give it relative to the mount point"
    if path.endswith("/"):
        return f"PATH {path!r} ends with '/': give the file's whole path, name included"
    bad = _BAD_COMPONENT.search(path)
    if bad:
        component = bad.group(1)
        if not component:
            return f"PATH {path!r} has an empty component"
        return f"PATH {path!r} has a {component!r} component"
    if len(path) > MAX_NAME_BYTES // 4:
        for component in path.split("/"):
            if len(component.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
                return f"PATH {path!r} has a component longer than {MAX_NAME_BYTES} bytes"
    return None


def _is_option(token: str) -> bool:
    return bool(_DIGEST_OPTION.match(token) or _SIZE_OPTION.match(token)
                or _MIRROR_OPTION.match(token) or _URL_COMMAND_OPTION.match(token))


def parse_url_list(text: str, source: str) -> list[Entry]:
    """Parse a whole URL list; ``source`` names it in errors (a file name, ``<stdin>``).

    Lines end with LF or CRLF; a leading BOM is ignored. Returns the entries in line order.
    Raises UrlListError on the first problem.
    """
    entries: list[Entry] = []
    files: dict[str, int] = {}  # path -> line of the entry
    directories: dict[str, int] = {}  # implied directory -> first line implying it
    listings: dict[str, int] = {}  # the PATH of each listing -> its line
    if text.startswith("\ufeff"):
        text = text[1:]
    for number, line in enumerate(text.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]
        if len(line) > MAX_LINE_BYTES // 4 and (
            len(line.encode("utf-8", "surrogatepass")) > MAX_LINE_BYTES
        ):
            raise UrlListError(source, number, f"line longer than {MAX_LINE_BYTES} bytes")
        stripped = line.strip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        bad = _BAD_CHARACTER.search(stripped)
        if bad:
            raise UrlListError(
                source, number, f"control character U+{ord(bad.group()):04X} in line"
            )
        # Every ASCII separator but space and tab is a control character, rejected above.
        tokens = stripped.split() if stripped.isascii() else _TOKEN_SEPARATOR.split(stripped)
        path, entry = _parse_line(tokens, source, number)
        if entry.listing:
            _register_listing(path, number, files, directories, listings, source)
        else:
            _register(path, number, files, directories, source)
            _outside_listings(path, number, listings, source)
        entries.append(entry)
    root = listings.get(".")
    if root is not None and len(entries) > 1:
        raise UrlListError(source, root, "a listing at PATH '.' (the mount point) must be the "
                           "list's only entry")
    return entries


def _parse_line(tokens: list[str], source: str, number: int) -> tuple[str, Entry]:
    """The line's PATH (a clean relative path) and its entry."""
    url = tokens[0]
    url_path, problem = _url_path(url)
    if url_path is None:
        raise UrlListError(source, number, problem)
    options = tokens[1:]
    if url_path.endswith("/"):
        return _parse_listing(url, url_path, options, source, number)
    if options and not _is_option(options[0]):
        path = options.pop(0)
    else:
        default, problem = _default_path(url, url_path)
        if default is None:
            raise UrlListError(source, number, problem)
        path = default
    path_problem = _check_path(path)
    if path_problem:
        raise UrlListError(source, number, path_problem)

    digest: Digest | None = None
    size: int | None = None
    mirrors: list[str] = []
    command: str | None = None
    for token in options:
        if _DIGEST_OPTION.match(token):
            if digest is not None:
                raise UrlListError(
                    source, number, f"more than one digest ({digest.algorithm} already given)"
                )
            try:
                fast = _HEX_DIGEST.fullmatch(token)
                if fast and len(fast.group(2)) == 2 * DIGEST_SIZES[fast.group(1)]:
                    digest = Digest(fast.group(1), bytes.fromhex(fast.group(2)))
                else:
                    digest = parse_digest(token)
            except ValueError as exc:
                raise UrlListError(source, number, f"malformed digest: {exc}") from None
        elif _SIZE_OPTION.match(token):
            if size is not None:
                raise UrlListError(source, number, "size given twice")
            value = token[5:]
            if not _DECIMAL.fullmatch(value):
                raise UrlListError(
                    source, number, f"malformed size {token!r}: expected size=N, N in bytes"
                )
            size = int(value)
            if size > MAX_SIZE:
                raise UrlListError(source, number, f"size {value} is too large")
        elif _MIRROR_OPTION.match(token):
            mirror = token[7:]
            mirror_problem = url_problem(mirror)
            if mirror_problem is not None:
                raise UrlListError(source, number, f"mirror: {mirror_problem}")
            if mirror == url or mirror in mirrors:
                raise UrlListError(source, number, f"mirror {redact_url(mirror)} given twice")
            if len(mirrors) >= MAX_MIRRORS:
                raise UrlListError(source, number, f"more than {MAX_MIRRORS} mirrors")
            mirrors.append(mirror)
        elif _URL_COMMAND_OPTION.match(token):
            if command is not None:
                raise UrlListError(source, number, "url-command given twice")
            command = token[len("url-command="):]
            if not command.startswith("/"):
                raise UrlListError(
                    source, number,
                    f"url-command={command}: give the absolute path of a program",
                )
        else:
            shown = redact_url(token) if "://" in token else token
            raise UrlListError(
                source, number, f"unknown token {shown!r} (expected {_OPTIONS_HELP})"
            )
    return path, Entry(url=url, path=PurePosixPath(path), digest=digest, size=size,
                       line=number, mirrors=tuple(mirrors), url_command=command)


def _parse_listing(url: str, url_path: str, options: list[str], source: str,
                   number: int) -> tuple[str, Entry]:
    """A listing line: ``URL/ [PATH]``. Its PATH defaults to the last non-empty segment."""
    if options and not _is_option(options[0]):
        path = options.pop(0)
    else:
        default, problem = _default_path(url, url_path.rstrip("/"))
        if default is None:
            raise UrlListError(source, number, problem.replace(
                "has no file name at the end; give a PATH",
                "names a whole server: give a PATH ('.' for the mount point)"))
        path = default
    if options:
        raise UrlListError(source, number, "a listing (a URL ending with '/') takes no "
                           f"options: {options[0]!r}")
    if path != ".":
        path_problem = _check_path(path)
        if path_problem:
            raise UrlListError(source, number, path_problem)
    return path, Entry(url=url, path=PurePosixPath(path), digest=None, size=None,
                       line=number, listing=True)


def _register_listing(path: str, number: int, files: dict[str, int],
                      directories: dict[str, int], listings: dict[str, int],
                      source: str) -> None:
    """Record the listing at ``path``: a directory nothing else in the list may be in,
    nor be (a file, another listing, or the parent of an entry)."""
    if path in files:
        raise UrlListError(source, number, f"PATH {path!r} is a file on line {files[path]}")
    if path in directories:
        raise UrlListError(source, number, f"the listing's PATH {path!r} holds the entry of "
                           f"line {directories[path]}: a listed directory holds only what "
                           "the server lists")
    for other, line in listings.items():
        if other == "." or path == "." or path.startswith(other + "/") \
                or other.startswith(path + "/") or other == path:
            raise UrlListError(source, number, f"the listing at {path!r} overlaps the "
                               f"listing of line {line} at {other!r}")
    if path != ".":
        _register(path, number, files, directories, source)
        del files[path]  # a directory, not a file: keep its parents only
        directories[path] = number
    listings[path] = number


def _outside_listings(path: str, number: int, listings: dict[str, int], source: str) -> None:
    """UrlListError if the file ``path`` lies inside a listed directory."""
    for other, line in listings.items():
        if other == ".":
            raise UrlListError(source, line, "a listing at PATH '.' (the mount point) must "
                               "be the list's only entry")
        if path.startswith(other + "/"):
            raise UrlListError(source, number, f"PATH {path!r} is inside the listing of "
                               f"line {line}: a listed directory holds only what the "
                               "server lists")


def _register(
    path: str, number: int, files: dict[str, int], directories: dict[str, int], source: str
) -> None:
    """Record the ``path`` of line ``number`` and its implied directories; reject duplicates
    and file/directory clashes."""
    if path in files:
        raise UrlListError(source, number, f"duplicate PATH {path!r} (first on line {files[path]})")
    if path in directories:
        raise UrlListError(
            source,
            number,
            f"PATH {path!r} is a file here and a directory on line {directories[path]}",
        )
    # Walk the parents from the deepest; stop at the first one already known (its own
    # parents were checked when it was registered).
    parent = path.rpartition("/")[0]
    while parent and parent not in directories:
        if parent in files:
            raise UrlListError(
                source,
                number,
                f"{parent!r} is a directory here and a file on line {files[parent]}",
            )
        directories[parent] = number
        parent = parent.rpartition("/")[0]
    files[path] = number


def read_url_list(path: str) -> list[Entry]:
    """Read and parse the URL list at ``path`` (``-``: standard input, named ``<stdin>``).

    The bytes must be UTF-8 (BOM allowed). UsageError (one line) if the file cannot be read;
    UrlListError for anything wrong inside it, invalid UTF-8 included.
    """
    if path == "-":
        source = STDIN_SOURCE
        if sys.stdin is None:
            raise UsageError("cannot read the URL list from standard input: it is closed")
        try:
            data = sys.stdin.buffer.read()
        except OSError as exc:
            raise UsageError(
                f"cannot read the URL list from standard input: {exc.strerror or exc}"
            ) from exc
    else:
        source = path
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise UsageError(f"cannot read URL list {path}: {exc.strerror or exc}") from exc
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UrlListError(
            source, line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x})"
        ) from None
    return parse_url_list(text, source)

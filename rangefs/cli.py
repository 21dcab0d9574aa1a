"""The ``rangefs`` command line: argv/env -> config, logging set-up, exit codes.

Exit codes: 0 ok (also after SIGTERM/SIGHUP or an outside unmount), 1 runtime failure,
2 usage (bad option, bad URL list, bad mount point, unusable cache directory),
130 interrupted by SIGINT. Errors are one line on stderr, prefixed ``rangefs:``.
Header values (credentials) are never logged nor echoed in an error message; every log
line also goes through :class:`RedactingFormatter` (what libraries log at --debug). The
cache directory, and a download's partial directory, must be private (ours, writable by
no one else), else exit 2: nobody else may plant a symlink where rangefs writes.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import logging.handlers
import math
import os
import re
import ssl
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import trio

from . import mountopts, service
from .budget import DEFAULT_MIN_FREE, EXTENT_BYTES, MinFree
from .cache import remove_unused
from .clictl import evict_command, prefetch_command, refresh_command, status_command
from .digests import parse_digest
from .download import DownloadOptions, DownloadStats, cat_url, download_file, partial_dir
from .errors import CacheLocked, RangefsError, UsageError
from .proxies import ProxyConfig
from .ratecontrol import BackoffPolicy
from .redact import redact_text, redact_url
from .settings import LISTING_TTL, URL_COMMAND_TIMEOUT, Prefetch
from .source import HttpOptions, tls_context
from .urlcommand import UrlCommand, program_problem
from .urllist import default_name, read_url_list, url_problem

log = logging.getLogger("rangefs.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130

MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 64 << 20
# A mount's blocks are small so that a random reader fetches little more than it reads
# (a 4 KiB pread brings one 64 KiB block: 16 x, about 4 ms at 16 MiB/s); sequential
# readers still get large requests (adjacent blocks are coalesced).
DEFAULT_MOUNT_BLOCK_SIZE = "64K"
DEFAULT_MOUNT_CONCURRENCY = 32
PROBES_PER_SLOT = 4  # a mount probes sizes with 4 x --concurrency requests in flight
DEFAULT_READ_TIMEOUT = 60.0

MAX_SIZE = (1 << 63) - 1  # the largest size option (the largest off_t)

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# A header value: visible ASCII, spaces and tabs (httpx sends ASCII only).
_HEADER_VALUE_RE = re.compile(r"^[\t\x20-\x7e]*$")
# Headers rangefs sets itself, hop-by-hop headers, and conditions that would change what a
# range request means (rangefs sends If-Range itself).
_FORBIDDEN_HEADERS = frozenset({
    "range", "if-range", "accept-encoding", "host", "content-length", "transfer-encoding",
    "connection", "keep-alive", "te", "trailer", "upgrade", "expect", "if-match",
    "if-none-match", "if-modified-since", "if-unmodified-since",
})

_URL_COMMAND_HELP = (
    "Shell command that prints a fresh URL when one expires (its X-Amz-Expires, Expires= "
    "or se= time is near) or is refused (401, 403): run by /bin/sh -c with RANGEFS_PATH, "
    "RANGEFS_URL and RANGEFS_REASON set; it must print one http(s) URL line and exit 0."
)


# -- values ------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes from '20G', '1M', '256K', '1.5GiB', '4096' (binary units). ValueError."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 256K, 1M, 20G)")
    number, unit = match.groups()
    value = Fraction(number) * _UNITS[unit.lower()]  # exact, whatever the size
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    if value > MAX_SIZE:
        raise ValueError(f"{text!r} is too large")
    return int(value)


if TYPE_CHECKING:  # click >= 8.2 types ParamType as a generic; older click is not subscriptable
    _IntParamType = click.ParamType[int]
else:
    _IntParamType = click.ParamType


class SizeType(_IntParamType):
    """A byte count with an optional binary unit suffix (K, M, G, T; KiB/KB also taken)."""

    name = "SIZE"

    def __init__(self, *, minimum: int = 0, power_of_two: bool = False,
                 maximum: int | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.power_of_two = power_of_two

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            size = value
        else:
            try:
                size = parse_size(str(value))
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
        if size < self.minimum:
            self.fail(f"{value} is below the minimum of {_human(self.minimum)}", param, ctx)
        if self.maximum is not None and size > self.maximum:
            self.fail(f"{value} is above the maximum of {_human(self.maximum)}", param, ctx)
        if self.power_of_two and size & (size - 1):
            self.fail(f"{value} is not a power of two (e.g. 64K, 1M, 4M)", param, ctx)
        return size


class MinFreeType(click.ParamType):  # type: ignore[type-arg]
    """``--cache-min-free``: a percentage of the file system (``5%``) or a size."""

    name = "SIZE|N%"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> MinFree:
        if isinstance(value, MinFree):
            return value
        text = str(value)
        try:
            percent = MinFree.parse(text)
            if percent is not None:
                return percent
            return MinFree(nbytes=parse_size(text))
        except ValueError as exc:
            self.fail(f"{text!r}: {exc} (give a size such as 2G or a percentage such as 5%)",
                      param, ctx)


class SecondsType(click.FloatRange):
    """A positive number of seconds (``inf``: no limit); NaN is refused."""

    name = "SECONDS"

    def __init__(self) -> None:
        super().__init__(min=0, min_open=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


def _human(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit.lower()] and size % _UNITS[unit.lower()] == 0:
            return f"{size // _UNITS[unit.lower()]}{unit}"
    return str(size)


def parse_header(text: str) -> tuple[str, str]:
    """('Name', 'value') from 'Name: value'. ValueError whose message never has the value."""
    name, sep, value = text.partition(":")
    name = name.strip()
    if not sep or not _TOKEN_RE.match(name):
        raise ValueError("a header must look like 'Name: value'")
    if name.lower() in _FORBIDDEN_HEADERS:
        raise ValueError(f"header {name} is set by rangefs itself and cannot be given")
    value = value.strip()
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"header {name} has a line break or NUL in its value")
    if not _HEADER_VALUE_RE.match(value):
        raise ValueError(
            f"header {name} has a control or non-ASCII character in its value "
            "(only printable ASCII can be sent)"
        )
    return name, value


def read_header_file(path: str) -> list[tuple[str, str]]:
    """Headers from a file: 'Name: value' a line, blank lines and '#' comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read header file {path}: {exc}") from None
    headers = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            headers.append(parse_header(line))
        except ValueError as exc:
            raise UsageError(f"{path}:{number}: {exc}") from None
    return headers


def default_cache_dir(environ: dict[str, str] | os._Environ[str] | None = None) -> Path:
    """$XDG_CACHE_HOME/rangefs, else ~/.cache/rangefs."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rangefs"


def prepare_cache_dir(path: Path) -> Path:
    """Create the cache directory (0700, and any missing parent 0700 too) if needed;
    UsageError if it cannot be used or is not private (see :func:`check_private_dir`)."""
    path = path.absolute()
    try:
        make_private_dirs(path)
    except OSError as exc:
        raise UsageError(
            f"cache directory {path} cannot be created ({exc.strerror}): "
            "choose another with --cache-dir"
        ) from None
    if not path.is_dir():
        raise UsageError(
            f"cache directory {path} is not a directory: choose another with --cache-dir"
        )
    check_private_dir(path, "cache directory", "choose another with --cache-dir")
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise UsageError(
            f"cache directory {path} is not writable: choose another with --cache-dir"
        )
    return path


def make_private_dirs(path: Path) -> None:
    """``mkdir -p`` with mode 0700 for every directory it creates (``os.makedirs`` gives
    the parents 0777 - umask, which umask 000 leaves open to everyone). OSError."""
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)


def check_private_dir(path: Path, what: str, advice: str) -> None:
    """UsageError unless the directory ``path`` belongs to us (or root) and no one else may
    write to it: another user could plant a symlink there and have rangefs overwrite any
    file it can write through it."""
    st = os.stat(path)
    if st.st_uid not in (os.geteuid(), 0):
        raise UsageError(f"{what} {path} belongs to another user (uid {st.st_uid}): {advice}")
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_ISVTX or st.st_uid != os.geteuid():
            # a shared directory such as /tmp: never advise making it private
            raise UsageError(
                f"{what} {path} is shared with other users (mode {mode:o}): {advice} "
                f"(e.g. a new directory inside it: it is created private)"
            )
        raise UsageError(
            f"{what} {path} can be written by other users (mode {mode:o}): "
            f"make it private (chmod 700 {path}) or {advice}"
        )


# -- logging -----------------------------------------------------------------------------

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_QUIET_LIBRARIES = ("httpx", "httpcore", "pyfuse3", "hpack")
_MIN_SECRET = 4  # shorter header values are not searched for in log lines


class RedactingFormatter(logging.Formatter):
    """A formatter whose every line (traceback included) goes through :func:`redact_text`:
    no URL userinfo, no query value, and no header value given to rangefs (see
    :func:`hide_in_logs`). rangefs' own messages are redacted already; this catches what
    libraries log at --debug (httpx logs every URL with its signed query, httpcore the
    response headers, a redirect's Location included)."""

    secrets: frozenset[str] = frozenset()

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record), self.secrets)


def hide_in_logs(values: Iterable[str]) -> None:
    """Never let any of ``values`` (header values: credentials) appear in a log line."""
    RedactingFormatter.secrets = RedactingFormatter.secrets | {
        v for v in values if len(v) >= _MIN_SECRET
    }


def setup_logging(*, verbose: int, debug: bool, log_file: str | None) -> None:
    """Root logging: WARNING, -v INFO, -vv or --debug DEBUG. httpx & co. stay at WARNING
    unless --debug. Handlers: stderr, plus ``log_file`` if given."""
    level = logging.DEBUG if debug or verbose >= 2 else logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    formatter = RedactingFormatter(_FORMAT)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    root.addHandler(stderr)
    if log_file is not None:
        try:
            file_handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot open log file {log_file}: {exc.strerror}") from None
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    root.setLevel(level)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)


DETACHED_LOG_NAME = "rangefs.log"  # in the cache directory, when there is no syslog


def _log_when_detached(cache: Path) -> None:
    """A daemon without --log-file (stderr goes to /dev/null) logs to syslog (the journal
    on systemd hosts) when /dev/log exists, else to CACHE/rangefs.log (0600, rotated at
    10 MiB, 2 old files kept): a user always finds the reason for an EIO somewhere."""
    handler: logging.Handler | None = None
    if os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler(address="/dev/log")
            handler.setFormatter(
                RedactingFormatter("rangefs[%(process)d]: %(levelname)s %(name)s: %(message)s")
            )
        except OSError:
            handler = None
    if handler is None:
        path = cache / DETACHED_LOG_NAME
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
            handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=10 << 20, backupCount=2, encoding="utf-8"
            )
        except OSError as exc:
            log.warning("no syslog and cannot write %s: the log is lost (%s)", path, exc)
            return
        handler.setFormatter(RedactingFormatter(_FORMAT))
    logging.getLogger().addHandler(handler)


# -- commands ----------------------------------------------------------------------------


def _fail(message: str, code: int, daemon: service.Daemon | None = None) -> NoReturn:
    """One line on stderr (or, in a daemon child not yet ready, to the waiting parent)."""
    line = f"rangefs: {message}"
    if daemon is None or not daemon.fail(line):
        click.echo(line, err=True)
        if daemon is not None:  # detached: stderr is /dev/null
            log.error("%s", message)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="rangefs", prog_name="rangefs")
def rangefs() -> None:
    """Read-only FUSE file system and downloader for large objects behind HTTP URLs,
    served from a resumable local block cache filled with HTTP range requests."""


@rangefs.command("mount")
@click.argument("urllist", metavar="URLLIST")
@click.argument("mountpoint", metavar="MOUNTPOINT")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="RANGEFS_CACHE_DIR", show_envvar=True,
              help="Directory of the block cache (kept across mounts).  "
                   "[default: $XDG_CACHE_HOME/rangefs, else ~/.cache/rangefs]")
@click.option("--cache-size", type=SizeType(minimum=1), default=None, metavar="SIZE",
              help="Most bytes the cache directory may hold (suffixes K, M, G, T = powers "
                   "of 1024, e.g. 20G). Objects larger than it (or than the disk) are still "
                   "read everywhere: beyond the budget the least recently used runs of "
                   f"blocks ({EXTENT_BYTES >> 20} MiB) of any file, open or not, are "
                   "evicted, never one a read is waiting for; a file is filled whole only "
                   "when it fits.  [default: no fixed size; --cache-min-free applies]")
@click.option("--cache-min-free", type=MinFreeType(), default=DEFAULT_MIN_FREE,
              show_default=True, metavar="SIZE|N%",
              help="Free space the cache leaves on its file system (a size, or a percentage "
                   "of the file system): the cache evicts blocks instead of filling the "
                   "disk; with --cache-size the smaller budget applies. 0 turns it off.")
@click.option("--block-size", type=SizeType(minimum=MIN_BLOCK_SIZE, maximum=MAX_BLOCK_SIZE,
                                            power_of_two=True),
              default=DEFAULT_MOUNT_BLOCK_SIZE, show_default=True, metavar="SIZE",
              help="Cache block size in bytes: a power of two from 4K to 64M (e.g. 64K, 1M). "
                   "The smallest unit fetched and the unit of the cache index; adjacent "
                   "missing blocks are fetched by one request.")
@click.option("--concurrency", type=click.IntRange(1, 1024), default=DEFAULT_MOUNT_CONCURRENCY,
              show_default=True, metavar="N",
              help="Concurrent HTTP range requests for background fill and read-ahead, over "
                   "all objects (readers' own requests have 2 x N slots; probes of the "
                   "list's sizes 4 x N).")
@click.option("--max-rate", type=SizeType(minimum=1), default=None, metavar="SIZE",
              help="Download rate limit over all objects, in bytes per second (e.g. 50M = "
                   "50 MiB/s).  [default: unlimited]")
@click.option("--prefetch", type=click.Choice([p.value for p in Prefetch]), default="open",
              show_default=True,
              help="Background fill: 'open' fills an opened file completely once it is read "
                   "sequentially, or all over in no order (reads that fetched 1/64 of it, "
                   "spread over it: a program touching all of a mapped file), one file at a "
                   "time (other random readers fetch only what they read; a file waiting "
                   "for its turn gets read-ahead), 'none' only fetches what readers ask for "
                   "(plus read-ahead), 'all' fills every file of the list from mount time "
                   "(not those of listed directories).")
@click.option("--read-timeout", type=SecondsType(),
              default=DEFAULT_READ_TIMEOUT, show_default=True, metavar="SECONDS",
              help="How long a read() waits for its blocks before failing with EIO (the mount "
                   "stays up and the fetch may go on).")
@click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'",
              help="HTTP header sent with every request (repeatable), e.g. "
                   "'Authorization: Bearer ...'. Never logged; visible in ps: prefer "
                   "--header-file for secrets. Dropped on redirects to another origin.")
@click.option("--proxy", default=None, metavar="URL",
              help="http:// forward proxy for every request (https through CONNECT; "
                   "user:password@ for proxy authentication).  [default: HTTP_PROXY, "
                   "HTTPS_PROXY, ALL_PROXY and NO_PROXY from the environment]")
@click.option("--no-proxy", is_flag=True,
              help="Ignore the proxy variables of the environment.")
@click.option("--cacert", type=click.Path(dir_okay=False), envvar="RANGEFS_CACERT",
              show_envvar=True, default=None, metavar="FILE",
              help="PEM file of CA certificates to trust beside the system's trust store "
                   "(which honours SSL_CERT_FILE and SSL_CERT_DIR), e.g. a company CA.")
@click.option("--header-file", type=click.Path(dir_okay=False), envvar="RANGEFS_HEADER_FILE",
              show_envvar=True, default=None,
              help="File of HTTP headers, one 'Name: value' a line ('#' comments allowed), "
                   "added to those of --header.")
@click.option("--url-command", default=None, metavar="CMD",
              help=_URL_COMMAND_HELP + " An entry's url-command=PROGRAM overrides it.")
@click.option("--url-command-timeout", type=SecondsType(), default=URL_COMMAND_TIMEOUT,
              show_default=True, metavar="SECONDS",
              help="How long --url-command (or url-command=) may run before it is killed.")
@click.option("--record", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE", help="Append to FILE the ranges that reads touch first, in "
                                   "that order (JSON lines), for --prefetch-list.")
@click.option("--prefetch-list", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="At mount, fetch the ranges recorded in FILE (by --record) in their "
                   "order, a few at a time, before the reads that will want them.")
@click.option("--listing-ttl", type=SecondsType(), default=LISTING_TTL, show_default=True,
              metavar="SECONDS",
              help="How long the listing of a listed directory (a list entry whose URL ends "
                   "with '/') is used, in this mount and remembered for the next ones, "
                   "before the directory is listed again when next looked into. "
                   "'rangefs refresh DIR' lists one again at once.")
@click.option("--metrics", default=None, metavar="ADDRESS",
              help="Serve Prometheus metrics at http://ADDRESS/metrics (PORT or HOST:PORT; "
                   "the host defaults to 127.0.0.1).  [default: off]")
@click.option("--allow-other", is_flag=True,
              help="Let other users access the mount (needs user_allow_other in "
                   "/etc/fuse.conf when not root).  [default: only the mounting user]")
@click.option("-f", "--foreground", is_flag=True,
              help="Stay in the foreground until unmounted (for systemd Type=notify and "
                   "debugging).  [default: return once the mount is ready and keep serving it "
                   "in the background]")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None,
              help="Append the log to this file.  [default: stderr in the foreground; in "
                   "the background syslog (the journal) when /dev/log exists, else "
                   "CACHE_DIR/rangefs.log]")
@click.option("-v", "--verbose", count=True,
              help="More log output: -v info, -vv debug.  [default: warnings and errors only]")
@click.option("--debug", is_flag=True,
              help="Debug everything, including HTTP client and libfuse request traces.")
def mount_command(
    urllist: str,
    mountpoint: str,
    cache_dir: Path | None,
    cache_size: int | None,
    cache_min_free: MinFree,
    block_size: int,
    concurrency: int,
    max_rate: int | None,
    prefetch: str,
    read_timeout: float,
    headers: Sequence[str],
    proxy: str | None,
    no_proxy: bool,
    cacert: str | None,
    header_file: str | None,
    url_command: str | None,
    url_command_timeout: float,
    record: Path | None,
    prefetch_list: Path | None,
    listing_ttl: float,
    metrics: str | None,
    allow_other: bool,
    foreground: bool,
    log_file: str | None,
    verbose: int,
    debug: bool,
) -> None:
    """Mount every URL of URLLIST as a read-only file under MOUNTPOINT.

    URLLIST has one 'URL [PATH] [sha256:HEX | size=N | mirror=URL | url-command=PROGRAM]'
    entry a line ('#' comments); '-' reads it from standard input. A URL ending with '/'
    is a directory listed from the server (an HTML index or an S3 bucket), 'URL/ .' at the
    mount point. MOUNTPOINT must be an empty directory. Unmount with 'fusermount3 -u MOUNTPOINT' (or
    SIGTERM to the rangefs process).

    Options also go the mount(8) way, '-o name[=value],...' with _ for - (-o
    cache_size=50G,allow_other), and 'rangefs URLLIST MOUNTPOINT -o ...' is this command:
    'mount -t fuse.rangefs' and /etc/fstab use that (see the README).
    """
    # the mount stack is imported here, not at the top: download, cat and the control
    # commands do not need it (settings.py)
    from .metrics import parse_address
    from .mount import MountConfig, check_mountpoint, run_mount
    from .objects import StoreConfig

    daemon: service.Daemon | None = None
    try:
        setup_logging(verbose=verbose, debug=debug, log_file=log_file)
        http_headers = _http_headers(headers, header_file)
        trusted = _cacert(cacert)
        _check_proxy(proxy, no_proxy)
        if metrics is not None:
            parse_address(metrics)
        entries = read_url_list(urllist)
        command = _url_command(url_command, url_command_timeout)
        for program in {e.url_command for e in entries if e.url_command is not None}:
            problem = program_problem(program)
            if problem is not None:
                raise UsageError(f"{urllist}: {problem}")
        target = Path(mountpoint).absolute()
        service.clear_stale_mount(target)  # only a rangefs mount whose process is gone
        check_mountpoint(target)
        cache = prepare_cache_dir(cache_dir if cache_dir is not None else default_cache_dir())
        config = MountConfig(
            urllist=urllist,
            mountpoint=target,
            store=StoreConfig(
                cache_dir=cache,
                block_size=block_size,
                concurrency=concurrency,
                max_rate=float(max_rate) if max_rate is not None else None,
                prefetch=Prefetch(prefetch),
                read_timeout=read_timeout,
                # a stalled body is dropped and retried well within a reader's deadline
                http=HttpOptions(headers=http_headers, cacert=trusted, proxy=proxy,
                                 trust_env=not no_proxy,
                                 read_timeout=min(30.0, max(1.0, read_timeout / 2)),
                                 # demand (2 x N) + fill slots, and the probes'
                                 max_connections=(3 + PROBES_PER_SLOT) * concurrency),
                cache_size=cache_size,
                cache_min_free=cache_min_free,
                probe_concurrency=PROBES_PER_SLOT * concurrency,
                url_command=command,
            ),
            allow_other=allow_other,
            debug_fuse=debug,
            foreground=foreground,
            metrics=metrics,
            record=record.absolute() if record is not None else None,
            prefetch_list=prefetch_list.absolute() if prefetch_list is not None else None,
            listing_ttl=listing_ttl,
        )
        if not foreground:
            daemon = service.Daemon()
            daemon.fork()  # the parent exits inside, with the child's outcome
            if log_file is None:
                _log_when_detached(cache)
        on_ready = _ready_callback(daemon)
        trio.run(functools.partial(run_mount, config, entries, on_ready=on_ready))
    except (UsageError, CacheLocked) as exc:  # UrlListError too; CacheLocked: another cache
        _fail(str(exc), EXIT_USAGE, daemon)
    except RangefsError as exc:
        _fail(str(exc), EXIT_FAILURE, daemon)
    except KeyboardInterrupt:
        sys.exit(EXIT_SIGINT)
    sys.exit(EXIT_OK)


def _ready_callback(daemon: service.Daemon | None) -> Callable[[], None]:
    def on_ready() -> None:
        if daemon is not None:
            daemon.ready()
        else:
            service.notify("READY=1\nSTATUS=mounted")

    return on_ready


def _url_command(text: str | None, timeout: float) -> UrlCommand | None:
    """--url-command: None if not given; UsageError if blank."""
    if text is None:
        return None
    if not text.strip():
        raise UsageError("--url-command: give a command (it prints a fresh URL)")
    return UrlCommand(text, timeout=timeout)


def _check_proxy(proxy: str | None, no_proxy: bool) -> str | None:
    """--proxy / the environment's proxy variables: UsageError when unusable."""
    ProxyConfig.resolve(proxy, trust_env=not no_proxy)
    return proxy


def _cacert(path: str | None) -> str | None:
    """--cacert: the path, once it loads as PEM CA certificates; UsageError otherwise."""
    if path is None:
        return None
    try:
        tls_context(path)
    except FileNotFoundError:
        raise UsageError(f"--cacert {path}: no such file") from None
    except ssl.SSLError as exc:  # (an OSError too)
        raise UsageError(
            f"--cacert {path}: not a PEM file of CA certificates ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise UsageError(f"--cacert {path}: {exc.strerror or exc}") from None
    return os.path.abspath(path)


def _http_headers(headers: Sequence[str], header_file: str | None) -> tuple[tuple[str, str], ...]:
    """--header values and --header-file lines; click.BadParameter / UsageError on bad ones."""
    header_list: list[tuple[str, str]] = []
    for text in headers:
        try:
            header_list.append(parse_header(text))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--header'") from None
    if header_file is not None:
        header_list.extend(read_header_file(header_file))
    hide_in_logs(value for _, value in header_list)
    return tuple(header_list)


def _transfer_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options that download and cat share."""
    options = [
        click.option("--block-size", type=SizeType(minimum=MIN_BLOCK_SIZE, maximum=MAX_BLOCK_SIZE,
                                                   power_of_two=True),
                     default="1M", show_default=True, metavar="SIZE",
                     help="Bytes per block (a power of two, 4K..64M): the unit of requests, "
                          "retries and resumption."),
        click.option("--concurrency", type=click.IntRange(1, 256), default=None,
                     metavar="N",
                     help="download: the most concurrent range requests; below it the "
                          "download measures and runs as many as make it faster (more "
                          "while the rate grows, fewer on errors).  cat: concurrent range "
                          "requests.  [default: download 64, cat 16]"),
        click.option("--max-rate", type=SizeType(minimum=1), default=None, metavar="SIZE",
                     help="Rate limit in bytes per second (e.g. 50M).  [default: unlimited]"),
        click.option("--sha256", "sha256", default=None, metavar="HEX",
                     help="Expected SHA-256 of the object (64 hex digits); checked at the end. "
                          "[default: the server's Repr-Digest/Digest when it sends one]"),
        click.option("--retries", type=click.IntRange(0, 100), default=8, show_default=True,
                     help="Retries of a failing request (backoff with jitter, Retry-After "
                          "honoured) before it counts as failed."),
        click.option("--read-timeout", type=SecondsType(),
                     default=30.0, show_default=True, metavar="SECONDS",
                     help="A request whose body stalls this long is retried."),
        click.option("--header", "headers", multiple=True, metavar="'NAME: VALUE'",
                     help="HTTP header for every request (repeatable; never logged; dropped "
                          "on a redirect to another origin)."),
        click.option("--header-file", type=click.Path(dir_okay=False),
                     envvar="RANGEFS_HEADER_FILE", show_envvar=True, default=None,
                     help="File of HTTP headers, one 'Name: value' a line."),
        click.option("--cacert", type=click.Path(dir_okay=False), envvar="RANGEFS_CACERT",
                     show_envvar=True, default=None, metavar="FILE",
                     help="PEM file of CA certificates to trust beside the system's trust "
                          "store (which honours SSL_CERT_FILE and SSL_CERT_DIR)."),
        click.option("--proxy", default=None, metavar="URL",
                     help="http:// forward proxy for every request.  [default: HTTP_PROXY, "
                          "HTTPS_PROXY, ALL_PROXY, NO_PROXY]"),
        click.option("--no-proxy", is_flag=True,
                     help="Ignore the proxy variables of the environment."),
        click.option("--url-command", default=None, metavar="CMD", help=_URL_COMMAND_HELP),
        click.option("--url-command-timeout", type=SecondsType(), default=URL_COMMAND_TIMEOUT,
                     show_default=True, metavar="SECONDS",
                     help="How long --url-command may run before it is killed."),
        click.option("-v", "--verbose", count=True, help="More log output: -v info, -vv debug."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _download_options(
    *, block_size: int, concurrency: int | None, max_rate: int | None, sha256: str | None,
    retries: int, read_timeout: float, headers: Sequence[str], header_file: str | None,
    cacert: str | None = None, proxy: str | None = None, no_proxy: bool = False,
    force: bool = False, from_mounts: bool = True, url_command: str | None = None,
    url_command_timeout: float = URL_COMMAND_TIMEOUT,
) -> DownloadOptions:
    digest = None
    if sha256 is not None:
        try:
            digest = parse_digest(f"sha256:{sha256.strip()}")
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--sha256'") from None
    return DownloadOptions(
        block_size=block_size,
        concurrency=concurrency,
        max_rate=float(max_rate) if max_rate is not None else None,
        http=HttpOptions(headers=_http_headers(headers, header_file), read_timeout=read_timeout,
                         cacert=_cacert(cacert), proxy=_check_proxy(proxy, no_proxy),
                         trust_env=not no_proxy,
                         # every request of the job, the probe and a spare at once
                         max_connections=max(HttpOptions.max_connections,
                                             (concurrency or 0) + 2)),
        backoff=BackoffPolicy(steps=retries),
        digest=digest,
        force=force,
        from_mounts=from_mounts,
        url_command=_url_command(url_command, url_command_timeout),
    )


def _job_options(url: str, **kw: Any) -> DownloadOptions:
    """The options of a download or cat of ``url``: exit 2 (one line) for a URL that is
    not http(s) or an unusable header file."""
    problem = url_problem(url)
    if problem is not None:
        _fail(problem, EXIT_USAGE)
    try:
        return _download_options(**kw)
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)


def _run_job(job: Callable[[], Any]) -> Any:
    """trio.run a job; one-line errors and exit codes as for mount.

    The garbage collector is told to leave alone what exists before the job (the imported
    modules) and, after it, everything: the process ends then, and the interpreter's
    final full collection over every object the job made took ~30 ms of a 0.65 s
    download of 256 MiB (measured), for memory that the exit frees anyway.
    """
    try:
        gc.freeze()
        result = trio.run(job)
        gc.freeze()
        return result
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    except RangefsError as exc:
        _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        sys.exit(EXIT_SIGINT)
    except BaseExceptionGroup as group:
        # Ctrl-C while requests run: trio raises the KeyboardInterrupt in every task it
        # reached, and the nurseries gather them in a group
        _, other = group.split(KeyboardInterrupt)
        if other is None:
            sys.exit(EXIT_SIGINT)
        raise


class _ProgressLine:
    """'12.3 MiB / 256 MiB (4.8 %) 35.1 MiB/s' rewritten in place on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.shown = False

    def __call__(self, stats: DownloadStats) -> None:
        if not self.enabled:
            return
        mib = 1 << 20
        done = stats.cached_bytes
        total = max(stats.download_size, 1)
        rate = (done - stats.found_cached_bytes) / mib / max(stats.duration, 1e-3)
        click.echo(
            f"\r{done / mib:10.1f} MiB / {stats.download_size / mib:.1f} MiB "
            f"({100 * done / total:5.1f} %) {rate:7.1f} MiB/s",
            nl=False, err=True,
        )
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            click.echo("", err=True)


def _private_part_dir(dest: Path) -> bool:
    """Make ``DEST.rangefs-part/`` ours before the download writes into it: created here
    (0700), or, left by an earlier run, a real directory of ours that no one else may
    write to (else exit 2: a planted symlink in it would make rangefs overwrite another
    file). True if created here."""
    part = partial_dir(dest)
    if not dest.parent.is_dir():
        return False  # download_file says so
    try:
        os.mkdir(part, 0o700)
        return True
    except FileExistsError:
        pass
    except OSError as exc:
        _fail(f"cannot create {part}: {exc.strerror}", EXIT_USAGE)
    if not stat.S_ISDIR(os.lstat(part).st_mode):
        _fail(f"{part} is not a directory (a symlink?): remove it", EXIT_USAGE)
    try:
        check_private_dir(part, "partial download", f"remove it (rm -r {part})")
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    return False


@rangefs.command("download")
@click.argument("url")
@click.argument("dest", required=False, type=click.Path(dir_okay=True, path_type=Path))
@_transfer_options
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress line.  [default: when stderr is a terminal]")
@click.option("--from-mounts/--no-from-mounts", default=True, show_default=True,
              help="First copy what the rangefs mounts of this user have cached of URL "
                   "(the same version only), then fetch the rest.")
@click.option("--helper/--no-helper", default=True, show_default=True,
              help="On a machine with two CPUs or more, fetch half of what is missing (at "
                   "least 64 MiB) in a second rangefs process: the other CPU receives and "
                   "writes it. Each process runs half of the requests.")
def download_command(url: str, dest: Path | None, force: bool, progress: bool | None,
                     from_mounts: bool, helper: bool, verbose: int, **kw: Any) -> None:
    """Download URL to DEST (default: the URL's last path segment, in the current directory).

    Parallel range requests; resumable: blocks are kept in DEST.rangefs-part/ and a rerun
    of the same command after a failure, Ctrl-C or a kill goes on from there. DEST appears
    only when complete and, when a digest is known, verified. Exit 0 only then.
    """
    setup_logging(verbose=verbose, debug=False, log_file=None)
    options = _job_options(url, force=force, from_mounts=from_mounts, **kw)
    if dest is None or dest.is_dir():
        name, _ = default_name(url)
        if name is None:
            _fail(f"cannot name the file after {redact_url(url)}: give DEST", EXIT_USAGE)
        dest = Path(name) if dest is None else dest / name
    created = _private_part_dir(dest)
    line = _ProgressLine(sys.stderr.isatty() if progress is None else progress)
    from .helper import Helper  # (forked here: before trio.run, with everything imported)

    gc.freeze()  # the helper shares the imported modules' pages, copy-on-write
    second = Helper.fork(options) if helper else None
    try:
        result = _run_job(functools.partial(download_file, url, dest, options, progress=line,
                                            helper=second))
    except SystemExit:
        if created:  # refused before its first write: leave nothing behind
            remove_unused(partial_dir(dest))
        raise
    finally:
        if second is not None:
            second.close()
        line.finish()
    verified = f", {result.verified.algorithm} verified" if result.verified else ""
    click.echo(
        f"{result.dest}: {result.size} bytes ({result.downloaded_bytes} downloaded, "
        f"{result.found_cached_bytes} resumed, {result.copied_bytes} copied from mounts)"
        f"{verified}",
        err=True,
    )


@rangefs.command("cat")
@click.argument("url")
@_transfer_options
@click.option("--from-mounts/--no-from-mounts", default=True, show_default=True,
              help="Read what the rangefs mounts of this user have cached of URL (the same "
                   "version only) from their cache instead of the network.")
def cat_command(url: str, from_mounts: bool, verbose: int, **kw: Any) -> None:
    """Write the object at URL to standard output, in order.

    Concurrent range requests with a bounded reorder window (memory: about 2 x concurrency
    x block size). A known digest (--sha256 or the server's) is checked at the end: on a
    mismatch the bytes were already written, and the exit code is 1.
    """
    setup_logging(verbose=verbose, debug=False, log_file=None)
    options = _job_options(url, from_mounts=from_mounts, **kw)
    _run_job(functools.partial(cat_url, url, sys.stdout.fileno(), options))


rangefs.add_command(status_command)
rangefs.add_command(prefetch_command)
rangefs.add_command(evict_command)
rangefs.add_command(refresh_command)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point. ``rangefs LIST MOUNTPOINT -o OPTS`` (how mount.fuse3
    runs it) means ``rangefs mount``; ``-o`` lists become options (see mountopts.py)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        args = mountopts.rewrite_argv(args, rangefs)
    except UsageError as exc:
        _fail(str(exc), EXIT_USAGE)
    rangefs.main(args=args, prog_name="rangefs")


if __name__ == "__main__":
    main()

"""Expiring URLs: when a signed URL stops working, and fresh ones from the user's command.

Expiry (pure, no I/O): :func:`expiry` reads it from the URL's query, parameter names
compared case-insensitively:

- AWS SigV4: ``X-Amz-Date`` (``YYYYMMDDTHHMMSSZ``) + ``X-Amz-Expires`` (seconds);
- GCS v4: ``X-Goog-Date`` + ``X-Goog-Expires``, the same way;
- ``Expires`` (seconds since the epoch): S3 SigV2, GCS v2, CloudFront;
- Azure SAS: ``se`` (ISO 8601, UTC; ``st`` is when it started, if given).

:func:`refresh_time` is when a URL should be replaced: ``min(60 s, 10 % of its lifetime)``
before it expires (its lifetime starts at its signing date, else when rangefs got it).

The command (``--url-command CMD``, or ``url-command=PROGRAM`` on a line of the URL list):
``CMD`` runs through ``/bin/sh -c``, ``PROGRAM`` (an absolute path) is executed directly
with no argument; both get rangefs' environment plus ``RANGEFS_PATH`` (the file's path in
the mount; download: DEST; cat: the URL's file name), ``RANGEFS_URL`` (the URL being
replaced, signature and all) and ``RANGEFS_REASON`` (``expiring`` or ``refused``). It has
:data:`DEFAULT_TIMEOUT` seconds (``--url-command-timeout``) to exit 0 after printing exactly
one non-blank line on stdout: an http(s) URL, which then replaces the object's URL for
every later request (probes, ranged GETs, background fill). stdin is /dev/null; stdout is
read up to :data:`MAX_OUTPUT` bytes; its own session is SIGKILLed at the timeout (and
whatever it left running, when it exits). Anything else (exit status, signal, timeout,
not exactly one http(s) URL, the same URL again) is one warning line without secrets,
and the request that needed a fresh URL fails as it would have without one.

:class:`FreshUrl` is one object's current URL: :meth:`FreshUrl.current` (before each
request: replaces a URL past its refresh time) and :meth:`FreshUrl.after_refusal` (after a
401/403, or a 400/404/410 of a URL that carries an expiry: :func:`is_refusal`). Runs are
single flight (one at a time per object; those who waited take its URL) and rate
limited: at least :data:`MIN_INTERVAL` seconds apart, doubling (up to :data:`MAX_INTERVAL`)
after each run that gave no URL that worked, back to :data:`MIN_INTERVAL` once a request
with a command's URL succeeded (:meth:`FreshUrl.worked`). A refusal waits for the next
allowed run if it comes within :data:`WAIT_LIMIT` seconds, else fails at once.

The cache key of an object does not change (``cachedir.cache_key`` ignores signing
parameters): its identity is its validator, checked by every ranged GET, so a fresh URL of
another version is a changed remote, handled as such. Trio thread only; a cancelled run
kills its process group before the cancellation goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final
from urllib.parse import parse_qsl, urlsplit

import trio
import trio.lowlevel

from .redact import redact_text, redact_url
from .settings import URL_COMMAND_TIMEOUT
from .urllist import url_problem

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT: Final = URL_COMMAND_TIMEOUT
"""Seconds a command may run before it is killed (and counts as failed)."""
MAX_OUTPUT: Final = 64 * 1024
"""Bytes of stdout (and of stderr) read from a command; more is a failure."""
MIN_INTERVAL: Final = 1.0
"""Seconds between two runs for one object, at least."""
MAX_INTERVAL: Final = 300.0
"""The longest wait between runs for one object that keeps giving dead URLs."""
WAIT_LIMIT: Final = 5.0
"""A refused request waits for the next allowed run at most this long, else fails."""
MARGIN: Final = 60.0
"""A URL is replaced this many seconds before it expires (or 10 % of its lifetime)."""

_REFUSED: Final = frozenset({401, 403})
_REFUSED_IF_EXPIRING: Final = frozenset({400, 404, 410})
_SHELL: Final = "/bin/sh"


@dataclass(frozen=True)
class Expiry:
    """When a URL stops working: ``at`` (seconds since the epoch), ``start`` (when it was
    signed, if the URL says), ``how`` (the parameters it was read from)."""

    at: float
    start: float | None
    how: str


def _params(url: str) -> dict[str, str]:
    try:
        query = urlsplit(url).query
    except ValueError:
        return {}
    return {k.lower(): v for k, v in parse_qsl(query, keep_blank_values=True)}


def _amz_date(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _iso_date(text: str) -> float | None:
    """An Azure SAS time: ``YYYY-MM-DD``, ``YYYY-MM-DDThh:mm[:ss[.f]]Z`` or with an offset."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _seconds(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 12 else None


def expiry(url: str) -> Expiry | None:
    """When ``url`` expires, read from its query (see the module docstring); None if it
    carries no expiry this module knows, or an unreadable one. Never raises."""
    params = _params(url)
    for prefix, name in (("x-amz-", "X-Amz"), ("x-goog-", "X-Goog")):
        date, lifetime = params.get(prefix + "date"), params.get(prefix + "expires")
        if date is not None and lifetime is not None:
            start, seconds = _amz_date(date), _seconds(lifetime)
            if start is None or seconds is None:
                return None
            return Expiry(start + seconds, start, f"{name}-Date + {name}-Expires")
    if "expires" in params:
        seconds = _seconds(params["expires"])
        return None if seconds is None else Expiry(float(seconds), None, "Expires")
    if "se" in params:
        at = _iso_date(params["se"])
        start = _iso_date(params["st"]) if "st" in params else None
        return None if at is None else Expiry(at, start, "se")
    return None


def refresh_time(url: str, obtained: float) -> float | None:
    """When ``url`` (got at ``obtained``, epoch seconds) should be replaced: ``min(MARGIN,
    10 % of its lifetime)`` before it expires; None if it carries no expiry."""
    found = expiry(url)
    if found is None:
        return None
    start = found.start if found.start is not None else obtained
    lifetime = max(0.0, found.at - start)
    return found.at - min(MARGIN, 0.1 * lifetime)


def is_refusal(status: int | None, url: str) -> bool:
    """An answer that a fresh URL may cure: 401 or 403, or 400/404/410 for a URL that
    carries an expiry (S3 and GCS answer those for some expired or re-signed URLs)."""
    if status in _REFUSED:
        return True
    return status in _REFUSED_IF_EXPIRING and expiry(url) is not None


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def expired_hint(url: str, now: float | None = None) -> str | None:
    """For a refusal of ``url`` when no command is set: that it expired and what to do,
    if its query says it expired; else None."""
    found = expiry(url)
    now = time.time() if now is None else now
    if found is None or found.at > now:
        return None
    when = datetime.fromtimestamp(found.at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f"the URL expired {_ago(now - found.at)} ago ({when}, from its {found.how}): "
            "give --url-command CMD to fetch fresh URLs (see the README)")


@dataclass(frozen=True)
class UrlCommand:
    """One command that prints a fresh URL: ``text`` runs through ``/bin/sh -c`` when
    ``shell``, else it is the absolute path of a program run with no argument.
    ``timeout`` in seconds."""

    text: str
    shell: bool = True
    timeout: float = DEFAULT_TIMEOUT

    def argv(self) -> list[str]:
        return [_SHELL, "-c", self.text] if self.shell else [self.text]

    def describe(self) -> str:
        return "--url-command" if self.shell else f"url-command={self.text}"


def program_problem(path: str) -> str | None:
    """Why ``path`` (a list's ``url-command=PROGRAM``) cannot be run, or None."""
    if not os.path.isabs(path):
        return f"url-command={path}: give the program's absolute path"
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        return f"url-command={path}: not an executable file"
    return None


class CommandFailed(Exception):
    """A run gave no usable URL; ``str()`` is one line without secrets."""


def _kill_group(process: trio.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def _read_bounded(stream: trio.abc.ReceiveStream | None, into: bytearray) -> None:
    """Read ``stream`` to its end into ``into``; stop after MAX_OUTPUT + 1 bytes."""
    if stream is None:
        return
    while len(into) <= MAX_OUTPUT:
        chunk = await stream.receive_some(MAX_OUTPUT + 1 - len(into))
        if not chunk:
            return
        into += chunk


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    if not lines:
        return ""
    return f": {redact_text(lines[-1])[:200]}"


def parse_output(data: bytes, current: str) -> str:
    """The URL a command printed (``data``: its stdout); CommandFailed unless it is exactly
    one non-blank line holding an http(s) URL other than ``current``."""
    if len(data) > MAX_OUTPUT:
        raise CommandFailed(f"printed more than {MAX_OUTPUT} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandFailed("printed something that is not UTF-8") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) != 1:
        raise CommandFailed(f"printed {len(lines)} lines, not one URL")
    url = lines[0]
    problem = url_problem(url)
    if problem is not None:
        if "://" not in url:
            problem = "not a URL"
        raise CommandFailed(f"printed no usable http(s) URL ({problem})")
    if url == current:
        raise CommandFailed("printed the same URL again")
    return url


async def run_command(command: UrlCommand, path: str, url: str, reason: str) -> str:
    """Run ``command`` for the object at ``url`` (``path``: RANGEFS_PATH); the fresh URL
    it printed. CommandFailed (one line, no secrets) otherwise. Bounded by its timeout; on
    cancellation the process group is killed first."""
    env = dict(os.environ, RANGEFS_PATH=path, RANGEFS_URL=url, RANGEFS_REASON=reason)
    try:
        process = await trio.lowlevel.open_process(
            command.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, start_new_session=True,
        )
    except OSError as exc:
        raise CommandFailed(f"cannot be run: {exc.strerror or exc}") from None
    out, err = bytearray(), bytearray()
    try:
        with trio.move_on_after(command.timeout) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_bounded, process.stdout, out)
                nursery.start_soon(_read_bounded, process.stderr, err)
                await process.wait()
                # what it left running would hold the pipes open: its output is complete
                _kill_group(process)
    finally:
        _kill_group(process)  # the timeout, a cancellation, or children left running
        with trio.CancelScope(shield=True):
            await process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    await stream.aclose()
    if scope.cancelled_caught:
        raise CommandFailed(f"did not finish within {command.timeout:g} s (killed)")
    code = process.returncode or 0
    if code < 0:
        raise CommandFailed(f"was killed by signal {-code}{_last_line(bytes(err))}")
    if code != 0:
        raise CommandFailed(f"exited with status {code}{_last_line(bytes(err))}")
    return parse_output(bytes(out), url)


class FreshUrl:
    """The current URL of one object, replaced by ``command``'s output when it expires or
    is refused (see the module docstring). ``name`` (the redacted URL) names it in logs;
    ``path`` is given to the command. Trio thread only."""

    def __init__(self, url: str, command: UrlCommand, *, path: str, name: str) -> None:
        self.url = url
        self.command = command
        self.path = path
        self.name = name
        self.runs = 0  # the command's runs for this object
        self.problem: str | None = None  # why the last refusal was not cured
        self._due = refresh_time(url, time.time())
        self._lock = trio.Lock()
        self._from_command = False  # self.url was printed by the command
        self._worked = False  # a request with self.url succeeded
        self._refused = False  # a request with self.url was refused
        self._failures = 0  # runs in a row that gave no URL that worked
        self._why: str | None = None  # why the last run failed
        self._last_run = -math.inf  # trio time of the last run
        self._next_run = -math.inf  # trio time of the next allowed run

    async def current(self) -> str:
        """The URL for the next request: a fresh one if this one is past its refresh
        time and a run is allowed now, or is running (a failed run leaves the old one,
        logged)."""
        due = self._due
        if due is not None and time.time() >= due and (
            self._lock.locked() or trio.current_time() >= self._next_run
        ):
            await self._refresh(self.url, "expiring", wait=False)
        return self.url

    async def after_refusal(self, url: str) -> str | None:
        """``url`` was refused (:func:`is_refusal`): the URL to try instead (another task
        may have got it already), or None (``problem`` says why)."""
        if url != self.url:
            return self.url
        if self._from_command and not self._worked and not self._refused:
            self._refused = True  # counted once, however many requests it failed
            self._failures += 1  # the command's last URL was refused before it ever worked
            self._next_run = max(self._next_run, self._last_run + self._interval())
        return self.url if await self._refresh(url, "refused", wait=True) else None

    def worked(self, url: str) -> None:
        """A request with ``url`` succeeded. No await. (A URL past its refresh time does
        not count: a server that takes expired URLs must not make a command that prints
        them run every MIN_INTERVAL.)"""
        if url == self.url and not self._worked:
            self._worked = True
            if self._from_command and (self._due is None or time.time() < self._due):
                self._failures = 0

    def _interval(self) -> float:
        return min(MAX_INTERVAL, MIN_INTERVAL * 2.0 ** min(self._failures, 16))

    async def _refresh(self, stale: str, reason: str, *, wait: bool) -> bool:
        """Run the command unless another task did (True then too), or a run is not
        allowed yet (False; with ``wait``, a run allowed within WAIT_LIMIT is waited for)."""
        runs = self.runs
        async with self._lock:
            if self.url != stale:
                return True
            if self.runs != runs:
                return False  # it ran (and failed) while this waited: one run serves all
            delay = self._next_run - trio.current_time()
            if delay > 0 and (not wait or delay > WAIT_LIMIT):
                why = self._why or "gave a URL that was refused"
                self.problem = (f"{self.command.describe()} {why} (it ran {self.runs} time(s); "
                                f"the next run is allowed in {delay:.0f} s)")
                return False
            if delay > 0:
                await trio.sleep(delay)
            self.runs += 1
            self._last_run = trio.current_time()
            self._next_run = self._last_run + self._interval()
            try:
                fresh = await run_command(self.command, self.path, stale, reason)
            except CommandFailed as exc:
                self._failures += 1
                self._next_run = self._last_run + self._interval()
                self._why = str(exc)
                self.problem = f"{self.command.describe()} {exc}"
                log.warning("%s: %s", self.name, self.problem)
                return False
            self.url = fresh
            self._from_command, self._worked, self._refused = True, False, False
            self._due = refresh_time(fresh, time.time())
            found = expiry(fresh)
            left = f", valid for {_ago(found.at - time.time())}" if found else ""
            if self._due is not None and self._due <= time.time():
                self._failures += 1
                self._next_run = self._last_run + self._interval()
                left = ", which is past its refresh time already"
            log.info("%s: a fresh URL from %s (%s)%s: %s", self.name,
                     self.command.describe(), reason, left, redact_url(fresh))
            self.problem = self._why = None
            return True

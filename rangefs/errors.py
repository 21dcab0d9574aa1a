"""The exception hierarchy of rangefs, drawn once.

Every module raises the most specific class below and translates a lower-level
error (OSError, httpx, json, ...) at its own boundary with ``raise ... from exc``.
Nobody else catches broadly: the CLI turns ``UsageError`` into exit code 2 and
other ``RangefsError`` into exit code 1; ``ops.py`` turns them into ``FUSEError``
with one errno table.

    RangefsError
    ├── UsageError                 bad input from the user (options, paths); exit 2
    │   └── UrlListError           a malformed URL list; carries file and line
    ├── CacheError                 the local block cache
    │   ├── InvalidOffset          offset not block-aligned / out of range
    │   ├── InvalidBlockSize       write not exactly one whole block / bad block size
    │   ├── UncachedRange          a read touches a block that is not cached
    │   ├── NotEnoughSpace         the cache filesystem cannot hold the object
    │   ├── CacheLocked            another process owns the cache directory
    │   ├── CacheCorrupt           an index that is torn, foreign or fails its checksum
    │   └── CacheClosed            use after close()
    ├── SourceError                the remote object (URL always redacted)
    │   ├── TransientError         retry later (5xx, 408, 429, reset, short body ...)
    │   │   └── Unreachable        no connection: the name does not resolve, refused
    │   ├── PermanentError         retrying will not help (404, 403, bad answer ...)
    │   ├── RemoteChanged          the validator / size differs: another version
    │   ├── ReadTimeout            a reader's wait for its blocks passed its deadline
    │   └── RangeNotSupported      the server ignores Range requests
    ├── RetriesExhausted           a transient error persisted past the retry budget
    ├── DigestMismatch             the bytes do not hash to the expected digest
    └── InternalError              a bug or a local I/O failure; never retried
"""

from __future__ import annotations


class RangefsError(Exception):
    """Base of every error rangefs raises on purpose."""


class UsageError(RangefsError):
    """The user gave something unusable; the message says what to do. Exit code 2."""


class UrlListError(UsageError):
    """A malformed URL list. ``str()`` is ``file:line: reason``."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        super().__init__(f"{source}:{line}: {reason}")
        self.source = source
        self.line = line
        self.reason = reason


class CacheError(RangefsError):
    """A problem with the local block cache."""


class InvalidOffset(CacheError):
    """An offset that is negative, past the end, or not block-aligned for a write."""


class InvalidBlockSize(CacheError):
    """A write that is not exactly one whole block, or an unusable block size."""


class UncachedRange(CacheError):
    """A read touched at least one block that is not in the cache."""


class NotEnoughSpace(CacheError):
    """The cache filesystem cannot hold the object; raised before anything is written."""


class CacheLocked(CacheError):
    """Another process holds the cache directory's lock."""


class CacheCorrupt(CacheError):
    """An index that is torn, belongs to another object, or fails its checksum."""


class CacheClosed(CacheError):
    """The cache was used after close()."""


class SourceError(RangefsError):
    """A problem with the remote object. Messages never contain credentials."""


class TransientError(SourceError):
    """Worth retrying. ``retry_after`` is the server's requested delay in seconds, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unreachable(TransientError):
    """No connection could be made (the host name does not resolve, the connection is
    refused). One-off requests (probes, ``cat``, ``download``) retry it only a couple of
    times, quickly: it is rarely a blip, and a bad URL must fail fast."""


class PermanentError(SourceError):
    """Retrying will not help. ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteChanged(SourceError):
    """The remote object is no longer the version the cache holds (validator or size)."""


class ReadTimeout(SourceError):
    """A reader's wait for its blocks passed its deadline (the fetch may go on)."""


class RangeNotSupported(SourceError):
    """The server answered a partial request with the whole object (or refuses Range)."""


class RetriesExhausted(RangefsError):
    """A transient error persisted past the retry budget; ``__cause__`` is the last one."""


class DigestMismatch(RangefsError):
    """The object's bytes do not hash to the expected digest."""


class InternalError(RangefsError):
    """A bug or a local I/O failure (disk error). Never retried."""

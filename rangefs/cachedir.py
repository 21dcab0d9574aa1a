"""The cache directory: its lock, one sub-directory per object, remembered metadata.

Layout (directories 0700, files 0600, created with those modes)::

    ROOT/lock                 flock'ed shared by every process using ROOT (mounts may share
                              a cache directory: each object's cache is owned by one
                              process at a time, through the lock of its directory)
    ROOT/metadata.json        every object's size, validator, mtime, digest and URL without
                              credentials, by KEY: one file, read once at mount, so that a
                              remount of a long list shows it without a request or a file
                              read per entry; the rows a process changed are merged into it
                              (under ROOT/metadata.lock; tmp + rename, no fsync: a lost
                              table only costs probes) at most every META_SAVE_PERIOD
    ROOT/control.PID.sock     the control socket of the mount with that PID (control.py)
    ROOT/objects/KEY/lock     flock'ed by the process whose cache of the object is open; it
                              holds that process's PID (the others read the object through
                              it: mountctl.py ``hold``)
    ROOT/objects/KEY/data     the object's bytes (cache.py), for objects that were opened
    ROOT/objects/KEY/index    which blocks are durable (cachefiles.py)
    ROOT/listings/KEY.json    what the server listed in a listed directory, and when
                              (listings.py): names, URL segments, sizes, mtimes, and the
                              directory's URL redacted (no credential)

KEY is a hash of the URL without credentials: no user:password, and no query parameter
that signs or expires a URL (so a re-signed URL finds its cache). Nothing in ROOT holds a
credential in clear. Only the trio thread calls these functions (they do small sync I/O),
except ``usage``, ``object_bytes`` and ``remove``, which are for worker threads.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import CacheLocked, UsageError

log = logging.getLogger(__name__)

# Query parameters that carry a signature, a token or an expiry, compared lower-case.
_SIGNING_PARAMS = frozenset(
    {"signature", "sig", "expires", "token", "key-pair-id", "policy", "se", "st", "sp", "sv",
     "sr", "skoid", "sktid", "skt", "ske", "sks", "skv", "access_token", "auth",
     "awsaccesskeyid", "googleaccessid"}
)
_SIGNING_PREFIXES = ("x-amz-", "x-goog-", "x-oss-")
META_NAME = "metadata.json"
META_SAVE_PERIOD = 1.0  # seconds: the store saves a changed table at most this often


# URLs whose key needs no parsing: http(s), a plain host name or address, an optional port
# without leading zeros, a path without query, fragment, credentials or escapes
_PLAIN_URL = re.compile(r"(https?)://([a-z0-9.-]+)(?::([1-9][0-9]{0,4}))?(/[^?#@%\s]*)?",
                        re.IGNORECASE)


def cache_key(url: str) -> str:
    """A stable directory name for the object at ``url`` (32 hex digits)."""
    plain = _PLAIN_URL.fullmatch(url)
    if plain is not None and (plain[3] is None or int(plain[3]) <= 65535):
        # the same text as the general case below, without urlsplit/parse_qsl/urlencode
        port = f":{plain[3]}" if plain[3] else ""
        clean = f"{plain[1].lower()}://{plain[2].lower()}{port}{plain[4] or ''}"
        return hashlib.sha256(clean.encode()).hexdigest()[:32]
    return _general_cache_key(url)


def _general_cache_key(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() not in _SIGNING_PARAMS and not k.lower().startswith(_SIGNING_PREFIXES)
    ]
    clean = urlunsplit((parts.scheme.lower(), host.lower(), parts.path, urlencode(query), ""))
    return hashlib.sha256(clean.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ObjectMeta:
    """What a remount needs to show and validate an object without the network."""

    url: str  # redacted: no credentials
    size: int
    etag: str | None
    last_modified: str | None
    mtime: float | None
    accept_ranges: bool
    digest: str | None  # 'sha256:HEX' form, from the server


class CacheDir:
    """Owner of one cache root for the lifetime of a mount or download. Not thread-safe."""

    def __init__(self, root: Path, lock_fd: int) -> None:
        self.root = root
        self._lock_fd = lock_fd
        self._meta: dict[str, ObjectMeta] | None = None  # the table, loaded on first use
        self._meta_dirty = False
        self._changed: set[str] = set()  # keys whose row changed since the last snapshot

    @classmethod
    def open(cls, root: Path) -> CacheDir:
        """Create (0700) and lock ``root``. UsageError if unusable, CacheLocked if in use."""
        root = root.expanduser()
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            (root / "objects").mkdir(mode=0o700, exist_ok=True)
            fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
        except OSError as exc:
            raise UsageError(
                f"cache directory {root} is not usable: {exc.strerror}; "
                "choose another with --cache-dir"
            ) from exc
        if not os.access(root, os.W_OK | os.X_OK):
            os.close(fd)
            raise UsageError(
                f"cache directory {root} is not writable; choose another with --cache-dir"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):  # an older rangefs holds it
                raise CacheLocked(
                    f"cache directory {root} is in use by a process that does not share it; "
                    "stop it or choose another --cache-dir"
                ) from exc
            raise UsageError(f"cannot lock cache directory {root}: {exc.strerror}") from exc
        return cls(root, fd)

    def close(self) -> None:
        """Save the metadata table if it changed (errors logged), release the lock.
        Idempotent."""
        if self._lock_fd >= 0:
            changes = self.meta_snapshot()
            if changes is not None:
                try:
                    merge_meta_table(self.root, changes)
                except OSError as exc:
                    log.warning("cannot save %s: %s", self.root / META_NAME, exc)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def object_dir(self, key: str) -> Path:
        """The directory of one object (not created here)."""
        return self.root / "objects" / key

    def load_listing(self, key: str) -> bytes | None:
        """The remembered listing of the directory of ``key``, or None if there is none or
        it cannot be read (logged). Any thread."""
        try:
            return (self.root / "listings" / f"{key}.json").read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the remembered listing %s: %s", key, exc.strerror)
            return None

    def save_listing(self, key: str, data: bytes) -> None:
        """Remember ``data`` as the listing of the directory of ``key`` (tmp + rename, mode
        0600; directory 0700). Any thread; OSError."""
        directory = self.root / "listings"
        directory.mkdir(mode=0o700, exist_ok=True)
        _replace_file(directory, f"{key}.json", data)

    def load_meta(self, key: str) -> ObjectMeta | None:
        """The remembered metadata of ``key``, or None. The first call reads the table."""
        if self._meta is None:
            self._meta = read_meta_table(self.root)
        return self._meta.get(key)

    def save_meta(self, key: str, meta: ObjectMeta) -> None:
        """Remember ``meta`` for ``key`` (in memory; see :meth:`meta_snapshot`)."""
        if self._meta is None:
            self._meta = read_meta_table(self.root)
        if self._meta.get(key) != meta:
            self._meta[key] = meta
            self._meta_dirty = True
            self._changed.add(key)

    def meta_changed(self, failed: Mapping[str, ObjectMeta]) -> None:
        """The rows of a snapshot whose save failed: saved with the next one."""
        if self._meta is not None:
            self._changed.update(failed)
            self._meta_dirty = bool(self._changed)

    def meta_snapshot(self) -> dict[str, ObjectMeta] | None:
        """The rows that changed since the last snapshot, or None. The caller merges them
        into the file with :func:`merge_meta_table` (in a worker thread if it likes)."""
        if not self._meta_dirty or self._meta is None:
            return None
        self._meta_dirty = False
        changed, self._changed = self._changed, set()
        return {key: self._meta[key] for key in changed if key in self._meta}

    def touch(self, key: str) -> None:
        """Record that the object was used now (the eviction order is least recent first)."""
        with contextlib.suppress(OSError):
            os.utime(self.object_dir(key))

    def usage(self) -> list[tuple[float, int, str]]:
        """(last use, bytes on disk, key) of every object directory, oldest first.

        A scan of every directory (~37 us each here: 0.37 s for 10,000): thread-safe, for
        a worker thread; the store runs it once and then keeps a :class:`UsageTable`."""
        out = []
        try:
            keys = os.listdir(self.root / "objects")
        except OSError:
            return []
        for key in keys:
            directory = self.object_dir(key)
            try:
                used = directory.stat().st_mtime
            except OSError:
                continue
            out.append((used, self.object_bytes(key), key))
        out.sort()
        return out

    def object_bytes(self, key: str) -> int:
        """Bytes on disk of one object's directory (0 if absent). Thread-safe."""
        total = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.object_dir(key)):
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
        return total

    def remove(self, key: str) -> bool:
        """Delete an object's directory (its cache and index), unless a process has it
        open (its lock is held: False). Thread-safe."""
        directory = self.object_dir(key)
        try:
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:
            return True  # gone already
        except OSError as exc:
            log.warning("cannot evict %s: %s", directory, exc)
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # open in another process
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(fd)
        log.info("evicted %s from the cache", key)
        return True



class UsageTable:
    """Bytes on disk per object key, least recently used first, with their running total:
    what ``--cache-size`` eviction needs without scanning every directory on each open.
    Owned by the store (trio thread); built from :meth:`CacheDir.usage`."""

    def __init__(self, scanned: list[tuple[float, int, str]]) -> None:
        """``scanned``: (last use, bytes, key), oldest first, as ``CacheDir.usage`` gives."""
        self._bytes: collections.OrderedDict[str, int] = collections.OrderedDict(
            (key, nbytes) for _, nbytes, key in scanned
        )
        self.total = sum(self._bytes.values())

    def bytes_of(self, key: str) -> int:
        """Bytes accounted to ``key`` (0 if none)."""
        return self._bytes.get(key, 0)

    def set(self, key: str, nbytes: int) -> None:
        """Account ``nbytes`` to ``key`` and make it the most recently used."""
        self.total += nbytes - self._bytes.pop(key, 0)
        self._bytes[key] = nbytes

    def touch(self, key: str) -> None:
        """``key`` was used now (no-op for a key not in the table)."""
        if key in self._bytes:
            self._bytes.move_to_end(key)

    def pop(self, key: str) -> int:
        """Forget ``key``; the bytes it had (0 if none)."""
        nbytes = self._bytes.pop(key, 0)
        self.total -= nbytes
        return nbytes

    def oldest_first(self) -> list[str]:
        """Every key, least recently used first (a copy: safe to change the table)."""
        return list(self._bytes)


def read_meta_table(root: Path) -> dict[str, ObjectMeta]:
    """The metadata table of cache root ``root``; empty if absent, unreadable (logged)."""
    path = root / META_NAME
    try:
        raw = json.loads(path.read_bytes())
        if raw.get("version") != 1:
            raise ValueError(f"unknown version {raw.get('version')!r}")
        table: dict[str, ObjectMeta] = {}
        for key, row in raw["objects"].items():
            url, size, etag, last_modified, mtime, accept_ranges, digest = row
            table[str(key)] = ObjectMeta(
                url=str(url),
                size=int(size),
                etag=None if etag is None else str(etag),
                last_modified=None if last_modified is None else str(last_modified),
                mtime=None if mtime is None else float(mtime),
                accept_ranges=bool(accept_ranges),
                digest=None if digest is None else str(digest),
            )
        return table
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # ValueError includes a row of the wrong length
        log.warning("ignoring unreadable %s (sizes are probed again): %s", path, exc)
        return {}


def merge_meta_table(root: Path, changes: Mapping[str, ObjectMeta]) -> None:
    """Merge ``changes`` into the metadata table on disk: the rows of other processes
    sharing the directory are kept. Serialized between processes by an flock of
    ROOT/metadata.lock. Any thread; OSError."""
    fd = os.open(root / "metadata.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        table = read_meta_table(root)
        table.update(changes)
        write_meta_table(root, table)
    finally:
        os.close(fd)


def write_meta_table(root: Path, table: Mapping[str, ObjectMeta]) -> None:
    """Replace the metadata table atomically (tmp + rename, mode 0600). Any thread; OSError."""
    # one row per object, in ObjectMeta's field order (10,000 rows: ~20 ms)
    rows = {k: [m.url, m.size, m.etag, m.last_modified, m.mtime, m.accept_ranges, m.digest]
            for k, m in table.items()}
    data = json.dumps({"version": 1, "objects": rows}, separators=(",", ":"))
    _replace_file(root, META_NAME, data.encode())


def _replace_file(directory: Path, name: str, data: bytes) -> None:
    """Write ``directory/name`` atomically: a temporary file (mode 0600) renamed over it,
    no fsync (what is lost in a crash costs requests, not bytes). OSError."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

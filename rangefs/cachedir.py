"""The cache directory: its lock, one sub-directory per object, remembered metadata.

Layout (directories 0700, files 0600, created with those modes)::

    ROOT/lock                 flock'ed exclusively by the one process using ROOT
    ROOT/objects/KEY/data     the object's bytes (cache.py)
    ROOT/objects/KEY/index    which blocks are durable (cachefiles.py)
    ROOT/objects/KEY/meta.json  size, validator, mtime, digest; the URL without credentials

KEY is a hash of the URL without credentials: no user:password, and no query parameter
that signs or expires a URL (so a re-signed URL finds its cache). Nothing in ROOT holds a
credential in clear. Only the trio thread calls these functions; they do small sync I/O.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .errors import CacheLocked, UsageError

log = logging.getLogger(__name__)

# Query parameters that carry a signature, a token or an expiry, compared lower-case.
_SIGNING_PARAMS = frozenset(
    {"signature", "sig", "expires", "token", "key-pair-id", "policy", "se", "st", "sp", "sv",
     "sr", "skoid", "sktid", "skt", "ske", "sks", "skv", "access_token", "auth"}
)
_SIGNING_PREFIXES = ("x-amz-", "x-goog-", "x-oss-")


def cache_key(url: str) -> str:
    """A stable directory name for the object at ``url`` (32 hex digits)."""
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
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = b""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0).strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise CacheLocked(
                    f"cache directory {root} is in use by process {holder.decode() or '?'}; "
                    "stop it or choose another --cache-dir"
                ) from exc
            raise UsageError(f"cannot lock cache directory {root}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(root, fd)

    def close(self) -> None:
        """Release the lock. Idempotent."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def object_dir(self, key: str) -> Path:
        """The directory of one object (not created here)."""
        return self.root / "objects" / key

    def load_meta(self, key: str) -> ObjectMeta | None:
        """The remembered metadata, or None when absent or unreadable (logged)."""
        path = self.object_dir(key) / "meta.json"
        try:
            raw = json.loads(path.read_bytes())
            return ObjectMeta(
                url=str(raw["url"]),
                size=int(raw["size"]),
                etag=raw["etag"],
                last_modified=raw["last_modified"],
                mtime=None if raw["mtime"] is None else float(raw["mtime"]),
                accept_ranges=bool(raw["accept_ranges"]),
                digest=raw["digest"],
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None

    def save_meta(self, key: str, meta: ObjectMeta) -> None:
        """Write meta.json atomically (tmp + rename; durability is not needed)."""
        directory = self.object_dir(key)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".meta.")  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(meta), f)
            os.replace(tmp, directory / "meta.json")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def touch(self, key: str) -> None:
        """Record that the object was used now (the eviction order is least recent first)."""
        with contextlib.suppress(OSError):
            os.utime(self.object_dir(key))

    def usage(self) -> list[tuple[float, int, str]]:
        """(last use, bytes on disk, key) of every object directory, oldest first."""
        out = []
        try:
            keys = os.listdir(self.root / "objects")
        except OSError:
            return []
        for key in keys:
            directory = self.object_dir(key)
            try:
                used = directory.stat().st_mtime
                size = sum(f.stat().st_blocks * 512 for f in directory.iterdir() if f.is_file())
            except OSError:
                continue
            out.append((used, size, key))
        out.sort()
        return out

    def remove(self, key: str) -> None:
        """Delete an object's directory (its cache, index and metadata)."""
        shutil.rmtree(self.object_dir(key), ignore_errors=True)
        log.info("evicted %s from the cache", key)


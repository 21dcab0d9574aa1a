"""``rangefs download`` copies what the rangefs mounts of this machine already cached
instead of fetching it again (issue 18, one cache for many processes: this is the
download's side).

Before fetching, the download asks each rangefs mount of this user (its control socket,
``control.py``) to ``export`` the object (``mountctl.py``): a mount that holds blocks of it
answers with its data file, the validators of its version and the runs of cached blocks,
and keeps every block of that version pinned (never evicted) until the connection closes.
The download copies each of its own blocks that those runs cover whole, when the mount's
version is the one the download probed (same size, and the same strong ETag, or no ETag
and the same Last-Modified); it fetches the rest as usual. The copy reads the mount's data
file: a block the mount marks cached was written before its bit was set, and the page
cache is one for every process, so no half-written block can be copied.

Blocking (sockets, preads): run it in a worker thread before the download starts. A mount
that cannot help (none of the object, another version, no answer within a few seconds) is
skipped with one info line; nothing here fails the download.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from typing import Any

from .cache import LocalDownloadCache
from .control import Client, ControlError, MountInfo, find_mounts
from .redact import redact_url
from .source import RemoteInfo

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 10.0
"""Seconds a mount may take to answer ``export`` (it may reopen the object's cache)."""
XATTR_TIMEOUT = 2.0
"""Seconds a mount may take to name its control socket."""


def copy_from_mounts(
    url: str, info: RemoteInfo, cache: LocalDownloadCache,
    mounts: Sequence[MountInfo] | None = None,
) -> int:
    """Copy into ``cache`` every block of it that a rangefs mount has cached of version
    ``info`` of ``url``; the bytes copied. Never raises for a mount that cannot help."""
    try:
        candidates = list(mounts) if mounts is not None else find_mounts()
    except OSError as exc:
        log.debug("cannot list the mounts: %s", exc)
        return 0
    uid = os.getuid()
    copied = 0
    for mount in candidates:
        if cache.complete():
            break
        if uid != 0 and mount.uid not in (None, uid):
            continue
        try:
            with Client(mount.control_socket(XATTR_TIMEOUT), ANSWER_TIMEOUT) as client:
                answer = client.request("export", url=url)
                if not answer.get("found"):
                    continue
                why = _other_version(answer, info)
                if why is not None:
                    log.info("%s: the copy cached by the mount at %s is not used: %s",
                             redact_url(url), mount.mountpoint, why)
                    continue
                got = _copy(answer, cache)
        except (ControlError, OSError, ValueError, KeyError, TypeError) as exc:
            log.info("%s: nothing copied from the mount at %s: %s", redact_url(url),
                     mount.mountpoint, exc)
            continue
        if got:
            log.info("%s: %d bytes copied from the cache of the mount at %s",
                     redact_url(url), got, mount.mountpoint)
        copied += got
    return copied


def _other_version(answer: dict[str, Any], info: RemoteInfo) -> str | None:
    """Why the mount's version is not ``info`` (None: it is the same)."""
    if answer["size"] != info.size:
        return f"its size is {answer['size']}, the server's {info.size}"
    theirs, ours = answer.get("etag"), info.etag
    if ours is not None or theirs is not None:
        if ours is None or theirs != ours or ours.startswith("W/"):
            return "another (or a weak) ETag"
        return None
    if info.last_modified is None or answer.get("last_modified") != info.last_modified:
        return "no ETag, and no Last-Modified that agrees"
    return None


def _copy(answer: dict[str, Any], cache: LocalDownloadCache) -> int:
    """Copy the blocks of ``cache`` that the exported runs cover whole; bytes copied."""
    size, dbs, mbs = cache.size, cache.block_size, int(answer["block_size"])
    covered = sorted((int(a) * mbs, min(size, (int(b) + 1) * mbs)) for a, b in answer["runs"])
    fd = os.open(answer["data"], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size < size:
            raise ValueError(f"{answer['data']} is not a data file of this user")
        copied = 0
        run = 0
        for index in range(cache.num_blocks):
            start, end = index * dbs, min(size, (index + 1) * dbs)
            while run < len(covered) and covered[run][1] <= start:
                run += 1
            if run == len(covered):
                break
            if cache.is_cached(index) or not covered[run][0] <= start or covered[run][1] < end:
                continue
            data = os.pread(fd, end - start, start)
            if len(data) != end - start:
                raise ValueError(f"short read of {answer['data']}")
            cache.write_blocks(index, [data])
            copied += len(data)
        return copied
    finally:
        os.close(fd)

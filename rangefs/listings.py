"""Listed directories: listed from the server when first looked into, remembered in the
cache directory, listed again when older than the TTL or on ``rangefs refresh``.

A list entry whose URL ends with '/' is a listed directory (``urllist.py``); its
subdirectories are listed directories too. :class:`Listings` owns their state; the FUSE
handlers call :meth:`Listings.ensure` before they read a listed directory's children.

- **Lazy.** Nothing is listed at mount time. A directory is listed when first looked
  into, one request (an S3 prefix: one per 1,000 keys) and no HEAD per file: sizes come
  from the listing where it gives them exactly (``indexes.py``), and the other files are
  probed when first looked at, one by one — ``ls`` of 100,000 names costs the listing only.
- **Remembered.** Every listing is saved in ``CACHE_DIR/listings/`` (names, URL
  segments, sizes, times; the directory's URL only redacted). A mount uses a remembered
  listing younger than the TTL without a request; an older one is listed again, and when
  that fails the remembered one is served (one warning).
- **Single flight, never a hang.** One listing of a directory runs at a time, as a
  background task of the store (named, contained): a waiter that gives up (the FUSE
  request's read timeout) does not cancel it, and the next waiter finds its result.
- **Errors** are logged once per directory (until it lists again); the directory fails
  with EIO, everything else stays usable. A failed directory is not asked again for
  :data:`RETRY_AFTER` seconds: its lookups fail fast meanwhile.
- **Changes** (a later listing) go through :meth:`Tree.set_listed`: kept names keep their
  inodes; the kernel is told to forget names that went away or changed (``on_change``), and
  an object whose listed size or time changed is checked again when next opened.

Everything runs on the trio thread; :meth:`ensure` and :meth:`refresh` may be cancelled.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit, urlunsplit

import trio

from .cachedir import CacheDir, cache_key
from .errors import PermanentError, RangefsError, ReadTimeout, SourceError
from .fetcher import retry_transient
from .indexes import (
    MAX_CHILDREN,
    Child,
    is_bucket_listing,
    parse_html_index,
    parse_s3_page,
    s3_list_query,
    usable_name,
)
from .objects import ObjectStore
from .redact import redact_url
from .settings import LISTING_TTL
from .source import Document
from .tree import Changes, DirNode, DirSource, InodeNo, Listed, Node, Tree
from .urllist import Entry

log = logging.getLogger(__name__)

#: Default seconds a listing is used before the directory is listed again.
DEFAULT_TTL = LISTING_TTL
#: Seconds a directory whose listing failed is not asked again (its lookups fail fast).
RETRY_AFTER = 10.0
#: The largest listing page accepted, in bytes.
MAX_PAGE_BYTES = 64 << 20
#: The most pages of one S3 prefix (1,000 keys each).
MAX_PAGES = 10_000
_FORMAT = 1  # of the remembered files


@dataclass
class _State:
    """One listed directory, in this mount."""

    listed_at: float | None = None  # wall time of the listing the tree shows
    running: trio.Event | None = None  # set when the listing in flight ends
    error: RangefsError | None = None  # why the last listing failed, if it did
    failed_at: float = 0.0  # trio time of that failure
    logged: bool = False  # that failure was logged
    changes: Changes | None = field(default=None, repr=False)  # of the last listing


class Listings:
    """The listed directories of one mount. ``ttl``: seconds a listing is used (the FUSE
    layer keeps the kernel's entries of listed names no longer). ``on_change(parent,
    names)``, set by the FUSE layer, is called (no await) with the names of ``parent``
    that the kernel must forget."""

    def __init__(self, tree: Tree, store: ObjectStore, *, ttl: float = DEFAULT_TTL) -> None:
        self._tree = tree
        self._store = store
        self.ttl = ttl
        self.on_change: Callable[[InodeNo, list[str]], None] | None = None
        self._states: dict[InodeNo, _State] = {}
        self._found: dict[InodeNo, DirSource] = {}  # entries' sources, once their kind is known

    def _state(self, inode: InodeNo) -> _State:
        state = self._states.get(inode)
        if state is None:
            state = self._states[inode] = _State()
        return state

    def fresh(self, node: DirNode) -> bool:
        """Whether ``node`` needs no listing before its children are read (not a listed
        directory, or listed less than the TTL ago). No await."""
        if node.listing is None:
            return True
        listed_at = self._state(node.inode).listed_at
        return listed_at is not None and time.time() - listed_at < self.ttl

    async def ensure(self, node: DirNode) -> None:
        """Make the children of ``node`` usable: list it unless :meth:`fresh`. Raises the
        listing's error (SourceError, RetriesExhausted, ...) when there is nothing to show;
        ReadTimeout after the store's read timeout (the listing goes on)."""
        if self.fresh(node):
            return
        state = self._state(node.inode)
        if state.listed_at is None and state.running is None and await self._load(node) \
                and self.fresh(node):
            return
        await self._list(node, force=False)

    async def refresh(self, node: DirNode) -> Changes:
        """List ``node`` now, whatever its age, and make its listed subdirectories stale
        (listed again when next looked into). Raises as :meth:`ensure`."""
        if node.listing is None:
            raise PermanentError(f"{self._tree.path(node.inode)} is not a listed directory")
        await self._list(node, force=True)
        for _, child in self._tree.children(node.inode):
            if isinstance(child, DirNode):
                self._stale(child)
        return self._state(node.inode).changes or Changes(0, (), ())

    def _stale(self, node: DirNode) -> None:
        """``node`` and the listed directories under it are listed again when next looked
        into: the kernel forgets their names, so that the next look reaches the mount."""
        pending = [node]
        while pending:
            directory = pending.pop()
            state = self._states.get(directory.inode)
            if state is not None and state.listed_at is not None:
                state.listed_at = 0.0
                children = self._tree.children(directory.inode)
                if children and self.on_change is not None:
                    self.on_change(directory.inode, [name for name, _ in children])
                pending.extend(child for _, child in children if isinstance(child, DirNode))

    async def resolve(self, path: str) -> Node | None:
        """The node at ``path`` (relative to the mount point), listing the directories on
        the way as a lookup would; None if there is none. Raises as :meth:`ensure`."""
        node: Node = self._tree.root
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if not isinstance(node, DirNode):
                return None
            await self.ensure(node)
            found = self._tree.lookup(node.inode, part)
            if found is None:
                return None
            node = found
        return node

    # -- listing ------------------------------------------------------------------------

    async def _list(self, node: DirNode, *, force: bool) -> None:
        state = self._state(node.inode)
        if state.running is None:
            if state.error is not None and not force and \
                    trio.current_time() - state.failed_at < RETRY_AFTER:
                if state.listed_at is not None:
                    return  # serve what it had
                raise state.error
            state.running = trio.Event()
            self._store.tasks.start(f"listing of {self._name(node)}", self._run, node, state)
        if state.error is not None and state.listed_at is not None and not force:
            return  # the last try failed: serve what it had while this one runs
        running = state.running
        timeout = self._store.config.read_timeout
        with trio.move_on_after(timeout):
            await running.wait()
        if not running.is_set():
            raise ReadTimeout(f"{self._name(node)}: no listing after {timeout:g} s "
                              "(it goes on)")
        if state.error is not None and (state.listed_at is None or force):
            raise state.error

    async def _run(self, node: DirNode, state: _State) -> None:
        """The background task of one listing: fetch, apply, remember; errors kept in
        ``state`` for the waiters (logged once per directory)."""
        try:
            source, children = await self._fetch(node)
            listed_at = time.time()
            self._apply(node, source, children, listed_at)
            state.error = None
            state.logged = False
            await self._save(source, children, listed_at)
        except (RangefsError, ValueError) as exc:
            error = exc if isinstance(exc, RangefsError) else \
                SourceError(f"{self._name(node)}: unusable listing: {exc}")
            state.error = error
            state.failed_at = trio.current_time()
            if not state.logged:
                state.logged = True
                shown = "serving the listing it had" if state.listed_at is not None \
                    else "it fails (EIO)"
                log.warning("cannot list %s (%s): %s", self._name(node), shown, error)
        finally:
            assert state.running is not None
            state.running.set()
            state.running = None

    def _name(self, node: DirNode) -> str:
        assert node.listing is not None
        return redact_url(node.listing.url)

    def _source(self, node: DirNode) -> DirSource:
        assert node.listing is not None
        return self._found.get(node.inode, node.listing)

    async def _fetch(self, node: DirNode) -> tuple[DirSource, list[Child]]:
        source = self._source(node)
        if source.bucket is not None:
            return source, await self._list_s3(source)
        document = await self._get(source.url)
        if document.status < 300 and _is_html(document):
            # a worker thread: an index of 100,000 names takes a second to parse
            return source, await trio.to_thread.run_sync(
                _parse_html, document.body, _directory(document.url))
        if document.status < 300 and is_bucket_listing(document.body):
            found = replace(source, bucket=source.url, prefix="")
        else:
            found = await self._find_bucket(source, document)
        self._found[node.inode] = found
        return found, await self._list_s3(found)

    async def _find_bucket(self, source: DirSource, answer: Document) -> DirSource:
        """The S3 bucket and prefix of ``source``'s URL: its first path segment is the
        bucket (path style), or the host is (virtual-hosted style); PermanentError if
        neither lists, naming what the URL answered."""
        parts = urlsplit(source.url)
        segments = parts.path.strip("/").split("/")
        candidates: list[tuple[str, list[str]]] = []
        if len(segments) > 1:
            candidates.append((f"/{segments[0]}/", segments[1:]))
        candidates.append(("/", segments))
        for path, rest in candidates:
            bucket = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
            rest_path = "/".join(rest)
            prefix = unquote(rest_path) + "/" if rest_path else ""
            probe = await self._get(f"{bucket}?{s3_list_query(prefix, None)}")
            if probe.status < 300 and is_bucket_listing(probe.body):
                return replace(source, bucket=bucket, prefix=prefix)
        kind = answer.content_type or "no content type"
        raise PermanentError(
            f"{redact_url(source.url)} answers neither an HTML directory index nor an S3 "
            f"bucket listing (HTTP {answer.status}, {kind})", status=answer.status)

    async def _list_s3(self, source: DirSource) -> list[Child]:
        assert source.bucket is not None
        children: list[Child] = []
        token: str | None = None
        for _ in range(MAX_PAGES):
            url = f"{source.bucket}?{s3_list_query(source.prefix, token)}"
            document = await self._get(url)
            if document.status >= 300:
                raise PermanentError(f"listing {redact_url(source.url)}: HTTP "
                                     f"{document.status}", status=document.status)
            page = await trio.to_thread.run_sync(parse_s3_page, document.body, source.prefix)
            children.extend(page.children)
            if len(children) > MAX_CHILDREN:
                raise ValueError(f"more than {MAX_CHILDREN} entries")
            token = page.next_token
            if token is None:
                return children
        raise ValueError(f"more than {MAX_PAGES} pages")

    async def _get(self, url: str) -> Document:
        store = self._store
        return await retry_transient(
            lambda: store.session.fetch_document(url, limit=MAX_PAGE_BYTES),
            store.config.backoff, redact_url(url), stats=store.stats)

    # -- the tree -----------------------------------------------------------------------

    def _apply(self, node: DirNode, source: DirSource, children: Sequence[Child],
               listed_at: float) -> None:
        """Make ``children`` the contents of ``node`` (trio thread, no await)."""
        base, query = _split_query(source.url)
        path = self._tree.path(node.inode)
        listed: list[Listed] = []
        for child in children:
            url = base + child.segment + query
            if child.is_dir:
                prefix = f"{source.prefix}{child.name}/" if source.bucket is not None else ""
                listed.append((child.name, DirSource(url, source.line, source.bucket, prefix)))
            else:
                listed.append((child.name, Entry(
                    url=url, path=PurePosixPath(path, child.name), digest=None,
                    size=child.size, line=source.line, listed=True, mtime=child.mtime)))
        changes = self._tree.set_listed(node.inode, listed)
        state = self._state(node.inode)
        state.listed_at = listed_at
        state.changes = changes
        for _, old in changes.replaced:
            if isinstance(old, DirNode):
                continue
            new = self._tree.lookup(node.inode, old.name)
            if new is not None and not isinstance(new, DirNode):
                self._store.get(new.entry).listing_changed(new.entry)
        forget = [name for name, _ in (*changes.removed, *changes.replaced)]
        if forget and self.on_change is not None:
            self.on_change(node.inode, forget)
        if changes.added or forget:
            log.info("%s: listed %d entries (%d new, %d gone, %d changed)", self._name(node),
                     len(listed), changes.added, len(changes.removed), len(changes.replaced))

    # -- remembering --------------------------------------------------------------------

    async def _save(self, source: DirSource, children: Sequence[Child],
                    listed_at: float) -> None:
        header = {"format": _FORMAT, "listed": listed_at, "url": redact_url(source.url),
                  "s3": source.bucket is not None, "prefix": source.prefix}
        cachedir = self._store.cachedir

        def save() -> None:  # a worker thread: JSON of 100,000 names takes ~0.1 s
            rows = [[c.name, c.segment, c.is_dir, c.size, c.mtime] for c in children]
            data = json.dumps({**header, "children": rows}, separators=(",", ":"))
            cachedir.save_listing(cache_key(source.url), data.encode())

        try:
            await trio.to_thread.run_sync(save)
        except OSError as exc:
            log.warning("cannot remember the listing of %s: %s", redact_url(source.url),
                        exc.strerror or exc)

    async def _load(self, node: DirNode) -> bool:
        """Show the remembered listing of ``node``, if there is a usable one; True if so."""
        source = self._source(node)
        try:
            saved = await trio.to_thread.run_sync(_read_saved, self._store.cachedir,
                                                  cache_key(source.url))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unusable remembered listing of %s: %s",
                        self._name(node), exc)
            return False
        if saved is None:
            return False
        if saved.s3 and source.bucket is None:
            source = replace(source, bucket=_up(source.url, saved.prefix.count("/")),
                             prefix=saved.prefix)
            self._found[node.inode] = source
        self._apply(node, source, saved.children, saved.listed_at)
        return True


@dataclass(frozen=True)
class _Saved:
    """A remembered listing: when it was listed (wall time), whether from S3 and its key
    prefix, its children."""

    listed_at: float
    s3: bool
    prefix: str
    children: list[Child]


def _read_saved(cachedir: CacheDir, key: str) -> _Saved | None:
    """Worker thread: the remembered listing of ``key``, or None if there is none, it has
    another format or a child no listing could give. ValueError & co. if it is not one."""
    data = cachedir.load_listing(key)
    if data is None:
        return None
    saved = json.loads(data)
    if saved["format"] != _FORMAT:
        return None
    children = [Child(str(name), str(segment), bool(is_dir),
                      None if size is None else int(size),
                      None if mtime is None else float(mtime))
                for name, segment, is_dir, size, mtime in saved["children"]]
    if not all(_safe(child) for child in children):
        return None
    return _Saved(float(saved["listed"]), bool(saved["s3"]), str(saved["prefix"]), children)


def _parse_html(body: bytes, base: str) -> list[Child]:
    """Worker thread: the children an HTML index gives (undecodable bytes make names
    that :func:`usable_name` refuses)."""
    return parse_html_index(body.decode("utf-8", "surrogateescape"), base)


def _is_html(document: Document) -> bool:
    if document.content_type in ("text/html", "application/xhtml+xml"):
        return True
    head = document.body[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def _directory(url: str) -> str:
    """``url`` without query and fragment, ending with '/'."""
    base = url.partition("#")[0].partition("?")[0]
    return base if base.endswith("/") else base + "/"


def _split_query(url: str) -> tuple[str, str]:
    """(the directory URL without query, '?query' or ''): a listing URL's query (a token)
    goes with every child's URL."""
    base, mark, query = url.partition("#")[0].partition("?")
    return base, mark + query


def _up(url: str, levels: int) -> str:
    """``url`` (a directory URL) ``levels`` path segments up, without query."""
    parts = urlsplit(url)
    segments = parts.path.rstrip("/").split("/")
    path = "/".join(segments[: len(segments) - levels]) + "/"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _safe(child: Child) -> bool:
    """Whether a remembered child is one that a listing could have given."""
    segment = child.segment.rstrip("/")
    return usable_name(child.name) and bool(segment) and "/" not in segment \
        and "?" not in segment and "#" not in segment

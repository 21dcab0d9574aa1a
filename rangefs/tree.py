"""The directory tree that the URL list describes, and what listings add to it.

Every entry is a file, or a *listed directory* (an entry whose URL ends with '/': its
children come from the server, ``listings.py``); other directories are implied by the
entries' paths. Inodes of the list's paths are assigned once, in sorted path order
(component by component, by code point), starting with :data:`ROOT_INODE` for the mount
point, so the same list always gives the same inodes, whatever its order.

Only the children of listed directories change (:meth:`Tree.set_listed`): a name listed
again keeps its inode; new names get new inodes, above every inode given before; a node
whose name goes away stays resolvable by inode (the kernel or an open file may still hold
it) but no longer appears in its directory or in :meth:`Tree.files`. Every method is
synchronous and called from the trio thread only, so readers never see a half-made change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import NewType

from rangefs.urllist import Entry

InodeNo = NewType("InodeNo", int)
#: The mount point's inode (FUSE_ROOT_ID).
ROOT_INODE = InodeNo(1)


@dataclass(frozen=True, slots=True)
class FileNode:
    """A file: the object of ``entry``. ``name`` is its last path component."""

    inode: InodeNo
    name: str
    parent: InodeNo
    entry: Entry


@dataclass(frozen=True, slots=True)
class DirSource:
    """Where a listed directory's children come from: the directory's ``url`` (it ends
    with '/'; it may hold credentials: never log it), the ``line`` of the list entry it
    descends from, and for a directory of an S3 bucket the bucket's URL and the key
    ``prefix`` of the directory (found when the entry's URL was first listed)."""

    url: str = field(repr=False)
    line: int
    bucket: str | None = field(default=None, repr=False)
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class DirNode:
    """A directory. The root is named ``""`` and is its own parent. ``listing`` is set for
    a directory whose children the server lists."""

    inode: InodeNo
    name: str
    parent: InodeNo
    listing: DirSource | None = None


Node = FileNode | DirNode


@dataclass(frozen=True, slots=True)
class Changes:
    """What :meth:`Tree.set_listed` did to one directory: how many names were ``added``,
    and the (name, node) of names ``removed`` or whose node was ``replaced`` (another
    entry, or a file that became a directory): the kernel must forget those names."""

    added: int
    removed: tuple[tuple[str, Node], ...]
    replaced: tuple[tuple[str, Node], ...]


#: One child as a listing gives it: a file's entry, or a subdirectory's source.
Listed = tuple[str, Entry | DirSource]


class Tree:
    """Files and directories, by inode. Build with :meth:`from_entries`."""

    __slots__ = ("_children", "_files", "_links", "_listed", "_nodes", "_paths")

    def __init__(
        self,
        nodes: list[Node],
        children: dict[InodeNo, dict[str, Node]],
        paths: list[tuple[str, ...]],
    ) -> None:
        # Internal: use from_entries(). nodes[i] has inode i + 1; children maps every
        # DirNode's inode to {name: node} in sorted name order; paths[i] is nodes[i]'s path.
        self._nodes = nodes
        self._children = children
        self._paths = paths
        self._listed: dict[InodeNo, tuple[tuple[str, Node], ...]] = {}  # children(), memoised
        self._links: dict[InodeNo, int] = {}  # links(), memoised
        # the files in the tree now, in inode order
        self._files: dict[InodeNo, FileNode] = {
            node.inode: node for node in nodes if isinstance(node, FileNode)
        }

    @classmethod
    def from_entries(cls, entries: Iterable[Entry]) -> Tree:
        """Build the tree of ``entries``. ValueError if two entries share a path, a path is
        both a file and a directory, or a path is not relative and clean (the URL list
        rejects all of these first, with line numbers)."""
        files: dict[tuple[str, ...], Entry] = {}
        listed: dict[tuple[str, ...], Entry] = {}
        for entry in entries:
            parts = entry.path.parts
            if entry.listing:
                listed[parts] = entry  # PurePosixPath('.').parts == (): the root
                continue
            if not parts or entry.path.is_absolute() or ".." in parts:
                raise ValueError(f"line {entry.line}: unusable path {str(entry.path)!r}")
            if parts in files:
                raise ValueError(
                    f"line {entry.line}: path {str(entry.path)!r} repeats line "
                    f"{files[parts].line}"
                )
            files[parts] = entry
        directories: set[tuple[str, ...]] = {parts for parts in listed if parts}
        for parts in [*files, *listed]:
            for end in range(len(parts) - 1, 0, -1):
                prefix = parts[:end]
                if prefix in directories:
                    break
                directories.add(prefix)
        for parts in directories:
            clash = files.get(parts)
            if clash is not None:
                raise ValueError(
                    f"line {clash.line}: path {'/'.join(parts)!r} is both a file and a directory"
                )

        ordered: list[tuple[str, ...]] = [(), *sorted(directories | files.keys())]
        inode_of = {parts: InodeNo(index + 1) for index, parts in enumerate(ordered)}

        def source(parts: tuple[str, ...]) -> DirSource | None:
            entry = listed.get(parts)
            return DirSource(entry.url, entry.line) if entry is not None else None

        nodes: list[Node] = [DirNode(ROOT_INODE, "", ROOT_INODE, source(()))]
        children: dict[InodeNo, dict[str, Node]] = {ROOT_INODE: {}}
        for parts in ordered[1:]:
            inode = inode_of[parts]
            parent = inode_of[parts[:-1]]
            name = parts[-1]
            file_entry = files.get(parts)
            node: Node
            if file_entry is None:
                node = DirNode(inode, name, parent, source(parts))
                children[inode] = {}
            else:
                node = FileNode(inode, name, parent, file_entry)
            nodes.append(node)
            # ordered is sorted and a parent precedes its children: each dict is in name order
            children[parent][name] = node
        return cls(nodes, children, ordered)

    def __len__(self) -> int:
        """The number of nodes, root included."""
        return len(self._nodes)

    def __contains__(self, inode: object) -> bool:
        return isinstance(inode, int) and 1 <= inode <= len(self._nodes)

    @property
    def root(self) -> DirNode:
        """The mount point's node."""
        root = self._nodes[0]
        assert isinstance(root, DirNode)
        return root

    def node(self, inode: InodeNo) -> Node:
        """The node of ``inode``. KeyError if there is none."""
        if not 1 <= inode <= len(self._nodes):
            raise KeyError(inode)
        return self._nodes[inode - 1]

    def find(self, path: str) -> Node | None:
        """The node at ``path`` ('a/b', relative to the root; '' is the root), or None."""
        node: Node = self.root
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if not isinstance(node, DirNode):
                return None
            found = self.lookup(node.inode, part)
            if found is None:
                return None
            node = found
        return node

    def lookup(self, parent: InodeNo, name: str) -> Node | None:
        """The child ``name`` of directory ``parent`` (``.`` and ``..`` included), or None
        if there is none, or if ``parent`` is unknown or not a directory."""
        kids = self._children.get(parent)
        if kids is None:
            return None
        if name == ".":
            return self._nodes[parent - 1]
        if name == "..":
            return self._nodes[self._nodes[parent - 1].parent - 1]
        return kids.get(name)

    def children(self, inode: InodeNo) -> tuple[tuple[str, Node], ...]:
        """The (name, node) pairs in directory ``inode``, sorted by name (no ``.``/``..``).
        KeyError if ``inode`` is unknown, NotADirectoryError if it is a file. The sequence
        is immutable and shared (readdir asks for it once per reply: a directory of 10,000
        entries is not copied each time); a listing that changes the directory makes a new
        one."""
        listed = self._listed.get(inode)
        if listed is not None:
            return listed
        kids = self._children.get(inode)
        if kids is None:
            self.node(inode)  # KeyError if unknown
            raise NotADirectoryError(f"inode {inode} is not a directory")
        listed = self._listed[inode] = tuple(kids.items())
        return listed

    def links(self, inode: InodeNo) -> int:
        """st_nlink of directory ``inode``: 2 + its subdirectories; 1 ("not counted", as
        btrfs and many network file systems say) for a listed directory, whose
        subdirectories change. KeyError / NotADirectoryError as :meth:`children`."""
        links = self._links.get(inode)
        if links is None:
            node = self.node(inode)
            children = self.children(inode)
            if isinstance(node, DirNode) and node.listing is not None:
                links = 1
            else:
                links = 2 + sum(1 for _, child in children if isinstance(child, DirNode))
            self._links[inode] = links
        return links

    def files(self) -> list[FileNode]:
        """Every file in the tree now, in inode order (for the list's own entries, sorted
        path order)."""
        return list(self._files.values())

    def path(self, inode: InodeNo) -> PurePosixPath:
        """The path of ``inode`` relative to the mount point (``.`` for the root)."""
        self.node(inode)
        return PurePosixPath(*self._paths[inode - 1])

    def set_listed(self, inode: InodeNo, listed: Sequence[Listed]) -> Changes:
        """Make ``listed`` the children of the listed directory ``inode`` (the first of
        two equal names wins). A name listed again as the same kind keeps its node (its
        inode, and a subdirectory its children); a file's entry or a subdirectory's source
        that differs gives a new node with the same inode. Removed names leave the tree
        with everything under them. KeyError if ``inode`` is not a listed directory."""
        node = self.node(inode)
        if not isinstance(node, DirNode) or node.listing is None:
            raise KeyError(inode)
        old = self._children[inode]
        new: dict[str, Node] = {}
        added = 0
        replaced: list[tuple[str, Node]] = []
        base = self._paths[inode - 1]
        for name, what in sorted(listed, key=lambda item: item[0]):
            if name in new:
                continue
            before = old.get(name)
            child: Node
            if isinstance(what, Entry):
                if isinstance(before, FileNode):
                    child = before if before.entry == what else \
                        FileNode(before.inode, name, inode, what)
                else:
                    child = FileNode(self._next_inode(), name, inode, what)
            elif isinstance(before, DirNode):
                child = before if before.listing == what else \
                    DirNode(before.inode, name, inode, what)
            else:
                child = DirNode(self._next_inode(), name, inode, what)
            if before is None:
                added += 1
            elif child is not before:
                replaced.append((name, before))
                if child.inode != before.inode:
                    self._forget(before)
            self._store(child, (*base, name))
            new[name] = child
        removed = tuple((name, child) for name, child in old.items() if name not in new)
        for _, child in removed:
            self._forget(child)
        self._children[inode] = new
        self._listed.pop(inode, None)
        self._links.pop(inode, None)
        return Changes(added, removed, tuple(replaced))

    def _next_inode(self) -> InodeNo:
        self._nodes.append(self.root)  # a placeholder, replaced by _store
        self._paths.append(())
        return InodeNo(len(self._nodes))

    def _store(self, node: Node, path: tuple[str, ...]) -> None:
        self._nodes[node.inode - 1] = node
        self._paths[node.inode - 1] = path
        if isinstance(node, FileNode):
            self._files[node.inode] = node
        else:
            self._files.pop(node.inode, None)
            self._children.setdefault(node.inode, {})

    def _forget(self, node: Node) -> None:
        """``node`` and everything under it leave the tree (their inodes still resolve)."""
        pending = [node]
        while pending:
            gone = pending.pop()
            self._files.pop(gone.inode, None)
            if isinstance(gone, DirNode):
                pending.extend(self._children.get(gone.inode, {}).values())

"""The immutable directory tree that the URL list describes.

Every entry is a file; directories are implied by the entries' paths. Inodes are assigned
once, in sorted path order (component by component, by code point), starting with
:data:`ROOT_INODE` for the mount point, so the same set of paths always gives the same
inodes, whatever the order of the list. The tree never changes after
:meth:`Tree.from_entries`, so any task may read it at any time without locking.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
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
class DirNode:
    """A directory. The root is named ``""`` and is its own parent."""

    inode: InodeNo
    name: str
    parent: InodeNo


Node = FileNode | DirNode


class Tree:
    """Files and implied directories, by inode. Build with :meth:`from_entries`."""

    __slots__ = ("_children", "_listed", "_nodes", "_paths")

    def __init__(
        self,
        nodes: tuple[Node, ...],
        children: dict[InodeNo, dict[str, Node]],
        paths: tuple[tuple[str, ...], ...],
    ) -> None:
        # Internal: use from_entries(). nodes[i] has inode i + 1; children maps every
        # DirNode's inode to {name: node} in sorted name order; paths[i] is nodes[i]'s path.
        self._nodes = nodes
        self._children = children
        self._paths = paths
        self._listed: dict[InodeNo, tuple[tuple[str, Node], ...]] = {}  # children(), memoised

    @classmethod
    def from_entries(cls, entries: Iterable[Entry]) -> Tree:
        """Build the tree of ``entries``. ValueError if two entries share a path, a path is
        both a file and a directory, or a path is not relative and clean (the URL list
        rejects all of these first, with line numbers)."""
        files: dict[tuple[str, ...], Entry] = {}
        for entry in entries:
            parts = entry.path.parts
            if not parts or entry.path.is_absolute() or ".." in parts:
                raise ValueError(f"line {entry.line}: unusable path {str(entry.path)!r}")
            if parts in files:
                raise ValueError(
                    f"line {entry.line}: path {str(entry.path)!r} repeats line "
                    f"{files[parts].line}"
                )
            files[parts] = entry
        directories: set[tuple[str, ...]] = set()
        for parts in files:
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
        nodes: list[Node] = [DirNode(ROOT_INODE, "", ROOT_INODE)]
        children: dict[InodeNo, dict[str, Node]] = {ROOT_INODE: {}}
        for parts in ordered[1:]:
            inode = inode_of[parts]
            parent = inode_of[parts[:-1]]
            name = parts[-1]
            file_entry = files.get(parts)
            node: Node
            if file_entry is None:
                node = DirNode(inode, name, parent)
                children[inode] = {}
            else:
                node = FileNode(inode, name, parent, file_entry)
            nodes.append(node)
            # ordered is sorted and a parent precedes its children: each dict is in name order
            children[parent][name] = node
        return cls(tuple(nodes), children, tuple(ordered))

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
        entries is not copied each time)."""
        listed = self._listed.get(inode)
        if listed is not None:
            return listed
        kids = self._children.get(inode)
        if kids is None:
            self.node(inode)  # KeyError if unknown
            raise NotADirectoryError(f"inode {inode} is not a directory")
        listed = self._listed[inode] = tuple(kids.items())
        return listed

    def files(self) -> list[FileNode]:
        """Every file, in inode order (which is sorted path order)."""
        return [node for node in self._nodes if isinstance(node, FileNode)]

    def path(self, inode: InodeNo) -> PurePosixPath:
        """The path of ``inode`` relative to the mount point (``.`` for the root)."""
        self.node(inode)
        return PurePosixPath(*self._paths[inode - 1])

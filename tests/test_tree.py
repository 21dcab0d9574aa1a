from __future__ import annotations

import dataclasses
import random
import re
from pathlib import PurePosixPath

import pytest

from rangefs.tree import ROOT_INODE, DirNode, DirSource, FileNode, InodeNo, Tree
from rangefs.urllist import Entry, parse_url_list

LIST = """\
http://h/1 b/z.bin
http://h/2 a.txt
http://h/3 b/c/d.iso
http://h/4 b/a.bin
http://h/5 e/f/g/h.dat
"""


def entries(text: str = LIST) -> list[Entry]:
    return parse_url_list(text, "list")


def entry(path: str, line: int = 1) -> Entry:
    return Entry(f"http://h/{line}", PurePosixPath(path), None, None, line)


def test_inodes_in_sorted_path_order() -> None:
    tree = Tree.from_entries(entries())
    expected = [
        ".",
        "a.txt",
        "b",
        "b/a.bin",
        "b/c",
        "b/c/d.iso",
        "b/z.bin",
        "e",
        "e/f",
        "e/f/g",
        "e/f/g/h.dat",
    ]
    assert len(tree) == len(expected)
    assert [str(tree.path(InodeNo(i))) for i in range(1, len(tree) + 1)] == expected


def test_root() -> None:
    tree = Tree.from_entries(entries())
    root = tree.node(ROOT_INODE)
    assert root == DirNode(ROOT_INODE, "", ROOT_INODE)
    assert tree.root is root
    assert ROOT_INODE == 1


def test_nodes_and_parents() -> None:
    tree = Tree.from_entries(entries())
    b = tree.lookup(ROOT_INODE, "b")
    assert isinstance(b, DirNode) and b.name == "b" and b.parent == ROOT_INODE
    c = tree.lookup(b.inode, "c")
    assert isinstance(c, DirNode) and c.parent == b.inode
    d = tree.lookup(c.inode, "d.iso")
    assert isinstance(d, FileNode)
    assert d.parent == c.inode and d.name == "d.iso"
    assert d.entry.url == "http://h/3" and d.entry.line == 3
    assert tree.node(d.inode) is d


def test_lookup_missing_and_non_directories() -> None:
    tree = Tree.from_entries(entries())
    assert tree.lookup(ROOT_INODE, "nope") is None
    assert tree.lookup(ROOT_INODE, "b/a.bin") is None  # one component at a time
    assert tree.lookup(ROOT_INODE, "") is None
    a = tree.lookup(ROOT_INODE, "a.txt")
    assert isinstance(a, FileNode)
    assert tree.lookup(a.inode, "x") is None  # a file has no children
    assert tree.lookup(a.inode, ".") is None
    assert tree.lookup(InodeNo(999), "a.txt") is None
    assert tree.lookup(InodeNo(0), "a.txt") is None


def test_lookup_dot_and_dotdot() -> None:
    tree = Tree.from_entries(entries())
    b = tree.lookup(ROOT_INODE, "b")
    assert b is not None
    c = tree.lookup(b.inode, "c")
    assert c is not None
    assert tree.lookup(c.inode, ".") is c
    assert tree.lookup(c.inode, "..") is b
    assert tree.lookup(ROOT_INODE, "..") is tree.root
    assert tree.lookup(ROOT_INODE, ".") is tree.root


def test_children_sorted() -> None:
    tree = Tree.from_entries(entries())
    assert [name for name, _ in tree.children(ROOT_INODE)] == ["a.txt", "b", "e"]
    b = tree.lookup(ROOT_INODE, "b")
    assert b is not None
    kids = tree.children(b.inode)
    assert [name for name, _ in kids] == ["a.bin", "c", "z.bin"]
    assert [type(node) for _, node in kids] == [FileNode, DirNode, FileNode]
    assert isinstance(kids, tuple)  # immutable: shared by every caller
    assert tree.children(b.inode) is kids


def test_children_errors() -> None:
    tree = Tree.from_entries(entries())
    a = tree.lookup(ROOT_INODE, "a.txt")
    assert a is not None
    with pytest.raises(NotADirectoryError):
        tree.children(a.inode)
    with pytest.raises(KeyError):
        tree.children(InodeNo(999))


def test_node_unknown_inode() -> None:
    tree = Tree.from_entries(entries())
    for bad in (0, -1, len(tree) + 1):
        with pytest.raises(KeyError):
            tree.node(InodeNo(bad))
        assert InodeNo(bad) not in tree
    assert InodeNo(len(tree)) in tree


def test_files() -> None:
    tree = Tree.from_entries(entries())
    files = tree.files()
    assert [str(tree.path(f.inode)) for f in files] == [
        "a.txt",
        "b/a.bin",
        "b/c/d.iso",
        "b/z.bin",
        "e/f/g/h.dat",
    ]
    assert all(str(tree.path(f.inode)) == str(f.entry.path) for f in files)
    assert sorted(f.entry.line for f in files) == [1, 2, 3, 4, 5]


def test_deterministic_whatever_the_order() -> None:
    items = entries()
    reference = Tree.from_entries(items)
    shuffled = items[:]
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        tree = Tree.from_entries(shuffled)
        assert [tree.node(InodeNo(i)) for i in range(1, len(tree) + 1)] == [
            reference.node(InodeNo(i)) for i in range(1, len(reference) + 1)
        ]


def test_empty_tree() -> None:
    tree = Tree.from_entries([])
    assert len(tree) == 1
    assert tree.children(ROOT_INODE) == ()
    assert tree.files() == []
    assert tree.path(ROOT_INODE) == PurePosixPath(".")


def test_nodes_are_frozen() -> None:
    tree = Tree.from_entries(entries())
    node = tree.node(InodeNo(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        node.name = "x"  # type: ignore[misc]
    assert not hasattr(node, "__dict__")  # slots


def test_unicode_names_sort_by_code_point() -> None:
    tree = Tree.from_entries([entry("é", 1), entry("z", 2), entry("A", 3), entry("a", 4)])
    assert [name for name, _ in tree.children(ROOT_INODE)] == ["A", "a", "z", "é"]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([entry("a/b", 1), entry("a/b", 2)], "line 2: path 'a/b' repeats line 1"),
        ([entry("a/b", 1), entry("a", 2)], "line 2: path 'a' is both a file and a directory"),
        ([entry("a", 1), entry("a/b/c", 2)], "line 1: path 'a' is both a file and a directory"),
        ([entry("/abs", 1)], "unusable path '/abs'"),
        ([entry("../x", 1)], "unusable path '../x'"),
        ([entry("a/../x", 1)], "unusable path"),
        ([entry(".", 1)], "unusable path '.'"),
    ],
)
def test_conflicts_raise_value_error(items: list[Entry], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Tree.from_entries(items)


def test_large_tree() -> None:
    text = "\n".join(f"http://h/{i} d{i % 50}/s{i % 7}/f{i}" for i in range(20_000))
    tree = Tree.from_entries(entries(text))
    assert len(tree.files()) == 20_000
    assert len(tree) == 1 + 50 + 50 * 7 + 20_000
    d3 = tree.lookup(ROOT_INODE, "d3")
    assert d3 is not None
    s2 = tree.lookup(d3.inode, "s2")
    assert s2 is not None
    f = tree.lookup(s2.inode, "f1003")
    assert isinstance(f, FileNode) and f.entry.line == 1004
    assert tree.lookup(s2.inode, "f1004") is None


# -- listed directories ----------------------------------------------------------------


def _listed_tree() -> Tree:
    return Tree.from_entries([
        Entry(url="http://h/d/", path=PurePosixPath("d"), digest=None, size=None, line=1,
              listing=True),
        entry("f.bin", 2),
    ])


def _file(name: str, size: int | None = None) -> Entry:
    return Entry(url=f"http://h/d/{name}", path=PurePosixPath("d", name), digest=None,
                 size=size, line=1, listed=True)


def test_a_listing_entry_is_a_listed_directory() -> None:
    tree = _listed_tree()
    node = tree.find("d")
    assert isinstance(node, DirNode) and node.listing is not None
    assert node.listing.url == "http://h/d/" and node.listing.line == 1
    assert tree.children(node.inode) == ()  # nothing until listed
    assert tree.links(node.inode) == 1 and tree.links(ROOT_INODE) == 3
    assert [f.name for f in tree.files()] == ["f.bin"]


def test_set_listed_keeps_inodes_and_says_what_changed() -> None:
    tree = _listed_tree()
    d = tree.find("d")
    assert isinstance(d, DirNode)
    sub = DirSource("http://h/d/s/", 1)
    changes = tree.set_listed(d.inode, [("b", _file("b", 1)), ("a", _file("a")), ("s", sub),
                                        ("a", _file("a", 9))])  # a repeated name: first wins
    assert changes.added == 3 and not changes.removed and not changes.replaced
    assert [name for name, _ in tree.children(d.inode)] == ["a", "b", "s"]
    a, b, s = (tree.find(f"d/{n}") for n in "abs")
    assert isinstance(a, FileNode) and a.entry.size is None and a.inode > d.inode
    assert isinstance(s, DirNode) and tree.path(s.inode) == PurePosixPath("d/s")
    s_child = tree.set_listed(s.inode, [("x", _file("s/x"))])
    assert s_child.added == 1
    assert {f.name for f in tree.files()} == {"f.bin", "a", "b", "x"}

    # again: b changed size, a is gone, c is new, s is now a file, t a directory
    changes = tree.set_listed(d.inode, [("b", _file("b", 2)), ("c", _file("c")),
                                        ("s", _file("s")), ("t", DirSource("http://h/d/t/", 1))])
    assert changes.added == 2
    assert [name for name, _ in changes.removed] == ["a"]
    assert sorted(name for name, _ in changes.replaced) == ["b", "s"]
    new_b, new_s = tree.find("d/b"), tree.find("d/s")
    assert isinstance(new_b, FileNode) and new_b.inode == b.inode and new_b.entry.size == 2
    assert isinstance(new_s, FileNode) and new_s.inode != s.inode
    assert {f.name for f in tree.files()} == {"f.bin", "b", "c", "s"}  # x left with s
    assert tree.node(a.inode) == a  # gone from the tree, still resolvable by inode
    assert tree.lookup(d.inode, "a") is None
    with pytest.raises(KeyError):
        tree.set_listed(ROOT_INODE, [])  # not a listed directory


def test_a_listing_at_the_root() -> None:
    tree = Tree.from_entries([Entry(url="http://h/", path=PurePosixPath("."), digest=None,
                                    size=None, line=1, listing=True)])
    assert tree.root.listing is not None and len(tree) == 1
    tree.set_listed(ROOT_INODE, [("x", Entry(url="http://h/x", path=PurePosixPath("x"),
                                             digest=None, size=3, line=1, listed=True))])
    assert tree.find("x") is not None and tree.path(tree.find("x").inode).as_posix() == "x"

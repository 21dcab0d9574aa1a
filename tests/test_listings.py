"""Listed directories (issue 19): a list entry whose URL ends with '/' shows the tree under
it, listed from real servers' HTML indexes (nginx, Apache, lighttpd, python -m http.server,
rclone serve http) when first looked into; sizes from the listing where it gives them (no
HEAD per file); remembered in the cache directory; listed again after --listing-ttl or on
``rangefs refresh``; a directory that cannot be listed fails alone, logged once. Real
mounts through the kernel; every byte read is compared with the served file."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from rangefs.errors import UrlListError
from rangefs.indexes import parse_html_index
from rangefs.urllist import parse_url_list
from tests import content
from tests.indexrig import EXACT_SIZES, KINDS, IndexServer
from tests.mountutil import file_sizes, mounted, run_rangefs, wait_for, write_list

TREE = {
    "a b.bin": 123_457,
    "ü.txt": 2,
    "we&ird<n>.txt": 0,
    "sub/x.txt": 3,
    "sub/deeper/y.bin": 300_001,
    "sub/deeper/z.bin": 65_536,
}


def make_tree(root: Path, files: dict[str, int] = TREE) -> Path:
    """Write ``files`` (path: size) under ``root``, each with its own test content."""
    for name, size in files.items():
        write(root / name, content.content(name, 0, size))
    return root


def write(path: Path, data: bytes) -> None:
    """Write a served file, modified an hour ago: Apache answers ranges of a file modified
    within the last second with the whole file (its validators are weak then)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    old = time.time() - 3600
    os.utime(path, (old, old))


@pytest.fixture
def served(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "www")


# -- the list --------------------------------------------------------------------------


def test_the_list_takes_listed_directories() -> None:
    entries = parse_url_list(
        "http://h/data/\nhttp://h/models/ m\nhttp://h/f.bin f.bin\n", "t")
    assert [(e.listing, str(e.path)) for e in entries] == [
        (True, "data"), (True, "m"), (False, "f.bin")]
    [root] = parse_url_list("http://h/ .\n", "t")
    assert root.listing and str(root.path) == "."
    for text, why in (
        ("http://h/\n", "names a whole server: give a PATH"),
        ("http://h/ .\nhttp://h/x x\n", "must be the list's only entry"),
        ("http://h/d/ d\nhttp://h/x d/x\n", "inside the listing of line 1"),
        ("http://h/x d/x\nhttp://h/d/ d\n", "holds the entry of line 1"),
        ("http://h/d/ d\nhttp://h/e/ d/e\n", "overlaps the listing of line 1"),
        ("http://h/d/ d size=3\n", "takes no options"),
        ("http://h/x d\nhttp://h/d/ d\n", "is a file on line 1"),
    ):
        with pytest.raises(UrlListError, match=why):
            parse_url_list(text, "t")


# -- every server's index --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_servers_index_gives_its_children(kind: str, tmp_path: Path,
                                               served: Path) -> None:
    import urllib.request

    with IndexServer(kind, served, tmp_path / kind) as server:
        for directory, expected in (("", {"a b.bin", "ü.txt", "we&ird<n>.txt", "sub/"}),
                                    ("sub/", {"x.txt", "deeper/"})):
            url = server.url + directory
            with urllib.request.urlopen(url, timeout=10) as answer:
                children = parse_html_index(answer.read().decode(), url)
            assert {c.name + ("/" if c.is_dir else "") for c in children} == expected
            for child in children:
                if child.is_dir:
                    assert child.size is None
                elif kind in EXACT_SIZES:
                    assert child.size == TREE[directory + child.name]
                else:
                    assert child.size is None  # rounded or absent: probed, never guessed


@pytest.mark.parametrize("kind", KINDS)
def test_a_listed_tree_reads_exactly(kind: str, tmp_path: Path, served: Path, mnt: Path,
                                     cache: Path) -> None:
    with IndexServer(kind, served, tmp_path / kind) as server:
        urls = write_list(tmp_path / "l.urls", [f"{server.url} data"])
        with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache):
            assert os.listdir(mnt) == ["data"]
            assert file_sizes(mnt / "data") == TREE
            for name in TREE:
                assert (mnt / "data" / name).read_bytes() == (served / name).read_bytes()
            assert not (mnt / "data" / "missing").exists()
            assert (mnt / "data" / "sub").is_dir()


# -- lazy, no HEAD storm ----------------------------------------------------------------


def test_ls_of_a_big_directory_costs_one_request(tmp_path: Path, mnt: Path,
                                                 cache: Path) -> None:
    files = {f"d/f{i:05d}.bin": i % 97 for i in range(2000)}
    make_tree(tmp_path / "www", {**files, "other/o.bin": 10})
    with IndexServer("nginx", tmp_path / "www", tmp_path / "nginx") as server:
        urls = write_list(tmp_path / "l.urls", [f"{server.url} data"])
        with mounted(urls, mnt, cache_dir=cache):
            assert server.requests() == []  # nothing listed at mount
            listed = subprocess.run(["ls", "-l", str(mnt / "data" / "d")], check=True,
                                    capture_output=True, text=True).stdout
            assert len(listed.splitlines()) == 2001  # "total" + 2000
            sizes = {p.name: p.stat().st_size for p in (mnt / "data" / "d").iterdir()}
            assert sizes == {name[2:]: size for name, size in files.items()}
            assert [ln.split()[:2] for ln in server.requests()] == [
                ["GET", '"/"'], ["GET", '"/d/"']]  # no HEAD, "other/" not listed


def test_files_without_a_listed_size_are_probed_one_by_one(tmp_path: Path, mnt: Path,
                                                           cache: Path) -> None:
    make_tree(tmp_path / "www", {f"f{i}.bin": 100 + i for i in range(50)})
    with IndexServer("python", tmp_path / "www", tmp_path / "py") as server:
        urls = write_list(tmp_path / "l.urls", [f"{server.url} data"])
        with mounted(urls, mnt, cache_dir=cache) as m:
            names = os.listdir(mnt / "data")  # readdir: no probe
            assert len(names) == 50
            assert (mnt / "data" / "f7.bin").stat().st_size == 107
            assert (mnt / "data" / "f7.bin").read_bytes() == content.content("f7.bin", 0, 107)
        log = m.stderr()
    heads = (tmp_path / "py" / "stderr.log").read_text().count('"HEAD ')
    assert heads == 1, log


# -- remembered, refreshed -------------------------------------------------------------


def test_a_remount_uses_the_remembered_listing_without_the_server(
        tmp_path: Path, served: Path, mnt: Path, cache: Path) -> None:
    with IndexServer("nginx", served, tmp_path / "nginx") as server:
        urls = write_list(tmp_path / "l.urls", [f"{server.url} data"])
        with mounted(urls, mnt, cache_dir=cache):
            assert file_sizes(mnt / "data") == TREE
            first = (mnt / "data" / "a b.bin").read_bytes()
    # the server is gone: the listings (and the cached blocks) are remembered
    with mounted(urls, mnt, cache_dir=cache):
        assert file_sizes(mnt / "data") == TREE
        assert (mnt / "data" / "a b.bin").read_bytes() == first == \
            (served / "a b.bin").read_bytes()
    remembered = list((cache / "listings").iterdir())
    assert len(remembered) == 3  # /, /sub/, /sub/deeper/
    assert all(b"127.0.0.1" in p.read_bytes() and p.stat().st_mode & 0o077 == 0
               for p in remembered)


def test_refresh_and_the_ttl_show_what_changed(tmp_path: Path, served: Path, mnt: Path,
                                               cache: Path) -> None:
    with IndexServer("nginx", served, tmp_path / "nginx") as server:
        urls = write_list(tmp_path / "l.urls", [f"{server.url} data"])
        with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache,
                     warnings_ok=True) as m:  # x.txt changed: said once, below
            data = mnt / "data"
            old = (data / "sub" / "x.txt").read_bytes()
            assert old == content.content("sub/x.txt", 0, 3)
            # the server changes: a new file, one removed, one rewritten with another size
            write(served / "new.bin", content.content("new", 0, 70_000))
            (served / "ü.txt").unlink()
            write(served / "sub" / "x.txt", content.content("x2", 0, 50_000))
            assert sorted(os.listdir(data)) == sorted(["a b.bin", "ü.txt", "we&ird<n>.txt",
                                                       "sub"])  # within the TTL
            out = run_rangefs(["refresh", str(data)])
            assert out.returncode == 0, out.stderr
            assert f"{data}: 4 entries (1 new, 1 gone, 0 changed)" in out.stdout
            assert sorted(os.listdir(data)) == ["a b.bin", "new.bin", "sub",
                                                "we&ird<n>.txt"]
            assert not (data / "ü.txt").exists()
            assert (data / "new.bin").read_bytes() == content.content("new", 0, 70_000)
            # sub/ was made stale: listed again when next looked into
            assert (data / "sub" / "x.txt").stat().st_size == 50_000
            assert (data / "sub" / "x.txt").read_bytes() == content.content("x2", 0, 50_000)
        warnings = [ln for ln in m.stderr().splitlines() if " WARNING " in ln]
        assert len(warnings) == 1 and "x.txt: the remote object changed" in warnings[0]
        mnt2 = tmp_path / "mnt2"  # a log of its own
        data = mnt2 / "data"
        with mounted(urls, mnt2, "--listing-ttl", "0.5", cache_dir=cache):
            assert "later.bin" not in os.listdir(data)
            write(served / "later.bin", b"later")
            time.sleep(0.6)  # past the TTL: the next look lists it again
            assert "later.bin" in os.listdir(data)
            assert (data / "later.bin").read_bytes() == b"later"


def test_refresh_says_what_it_cannot_do(tmp_path: Path, served: Path, mnt: Path,
                                        cache: Path) -> None:
    (served.parent / "f.bin").write_bytes(b"f")
    with IndexServer("nginx", served.parent, tmp_path / "nginx") as server:
        urls = write_list(tmp_path / "l.urls", [f"{server.url}www/ data",
                                                f"{server.url}f.bin f.bin"])
        with mounted(urls, mnt, cache_dir=cache, warnings_ok=True):
            out = run_rangefs(["refresh", str(mnt / "f.bin")])
            assert out.returncode == 1
            assert "no listed directory there" in out.stderr
            out = run_rangefs(["refresh", str(mnt)])  # the root: every listing under it
            assert out.returncode == 0 and f"{mnt / 'data'}: 4 entries" in out.stdout
            server.stop()
            out = run_rangefs(["refresh", str(mnt / "data")])
            assert out.returncode == 1
            assert "not listed" in out.stderr and "cannot connect" in out.stderr
            assert len(os.listdir(mnt / "data")) == 4  # it keeps its last listing


# -- errors ----------------------------------------------------------------------------


def test_a_directory_that_cannot_be_listed_fails_alone(tmp_path: Path, served: Path,
                                                       mnt: Path, cache: Path) -> None:
    (served.parent / "plain.txt").write_bytes(b"not an index")
    with IndexServer("nginx", served.parent, tmp_path / "nginx") as server:
        urls = write_list(tmp_path / "l.urls", [
            f"{server.url}www/ good", f"{server.url}missing/ gone",
            f"{server.url}plain.txt/ plain"])
        with mounted(urls, mnt, cache_dir=cache, warnings_ok=True) as m:
            for _ in range(3):
                with pytest.raises(OSError) as failure:
                    os.listdir(mnt / "gone")
                assert failure.value.errno == errno.EIO
            assert file_sizes(mnt / "good") == TREE
        log = m.stderr()
    lines = [ln for ln in log.splitlines() if "cannot list" in ln and "/missing/" in ln]
    assert len(lines) == 1, log  # once per directory
    assert "HTTP 404" in lines[0] and "neither an HTML directory index nor an S3" in lines[0]


def test_the_listing_urls_query_goes_with_every_file(tmp_path: Path, served: Path,
                                                     mnt: Path, cache: Path) -> None:
    with IndexServer("python", served, tmp_path / "py") as server:
        urls = write_list(tmp_path / "l.urls", [f"{server.url}sub/?token=t0k data"])
        with mounted(urls, mnt, cache_dir=cache):
            assert (mnt / "data" / "deeper" / "y.bin").read_bytes() == \
                (served / "sub" / "deeper" / "y.bin").read_bytes()
    log = (tmp_path / "py" / "stderr.log").read_text()
    assert '"GET /sub/?token=t0k ' in log and '"GET /sub/deeper/?token=t0k ' in log
    assert '"HEAD /sub/deeper/y.bin?token=t0k ' in log
    assert "y.bin " not in log.replace("y.bin?token=t0k ", "")  # never without it


def test_prefetch_and_a_recorded_list_reach_into_listed_directories(
        tmp_path: Path, served: Path, mnt: Path, cache: Path) -> None:
    with IndexServer("nginx", served, tmp_path / "nginx") as server:
        urls = write_list(tmp_path / "l.urls", [f"{server.url} data"])
        record = tmp_path / "reads.jsonl"
        with mounted(urls, mnt, "--prefetch", "none", "--record", str(record),
                     cache_dir=cache):
            # nothing listed yet: prefetch lists the tree as it goes, then fills it
            done = run_rangefs(["prefetch", "-q", str(mnt / "data" / "sub")], timeout=120)
            assert done.returncode == 0, done.stderr
            gets = len(server.requests(method="GET"))
            with open(mnt / "data" / "sub" / "deeper" / "y.bin", "rb") as f:
                assert f.read() == (served / "sub" / "deeper" / "y.bin").read_bytes()
            assert len(server.requests(method="GET")) == gets  # all from the cache
        # a new cache, and the recorded list: its ranges come before any read, listed
        # directories included
        other = tmp_path / "cache2"
        mnt2 = tmp_path / "mnt2"
        with mounted(urls, mnt2, "--prefetch", "none", "--prefetch-list", str(record),
                     cache_dir=other):
            wanted = '"/sub/deeper/y.bin"'
            wait_for(lambda: any(wanted in ln and ln.startswith("GET")
                                 for ln in server.requests()), "the recorded range fetched")
            assert (mnt2 / "data" / "sub" / "deeper" / "y.bin").read_bytes() == \
                (served / "sub" / "deeper" / "y.bin").read_bytes()

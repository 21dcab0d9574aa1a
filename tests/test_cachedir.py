"""cachedir.py: cache keys (the plain-URL shortcut gives the general answer) and the
metadata table (round trip, damage, private mode)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rangefs.cachedir import (
    META_NAME,
    CacheDir,
    ObjectMeta,
    UsageTable,
    _general_cache_key,
    cache_key,
    merge_meta_table,
    read_meta_table,
)

_host = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{0,20}", fullmatch=True)
_port = st.one_of(st.just(""), st.integers(0, 70000).map(lambda p: f":{p}"),
                  st.sampled_from([":080", ":0", ":65535", ":65536"]))
_path = st.one_of(st.just(""), st.text(alphabet=st.characters(
    blacklist_categories=("Cs",), blacklist_characters="#?"), max_size=30).map(
        lambda t: "/" + t))
_query = st.one_of(st.just(""), st.sampled_from(
    ["?a=1", "?X-Amz-Signature=s&b=2", "?", "#frag", "?token=t#f"]))


@given(scheme=st.sampled_from(["http", "https", "HTTP", "HttpS"]), host=_host, port=_port,
       path=_path, query=_query, userinfo=st.sampled_from(["", "u:p@", "user@"]))
def test_plain_url_shortcut_matches_the_general_key(scheme: str, host: str, port: str,
                                                     path: str, query: str,
                                                     userinfo: str) -> None:
    url = f"{scheme}://{userinfo}{host}{port}{path}{query}"
    try:
        expected = _general_cache_key(url)
    except ValueError:  # a port out of range: the general parser refuses it, and so must we
        with pytest.raises(ValueError):
            cache_key(url)
        return
    assert cache_key(url) == expected


def test_keys_ignore_credentials_signatures_and_case() -> None:
    base = cache_key("http://example.com:8080/a/b.bin")
    assert cache_key("HTTP://user:pw@EXAMPLE.com:8080/a/b.bin") == base
    assert cache_key("http://example.com:8080/a/b.bin?X-Amz-Signature=1&Expires=2") == base
    assert cache_key("http://example.com:8080/a/B.bin") != base
    assert cache_key("http://example.com:8081/a/b.bin") != base


def _meta(i: int) -> ObjectMeta:
    return ObjectMeta(url=f"http://h/{i}", size=i, etag=f'"{i}"', last_modified=None,
                      mtime=1.5 * i, accept_ranges=True, digest=None)


def test_metadata_table_round_trip_and_mode(tmp_path: Path) -> None:
    cd = CacheDir.open(tmp_path / "c")
    assert cd.load_meta("k1") is None
    cd.save_meta("k1", _meta(1))
    cd.save_meta("k2", _meta(2))
    snapshot = cd.meta_snapshot()
    assert snapshot == {"k1": _meta(1), "k2": _meta(2)}
    merge_meta_table(cd.root, snapshot)  # what the periodic saver does with it
    assert cd.meta_snapshot() is None  # nothing changed since
    cd.save_meta("k2", _meta(2))  # the same again: not a change
    assert cd.meta_snapshot() is None
    cd.save_meta("k3", _meta(3))
    cd.close()  # saves what changed
    path = tmp_path / "c" / META_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = CacheDir.open(tmp_path / "c")
    assert [again.load_meta(k) for k in ("k1", "k2", "k3")] == [_meta(1), _meta(2), _meta(3)]
    again.close()


def test_two_processes_share_a_root_and_keep_each_others_rows(tmp_path: Path) -> None:
    """Mounts may share a cache directory: both open it, and each merges only the rows it
    changed into metadata.json (a row the other wrote meanwhile is kept)."""
    first = CacheDir.open(tmp_path / "c")
    second = CacheDir.open(tmp_path / "c")  # a shared lock: no CacheLocked
    try:
        assert first.load_meta("a") is None and second.load_meta("b") is None  # both loaded
        first.save_meta("a", _meta(1))
        second.save_meta("b", _meta(2))
        first.close()
        second.close()  # its table never saw "a": "a" is kept all the same
        table = read_meta_table(tmp_path / "c")
        assert table == {"a": _meta(1), "b": _meta(2)}
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"version": 2, "objects": {}}',
                                     b'{"version": 1, "objects": {"k": {"size": 1}}}',
                                     b'{"version": 1, "objects": {"k": ["u", 1]}}',
                                     json.dumps({"version": 1, "objects": []}).encode()])
def test_a_damaged_table_is_ignored(tmp_path: Path, content: bytes,
                                    caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / META_NAME).write_bytes(content)
    assert read_meta_table(tmp_path) == {}
    assert "unreadable" in caplog.text


def test_usage_table_keeps_least_recently_used_first_and_the_total() -> None:
    table = UsageTable([(10.0, 100, "a"), (20.0, 200, "b"), (30.0, 300, "c")])
    assert table.oldest_first() == ["a", "b", "c"] and table.total == 600
    table.touch("a")
    assert table.oldest_first() == ["b", "c", "a"]
    table.set("b", 250)  # a new size is also a use
    assert table.oldest_first() == ["c", "a", "b"] and table.total == 650
    table.set("d", 50)
    assert table.pop("c") == 300 and table.pop("c") == 0
    table.touch("missing")
    assert table.oldest_first() == ["a", "b", "d"] and table.total == 400
    assert table.bytes_of("b") == 250 and table.bytes_of("c") == 0


def test_usage_scan_counts_blocks_on_disk_oldest_first(tmp_path: Path) -> None:
    cachedir = CacheDir.open(tmp_path / "root")
    try:
        for key, nbytes, used in (("new", 3 << 20, 2_000_000_000), ("old", 1 << 20, 1_000_000)):
            directory = cachedir.object_dir(key)
            directory.mkdir()
            with open(directory / "data", "wb") as f:
                os.posix_fallocate(f.fileno(), 0, nbytes)
            (directory / "index").write_bytes(b"x")
            os.utime(directory, (used, used))
        scanned = cachedir.usage()
        assert [key for _, _, key in scanned] == ["old", "new"]
        for _, nbytes, key in scanned:
            assert nbytes == cachedir.object_bytes(key)
            assert nbytes >= (1 << 20 if key == "old" else 3 << 20)
            assert nbytes < (1 << 20 if key == "old" else 3 << 20) + (64 << 10)
        assert cachedir.object_bytes("absent") == 0
    finally:
        cachedir.close()

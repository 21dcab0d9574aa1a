"""cachedir.py: cache keys (the plain-URL shortcut gives the general answer) and the
metadata table (round trip, damage, private mode)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rangefs.cachedir import (
    META_NAME,
    CacheDir,
    ObjectMeta,
    _general_cache_key,
    cache_key,
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


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"version": 2, "objects": {}}',
                                     b'{"version": 1, "objects": {"k": {"size": 1}}}',
                                     b'{"version": 1, "objects": {"k": ["u", 1]}}',
                                     json.dumps({"version": 1, "objects": []}).encode()])
def test_a_damaged_table_is_ignored(tmp_path: Path, content: bytes,
                                    caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / META_NAME).write_bytes(content)
    assert read_meta_table(tmp_path) == {}
    assert "unreadable" in caplog.text

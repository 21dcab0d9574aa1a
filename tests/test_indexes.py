"""The parsers of directory listings (``rangefs.indexes``) on hostile and odd input: what
is a child and what is not, which sizes are believed, S3 pages. The real servers' own
pages are parsed in tests/test_listings.py."""

from __future__ import annotations

import pytest

from rangefs.indexes import (
    is_bucket_listing,
    parse_html_index,
    parse_s3_page,
    s3_list_query,
    usable_name,
)

BASE = "http://h:8080/data/"


def names(body: str, base: str = BASE) -> list[str]:
    return [c.name + ("/" if c.is_dir else "") for c in parse_html_index(body, base)]


def test_only_links_one_segment_below_are_children() -> None:
    body = "".join(f'<a href="{href}">x</a>' for href in (
        "a.bin", "./b.bin", "/data/c.bin", "http://h:8080/data/d.bin", "sub/",
        "?C=N;O=D", "#top", "../", "/", "/other/e.bin", "http://evil/data/f.bin",
        "https://h:8080/data/g.bin", "deep/er.bin", "h.bin?x=1", "%2e%2e/", "j%2Fk",
        "a.bin", "", "mailto:x@y", "javascript:alert(1)",
    ))
    assert names(body) == ["a.bin", "b.bin", "c.bin", "d.bin", "sub/"]


def test_names_are_decoded_and_checked() -> None:
    body = ('<a href="%C3%BC%20x.txt">u</a><a href=caf%c3%a9>unquoted</a>'
            "<a href='q&amp;a.txt'>entity</a><a href=\"bad%00.txt\">nul</a>"
            '<a href="%ff.bin">not utf-8</a><a href="' + "n" * 256 + '">long</a>')
    children = parse_html_index(body, BASE)
    assert [(c.name, c.segment) for c in children] == [
        ("ü x.txt", "%C3%BC%20x.txt"), ("café", "caf%c3%a9"), ("q&a.txt", "q&a.txt")]


def test_sizes_only_where_the_server_prints_bytes() -> None:
    nginx = ('<pre><a href="../">../</a>\n'
             '<a href="d/">d/</a>                    06-Dec-2026 19:56                   -\n'
             '<a href="f.bin">f.bin</a>              06-Dec-2026 19:56              123457\n'
             '<a href="g.bin">g.bin</a>              06-Dec-2026 19:56                1.2M\n'
             "</pre>")
    got = {c.name: (c.size, c.mtime) for c in parse_html_index(nginx, BASE)}
    assert got == {"d": (None, None), "f.bin": (123457, 1796586960.0), "g.bin": (None, None)}
    apache = ('<tr><td><a href="f.bin">f.bin</a></td><td align="right">2026-12-06 19:56 '
              '</td><td align="right">345 </td></tr>')
    assert [c.size for c in parse_html_index(apache, BASE)] == [None]  # rounded elsewhere
    rclone = ('<tr><td><a href="f.bin">f.bin</a></td><td data-order="7"><size>7</size></td>'
              '<td><time datetime="2026-12-06 19:56:53.5 +0000 UTC">x</time></td></tr>')
    [child] = parse_html_index(rclone, BASE)
    assert (child.size, child.mtime) == (7, 1796586960.0 + 53.5)


def test_usable_names() -> None:
    assert usable_name("a b") and usable_name("ü")
    for bad in ("", ".", "..", "a/b", "a\x00", "a\nb", "\x7f", "x" * 256):
        assert not usable_name(bad)


S3 = """<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>p/</Prefix><KeyCount>4</KeyCount>
  <IsTruncated>{truncated}</IsTruncated>{token}
  <Contents><Key>p/</Key><Size>0</Size></Contents>
  <Contents><Key>p/a b.bin</Key><LastModified>2026-12-06T19:56:53.000Z</LastModified>
    <ETag>"x"</ETag><Size>123</Size></Contents>
  <Contents><Key>p/bad\u0001.bin</Key><Size>1</Size></Contents>
  <Contents><Key>elsewhere</Key><Size>1</Size></Contents>
  <CommonPrefixes><Prefix>p/sub/</Prefix></CommonPrefixes>
</ListBucketResult>"""


def test_an_s3_page() -> None:
    page = parse_s3_page(S3.format(truncated="true",
                                   token="<NextContinuationToken>t/1+=</NextContinuationToken>")
                         .replace("\u0001", "&#x263A;").encode(), "p/")
    assert [(c.name, c.segment, c.is_dir, c.size) for c in page.children] == [
        ("a b.bin", "a%20b.bin", False, 123), ("bad\u263a.bin", "bad%E2%98%BA.bin", False, 1),
        ("sub", "sub/", True, None)]
    assert page.children[0].mtime == 1796586960.0 + 53
    assert page.next_token == "t/1+="
    last = parse_s3_page(S3.format(truncated="false", token="").replace("\u0001", "").encode(),
                         "p/")
    assert last.next_token is None
    with pytest.raises(ValueError, match="without a NextContinuationToken"):
        parse_s3_page(S3.format(truncated="true", token="").replace("\u0001", "").encode(),
                      "p/")
    for bad in (b"<html></html>", b"not xml", b"<Error><Code>NoSuchKey</Code></Error>"):
        with pytest.raises(ValueError):
            parse_s3_page(bad, "")


def test_recognising_and_asking_for_bucket_listings() -> None:
    assert is_bucket_listing(b'<?xml version="1.0"?>\n<ListBucketResult xmlns="x">')
    assert is_bucket_listing(b"  <ListBucketResult>")
    assert not is_bucket_listing(b"<!DOCTYPE html><html>ListBucketResult")
    assert not is_bucket_listing(b'<?xml version="1.0"?><Error><Code>NoSuchKey</Code>')
    assert s3_list_query("a b/", None) == "list-type=2&delimiter=%2F&prefix=a%20b%2F"
    assert s3_list_query("", "t/1+=").endswith("&continuation-token=t%2F1%2B%3D")

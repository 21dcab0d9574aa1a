from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rangefs.digests import Digest
from rangefs.errors import UrlListError, UsageError
from rangefs.urllist import (
    MAX_LINE_BYTES,
    Entry,
    parse_url_list,
    read_url_list,
    redact_url,
)

HEX256 = hashlib.sha256(b"x").hexdigest()
HEX512 = hashlib.sha512(b"x").hexdigest()
SRC = "list.txt"


def parse(text: str) -> list[Entry]:
    return parse_url_list(text, SRC)


def error(text: str) -> UrlListError:
    with pytest.raises(UrlListError) as info:
        parse(text)
    assert info.value.source == SRC
    assert str(info.value) == f"{SRC}:{info.value.line}: {info.value.reason}"
    return info.value


# --- well-formed lists ----------------------------------------------------------------


def test_basic_entries() -> None:
    text = (
        "# a comment\n"
        "\n"
        "https://example.com/data/big.iso\n"
        "   # indented comment\n"
        "http://example.com/x?y=1  sub/dir/renamed.bin  sha256:" + HEX256 + " size=1234\n"
        "\t \n"
        "https://example.com/z.tar\tother/z.tar\tsize=0\n"
    )
    entries = parse(text)
    assert entries == [
        Entry("https://example.com/data/big.iso", PurePosixPath("big.iso"), None, None, 3),
        Entry(
            "http://example.com/x?y=1",
            PurePosixPath("sub/dir/renamed.bin"),
            Digest("sha256", bytes.fromhex(HEX256)),
            1234,
            5,
        ),
        Entry("https://example.com/z.tar", PurePosixPath("other/z.tar"), None, 0, 7),
    ]


def test_empty_and_comment_only_lists() -> None:
    assert parse("") == []
    assert parse("\n\n# nothing\n   \n") == []


def test_crlf_and_bom() -> None:
    entries = parse("\ufeff# c\r\nhttp://h/a\r\nhttp://h/b  b2  size=5\r\n")
    assert [(str(e.path), e.size, e.line) for e in entries] == [("a", None, 2), ("b2", 5, 3)]


def test_options_without_path_use_default_name() -> None:
    (entry,) = parse(f"http://h/dir/file.bin size=10 SHA256:{HEX256.upper()}")
    assert entry.path == PurePosixPath("file.bin")
    assert entry.size == 10
    assert entry.digest == Digest("sha256", bytes.fromhex(HEX256))


@pytest.mark.parametrize(
    ("token", "algorithm"),
    [
        (f"sha256:{HEX256}", "sha256"),
        (f"sha512:{HEX512}", "sha512"),
        (f"sha1:{hashlib.sha1(b'x').hexdigest()}", "sha1"),
        (f"md5:{hashlib.md5(b'x').hexdigest()}", "md5"),
        (f"sha-256=:{Digest('sha256', bytes.fromhex(HEX256)).base64}:", "sha256"),
        (f"sha256:{Digest('sha256', bytes.fromhex(HEX256)).base64}", "sha256"),
    ],
)
def test_digest_forms(token: str, algorithm: str) -> None:
    (entry,) = parse(f"http://h/a a {token}")
    assert entry.digest is not None and entry.digest.algorithm == algorithm


def test_default_path_is_percent_decoded() -> None:
    (entry,) = parse("http://h/dir/My%20File%E2%82%AC.iso?sig=abc#frag")
    assert entry.path == PurePosixPath("My File€.iso")


def test_explicit_path_is_literal_and_unicode() -> None:
    (entry,) = parse("http://h/a  données/%20x/é.bin")
    assert entry.path == PurePosixPath("données/%20x/é.bin")


def test_url_kept_as_given_but_repr_redacted() -> None:
    url = "https://alice:s3cret@h.example/a.bin?X-Amz-Signature=deadbeef&x=1"
    (entry,) = parse(url)
    assert entry.url == url
    text = repr(entry)
    assert "s3cret" not in text and "deadbeef" not in text and "alice" not in text
    assert "a.bin" in text


def test_upper_case_scheme_and_port() -> None:
    (entry,) = parse("HTTPS://h.example:8443/a.bin")
    assert entry.path == PurePosixPath("a.bin")


def test_directories_shared_by_many_files() -> None:
    entries = parse("http://h/1 a/b/c/1\nhttp://h/2 a/b/2\nhttp://h/3 a/3\nhttp://h/4 4\n")
    assert [str(e.path) for e in entries] == ["a/b/c/1", "a/b/2", "a/3", "4"]


# --- rejected lists -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://h/a", "unsupported URL scheme 'ftp://'"),
        ("file:///etc/passwd", "unsupported URL scheme 'file://'"),
        ("h.example/a.bin", "unsupported URL scheme 'none'"),
        ("mailto:x@h", "unsupported URL scheme"),
        ("http:///a.bin", "has no host"),
        ("http:/a.bin", "has no host"),
        ("http://u@/a.bin", "has no host"),
        ("http://h:99999/a.bin", "invalid port"),
        ("http://h:0/a.bin", "invalid port"),
        ("http://[::1/a.bin", "malformed URL"),
    ],
)
def test_bad_urls(url: str, reason: str) -> None:
    exc = error(f"# header\n{url} a.bin\n")
    assert exc.line == 2
    assert reason in exc.reason


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://h", "no file name at the end; give a PATH"),
        ("http://h/a%2Fb/", "with '/'; give a PATH"),  # a listing's default name, too
        ("http://h/a/%2F", "with '/'; give a PATH"),
        ("http://h/a%2Fb", "with '/'; give a PATH"),
        ("http://h/a%00b", "control character; give a PATH"),
        ("http://h/a%0Ab", "control character; give a PATH"),
        ("http://h/x/..", "is '..'; give a PATH"),
        ("http://h/x/%2e%2E", "is '..'; give a PATH"),
        ("http://h/x/.", "is '.'; give a PATH"),
        ("http://h/%ff.bin", "not UTF-8 once percent-decoded; give a PATH"),
    ],
)
def test_unusable_default_path(url: str, reason: str) -> None:
    exc = error(url)
    assert exc.line == 1
    assert reason in exc.reason
    parse(f"{url} explicit.bin")  # an explicit PATH fixes it


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/abs/a", "absolute PATH"),
        ("https://other.example/b", "looks like a URL: give one URL per line"),
        ("a//b", "empty component"),
        ("dir/", "ends with '/'"),
        (".", "'.' component"),
        ("..", "'..' component"),
        ("a/./b", "'.' component"),
        ("a/../b", "'..' component"),
        ("../escape", "'..' component"),
        ("x" * 256, "longer than 255 bytes"),
        ("d/" + "é" * 128, "longer than 255 bytes"),
    ],
)
def test_bad_paths(path: str, reason: str) -> None:
    exc = error(f"http://h/a {path}")
    assert reason in exc.reason


def test_longest_name_accepted() -> None:
    parse("http://h/a " + "x" * 255)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("http://h/a\x00b", "U+0000"),
        ("http://h/a a\x01b", "U+0001"),
        ("http://h/a a\rb", "U+000D"),
        ("http://h/a a\x0bb", "U+000B"),
        ("http://h/a a\x1fb", "U+001F"),
        ("http://h/a a\x7fb", "U+007F"),
        ("http://h/a a\x85b", "U+0085"),
        ("http://h/a a\ud800b", "U+D800"),
        ("http://h/a a.bin\x0c", "U+000C"),
    ],
)
def test_control_characters(text: str, code: str) -> None:
    exc = error(f"\n{text}\n")
    assert exc.line == 2
    assert code in exc.reason


def test_duplicate_path_names_earlier_line() -> None:
    exc = error("http://h/a/x.bin\n# c\nhttp://other/b/x.bin\n")
    assert exc.line == 3
    assert "duplicate PATH 'x.bin'" in exc.reason and "line 1" in exc.reason


def test_file_then_directory_names_both_lines() -> None:
    exc = error("http://h/1 a/b\nhttp://h/2 c\nhttp://h/3 a/b/c\n")
    assert exc.line == 3
    assert "'a/b'" in exc.reason and "line 1" in exc.reason


def test_directory_then_file_names_both_lines() -> None:
    exc = error("http://h/1 a/b/c\nhttp://h/2 x\nhttp://h/3 a/b\n")
    assert exc.line == 3
    assert "'a/b'" in exc.reason and "line 1" in exc.reason


def test_deep_directory_clash() -> None:
    exc = error("http://h/1 a\nhttp://h/2 z/y\nhttp://h/3 a/b/c/d\n")
    assert exc.line == 3 and "'a'" in exc.reason and "line 1" in exc.reason


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ("sha256:abcd", "malformed digest"),
        (f"sha256:{HEX256[:-1]}g", "malformed digest"),
        (f"sha512:{HEX256}", "malformed digest"),
        ("md5:", "malformed digest"),
        ("sha-256=:abc", "malformed digest"),
        (f"sha256:{HEX256} sha256:{HEX256}", "more than one digest"),
        (f"sha256:{HEX256} sha512:{HEX512}", "more than one digest"),
        ("size=", "malformed size"),
        ("size=abc", "malformed size"),
        ("size=-1", "malformed size"),
        ("size=1_000", "malformed size"),
        ("size=+5", "malformed size"),
        ("size=١٢", "malformed size"),
        ("size=1 size=1", "size given twice"),
        (f"size={1 << 63}", "too large"),
        ("crc32:abcd", "unknown token 'crc32:abcd'"),
        ("extra", "unknown token 'extra'"),
        ("size=1 other/path", "unknown token 'other/path'"),
    ],
)
def test_bad_options(options: str, reason: str) -> None:
    exc = error(f"http://h/a a/b {options}")
    assert reason in exc.reason


def test_option_in_path_position_is_an_option() -> None:
    exc = error("http://h/a sha256:zz")
    assert "malformed digest" in exc.reason


def test_line_length_limit() -> None:
    prefix = "http://h/a.bin?q="
    ok = prefix + "x" * (MAX_LINE_BYTES - len(prefix))
    assert len(parse(ok + "\r\n")) == 1  # the line ending does not count
    exc = error("\n" + ok + "x")
    assert exc.line == 2 and "longer than" in exc.reason
    # bytes, not characters
    multibyte = prefix + "é" * ((MAX_LINE_BYTES - len(prefix)) // 2 + 1)
    assert "longer than" in error(multibyte).reason
    # a comment is a line too
    assert "longer than" in error("#" * (MAX_LINE_BYTES + 1)).reason


def test_errors_never_show_credentials() -> None:
    secret_lines = [
        "ftp://alice:pw-SECRET@h/a.bin?sig=TOKEN-SECRET",
        "http://alice:pw-SECRET@h:99999/a.bin?sig=TOKEN-SECRET",
        "http://alice:pw-SECRET@h/?sig=TOKEN-SECRET",  # a listing of a whole server
        "http://alice:pw-SECRET@h/dir/?sig=TOKEN-SECRET d size=1",  # a listing's option
        "http://alice:pw-SECRET@[::1/a.bin?sig=TOKEN-SECRET",
        "http://alice:pw-SECRET@h/%2e%2e?sig=TOKEN-SECRET",
        "http://h/a http://alice:pw-SECRET@h/b?sig=TOKEN-SECRET",  # two URLs on one line
        "http://h/a a size=1 http://alice:pw-SECRET@h/b?sig=TOKEN-SECRET",
    ]
    for line in secret_lines:
        exc = error(line)
        assert "SECRET" not in str(exc), str(exc)
        assert "alice" not in str(exc), str(exc)


# --- redact_url -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://h.example/a.bin", "https://h.example/a.bin"),
        ("https://u:p@h.example:8443/a.bin", "https://h.example:8443/a.bin"),
        ("https://u:p@w@h.example/a", "https://h.example/a"),
        (
            "https://h/a?X-Amz-Signature=abc&b=&c",
            "https://h/a?X-Amz-Signature=REDACTED&b=REDACTED&REDACTED",
        ),
        ("https://h/a?token", "https://h/a?REDACTED"),
        ("https://h/a#access_token=xyz", "https://h/a"),
        ("http://u:p@[::1/a?k=v", "http://[::1/a?REDACTED"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@settings(max_examples=40, deadline=None)
@given(
    user=st.text(alphabet="abcdefghijklmnop:%", min_size=0, max_size=10),
    secret=st.text(alphabet="ABCDEFGHIJ0123456789-._~%:!$'()*+,;", min_size=1, max_size=20),
    key=st.text(alphabet="abcdefgh", min_size=1, max_size=5),
)
def test_redact_url_never_leaks(user: str, secret: str, key: str) -> None:
    marker = "Zq" + secret
    for url in (
        f"https://{user}{marker}@h.example/p?{key}={marker}",
        f"https://h.example/p?{key}={marker}&{marker}",
        f"http://{user}{marker}@[::1/p?{key}={marker}",
    ):
        assert marker not in redact_url(url)


# --- read_url_list --------------------------------------------------------------------


def test_read_file(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_bytes(b"\xef\xbb\xbfhttp://h/a\r\nhttp://h/b dir/caf\xc3\xa9\r\n")
    entries = read_url_list(str(path))
    assert [str(e.path) for e in entries] == ["a", "dir/café"]


def test_read_file_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_bytes(b"\xef\xbb\xbfhttp://h/a\nhttp://h/b\nhttp://h/c caf\xe9\n")
    with pytest.raises(UrlListError) as info:
        read_url_list(str(path))
    assert info.value.line == 3
    assert info.value.source == str(path)
    assert "UTF-8" in info.value.reason and "0xe9" in info.value.reason


def test_read_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "urls.txt"
    path.write_bytes(b"http://h/a\ngopher://h/b\n")
    with pytest.raises(UrlListError, match=r"urls\.txt:2: unsupported URL scheme"):
        read_url_list(str(path))


@pytest.mark.parametrize("kind", ["missing", "directory", "unreadable"])
def test_read_unreadable_is_usage_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "urls.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "unreadable":
        path.mkdir()
        path = path / "nested-under-a-dir" / "x"
    with pytest.raises(UsageError) as info:
        read_url_list(str(path))
    assert not isinstance(info.value, UrlListError)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and message.startswith("cannot read URL list")


def test_read_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"\xef\xbb\xbfhttp://h/a\r\n# c\r\nhttp://h/b  x/y\r\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    entries = read_url_list("-")
    assert [(str(e.path), e.line) for e in entries] == [("a", 1), ("x/y", 3)]


def test_read_stdin_errors_name_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"http://h/a\n\xff\n")))
    with pytest.raises(UrlListError) as info:
        read_url_list("-")
    assert str(info.value).startswith("<stdin>:2: ")


def test_read_closed_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(UsageError, match="standard input"):
        read_url_list("-")


# --- scale ----------------------------------------------------------------------------


def test_100k_entries_parse(tmp_path: Path) -> None:
    lines = [
        f"https://cdn.example.com/bucket/obj{i}.bin?sig=abc d{i % 100}/e{i % 7}/f{i}.bin "
        f"sha256:{HEX256} size={i}"
        for i in range(100_000)
    ]
    path = tmp_path / "big.txt"
    path.write_text("\n".join(lines) + "\n")
    entries = read_url_list(str(path))
    assert len(entries) == 100_000
    assert entries[-1].path == PurePosixPath("d99/e4/f99999.bin") and entries[-1].size == 99_999
    assert entries[-1].digest == Digest("sha256", bytes.fromhex(HEX256))

"""Bad input at the command line (issue 5, "Bad input"), as a user meets it.

Every malformation of a URL list (DESIGN.md §5) ends ``rangefs mount`` with ONE line
``rangefs: FILE:LINE: reason`` on stderr and exit code 2, before anything is mounted
(checked in /proc/self/mountinfo) or created (the cache directory does not appear). Bad
option values are click errors (exit 2), for ``mount``, ``download`` and ``cat``.

tests/test_urllist.py proves each parser rule in-process; here a few representative cases
of each rule go through the real command, plus what only the command can show: bytes that
are not UTF-8, CRLF and BOM, 100k-entry lists, standard input, and the option values.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mountutil import (
    child_env,
    is_mounted,
    mounted,
    rangefs_argv,
    unmount,
    write_list,
)

HEX64 = "ab" * 32


@dataclass
class Run:
    """One ``rangefs`` invocation of this module, in its own directory ``dir``."""

    dir: Path
    args: list[str]
    stdin: bytes | None = None
    env: dict[str, str] | None = None
    result: subprocess.CompletedProcess[bytes] | None = None

    @property
    def mnt(self) -> Path:
        return self.dir / "mnt"

    @property
    def cache(self) -> Path:
        return self.dir / "cache"

    @property
    def cwd(self) -> Path:
        return self.dir / "cwd"

    def done(self) -> subprocess.CompletedProcess[bytes]:
        assert self.result is not None
        return self.result


def one_line_error(stderr: bytes) -> str:
    """The single line of ``stderr``, which must be printable text (no control character
    of the input may reach the terminal)."""
    text = stderr.decode("utf-8")
    lines = text.splitlines()
    assert len(lines) == 1 and text.endswith("\n"), text
    assert lines[0].isprintable(), repr(lines[0])
    assert "Traceback" not in text
    return lines[0]


def assert_nothing_happened(mnt: Path, cache: Path) -> None:
    assert not is_mounted(mnt), "a rejected list must mount nothing"
    assert list(mnt.iterdir()) == []
    assert not cache.exists(), "a rejected list must create no cache directory"


# -- every malformation of DESIGN.md §5, through `rangefs mount` ---------------------------


BAD_LISTS: list[tuple[str, list[str] | bytes, int, str]] = [
    # other schemes, and URLs that are not http(s) URLs at all
    ("file-scheme", ["http://h/a a", "file:///etc/passwd"], 2, "unsupported url scheme"),
    ("s3-scheme", ["s3://bucket/key k"], 1, "unsupported url scheme"),
    ("no-scheme", ["# list", "h/a.bin"], 2, "unsupported url scheme"),
    ("no-host", ["http:///a.bin a"], 1, "no host"),
    ("bom-mid-file", ["http://h/a a", "\ufeffhttp://h/b b"], 2, "unsupported url scheme"),
    # empty, '.' and '..' components, explicit or from the URL
    ("empty-component", ["http://h/a a//b"], 1, "empty component"),
    ("dot-component", ["http://h/a ./a"], 1, "'.' component"),
    ("dotdot-component", ["http://h/a x/../../y"], 1, "'..' component"),
    ("dotdot-default-name", ["http://h/%2e%2E"], 1, "'..'; give a path"),
    ("slash-in-default-name", ["http://h/a%2F..%2F..%2Fetc%2Fpasswd"], 1, "'/'"),
    # absolute PATHs
    ("absolute", ["http://h/a a", "", "http://h/b /etc/passwd"], 3, "absolute path"),
    # NUL and control characters, C0 and C1, literal or percent-encoded in the name
    ("nul", ["http://h/a a\x00b"], 1, "U+0000"),
    ("escape", ["http://h/a a\x1b[2Jb"], 1, "U+001B"),
    ("cr-mid-line", ["http://h/a a\rb"], 1, "U+000D"),
    ("del", ["http://h/a a\x7f"], 1, "U+007F"),
    ("c1-nel", ["http://h/a a\u0085b"], 1, "U+0085"),
    ("encoded-newline", ["http://h/a%0Aevil"], 1, "control character"),
    # two entries with one PATH; a PATH that is a file and a directory
    ("duplicate-default", ["http://h/x/a.bin", "http://g/y/a.bin"], 2, "first on line 1"),
    ("duplicate-explicit", ["http://h/1 d/f", "# c", "http://h/2 d/f"], 3, "duplicate path"),
    ("file-then-dir", ["http://h/1 d", "http://h/2 d/e/f"], 2, "line 1"),
    ("dir-then-file", ["http://h/1 d/e/f", "http://h/2 d/e"], 2, "line 1"),
    # malformed digests and options
    ("short-digest", [f"http://h/a a sha256:{HEX64[:-1]}"], 1, "malformed digest"),
    ("not-hex-digest", ["http://h/a a sha512:nothex"], 1, "malformed digest"),
    ("two-digests", [f"http://h/a a sha256:{HEX64} sha256:{HEX64}"], 1, "more than one"),
    ("bad-size", ["http://h/a a size=1e3"], 1, "malformed size"),
    ("unknown-token", ["http://h/a a colour=red"], 1, "unknown token"),
    # very long lines
    ("long-line", ["http://h/a a", "http://h/b?q=" + "x" * 70_000], 2, "longer than 65536"),
    ("long-name", ["http://h/a " + "n" * 256], 1, "longer than 255"),
    # bytes that are not UTF-8
    ("invalid-utf8", b"http://h/a a\n\nhttp://h/b b\xff\n", 3, "not valid utf-8 (byte 0xff)"),
    ("overlong-slash", b"http://h/a a\xc0\xafb\n", 1, "not valid utf-8"),
    ("surrogate", b"http://h/a a\xed\xa0\x80\n", 1, "not valid utf-8"),
    ("utf-16", "http://h/a a\n".encode("utf-16"), 1, "not valid utf-8"),
]



GOOD_URL = "http://127.0.0.1:9/a"


def _header_file(directory: Path, kind: str) -> str:
    """A --header-file argument that cannot be used."""
    if kind == "missing":
        return str(directory / "no-such-file")
    if kind == "directory":
        return str(directory)
    if kind == "under-a-file":
        (directory / "plain").write_text("x")
        return str(directory / "plain" / "headers")
    path = directory / f"headers-{kind}"
    if kind == "not-utf8":
        path.write_bytes(b"X-Token: SECRETVALUE\xff\n")
    elif kind == "bad-line":
        path.write_text("X-Ok: 1\nAuthorization Bearer SECRETVALUE\n")
    elif kind == "bad-value":
        path.write_text("Authorization: Bearer SECRETVALUE\x01\n")
    else:
        assert kind == "forbidden", kind
        path.write_text("Range: bytes=0-SECRETVALUE\n")
    return str(path)


MOUNT_OPTIONS: list[tuple[list[str], str]] = [
    (["--cache-size", "-1"], "--cache-size"),
    (["--cache-size", "1.5"], "whole number"),
    (["--cache-size", "1" + "0" * 400], "--cache-size"),  # once an OverflowError traceback
    (["--cache-size", "99999999P"], "too large"),
    (["--max-rate", "-10M"], "--max-rate"),
    (["--block-size", "-4096"], "--block-size"),
    (["--block-size", "48K"], "power of two"),
    (["--block-size", "1G"], "above the maximum"),
    (["--block-size", "1K"], "below the minimum"),
    (["--concurrency", "1025"], "--concurrency"),
    (["--prefetch", "sometimes"], "--prefetch"),
    (["--read-timeout", "-1"], "--read-timeout"),
    (["--read-timeout", "nan"], "--read-timeout"),  # NaN passed FloatRange once
    (["--header", "Range: bytes=0-1"], "set by rangefs"),
    (["--header", "Transfer-Encoding: chunked"], "set by rangefs"),
    (["--header", "If-None-Match: *"], "set by rangefs"),
    (["--header", "Bad Name: SECRETVALUE"], "--header"),
    (["--header", "X-Token: SECRETVALUE\r\nX-Injected: 1"], "line break"),
    (["--header", "X-Token: caf\u00e9-SECRETVALUE"], "non-ASCII"),  # once a BUG traceback
    (["--header", "X-Token: SECRET\x01VALUE"], "control"),
    (["--log-file", "/nonexistent/dir/log"], "cannot open log file"),
    (["--cacert", "/nonexistent/ca.pem"], "--cacert /nonexistent/ca.pem: no such file"),
    (["--cacert", "/etc/hostname"], "not a PEM file of CA certificates"),
    (["--cache-min-free", "100%"], "--cache-min-free"),
    (["--cache-min-free", "lots"], "--cache-min-free"),
]

HEADER_FILES: list[tuple[str, str]] = [
    ("option", "missing"), ("option", "directory"), ("option", "under-a-file"),
    ("option", "not-utf8"), ("option", "bad-line"), ("option", "bad-value"),
    ("option", "forbidden"),
    ("environment", "missing"), ("environment", "bad-line"),
]

TRANSFER_OPTIONS: list[tuple[list[str], str]] = [
    (["download", "--block-size", "-1M", GOOD_URL], "--block-size"),
    (["cat", "--max-rate", "0", GOOD_URL], "--max-rate"),
    (["download", "--retries", "-1", GOOD_URL], "--retries"),
    (["cat", "--read-timeout", "0", GOOD_URL], "--read-timeout"),
    (["cat", "--read-timeout", "nan", GOOD_URL], "--read-timeout"),
    (["cat", "--header", "Host: SECRETVALUE", GOOD_URL], "set by rangefs"),
    (["cat", "--header", "X-Token: \u00e9SECRETVALUE", GOOD_URL], "non-ASCII"),
    (["download", "--header-file", "/nonexistent/headers", GOOD_URL], "cannot read header file"),
    (["download", "--cacert", "/nonexistent/ca.pem", GOOD_URL], "--cacert"),
    (["cat", "--cacert", "/etc/hostname", GOOD_URL], "not a PEM file"),
    (["cat", "ftp://h/a.bin"], "unsupported URL scheme 'ftp://'"),
    (["download", "file:///etc/passwd"], "unsupported URL scheme 'file://'"),
    (["cat", "http:///nohost"], "has no host"),
    (["cat", "http://u:SECRETVALUE@[::1/x?sig=SECRETVALUE"], "malformed URL"),
    (["cat", "http://h/a\x1b[2Jb"], "control character U+001B"),
    (["download", "http://h/%2e%2e"], "give DEST"),
    (["download", "http://h/dir/?sig=SECRETVALUE"], "give DEST"),
    (["download", "http://h/a%2F..%2Fb"], "give DEST"),
]

STDIN_LISTS: list[tuple[bytes, int, str]] = [
    (b"http://h/a a\nhttp://h/b b\x80\n", 2, "not valid UTF-8 (byte 0x80)"),
    (b"\xef\xbb\xbfhttp://h/a a\r\nhttp://h/b a\r\n", 2, "duplicate PATH 'a'"),
]


def _ids(table: Sequence[tuple[list[str], str]]) -> list[str]:
    return [" ".join(args)[:48] for args, _ in table]


def _mount_args(run: Run, *options: str, urllist: str | None = None) -> list[str]:
    return ["mount", "-f", "--cache-dir", str(run.cache), *options,
            urllist or str(run.dir / "list.urls"), str(run.mnt)]


def _plan(directory: Callable[[str], Path]) -> dict[str, Run]:
    """Every invocation of this module's option and list tests, each in its own directory."""
    runs: dict[str, Run] = {}

    def new(key: str) -> Run:
        run = Run(directory(key), [])
        run.mnt.mkdir()
        run.cwd.mkdir()
        runs[key] = run
        return run

    for name, lines, _, _ in BAD_LISTS:
        run = new(f"list/{name}")
        data = lines if isinstance(lines, bytes) else "".join(f"{x}\n" for x in lines).encode()
        (run.dir / "list.urls").write_bytes(data)
        run.args = _mount_args(run)
    for i, (data, _, _) in enumerate(STDIN_LISTS):
        run = new(f"stdin/{i}")
        run.args, run.stdin = _mount_args(run, urllist="-"), data
    run = new("list-is-a-directory")
    run.args = _mount_args(run, urllist=str(run.cwd))
    run = new("line-99999")
    lines = [f"http://127.0.0.1:9/o/f{i}.bin d{i % 100}/f{i}.bin size={i}" for i in range(100_000)]
    lines[99_998] = "http://127.0.0.1:9/o/x d5/../../../etc/passwd size=1"
    (run.dir / "list.urls").write_text("\n".join(lines) + "\n")
    run.args = _mount_args(run)
    for args, _ in MOUNT_OPTIONS:
        run = new(f"mount/{' '.join(args)}")
        write_list(run.dir / "list.urls", [f"{GOOD_URL} size=10"])
        run.args = _mount_args(run, *args)
    for how, kind in HEADER_FILES:
        run = new(f"header-file/{how}/{kind}")
        write_list(run.dir / "list.urls", [f"{GOOD_URL} size=10"])
        path = _header_file(run.dir, kind)
        if how == "option":
            run.args = _mount_args(run, "--header-file", path)
        else:
            run.args, run.env = _mount_args(run), {"RANGEFS_HEADER_FILE": path}
    for args, _ in TRANSFER_OPTIONS:
        run = new(f"transfer/{' '.join(args)}")
        run.args = list(args)
    run = new("download-env-header-file")
    run.args = ["download", GOOD_URL, str(run.cwd / "out")]
    run.env = {"RANGEFS_HEADER_FILE": _header_file(run.dir, "bad-line")}
    return runs


def run_unmounting(run: Run, timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    """Run ``run`` to completion. If it mounts (which none of these may do), unmount it at
    once and let the process end: its result then shows a failure, not a hang."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            [*rangefs_argv(), *run.args], stdin=subprocess.PIPE, stdout=out, stderr=err,
            cwd=run.cwd, env=child_env(run.env),
        )
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            process.stdin.write(run.stdin or b"")
        process.stdin.close()
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if is_mounted(run.mnt) or time.monotonic() > deadline:
                unmount(run.mnt)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
                process.kill()
                process.wait()
                err.write(b"\n(the test stopped it: it mounted, or hung)\n")
                break
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(run.args, process.returncode, out.read(), err.read())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Run every planned invocation, four at a time: each costs ~0.3 s of interpreter start,
    and none of them may mount anything, so they need not wait for one another."""

    def directory(key: str) -> Path:
        return tmp_path_factory.mktemp(re.sub(r"[^A-Za-z0-9]+", "-", key)[:40] or "x")

    planned = _plan(directory)

    def execute(run: Run) -> None:
        run.result = run_unmounting(run)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(execute, planned.values()))
    return planned


# -- the URL list ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "line", "reason"), [(name, line, reason) for name, _, line, reason in BAD_LISTS],
    ids=[name for name, *_ in BAD_LISTS],
)
def test_bad_list_is_one_line_with_file_and_line(
    runs: dict[str, Run], name: str, line: int, reason: str
) -> None:
    run = runs[f"list/{name}"]
    result = run.done()
    assert result.returncode == 2, result.stderr
    error = one_line_error(result.stderr)
    assert error.startswith(f"rangefs: {run.dir / 'list.urls'}:{line}: "), error
    assert reason.lower() in error.lower(), error
    assert_nothing_happened(run.mnt, run.cache)


@pytest.mark.parametrize(("index", "line", "reason"),
                         [(i, line, reason) for i, (_, line, reason) in enumerate(STDIN_LISTS)])
def test_bad_list_on_stdin_names_stdin(
    runs: dict[str, Run], index: int, line: int, reason: str
) -> None:
    run = runs[f"stdin/{index}"]
    assert run.done().returncode == 2, run.done().stderr
    error = one_line_error(run.done().stderr)
    assert error.startswith(f"rangefs: <stdin>:{line}: {reason}"), error
    assert_nothing_happened(run.mnt, run.cache)


def test_list_that_is_a_directory(runs: dict[str, Run]) -> None:
    run = runs["list-is-a-directory"]
    assert run.done().returncode == 2
    assert one_line_error(run.done().stderr) == (
        f"rangefs: cannot read URL list {run.cwd}: Is a directory"
    )
    assert_nothing_happened(run.mnt, run.cache)


def test_error_at_line_99999_of_100k(runs: dict[str, Run]) -> None:
    run = runs["line-99999"]
    assert run.done().returncode == 2, run.done().stderr
    error = one_line_error(run.done().stderr)
    assert error.startswith(
        f"rangefs: {run.dir / 'list.urls'}:99999: PATH 'd5/../../../etc/passwd' has a '..'"
    ), error
    assert_nothing_happened(run.mnt, run.cache)


def test_100k_entries_with_bom_and_crlf_mount(tmp_path: Path, mnt: Path) -> None:
    """A valid list of 100,000 entries, with a BOM and CRLF line ends: it mounts, and neither
    the BOM nor the CRs end up in a name or a size."""
    lines = [f"http://127.0.0.1:9/o/f{i}.bin?sig=x d{i % 100:02d}/f{i}.bin size={i}"
             for i in range(100_000)]
    urls = tmp_path / "big.urls"
    urls.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    with mounted(urls, mnt, cache_dir=tmp_path / "cache"):
        assert sorted(p.name for p in mnt.iterdir()) == [f"d{i:02d}" for i in range(100)]
        assert (mnt / "d00" / "f0.bin").stat().st_size == 0
        assert (mnt / "d99" / "f99999.bin").stat().st_size == 99_999
        names = [p.name for p in (mnt / "d42").iterdir()]
        assert len(names) == 1000 and {"f42.bin", "f99942.bin"} <= set(names)
        assert all(n.isprintable() and n.endswith(".bin") for n in names)


def test_crlf_list_names_have_no_cr(tmp_path: Path, mnt: Path) -> None:
    urls = tmp_path / "crlf.urls"
    urls.write_bytes(
        b"\xef\xbb\xbf# a comment\r\n\r\nhttp://127.0.0.1:9/a.bin size=3\r\n"
        b"http://127.0.0.1:9/b d/b.bin size=4\r\n"
    )
    with mounted(urls, mnt, cache_dir=tmp_path / "cache"):
        assert sorted(p.name for p in mnt.iterdir()) == ["a.bin", "d"]
        assert [p.name for p in (mnt / "d").iterdir()] == ["b.bin"]
        assert (mnt / "a.bin").stat().st_size == 3 and (mnt / "d" / "b.bin").stat().st_size == 4


# -- bad option values ---------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), MOUNT_OPTIONS, ids=_ids(MOUNT_OPTIONS))
def test_bad_mount_options_exit_2(runs: dict[str, Run], args: list[str], needle: str) -> None:
    run = runs[f"mount/{' '.join(args)}"]
    assert run.done().returncode == 2, run.done().stderr
    stderr = run.done().stderr.decode()
    assert needle in stderr, stderr
    assert "SECRETVALUE" not in stderr and "Traceback" not in stderr
    assert_nothing_happened(run.mnt, run.cache)


@pytest.mark.parametrize(("how", "kind"), HEADER_FILES, ids=[f"{h}-{k}" for h, k in HEADER_FILES])
def test_unusable_header_file_exits_2(runs: dict[str, Run], how: str, kind: str) -> None:
    run = runs[f"header-file/{how}/{kind}"]
    assert run.done().returncode == 2, run.done().stderr
    stderr = run.done().stderr.decode()
    assert "SECRETVALUE" not in stderr and "Traceback" not in stderr
    if kind == "directory":  # click's own check
        assert "is a directory" in stderr and "--header-file" in stderr, stderr
    else:
        error = one_line_error(run.done().stderr)
        assert error.startswith(("rangefs: cannot read header file ", "rangefs: /")), error
        assert str(run.dir) in error
    assert_nothing_happened(run.mnt, run.cache)


@pytest.mark.parametrize(("args", "needle"), TRANSFER_OPTIONS, ids=_ids(TRANSFER_OPTIONS))
def test_bad_download_and_cat_options_exit_2(
    runs: dict[str, Run], args: list[str], needle: str
) -> None:
    run = runs[f"transfer/{' '.join(args)}"]
    assert run.done().returncode == 2, run.done().stderr
    stderr = run.done().stderr.decode()
    assert needle in stderr, stderr
    assert "SECRETVALUE" not in stderr and "Traceback" not in stderr
    if stderr.startswith("rangefs: "):
        one_line_error(run.done().stderr)
    assert run.done().stdout == b""
    assert list(run.cwd.iterdir()) == [], "nothing may be created"


def test_header_file_error_for_download_via_environment(runs: dict[str, Run]) -> None:
    run = runs["download-env-header-file"]
    assert run.done().returncode == 2
    error = one_line_error(run.done().stderr)
    assert error.startswith(f"rangefs: {run.env and run.env['RANGEFS_HEADER_FILE']}:2: "), error
    assert b"SECRETVALUE" not in run.done().stderr
    assert list(run.cwd.iterdir()) == []

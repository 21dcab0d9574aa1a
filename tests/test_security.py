"""Security (issue 5, "Security"; DESIGN.md §2 invariant 10, §6), proven on real mounts
and real commands.

- Credentials (``--header``, ``--header-file``, ``RANGEFS_HEADER_FILE``, ``user:pass@`` in a
  URL) and signed query strings never appear in a log (-vv and --debug, stderr and
  --log-file), in an xattr, in the cache directory, in the command line of a rangefs
  process, nor in a request to another origin after a redirect.
- The cache directory is 0700 and its files 0600, created with those modes: under umask
  000, with no chmod afterwards (an audit hook in the rangefs process records every mkdir,
  chmod and file creation under the cache directory).
- Names cannot lead out of the mount; the mount is read-only for everyone, root included
  (even after root remounts it read-write); other users see nothing without --allow-other.
- Hostile servers (a hand-written origin, :class:`RawOrigin`) cannot make rangefs use
  unbounded memory or disk: endless bodies, enormous or endless headers, endless redirects,
  absurd sizes; the process's peak RSS (VmHWM) stays bounded.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pytest

from rangefs.redact import redact_text
from tests import content
from tests.faultserver import Fault, FaultServer
from tests.mountutil import (
    ROOT,
    is_mounted,
    mounted,
    rangefs_argv,
    require_fuse,
    run_rangefs,
    start_mount,
    unmount,
    write_list,
)

BS = 64 << 10
NOBODY = 65534
MAX_HWM_KB = 300 * 1024  # generous: a mount uses well under 100 MiB
XATTR_PREFIX = "user.rangefs."


def read_file(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def all_xattrs(root: Path) -> dict[str, bytes]:
    """Every extended attribute of ``root`` and everything under it: 'path name' -> value
    (an object whose server fails has none to show: EIO)."""
    found: dict[str, bytes] = {}
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / n for n in dirnames + filenames]
    for path in paths:
        try:
            names = os.listxattr(path)
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
            continue
        for name in names:
            found[f"{path} {name}"] = os.getxattr(path, name)
    return found


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (names relative) -> its bytes; directories -> b''."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = b""
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = Path(path).read_bytes()
    return out


def assert_private_modes(root: Path) -> None:
    """``root`` and every directory under it 0700, every file 0600 (nothing else)."""
    assert stat.S_IMODE(root.stat().st_mode) == 0o700, oct(root.stat().st_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            assert stat.S_IMODE(st.st_mode) == 0o700, (dirpath, name, oct(st.st_mode))
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert stat.S_ISREG(st.st_mode), (dirpath, name)
            assert stat.S_IMODE(st.st_mode) == 0o600, (dirpath, name, oct(st.st_mode))


def vm_hwm_kb(pid: int) -> int:
    """Peak resident set size of ``pid``, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def errno_of(call: Callable[[], object]) -> str:
    """'ok' or the errno name of the OSError ``call`` raises (closing a returned fd)."""
    try:
        result = call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    if isinstance(result, int):
        os.close(result)
    return "ok"


# -- credentials ---------------------------------------------------------------------------

SECRETS = {
    "arg": "ARGSECRET-a1b2",  # --header
    "file": "FILESECRET-c3d4",  # --header-file / RANGEFS_HEADER_FILE
    "password": "PASSSECRET-e5f6",  # user:pass@ in the URL
    "signature": "SIGSECRET-g7h8",  # ?X-Amz-Signature= of the URL in the list
    "credential": "CREDSECRET-i9j0",  # ?X-Amz-Credential=
    "location": "LOCSECRET-k1l2",  # the signature in a redirect's Location
}
USER = "alice"
BASIC = base64.b64encode(f"{USER}:{SECRETS['password']}".encode()).decode()


def assert_no_secret(where: str, data: bytes | str, extra: tuple[str, ...] = ()) -> None:
    """No secret of :data:`SECRETS` (nor the Basic credentials) in ``data``."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    for secret in (*SECRETS.values(), BASIC, *extra):
        assert secret.encode() not in data, f"{secret!r} found in {where}"


def signed(server: FaultServer, path: str, *, signature: str = SECRETS["signature"]) -> str:
    """``http://alice:PASSWORD@HOST:PORT/path?X-Amz-Signature=..&X-Amz-Credential=..``."""
    base = server.base_url.replace("://", f"://{USER}:{SECRETS['password']}@")
    return (f"{base}{path}?X-Amz-Signature={signature}"
            f"&X-Amz-Credential={SECRETS['credential']}")


@pytest.mark.parametrize("how", ["-vv --header-file", "--debug RANGEFS_HEADER_FILE"])
def test_credentials_never_logged_shown_stored_or_sent_elsewhere(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer,
    origin_factory: Callable[[], FaultServer], how: str,
) -> None:
    far = origin_factory()
    origin.add("/obj", 5 * BS + 1)
    origin.faults("/obj", [Fault("status", status=503, method="GET")])  # a retry is logged
    far.add("/far", 3 * BS + 7)
    origin.redirect("/cross", far.url(f"/far?X-Amz-Signature={SECRETS['location']}"))
    origin.redirect("/gone", "/missing?sig=" + SECRETS["location"])  # a 404 is logged too
    urls = write_list(tmp_path / "list.urls", [
        f"{signed(origin, '/obj')} obj",
        f"{signed(origin, '/cross')} d/cross",
        f"{signed(origin, '/gone')} gone",
    ])
    headers = tmp_path / "headers"
    headers.write_text(f"# secrets\nX-File-Token: {SECRETS['file']}\n")
    log_file = tmp_path / "rangefs.log"
    level, via = how.split()
    args = [level, "--header", f"X-Api-Key: {SECRETS['arg']}", "--log-file", str(log_file),
            "--block-size", "64K", "--read-timeout", "20"]
    env = {}
    if via == "--header-file":
        args += ["--header-file", str(headers)]
    else:
        env["RANGEFS_HEADER_FILE"] = str(headers)
    with mounted(urls, mnt, *args, cache_dir=cache, env=env, warnings_ok=True) as mount:
        content.check("/obj", 0, read_file(mnt / "obj"))
        content.check("/far", 0, read_file(mnt / "d" / "cross"))
        assert errno_of(lambda: os.stat(mnt / "gone")) == "EIO"
        xattrs = all_xattrs(mnt)
        assert xattrs[f"{mnt / 'obj'} user.rangefs.url"] == (
            f"{origin.base_url}/obj?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED".encode()
        )
        getfattr = b""
        if shutil.which("getfattr"):  # the attr package: optional, os.getxattr is the proof
            getfattr = subprocess.run(
                ["getfattr", "-d", "-m", "-", str(mnt / "obj"), str(mnt / "d" / "cross")],
                capture_output=True, check=True).stdout
            assert b"user.rangefs.url" in getfattr
        assert mount.stop() == 0
        stderr = mount.stderr()

    # the credentials were really used: each reached the first origin, as given
    gets = origin.gets("/obj")
    assert gets and all(r.headers.get("x-api-key") == SECRETS["arg"] for r in gets)
    assert all(r.headers.get("x-file-token") == SECRETS["file"] for r in gets)
    assert all(r.headers.get("authorization") == f"Basic {BASIC}" for r in gets)
    assert all(SECRETS["signature"] in r.query for r in gets)
    # ... and none of them reached the other origin after the cross-origin redirect
    assert far.gets("/far")
    for req in far.log:
        assert not {"authorization", "x-api-key", "x-file-token", "cookie"} & set(req.headers)
        assert req.query == f"X-Amz-Signature={SECRETS['location']}"  # its own, no more
        assert_no_secret(f"a request to the other origin {req}",
                         json.dumps(req.headers) + req.path)

    # never in a log, at either level, on stderr or in the log file
    log = log_file.read_text()
    assert " DEBUG " in log and "GET" in stderr
    if level == "--debug":  # the libraries' traces were on: they are redacted too
        assert "httpx: HTTP Request: GET" in log
        assert "X-Amz-Signature=REDACTED" in log
    assert_no_secret("stderr", stderr)
    assert_no_secret("--log-file", log)
    # never in an xattr
    for name, value in xattrs.items():
        assert_no_secret(f"xattr {name}", value)
    assert_no_secret("getfattr -d -m -", getfattr)
    # never in the cache directory: no file's bytes, no name
    files = tree_bytes(cache)
    assert any(name.endswith("metadata.json") for name in files)
    assert any(name.endswith("index") for name in files)
    for name, data in files.items():
        assert_no_secret(f"cache file {name}", name.encode() + b"\0" + data)
    assert_private_modes(cache)


@pytest.mark.parametrize(("line", "expected"), [
    ('httpx: HTTP Request: GET http://h:1/o?X-Amz-Signature=S1&X-Amz-Credential=S2 "HTTP/1.1"',
     'httpx: HTTP Request: GET http://h:1/o?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED '
     '"HTTP/1.1"'),
    ("[(b'Location', b'https://u:S1@cdn/x?sig=S2&v'), (b'Location', b'/rel?token=S3')]",
     "[(b'Location', b'https://cdn/x?sig=REDACTED&REDACTED'), "
     "(b'Location', b'/rel?token=REDACTED')]"),
    ("URL('http://alice:S1@h/p')", "URL('http://h/p')"),
    ("header value S1-long and S1-longer", "header value REDACTED and REDACTED"),
    ("what? nothing to hide: a ?b=c, d=e", "what? nothing to hide: a ?b=c, d=e"),
    # the punctuation after a URL stays; a ':' inside a query value is redacted with it
    ("GET http://h/o?sig=S2: HTTP 403 (see http://h/p?t=S3).",
     "GET http://h/o?sig=REDACTED: HTTP 403 (see http://h/p?t=REDACTED)."),
    ("http://h/o?se=2030-01-01T00:00:00Z&sig=S2:", "http://h/o?se=REDACTED&sig=REDACTED:"),
    ("http://h/o?a:b:c", "http://h/o?REDACTED"),
    ("huh?: what?", "huh?: what?"),
])
def test_redact_text_for_log_lines(line: str, expected: str) -> None:
    """What the log formatter does to every line (unit test of rangefs.redact.redact_text)."""
    assert redact_text(line, ["S1-longer", "S1-long"]) == expected


SITECUSTOMIZE = '''
"""Test hook (tests/test_security.py): record, under RANGEFS_TEST_AUDIT_ROOT, every mkdir
(with its mode), chmod, file creation and rename into it, in RANGEFS_TEST_AUDIT_LOG."""
import os
import sys

_root = os.environ.get("RANGEFS_TEST_AUDIT_ROOT")
_log = os.environ.get("RANGEFS_TEST_AUDIT_LOG")


def _path(p):
    try:
        if isinstance(p, int):
            return os.readlink(f"/proc/self/fd/{p}")
        return os.path.abspath(os.fsdecode(p))
    except Exception:
        return ""


def _inside(p):
    return p == _root or p.startswith(_root + os.sep)


def _hook(event, args):
    if event == "os.mkdir" or event == "os.chmod":
        path, mode = _path(args[0]), args[1]
    elif event == "open":
        path, mode = _path(args[0]), args[1]
        flags = args[2] if isinstance(args[2], int) else 0
        if not (flags & os.O_CREAT or (isinstance(mode, str) and set(mode) & set("wax+"))):
            return
    elif event == "os.rename":
        path, mode = _path(args[1]), _path(args[0])
        if _inside(mode):
            return
    else:
        return
    if _inside(path):
        os.write(_fd, f"{event}\\t{path}\\t{mode!r}\\n".encode())


if _root and _log:
    _root = os.path.abspath(_root)
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    sys.addaudithook(_hook)
'''


def test_cache_dir_private_from_creation_even_under_umask_000(
    tmp_path: Path, mnt: Path, origin: FaultServer
) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    audit = tmp_path / "audit.log"
    origin.add("/a", 3 * BS + 1)
    origin.add("/b", 0)
    urls = write_list(tmp_path / "list.urls", [origin.url("/a"), origin.url("/b")])
    cache = tmp_path / "new" / "parents" / "cache"  # mkdir -p: every level private
    env = {"PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}", "RANGEFS_TEST_AUDIT_ROOT": str(cache),
           "RANGEFS_TEST_AUDIT_LOG": str(audit)}
    old = os.umask(0)  # inherited by the rangefs process
    try:
        mount = start_mount(urls, mnt, "--block-size", "64K", cache_dir=cache, env=env)
    finally:
        os.umask(old)
    try:
        mount.wait_mounted()
        content.check("/a", 0, read_file(mnt / "a"))
        assert read_file(mnt / "b") == b""
        assert mount.stop() == 0
        mount.check_log()
    finally:
        mount.cleanup()
    assert_private_modes(tmp_path / "new")
    events = [line.split("\t") for line in audit.read_text().splitlines()]
    kinds = {kind for kind, _, _ in events}
    assert {"os.mkdir", "open"} <= kinds, events  # the hook saw the cache being made
    created = {Path(path).name for kind, path, _ in events if kind == "open"}
    assert {"lock", "data", "index.tmp"} <= created, created
    for kind, path, mode in events:
        assert kind != "os.chmod", f"chmod after creation (a window): {path} {mode}"
        assert kind != "os.rename", f"{path} was made elsewhere and moved in: {mode}"
        if kind == "os.mkdir":
            assert int(mode) == 0o700, (path, oct(int(mode)))


@pytest.mark.parametrize(("mode", "owner", "reason"), [
    (0o777, 0, "can be written by other users (mode 777)"),
    (0o1777, 0, "is shared with other users (mode 1777)"),  # like /tmp: never "chmod 700"
    (0o770, 0, "can be written by other users (mode 770)"),
    (0o700, NOBODY, "belongs to another user (uid 65534)"),
])
def test_a_cache_dir_others_could_write_to_is_refused(
    tmp_path: Path, mnt: Path, cache: Path, mode: int, owner: int, reason: str
) -> None:
    """Another user who can write into the cache directory could plant a symlink where
    rangefs (maybe root) writes: such a directory is refused, before anything is written."""
    cache.mkdir()
    os.chmod(cache, mode)
    os.chown(cache, owner, owner)
    urls = write_list(tmp_path / "list.urls", ["http://127.0.0.1:9/a size=10"])
    try:
        result = run_rangefs(["mount", "-f", "--cache-dir", str(cache), str(urls), str(mnt)],
                             timeout=20)
    finally:
        unmount(mnt)  # only if it mounted: a failure
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"rangefs: cache directory {cache} {reason}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert ("chmod 700" in result.stderr) == (mode == 0o777 or mode == 0o770)
    assert not is_mounted(mnt)
    assert os.listdir(cache) == []


@pytest.mark.parametrize("plant", ["foreign directory", "symlink", "open directory"])
def test_download_refuses_a_planted_partial_directory(
    tmp_path: Path, origin: FaultServer, plant: str
) -> None:
    """``rangefs download URL DEST`` into a directory others can write to (e.g. /tmp): a
    DEST.rangefs-part/ made by someone else, holding a symlink named ``data``, would have
    rangefs (as root) overwrite the link's target. It is refused; the target is intact."""
    origin.add("/out.bin", 1000)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    part = shared / "out.bin.rangefs-part"
    if plant == "symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        (elsewhere / "data").symlink_to(victim)
        part.symlink_to(elsewhere)
    else:
        part.mkdir(mode=0o700 if plant == "foreign directory" else 0o777)
        os.chmod(part, 0o700 if plant == "foreign directory" else 0o777)
        (part / "data").symlink_to(victim)
        if plant == "foreign directory":
            os.lchown(part / "data", NOBODY, NOBODY)
            os.chown(part, NOBODY, NOBODY)
    result = subprocess.run(
        [*rangefs_argv(), "download", origin.url("/out.bin"), str(shared / "out.bin")],
        capture_output=True, text=True, env=_env(None), timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"rangefs: {part}") or result.stderr.startswith(
        f"rangefs: partial download {part}"), result.stderr
    assert victim.read_bytes() == b"precious"
    assert not origin.gets("/out.bin")
    assert not (shared / "out.bin").exists()


def test_header_file_secret_is_not_in_any_command_line(tmp_path: Path, origin: FaultServer,
                                                       mnt: Path) -> None:
    """The daemon (forked) and anything it starts: the secret of --header-file is in no
    /proc/PID/cmdline nor environ, although it reaches the server."""
    require_fuse()
    origin.add("/a", 100)
    urls = write_list(tmp_path / "list.urls", [origin.url("/a")])
    headers = tmp_path / "headers"
    headers.write_text(f"Authorization: Bearer {SECRETS['file']}\n")
    pids: list[int] = []
    try:
        result = run_rangefs(["mount", "--cache-dir", str(tmp_path / "cache"), "--header-file",
                              str(headers), str(urls), str(mnt)])
        assert result.returncode == 0, result.stderr
        content.check("/a", 0, read_file(mnt / "a"))
        assert origin.gets("/a")[0].headers["authorization"] == f"Bearer {SECRETS['file']}"
        daemons = [pid for pid in process_tree(1)
                   if str(mnt).encode() in _cmdline(pid) and b"mount" in _cmdline(pid)]
        assert len(daemons) == 1, daemons
        pids = process_tree(daemons[0])
        for pid in pids:
            for what in ("cmdline", "environ"):
                with open(f"/proc/{pid}/{what}", "rb") as fh:
                    assert_no_secret(f"/proc/{pid}/{what}", fh.read())
        os.kill(daemons[0], signal.SIGTERM)
        deadline = time.monotonic() + 20
        while is_mounted(mnt) or _cmdline(daemons[0]):
            assert time.monotonic() < deadline, "the daemon did not stop"
            time.sleep(0.05)
    finally:
        unmount(mnt)
        for pid in pids:
            if _cmdline(pid):
                os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_download_and_cat_keep_credentials(
    tmp_path: Path, origin: FaultServer, origin_factory: Callable[[], FaultServer]
) -> None:
    """download and cat: the same rules; a download that fails half-way leaves a partial
    directory that is private and holds no credential."""
    far = origin_factory()
    far.add("/far", 7 * BS + 3)
    origin.redirect("/cross", far.url("/far"))
    headers = tmp_path / "headers"
    headers.write_text(f"X-File-Token: {SECRETS['file']}\n")
    common = ["-vv", "--block-size", "64K", "--header", f"X-Api-Key: {SECRETS['arg']}"]

    cat = subprocess.run(
        [*rangefs_argv(), "cat", *common, signed(origin, "/cross")], capture_output=True,
        env=_env({"RANGEFS_HEADER_FILE": str(headers)}), timeout=60, check=False)
    assert cat.returncode == 0, cat.stderr
    content.check("/far", 0, cat.stdout)
    assert_no_secret("cat's stderr", cat.stderr)

    # the first range request breaks off after 3 blocks; then the object is gone (404)
    far.faults("/far", [Fault("short_body", after=3 * BS + 5, method="GET"),
                        # gone for every pass of a download (up to 5 of 8 parallel requests)
                        *[Fault("status", status=404, method="GET")] * 64])
    dest = tmp_path / "out.bin"
    download = subprocess.run(
        [*rangefs_argv(), "download", *common, "--header-file", str(headers), "--retries", "0",
         signed(origin, "/cross"), str(dest)],
        capture_output=True, env=_env(None), timeout=60, check=False)
    assert download.returncode == 1, download.stderr
    assert_no_secret("download's stderr", download.stderr)
    assert not dest.exists()
    part = tmp_path / "out.bin.rangefs-part"
    files = tree_bytes(part)
    assert {"data", "index"} <= set(files), files.keys()
    for name, data in files.items():
        assert_no_secret(f"partial download file {name}", data)
    assert_private_modes(part)

    first = origin.requests("/cross")
    assert first and all(r.headers.get("x-api-key") == SECRETS["arg"] for r in first)
    assert all(r.headers.get("x-file-token") == SECRETS["file"] for r in first)
    assert all(r.headers.get("authorization") == f"Basic {BASIC}" for r in first)
    assert far.gets("/far")
    for req in far.log:
        assert not {"authorization", "x-api-key", "x-file-token"} & set(req.headers), req
        assert_no_secret(f"a request to the other origin {req}", json.dumps(req.headers)
                         + req.path + req.query)


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RANGEFS_HEADER_FILE", None)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


# -- names, read-only, other users ------------------------------------------------------


def test_odd_names_stay_inside_the_mount(tmp_path: Path, mnt: Path, cache: Path) -> None:
    """Names that look like escapes but are legal file names stay single names inside the
    mount; the kernel's '..' of the mount root is the real parent."""
    names = ["..\\..\\etc\\passwd", "...", ".hidden", "-rf", "a..b/..c", "%2e%2e", "~root"]
    urls = write_list(tmp_path / "list.urls",
                      [f"http://127.0.0.1:9/{i} {name} size={i}" for i, name in enumerate(names)]
                      + ["http://127.0.0.1:9/%2e%2e%5c%2e%2e%5cx size=3"])
    before = sorted(os.listdir(tmp_path))
    with mounted(urls, mnt, cache_dir=cache):
        found = sorted(os.path.relpath(os.path.join(d, f), mnt)
                       for d, _, files in os.walk(mnt) for f in files)
        assert found == sorted([*names, "..\\..\\x"])
        for name in found:
            real = os.path.realpath(mnt / name)
            assert real.startswith(f"{mnt}{os.sep}"), real
        assert os.stat(mnt / "..").st_ino == os.stat(tmp_path).st_ino
        assert (mnt / "..\\..\\etc\\passwd").stat().st_size == 0
    assert sorted(os.listdir(tmp_path)) == sorted({*before, "cache", "mnt.stderr"})


WRITES: dict[str, Callable[[Path], object]] = {
    "open for writing": lambda m: os.open(m / "f", os.O_WRONLY),
    "open read-write": lambda m: os.open(m / "f", os.O_RDWR),
    "open to truncate": lambda m: os.open(m / "f", os.O_RDONLY | os.O_TRUNC),
    "create": lambda m: os.open(m / "new", os.O_CREAT | os.O_WRONLY, 0o644),
    "create in a subdir": lambda m: os.open(m / "d" / "new", os.O_CREAT | os.O_EXCL | os.O_RDWR),
    "unlink": lambda m: os.unlink(m / "f"),
    "rename": lambda m: os.rename(m / "f", m / "g"),
    "rename over": lambda m: os.rename(m / "f", m / "d" / "e"),
    "mkdir": lambda m: os.mkdir(m / "newdir"),
    "rmdir": lambda m: os.rmdir(m / "d"),
    "setxattr": lambda m: os.setxattr(m / "f", "user.rangefs.url", b"http://evil/"),
    "setxattr on a dir": lambda m: os.setxattr(m, "user.x", b"1"),
    "removexattr": lambda m: os.removexattr(m / "f", "user.rangefs.url"),
    "truncate": lambda m: os.truncate(m / "f", 0),
    "chmod": lambda m: os.chmod(m / "f", 0o666),
    "chown": lambda m: os.chown(m / "f", NOBODY, NOBODY),
    "utime": lambda m: os.utime(m / "f", (0, 0)),
    "link": lambda m: os.link(m / "f", m / "hard"),
    "symlink": lambda m: os.symlink("f", m / "sym"),
}


def _try_writes(m: Path) -> dict[str, str]:
    return {what: errno_of(lambda w=write: w(m)) for what, write in WRITES.items()}  # type: ignore[misc]


def test_read_only_for_root_even_after_remount_rw(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    """Root gets EROFS for every change; and when root remounts the mount read-write (the
    kernel then passes the requests on), rangefs itself refuses them with EROFS."""
    assert os.geteuid() == 0, "these tests run as root (they check what root can do)"
    origin.add("/f", 2 * BS)
    urls = write_list(tmp_path / "list.urls", [f"{origin.url('/f')} f", f"{origin.url('/f')} d/e"])
    with mounted(urls, mnt, "--block-size", "64K", cache_dir=cache) as mount:
        assert _try_writes(mnt) == dict.fromkeys(WRITES, "EROFS")
        remount = subprocess.run(["mount", "-i", "-o", "remount,rw", str(mnt)],
                                 capture_output=True, text=True, check=False)
        assert remount.returncode == 0, remount.stderr
        [line] = [ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                  if f" {mnt} " in ln]
        assert line.split()[5].startswith("rw"), line  # the kernel no longer refuses writes
        assert _try_writes(mnt) == dict.fromkeys(WRITES, "EROFS")
        content.check("/f", 0, read_file(mnt / "f"))
        assert sorted(os.listdir(mnt)) == ["d", "f"]
        assert os.getxattr(mnt / "f", "user.rangefs.url") == origin.url("/f").encode()
        mount.check_log()
    assert origin.requests("/f") and all(r.method in ("GET", "HEAD") for r in origin.log)


def as_nobody(job: Callable[[], dict[str, Any]], timeout: float = 20.0) -> dict[str, Any]:
    """Run ``job`` in a forked child as uid/gid nobody (no supplementary groups); its
    JSON-able result. The child only makes system calls and exits with os._exit."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no threads of ours, no cleanup handlers
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload = json.dumps(job()).encode()
            os.write(write_end, payload)
            code = 0
        except BaseException as exc:  # report anything to the parent
            os.write(write_end, json.dumps({"child error": repr(exc)}).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    chunks = []
    with os.fdopen(read_end, "rb", buffering=0) as fh:
        while True:  # read as it comes: the answer may be larger than the pipe's buffer
            ready, _, _ = select.select([fh], [], [], 0.1)
            if ready:
                chunk = fh.read(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the child running as nobody hung")
    _, status = os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(b"".join(chunks) or b"{}")
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="rangefs-security-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        unmount(path / "mnt")
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("allow_other", [False, True], ids=["private", "allow-other"])
def test_other_users_need_allow_other(shared_dir: Path, origin: FaultServer,
                                      allow_other: bool) -> None:
    size = 3 * BS + 5
    origin.add("/f", size)
    mnt, cache = shared_dir / "mnt", shared_dir / "cache"
    urls = write_list(shared_dir / "list.urls",
                      [f"{origin.url('/f')} f", f"{origin.url('/f')} d/e"])
    args = ["--block-size", "64K", *(["--allow-other"] if allow_other else [])]
    with mounted(urls, mnt, *args, cache_dir=cache) as mount:
        assert sorted(os.listdir(mnt)) == ["d", "f"]  # root, the mounting user, sees it

        def job() -> dict[str, Any]:
            out: dict[str, Any] = {
                "stat": errno_of(lambda: os.stat(mnt)),
                "listdir": errno_of(lambda: os.listdir(mnt)),
                "stat file": errno_of(lambda: os.stat(mnt / "d" / "e")),
                "open": errno_of(lambda: os.open(mnt / "d" / "e", os.O_RDONLY)),
                "getxattr": errno_of(lambda: os.getxattr(mnt / "d" / "e", "user.rangefs.url")),
                "cache dir": errno_of(lambda: os.listdir(cache)),
                "writes": {w: errno_of(lambda f=f: f(mnt)) for w, f in WRITES.items()},
            }
            if out["open"] == "ok":
                out["names"] = os.listdir(mnt / "d")
                out["data"] = read_file(mnt / "d" / "e").hex()
            return out

        seen = as_nobody(job)
        assert seen["cache dir"] == "EACCES"  # the cache is private either way
        if not allow_other:
            for what in ("stat", "listdir", "stat file", "open", "getxattr"):
                assert seen[what] == "EACCES", (what, seen)
            # nothing inside can even be looked up; only the kernel's read-only check on
            # the mount point itself (before any FUSE request) may answer first
            assert set(seen["writes"].values()) <= {"EACCES", "EROFS"}, str(seen["writes"])
            for what in ("open for writing", "create", "unlink", "rename", "setxattr", "chmod"):
                assert seen["writes"][what] == "EACCES", (what, str(seen["writes"]))
        else:
            for what in ("stat", "listdir", "stat file", "open", "getxattr"):
                assert seen[what] == "ok", (what, seen)
            assert seen["names"] == ["e"]
            content.check("/f", 0, bytes.fromhex(seen["data"]))
            assert len(seen["data"]) == 2 * size
            # a read-only file system refuses nobody's changes just as root's
            assert set(seen["writes"].values()) <= {"EROFS", "EACCES", "EPERM"}, seen["writes"]
            for what in ("open for writing", "create", "unlink", "mkdir", "truncate"):
                assert seen["writes"][what] == "EROFS", (what, seen["writes"])
        mount.check_log()


# -- hostile servers -----------------------------------------------------------------------


class RawOrigin:
    """A hand-written HTTP/1.1 server on 127.0.0.1 for answers no well-behaved server gives.

    ``routes`` maps a path (query ignored) to a handler ``(origin, conn, method, range)``
    that writes the whole answer with ``origin.send`` and returns True to keep the
    connection for another request. ``sent`` counts the bytes written per connection
    (keyed by the id of its socket, which is kept until ``stop()``).
    ``stop()`` shuts every connection down (which ends any endless answer) and joins every
    thread.
    """

    def __init__(self, routes: dict[str, Callable[[RawOrigin, socket.socket, str, str | None],
                                                     bool]]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str]] = []
        self.sent: dict[int, int] = {}
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, name="raw-origin", daemon=True)
        self._threads.append(accept)
        accept.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def send(self, conn: socket.socket, data: bytes) -> None:
        with self._lock:  # by connection (its socket object lives as long as we do)
            self.sent[id(conn)] = self.sent.get(id(conn), 0) + len(data)
        conn.sendall(data)

    def send_forever(self, conn: socket.socket, chunk: bytes) -> None:
        """Write ``chunk`` again and again until the client goes away or we stop."""
        while not self.stopping.is_set():
            self.send(conn, chunk)

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
        self._listener.close()
        assert not [t.name for t in self._threads if t.is_alive()]

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(30)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                      name=f"raw-origin-conn-{conn.fileno()}")
            with self._lock:
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while not self.stopping.is_set():
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data or len(buffer) > 65536:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
                ranges = {k.strip().lower(): v.strip() for k, v in fields.items()}.get("range")
                path = target.partition("?")[0]
                with self._lock:
                    self.requests.append((method, path))
                handler = self.routes.get(path) or next(
                    (h for p, h in self.routes.items() if p.endswith("*")
                     and path.startswith(p[:-1])), None)
                if handler is None:
                    self.send(conn, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    continue
                if not handler(self, conn, method, ranges):
                    return
        except OSError:
            return  # the client went away, or stop()
        finally:
            conn.close()


SIZE = 4 * BS + 11
JUNK = b"J" * 65536
ETAG_HEADERS = b'Accept-Ranges: bytes\r\nETag: "v1"\r\nLast-Modified: ' \
    b"Wed, 01 Jan 2025 00:00:00 GMT\r\n"


def _range(ranges: str | None) -> tuple[int, int]:
    match = re.fullmatch(r"bytes=(\d+)-(\d+)", ranges or "")
    assert match, ranges
    return int(match[1]), int(match[2])


def _head(size: int, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % size) + ETAG_HEADERS + extra + b"\r\n"


def _object(key: str, *, length: bool, then_junk: bool, extra: bytes = b"") -> Callable[
        [RawOrigin, socket.socket, str, str | None], bool]:
    """HEAD: the size; GET: the exact range, with or without Content-Length, and then (if
    ``then_junk``) bytes for ever."""

    def handler(origin: RawOrigin, conn: socket.socket, method: str, ranges: str | None) -> bool:
        if method == "HEAD":
            origin.send(conn, _head(SIZE))
            return True
        start, end = _range(ranges)
        head = b"HTTP/1.1 206 Partial Content\r\n" + ETAG_HEADERS + extra
        head += b"Content-Range: bytes %d-%d/%d\r\n" % (start, end, SIZE)
        if length:
            head += b"Content-Length: %d\r\n" % (end - start + 1)
        else:
            head += b"Connection: close\r\n"
        origin.send(conn, head + b"\r\n" + content.content(key, start, end - start + 1))
        if then_junk:
            origin.send_forever(conn, JUNK)
        return length
    return handler


def test_endless_bodies_are_cut_at_the_range(tmp_path: Path, mnt: Path, cache: Path) -> None:
    """206 answers with the right bytes and then no end. Past their Content-Length: the
    connection frames the body, every read is exact. Without a Content-Length the body is
    longer than its range, so no byte of it is used: reads fail with EIO, never with bytes
    of a body whose length is wrong. Memory stays bounded either way."""
    raw = RawOrigin({
        "/overlong": _object("/overlong", length=True, then_junk=True),
        "/endless": _object("/endless", length=False, then_junk=True),
    })
    try:
        urls = write_list(tmp_path / "list.urls", [raw.url("/overlong"), raw.url("/endless")])
        with mounted(urls, mnt, "--block-size", "64K", "--prefetch", "none",
                     "--read-timeout", "3", cache_dir=cache, warnings_ok=True) as mount:
            with open(mnt / "overlong", "rb") as fh:
                for offset in (3 * BS, 0, BS + 17, SIZE - 5):  # a few separate requests
                    content.check("/overlong", offset, os.pread(fh.fileno(), 1000, offset))
            content.check("/overlong", 0, read_file(mnt / "overlong"))
            with open(mnt / "endless", "rb") as fh:
                for offset in (3 * BS, SIZE - 5):
                    with pytest.raises(OSError) as caught:
                        os.pread(fh.fileno(), 1000, offset)
                    assert caught.value.errno == errno.EIO
            assert "longer than the" in mount.stderr()
            time.sleep(0.5)  # let the junk pile up wherever it can
            hwm = vm_hwm_kb(mount.pid)
            assert hwm < MAX_HWM_KB, f"peak RSS {hwm} KiB"
            assert mount.stop() == 0
        assert max(raw.sent.values()) > SIZE + 2 * len(JUNK), raw.sent  # junk did flow
        assert max(raw.sent.values()) < 64 << 20, raw.sent  # until the client stopped it
        assert ("GET", "/endless") in raw.requests and ("GET", "/overlong") in raw.requests
    finally:
        raw.stop()


def _huge_header(key: str, *, head: bool) -> Callable[
        [RawOrigin, socket.socket, str, str | None], bool]:
    """A 1 MiB header line in the answer to HEAD (``head``) or to a range GET."""
    junk = b"X-Junk: " + b"a" * (1 << 20) + b"\r\n"
    good = _object(key, length=True, then_junk=False)

    def handler(origin: RawOrigin, conn: socket.socket, method: str, ranges: str | None) -> bool:
        if (method == "HEAD") != head:
            return good(origin, conn, method, ranges)
        origin.send(conn, b"HTTP/1.1 206 Partial Content\r\n" + junk)
        return False
    return handler


def _endless_headers(origin: RawOrigin, conn: socket.socket, method: str,
                     ranges: str | None) -> bool:
    if method == "HEAD":
        origin.send(conn, _head(SIZE))
        return True
    origin.send(conn, b"HTTP/1.1 206 Partial Content\r\n")
    origin.send_forever(conn, b"X-More: " + b"b" * 100 + b"\r\n")
    return False


def _endless_redirects(origin: RawOrigin, conn: socket.socket, method: str,
                       ranges: str | None) -> bool:
    n = sum(1 for _, path in origin.requests if path.startswith("/r/"))
    origin.send(conn, b"HTTP/1.1 302 Found\r\nLocation: /r/%d\r\nContent-Length: 0\r\n\r\n" % n)
    return True


def _huge_location(origin: RawOrigin, conn: socket.socket, method: str,
                   ranges: str | None) -> bool:
    location = b"/huge-location?x=" + b"c" * (1 << 20)
    origin.send(conn, b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\n\r\n")
    return False


def _huge_size(origin: RawOrigin, conn: socket.socket, method: str, ranges: str | None) -> bool:
    if method == "HEAD":
        origin.send(conn, _head(1 << 62))
        return True
    origin.send(conn, b"HTTP/1.1 500 No\r\nContent-Length: 0\r\n\r\n")  # never asked
    return True


def test_hostile_headers_redirects_and_sizes_fail_cleanly(
    tmp_path: Path, mnt: Path, cache: Path
) -> None:
    """Enormous or endless headers, endless redirects, an enormous Location and a size of
    4 EiB: each gives an errno (EIO, or ENOSPC for the size) in bounded time, memory and
    disk stay bounded, and the mount keeps serving a good object."""
    raw = RawOrigin({
        "/huge-header": _huge_header("/huge-header", head=False),
        "/huge-header-head": _huge_header("/huge-header-head", head=True),
        "/endless-headers": _endless_headers,
        "/r/*": _endless_redirects,
        "/huge-location": _huge_location,
        "/huge-size": _huge_size,
        "/good": _object("/good", length=True, then_junk=False),
    })
    try:
        paths = ["/huge-header", "/huge-header-head", "/endless-headers", "/r/start",
                 "/huge-location", "/huge-size", "/good"]
        urls = write_list(tmp_path / "list.urls",
                          [f"{raw.url(p)} {p.strip('/').replace('/', '-')}" for p in paths])
        timeout = 2.0  # seconds a read() waits; a read may be several FUSE reads
        with mounted(urls, mnt, "--block-size", "64K", "--prefetch", "none", "--read-timeout",
                     str(timeout), cache_dir=cache, warnings_ok=True) as mount:
            calls: dict[str, Callable[[], object]] = {
                "huge-header": lambda: read_file(mnt / "huge-header"),
                "huge-header-head": lambda: os.stat(mnt / "huge-header-head"),
                "endless-headers": lambda: read_file(mnt / "endless-headers"),
                "r-start": lambda: os.stat(mnt / "r-start"),
                "huge-location": lambda: os.stat(mnt / "huge-location"),
                "huge-size open": lambda: os.open(mnt / "huge-size", os.O_RDONLY),
            }

            pool = ThreadPoolExecutor(len(calls))  # all at once: the waits overlap
            try:
                futures = {name: pool.submit(errno_of, call) for name, call in calls.items()}
                done, _ = wait(futures.values(), timeout=60)  # a hang guard, not a speed
                assert len(done) == len(futures), [n for n, f in futures.items()
                                                   if f not in done]
            finally:
                pool.shutdown(wait=False)  # a hung call is freed by the unmount
            outcomes = {name: future.result() for name, future in futures.items()}
            assert outcomes == {
                "huge-header": "EIO", "huge-header-head": "EIO", "endless-headers": "EIO",
                "r-start": "EIO", "huge-location": "EIO", "huge-size open": "ENOSPC",
            }, outcomes
            # bounded: what ended each wait was --read-timeout or a permanent refusal
            failures = re.findall(r"failed with \w+: (\w+): (.*)", mount.stderr())
            assert failures, mount.stderr()
            for cause, text in failures:
                assert cause in ("ReadTimeout", "PermanentError", "NotEnoughSpace"), text
                assert cause != "ReadTimeout" or text.endswith(f"after {timeout:g} s"), text
            assert os.stat(mnt / "huge-size").st_size == 1 << 62  # shown, never allocated
            content.check("/good", 0, read_file(mnt / "good"))  # the mount still serves
            hwm = vm_hwm_kb(mount.pid)
            assert hwm < MAX_HWM_KB, f"peak RSS {hwm} KiB"
            stderr = mount.stderr()
            assert mount.stop() == 0
        assert {("GET", "/huge-header"), ("GET", "/endless-headers"),
                ("HEAD", "/huge-header-head"), ("HEAD", "/huge-location")} <= set(raw.requests)
        redirects = [p for _, p in raw.requests if p.startswith("/r/")]
        # the limit, not the server, stopped it: 11 requests (10 hops) per probe
        assert len(redirects) % 11 == 0 and 11 <= len(redirects) <= 33, redirects
        assert "more than 10 redirects" in stderr
        assert "c" * 1000 not in stderr, "a 1 MiB Location must not be logged"
        used = sum(os.lstat(os.path.join(d, f)).st_blocks * 512
                   for d, _, files in os.walk(cache) for f in files)
        assert used < 16 << 20, f"{used} bytes in the cache directory"
    finally:
        raw.stop()


def test_nothing_runs_as_another_user() -> None:
    """as_nobody really drops privileges (the tests above would prove nothing otherwise)."""
    seen = as_nobody(lambda: {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                              "groups": os.getgroups(), "shadow": errno_of(
                                  lambda: os.open("/etc/shadow", os.O_RDONLY))})
    assert seen == {"uid": NOBODY, "euid": NOBODY, "gid": NOBODY, "groups": [],
                    "shadow": "EACCES"}



def test_cache_refuses_a_directory_planted_by_another_user(tmp_path: Path) -> None:
    """Library level: a partial-download or object directory that another user owns (with a
    `data` symlink to a victim file) is refused before anything is opened or truncated."""
    from rangefs.cache import LocalDownloadCache
    from rangefs.cachefiles import ObjectIdentity
    from rangefs.errors import CacheError

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    planted = tmp_path / "planted"
    planted.mkdir(mode=0o700)
    (planted / "data").symlink_to(victim)
    os.chown(planted, 65534, 65534)
    identity = ObjectIdentity(url="http://x/y", size=4096, block_size=4096, etag=None,
                              last_modified=None)
    with pytest.raises(CacheError, match="belongs to uid 65534"):
        LocalDownloadCache.open(planted, identity)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(CacheError, match="symlink"):
        LocalDownloadCache.open(link, identity)
    assert victim.read_bytes() == b"precious"


def test_cache_files_are_never_opened_through_a_symlink(tmp_path: Path) -> None:
    from rangefs.cache import LocalDownloadCache
    from rangefs.cachefiles import ObjectIdentity
    from rangefs.errors import RangefsError

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    directory = tmp_path / "obj"
    directory.mkdir(mode=0o700)
    (directory / "data").symlink_to(victim)
    identity = ObjectIdentity(url="http://x/y", size=4096, block_size=4096, etag=None,
                              last_modified=None)
    with pytest.raises(RangefsError, match="symbolic links"):
        LocalDownloadCache.open(directory, identity)
    assert victim.read_bytes() == b"precious"

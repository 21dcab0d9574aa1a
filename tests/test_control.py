"""Operating a mount (issue 18): ``rangefs status``, ``prefetch``, ``evict`` over the
control socket, and ``--metrics`` scraped for real. Real mounts through the kernel, the
CLI run as a subprocess, the in-process origin (tests/faultserver.py)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import stat
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from rangefs import control, metrics
from rangefs.clictl import _percentile
from rangefs.errors import UsageError
from tests import content
from tests.daemons import free_port
from tests.faultserver import FaultServer
from tests.mountutil import (
    ROOT,
    child_env,
    mounted,
    rangefs_argv,
    run_rangefs,
    start_mount,
    write_list,
)

MIB = 1 << 20
GUARD = 30.0  # hang guard of the polls below (they end as soon as what they wait for is seen)


def scrape(port: int) -> dict[str, float]:
    """The samples of /metrics: 'name{labels}' -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def status_json(*args: str) -> list[dict[str, object]]:
    done = run_rangefs(["status", "--json", *args])
    assert done.returncode == 0, done.stderr
    answer: list[dict[str, object]] = json.loads(done.stdout)
    return answer


def files_of(mnt: Path, *paths: str) -> dict[str, dict[str, object]]:
    (answer,) = status_json("--files", *([str(mnt / p) for p in paths] or [str(mnt)]))
    files = answer["files"]
    assert isinstance(files, list)
    return {f["path"]: f for f in files}


def until(what: str, check: object) -> None:
    deadline = time.monotonic() + GUARD
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"not seen within {GUARD:g} s: {what}")
        time.sleep(0.02)


def test_metrics_scraped_during_a_read_and_status_agrees(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    origin.add("/m.bin", 3 * MIB)
    urls = write_list(tmp_path / "m.urls", [f"{origin.url('/m.bin')} d/m.bin"])
    port = free_port()
    with mounted(urls, mnt, "--prefetch", "none", "--metrics", f"127.0.0.1:{port}",
                 cache_dir=cache):
        os.stat(mnt / "d" / "m.bin")  # probed before the gate closes
        origin.gate = threading.Event()
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(
            (mnt / "d" / "m.bin").read_bytes()))
        reader.start()
        try:
            until("a fetch in flight", lambda: scrape(port)["rangefs_fetches_in_flight"] >= 1)
            during = files_of(mnt, "d/m.bin")["d/m.bin"]
            assert during["state"] in ("reading", "filling"), during
        finally:
            origin.gate.set()
            reader.join(GUARD)
        assert not reader.is_alive()
        content.check("/m.bin", 0, got[0])
        after = scrape(port)
        assert after["rangefs_fetches_in_flight"] == 0
        assert after['rangefs_origin_requests_total{status="206"}'] >= 1
        assert after["rangefs_origin_bytes_total"] >= 3 * MIB
        assert after['rangefs_read_bytes_total{source="network"}'] > 0
        assert after["rangefs_read_duration_seconds_count"] >= 1
        assert after['rangefs_read_duration_seconds_bucket{le="+Inf"}'] == \
            after["rangefs_read_duration_seconds_count"]
        assert after["rangefs_cache_bytes"] >= 3 * MIB
        # status reads the same counters
        (answer,) = status_json(str(mnt))
        stats = answer["stats"]
        assert isinstance(stats, dict)
        assert stats["bytes_fetched"] == after["rangefs_origin_bytes_total"]
        assert stats["responses"]["206"] >= 1
        mount = answer["mount"]
        assert isinstance(mount, dict)
        assert mount["mountpoint"] == str(mnt) and mount["cache_dir"] == str(cache)
        # the table for people names the mount and its traffic
        table = run_rangefs(["status", str(mnt)])
        assert table.returncode == 0, table.stderr
        assert str(mnt) in table.stdout
        assert re.search(r"origin  \d+ requests \(.*206: \d+", table.stdout), table.stdout


def test_prefetch_then_evict_then_read_again(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer
) -> None:
    sizes = {"/p/a.bin": 2 * MIB + 5, "/p/b.bin": MIB, "/q.bin": 3 * MIB}
    for path, size in sizes.items():
        origin.add(path, size)
    urls = write_list(tmp_path / "p.urls", [f"{origin.url(p)} {p.lstrip('/')}" for p in sizes])
    with mounted(urls, mnt, "--prefetch", "none", "--block-size", "64K", cache_dir=cache):
        before = files_of(mnt)
        assert {f["state"] for f in before.values()} == {"idle"}
        done = run_rangefs(["prefetch", str(mnt / "p")], timeout=120)
        assert done.returncode == 0, done.stderr
        assert "2/2 files" in done.stderr
        files = files_of(mnt)
        for path in ("p/a.bin", "p/b.bin"):
            assert files[path]["state"] in ("complete", "verified"), files[path]
            assert files[path]["cached"] == sizes["/" + path]
        assert files["q.bin"]["state"] == "idle" and files["q.bin"]["cached"] == 0
        assert origin.bytes_sent("/q.bin") == 0
        # the prefetched files are read without the network
        origin.reset_log()
        content.check("/p/a.bin", 0, (mnt / "p" / "a.bin").read_bytes())
        assert origin.gets("/p/a.bin") == []

        evicted = run_rangefs(["evict", str(mnt / "p" / "a.bin")])
        assert evicted.returncode == 0, evicted.stderr
        assert re.search(r"2\.[01] MiB evicted from 1 files", evicted.stdout), evicted.stdout
        files = files_of(mnt, "p")
        assert files["p/a.bin"]["cached"] == 0 and files["p/a.bin"]["state"] != "complete"
        assert files["p/b.bin"]["cached"] == MIB
        # read again: fetched again, every byte right
        origin.reset_log()
        with open(mnt / "p" / "a.bin", "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            data = os.pread(f.fileno(), 2 * MIB + 5, 0)
        content.check("/p/a.bin", 0, data)
        assert origin.gets("/p/a.bin")  # the evicted blocks came from the origin again


def test_status_errors_are_one_line(tmp_path: Path, mnt: Path, cache: Path,
                                    origin: FaultServer) -> None:
    outside = run_rangefs(["status", str(tmp_path)])
    assert outside.returncode == 2
    assert outside.stderr.strip() == f"rangefs: {tmp_path}: not inside a rangefs mount"
    origin.add("/e.bin", 10)
    urls = write_list(tmp_path / "e.urls", [origin.url("/e.bin")])
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache):
        missing = run_rangefs(["status", str(mnt / "nope")])
        assert missing.returncode == 1
        assert missing.stderr.strip() == "rangefs: nope: no such file in the mount"
        sock = Path(os.fsdecode(os.getxattr(mnt, control.XATTR)))
        assert sock.parent == cache and re.fullmatch(r"control\.\d+\.sock", sock.name)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with control.Client(sock) as client:
            with pytest.raises(control.ControlError, match="unknown command 'nope'"):
                client.request("nope")
            with pytest.raises(control.ControlError, match='"paths" must be a list'):
                client.request("evict", paths="e.bin")
            assert client.request("status")["mount"]["entries"] == 1  # still answering
    assert not sock.exists()  # removed at unmount


def test_unit_parse_address_and_percentile() -> None:
    assert metrics.parse_address("9464") == ("127.0.0.1", 9464)
    assert metrics.parse_address("0.0.0.0:1") == ("0.0.0.0", 1)
    assert metrics.parse_address("[::1]:80") == ("::1", 80)
    for bad in ("", "x", "1:2:x", "70000", "host:"):
        with pytest.raises(UsageError, match="--metrics"):
            metrics.parse_address(bad)
    buckets = [("0.001", 50), ("0.01", 99), ("0.1", 100), ("+Inf", 100)]
    assert _percentile(buckets, 0.5) == "<= 1 ms"
    assert _percentile(buckets, 0.99) == "<= 10 ms"
    assert _percentile([("+Inf", 0)], 0.5) == "-"


def test_unit_find_mounts_and_mount_of(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw\n"
        "40 35 0:50 / /srv/my\\040models rw,nosuid - fuse.rangefs /etc/m.list "
        "rw,user_id=1000,group_id=1000\n"
        "41 40 0:51 / /srv/my\\040models/inner rw - fuse.rangefs - rw,user_id=0\n"
    )
    found = control.find_mounts(os.fspath(info))
    assert [(m.mountpoint, m.source, m.uid) for m in found] == [
        (Path("/srv/my models"), "/etc/m.list", 1000),
        (Path("/srv/my models/inner"), "-", 0),
    ]
    assert control.mount_of(Path("/srv/my models/a/b"), found) == (found[0], "a/b")
    assert control.mount_of(Path("/srv/my models/inner/x"), found) == (found[1], "x")
    assert control.mount_of(Path("/srv/my models"), found) == (found[0], "")
    assert control.mount_of(Path("/srv"), found) is None


def test_status_of_a_killed_mount_and_the_remount_on_its_cache(
    tmp_path: Path, cache: Path, origin: FaultServer
) -> None:
    """kill -9 of one mount: status shows the live one and one line for the dead one
    (exit 1); the next mount on the dead one's cache replaces its stale socket."""
    origin.add("/k.bin", 100_000)
    urls = write_list(tmp_path / "k.urls", [origin.url("/k.bin")])
    live_mnt, dead_mnt = tmp_path / "live", tmp_path / "dead"
    dead_cache = tmp_path / "dead-cache"
    with mounted(urls, live_mnt, "--prefetch", "none", cache_dir=cache):
        dead = start_mount(urls, dead_mnt, "--prefetch", "none", cache_dir=dead_cache)
        try:
            dead.wait_mounted()
            dead.send(signal.SIGKILL)
            dead.wait_exit()
            stale = list(dead_cache.glob("control.*.sock"))
            assert stale  # left behind by the kill
            done = run_rangefs(["status", str(live_mnt), str(dead_mnt)])
            assert done.returncode == 1
            assert f"{live_mnt}  pid " in done.stdout
            assert done.stderr.strip() == (
                f"rangefs: {dead_mnt}: the rangefs process of this mount is gone "
                f"('fusermount3 -u -z {dead_mnt}' clears it)")
        finally:
            dead.cleanup()
        with mounted(urls, dead_mnt, "--prefetch", "none", cache_dir=dead_cache):
            (answer,) = status_json(str(dead_mnt))
            mount = answer["mount"]
            assert isinstance(mount, dict) and mount["cache_dir"] == str(dead_cache)
            assert not any(p.exists() for p in stale)  # the dead one's socket was removed


def test_status_watch_refreshes_until_ctrl_c(tmp_path: Path, mnt: Path, cache: Path,
                                             origin: FaultServer) -> None:
    origin.add("/w.bin", 10)
    urls = write_list(tmp_path / "w.urls", [origin.url("/w.bin")])
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache):
        watch = subprocess.Popen(
            [*rangefs_argv(), "status", "--watch", "--interval", "0.2", str(mnt)],
            env=child_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert watch.stdout is not None
            frames = 0
            deadline = time.monotonic() + GUARD
            while frames < 2 and time.monotonic() < deadline:
                ready, _, _ = select.select([watch.stdout], [], [], deadline - time.monotonic())
                if not ready:
                    break
                line = watch.stdout.readline().decode()
                if not line:
                    break
                frames += line.startswith(f"{mnt}  pid ")
            assert frames == 2, "two refreshes not seen"
            watch.send_signal(signal.SIGINT)
            # read what it still writes: a full pipe would keep it from exiting
            try:
                _, err = watch.communicate(timeout=GUARD)
            except subprocess.TimeoutExpired:
                watch.kill()
                _, err = watch.communicate()
                pytest.fail("status --watch still ran after SIGINT; its stderr:\n"
                            + err.decode(errors="replace")[-3000:])
            assert watch.returncode == 0, err
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()


def test_status_with_no_mount_says_so(tmp_path: Path) -> None:
    """In a private mount namespace without any rangefs mount (the machine's, if any, are
    lazily unmounted there only): one line, exit 1."""
    script = (
        "set -e; "
        "for m in $(awk '$0 ~ / - fuse.rangefs / {print $5}' /proc/self/mountinfo); do "
        "umount -l \"$m\"; done; "
        "exec \"$@\""
    )
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
         *rangefs_argv(), "status"],
        env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.strip() == "rangefs: no rangefs mount is running (for this user)"
    assert done.stdout == ""

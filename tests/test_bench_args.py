"""The benchmark's command line: only the full default run replaces the README's table;
the rangefs-metrics variant's scraper (issue 18); the ceiling tool's file system."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.bench.__main__ import RESULTS, parse_args
from tests.bench.peers import DEFAULT_PEERS, PEERS, Scraper, free_port
from tests.bench.scenarios import SUPPORTS
from tests.bench.system import unmount, wait_mounted
from tests.content import content


def test_the_full_default_run_writes_latest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANGEFS_BENCH_ARGS", raising=False)
    assert parse_args([]).output == RESULTS / "latest.md"
    assert parse_args(["--no-install", "--runs", "5"]).output == RESULTS / "latest.md"


@pytest.mark.parametrize("argv", [
    ["--scenarios", "7"],
    ["--peers", "rangefs,aria2"],
    ["--quick"],
    ["--runs", "1"],
    ["--delay-ms", "50"],
    ["--rate", "8m"],
    ["--big-size", "64"],
    ["--profile"],
    ["--scenarios", "1,2,3,4,5,6,7"],
    ["--scenarios", "8,9"],
    ["--scenarios", "10"],
    ["--scenarios", "1,2,3,4,5,6,7,8,9"],
    ["--budget-read-s", "10"],
    ["--scenarios", "11,12"],
    ["--scenarios", "13"],
    ["--cloud-rate", "50m"],
])
def test_any_other_run_writes_partial(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANGEFS_BENCH_ARGS", raising=False)
    assert parse_args(argv).output == RESULTS / "partial.md"


def test_extra_mount_options_make_a_partial_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANGEFS_BENCH_ARGS", "--block-size 1M")
    assert parse_args([]).output == RESULTS / "partial.md"


def test_an_explicit_output_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANGEFS_BENCH_ARGS", raising=False)
    assert str(parse_args(["--scenarios", "7", "--output", "/tmp/x.md"]).output) == "/tmp/x.md"


def test_the_default_runs_every_scenario_with_scenario_8_reading_for_30_s() -> None:
    args = parse_args([])
    assert args.scenarios == [str(n) for n in range(1, 14)]
    assert args.budget_read_s is None  # main() makes it 30 s, 8 s with --quick
    assert parse_args(["--scenarios", "8,9", "--budget-read-s", "5"]).budget_read_s == 5.0


@pytest.mark.parametrize("argv", [
    ["--scenarios", "14"],
    ["--scenarios", "0"],
    ["--budget-read-s", "0"],
    ["--budget-read-s", "x"],
])
def test_bad_scenario_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2


def test_the_metrics_variant_is_a_peer_of_scenarios_1_and_7(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANGEFS_BENCH_ARGS", raising=False)
    args = parse_args(["--scenarios", "1,7", "--peers", "rangefs,rangefs-metrics"])
    assert args.peers == ["rangefs", "rangefs-metrics"]
    assert args.output == RESULTS / "partial.md"
    assert "rangefs-metrics" in SUPPORTS["1"] and "rangefs-metrics" in SUPPORTS["7"]
    peer = PEERS["rangefs-metrics"]
    assert peer.is_rangefs and peer.scrape and not PEERS["rangefs"].scrape
    # opt-in: the full default run (the README's table) stays as it was
    assert "rangefs-metrics" not in DEFAULT_PEERS


def test_an_unknown_peer_is_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--peers", "rangefs,rangefs-metric"])
    assert exc.value.code == 2


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b"# HELP x\nrangefs_read_duration_seconds_count 42.0\n"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


class _NoMetrics(_Metrics):
    body = b"hello\n"


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> http.server.HTTPServer:
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _wait_for(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30  # a bound for a hung test, not a timing assertion
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_scraper_counts_its_scrapes_and_reads_the_mounts_read_count() -> None:
    server = _serve(_Metrics)
    try:
        scraper = Scraper(f"http://127.0.0.1:{server.server_port}/metrics", interval=0.01)
        scraper.start()
        _wait_for(lambda: scraper.scrapes >= 3)
        scraper.stop()
        assert scraper.failure is None
        assert scraper.scrapes >= 3 and len(scraper.seconds) == scraper.scrapes
        assert scraper.reads == 42
    finally:
        server.shutdown()
        server.server_close()


def test_a_failed_scrape_is_kept_and_stops_the_scraper() -> None:
    server = _serve(_NoMetrics)
    try:
        scraper = Scraper(f"http://127.0.0.1:{server.server_port}/metrics", interval=0.01)
        scraper.start()
        _wait_for(lambda: scraper.failure is not None)
        scraper.stop()
        assert scraper.scrapes == 0
        assert scraper.failure is not None and "rangefs_read_duration_seconds_count" in \
            scraper.failure
    finally:
        server.shutdown()
        server.server_close()
    closed = Scraper(f"http://127.0.0.1:{free_port()}/metrics", interval=0.01)
    closed.start()
    _wait_for(lambda: closed.failure is not None)
    closed.stop()
    assert closed.scrapes == 0 and closed.failure is not None


def test_the_ceilings_minimal_file_system_serves_its_file_exactly(tmp_path: Path) -> None:
    """``tests.bench.fuseceiling``'s least-work pyfuse3 server, mounted for real: what it
    measures must be a read of the right bytes."""
    source, mountpoint = tmp_path / "object", tmp_path / "mnt"
    source.write_bytes(content("ceiling", 0, 3 << 20) + b"tail")
    mountpoint.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tests.bench.fuseceiling import serve; "
         f"serve({str(source)!r}, {str(mountpoint)!r})"],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert wait_mounted(mountpoint, proc, 30), proc.stderr.read() if proc.stderr else ""
        assert os.listdir(mountpoint) == ["f"]
        assert (mountpoint / "f").read_bytes() == source.read_bytes()
    finally:
        unmount(mountpoint, proc)
    assert proc.returncode == 0

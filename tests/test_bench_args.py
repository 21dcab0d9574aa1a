"""The benchmark's command line: only the full default run replaces the README's table."""

from __future__ import annotations

import pytest

from tests.bench.__main__ import RESULTS, parse_args


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

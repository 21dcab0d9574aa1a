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
    ["--scenarios", "1,2,3,4,5,6,7"],
    ["--scenarios", "8,9"],
    ["--scenarios", "10"],
    ["--scenarios", "1,2,3,4,5,6,7,8,9"],
    ["--budget-read-s", "10"],
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
    assert args.scenarios == [str(n) for n in range(1, 11)]
    assert args.budget_read_s is None  # main() makes it 30 s, 8 s with --quick
    assert parse_args(["--scenarios", "8,9", "--budget-read-s", "5"]).budget_read_s == 5.0


@pytest.mark.parametrize("argv", [
    ["--scenarios", "11"],
    ["--scenarios", "0"],
    ["--budget-read-s", "0"],
    ["--budget-read-s", "x"],
])
def test_bad_scenario_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2

"""Shared fixtures: the test origin (``tests/faultserver.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faultserver import FaultServer

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def pytest_configure(config: pytest.Config) -> None:
    """Markers. ``slow`` tests (kill loops, load) are NOT deselected by default: CI runs
    everything; ``-m "not slow"`` skips them on a quick local run.

    The machine's proxy variables are dropped for the whole run (this process and every
    child): the servers of the tests are on 127.0.0.1, and the proxy tests set their own."""
    config.addinivalue_line("markers", "slow: takes more than ~20 s (kill loops, load)")
    for name in PROXY_VARIABLES:
        os.environ.pop(name, None)
        os.environ.pop(name.upper(), None)


@pytest.fixture
def origin() -> Iterator[FaultServer]:
    """A started in-process origin on 127.0.0.1; stopped (every thread joined) at teardown."""
    with FaultServer() as server:
        yield server


@pytest.fixture
def origin_factory() -> Iterator[Callable[[], FaultServer]]:
    """Call it for each extra origin (e.g. a cross-origin redirect target); all are stopped
    at teardown."""
    servers: list[FaultServer] = []

    def make() -> FaultServer:
        server = FaultServer().start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    """An empty directory to mount on."""
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache directory path for a mount (created by rangefs)."""
    return tmp_path / "cache"

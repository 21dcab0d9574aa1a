"""download_file / cat_url and the downloaders over real HTTP (tests/faultserver.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from rangefs.digests import Digest
from rangefs.download import DownloadOptions, cat_url, download_file, partial_dir
from rangefs.errors import DigestMismatch, PermanentError, RetriesExhausted, UsageError
from rangefs.ratecontrol import BackoffPolicy
from tests.content import check, digest_of
from tests.faultserver import Fault, FaultServer

OPTS = DownloadOptions(
    block_size=64 << 10,
    concurrency=4,
    backoff=BackoffPolicy(initial=0.01, maximum=0.05, steps=6),
)


async def test_download_is_exact_and_leaves_no_partial(origin: FaultServer,
                                                       tmp_path: Path) -> None:
    size = 3 * 1024 * 1024 + 7
    origin.add("/a", size, repr_digest=True)
    dest = tmp_path / "a.bin"
    result = await download_file(origin.url("/a"), dest, OPTS)
    check("/a", 0, dest.read_bytes())
    assert result.size == size and result.verified is not None  # the server's Repr-Digest
    assert not partial_dir(dest).exists()
    assert origin.bytes_sent("/a") <= size + 4096


@pytest.mark.parametrize("kind", ["status", "reset", "reset_body", "short_body",
                                  "wrong_start", "wrong_length", "gzip", "ignore_range"])
async def test_download_survives_faults(origin: FaultServer, tmp_path: Path, kind: str) -> None:
    size = 1024 * 1024
    origin.add("/a", size)
    origin.faults("/a", [Fault(kind, method="GET")] * 3)  # type: ignore[arg-type]
    dest = tmp_path / "a.bin"
    await download_file(origin.url("/a"), dest, OPTS)
    check("/a", 0, dest.read_bytes())


async def test_download_resumes_after_a_failure(origin: FaultServer, tmp_path: Path) -> None:
    size = 20 * 1024 * 1024  # more than one 8 MiB background request
    origin.add("/a", size)
    dest = tmp_path / "a.bin"
    opts = DownloadOptions(block_size=1 << 20, concurrency=1, pass_delay=0.01,
                           backoff=BackoffPolicy(initial=0.01, maximum=0.02, steps=1))
    # let the first request through, then a run of 503s makes the download give up
    origin.faults("/a", [Fault("delay", seconds=0, method="GET")]
                  + [Fault("status", status=503, method="GET")] * 100)
    with pytest.raises(RetriesExhausted, match="run the same command again"):
        await download_file(origin.url("/a"), dest, opts)
    assert not dest.exists() and partial_dir(dest).exists()
    sent_first = origin.bytes_sent("/a")
    origin.clear_faults()
    origin.reset_log()
    await download_file(origin.url("/a"), dest, opts)
    check("/a", 0, dest.read_bytes())
    assert sent_first > 0
    assert origin.bytes_sent("/a") <= size - sent_first + (1 << 20) + 4096


async def test_download_digest_mismatch_removes_everything(origin: FaultServer,
                                                           tmp_path: Path) -> None:
    origin.add("/a", 100_000)
    dest = tmp_path / "a.bin"
    wrong = DownloadOptions(block_size=64 << 10, digest=Digest("sha256", bytes(32)))
    with pytest.raises(DigestMismatch):
        await download_file(origin.url("/a"), dest, wrong)
    assert not dest.exists() and not partial_dir(dest).exists()
    right = DownloadOptions(block_size=64 << 10,
                            digest=Digest("sha256", digest_of("/a", 100_000)))
    await download_file(origin.url("/a"), dest, right)
    check("/a", 0, dest.read_bytes())


async def test_download_writes_behind(origin: FaultServer, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A download hands what it wrote to the disk every WRITE_BEHIND_BYTES while it runs
    (so its last fdatasync has little to wait for), and the bytes are exact."""
    from rangefs import cache as cache_mod
    from rangefs import cachefiles
    from rangefs.download import WRITE_BEHIND_BYTES

    calls: list[int] = []

    def recorder(fd: int) -> bool:
        calls.append(fd)
        return cachefiles.start_writeback(fd)

    monkeypatch.setattr(cache_mod, "start_writeback", recorder)
    size = 4 * WRITE_BEHIND_BYTES + 12345
    origin.add("/a", size)
    dest = tmp_path / "a.bin"
    await download_file(origin.url("/a"), dest, DownloadOptions(block_size=1 << 20))
    check("/a", 0, dest.read_bytes())
    assert len(calls) == 4


async def test_download_refuses_to_overwrite(origin: FaultServer, tmp_path: Path) -> None:
    origin.add("/a", 10)
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="--force"):
        await download_file(origin.url("/a"), dest, OPTS)
    assert dest.read_bytes() == b"keep me"


async def test_download_404(origin: FaultServer, tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="404"):
        await download_file(origin.url("/missing"), tmp_path / "x", OPTS)


async def test_download_empty_object(origin: FaultServer, tmp_path: Path) -> None:
    origin.add("/empty", 0)
    dest = tmp_path / "e"
    await download_file(origin.url("/empty"), dest, OPTS)
    assert dest.read_bytes() == b""


@pytest.mark.parametrize("accept_ranges", [True, False])
async def test_cat_streams_in_order(origin: FaultServer, tmp_path: Path,
                                    accept_ranges: bool) -> None:
    size = 5 * 1024 * 1024 + 3
    origin.add("/a", size, accept_ranges=accept_ranges, repr_digest=True)
    origin.fault_probability("/a", 0.2, ["status", "reset_body"], seed=3)
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        n = await cat_url(origin.url("/a"), fd, OPTS)
    finally:
        os.close(fd)
    assert n == size
    check("/a", 0, out.read_bytes())


async def test_cat_digest_mismatch(origin: FaultServer, tmp_path: Path) -> None:
    origin.add("/a", 70_000)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(DigestMismatch):
            await cat_url(origin.url("/a"), fd,
                          DownloadOptions(digest=Digest("sha256", bytes(32))))
    finally:
        os.close(fd)
    await trio.lowlevel.checkpoint()

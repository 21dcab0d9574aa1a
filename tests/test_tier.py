"""Many machines through one HTTP caching tier (issue 17 item 5): Debian's nginx with
``proxy_cache`` + ``slice 1m`` (``tests/tierrig.py``) between the mounts and the origin.

rangefs asks for block-aligned ranges (64 KiB blocks, adjacent missing blocks in one
request) with ``If-Range: "etag"``; the tier cuts them into 1 MiB slices, each fetched once
from the origin and cached. Two mounts with two empty cache directories stand for two
machines: the first one's reads fill the tier, the second one's cost the origin (almost)
nothing. What the origin sent is its own count of body bytes (``origin.bytes_sent``).

When the origin's object changes while the tier still holds slices of the old version, the
tier keeps answering with the old ETag. nginx's slice module refuses to join slices of two
ETags into one answer (``etag mismatch in slice response``: the connection is closed), and
rangefs refuses an answer whose ETag is not its version's: so a read gets old-version bytes
or EIO, never a byte of the new version in a file it has been reading as the old one.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.content import check, content
from tests.faultserver import FaultServer
from tests.mountutil import mounted, write_list
from tests.tierrig import SLICE, TierRig

MiB = 1 << 20
SIZE = 64 * MiB
PATH = "/models/weights.bin"
NAME = "weights.bin"
ORIGIN_SHARE = 0.01  # the second machine may cost the origin at most 1 % of the object


@pytest.fixture
def tier(tmp_path: Path, origin: FaultServer) -> Iterator[TierRig]:
    """nginx caching the origin in slices; always stopped."""
    with TierRig(tmp_path / "tier", origin.base_url) as rig:
        yield rig


def machine(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(mount point, empty cache directory) of one machine."""
    mnt = tmp_path / f"{name}-mnt"
    mnt.mkdir()
    return mnt, tmp_path / f"{name}-cache"


def settled_bytes(origin: FaultServer, path: str, quiet: float = 0.5, limit: float = 30) -> int:
    """``origin.bytes_sent(path)`` once it has held still for ``quiet`` s: the tier may
    still be finishing a slice whose client has gone (a cacheable answer is read to the
    end). Not a timing assertion: it only waits for the count to stop moving."""
    count, since = origin.bytes_sent(path), time.monotonic()
    deadline = since + limit
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.05)
        now = origin.bytes_sent(path)
        if now != count:
            count, since = now, time.monotonic()
    return count


def cp_and_check(source: Path, dest: Path, key: str, size: int) -> None:
    """``cp`` the file out and check every byte of the copy."""
    subprocess.run(["cp", str(source), str(dest)], check=True, timeout=600)
    data = dest.read_bytes()
    assert len(data) == size
    check(key, 0, data)
    dest.unlink()


def read_and_check(path: Path, key: str, size: int, chunk: int = MiB) -> None:
    """Read the whole file in order, ``chunk`` bytes a read, each checked."""
    with open(path, "rb", buffering=0) as fh:
        offset = 0
        while offset < size:
            data = fh.read(chunk)
            assert data, f"EOF at {offset} of {size}"
            check(key, offset, data)
            offset += len(data)
        assert fh.read(chunk) == b""


def mib(n: int) -> str:
    return f"{n / MiB:.2f} MiB ({100 * n / SIZE:.2f} % of the object)"


def test_tier_keeps_validators_and_honours_if_range(tier: TierRig, origin: FaultServer) -> None:
    """What rangefs relies on, asked of the tier directly: HEAD gives the size and the
    origin's validators; a range with a matching If-Range is a 206 of exactly those bytes;
    a non-matching If-Range never gets a 206 (the tier answers 200 with the whole object
    of the version it holds: right bytes, which rangefs would refuse as not a range)."""
    size = 5 * MiB + 12345
    origin.add("/v.bin", size)
    status, headers, body = tier.get("/v.bin", method="HEAD")
    assert status == 200 and body == b"", headers
    assert headers["content-length"] == str(size)
    assert headers["etag"] == '"v1"'
    assert headers["last-modified"] == "Wed, 01 Jan 2025 00:00:00 GMT"
    assert headers["accept-ranges"] == "bytes"

    for start, end in ((2 * MiB, 2 * MiB + 65535), (3 * MiB - 65536, 4 * MiB + 65535),
                       (5 * MiB, size - 1), (0, 0)):
        status, headers, body = tier.get(
            "/v.bin", {"Range": f"bytes={start}-{end}", "If-Range": '"v1"'})
        assert status == 206, headers
        assert headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert headers["etag"] == '"v1"'
        assert headers["last-modified"] == "Wed, 01 Jan 2025 00:00:00 GMT"
        check("/v.bin", start, body)
        assert len(body) == end - start + 1

    status, headers, body = tier.get(
        "/v.bin", {"Range": f"bytes={MiB}-{2 * MiB - 1}", "If-Range": '"other"'})
    assert status == 200, headers
    assert "content-range" not in headers
    assert headers["etag"] == '"v1"'
    assert len(body) == size
    check("/v.bin", 0, body)
    # the origin sent each slice once: the tier cached them (HEAD was a GET of slice 0)
    slices = [r.range for r in origin.gets("/v.bin")]
    assert sorted(slices) == sorted(set(slices)), slices
    assert all(r.if_range is None for r in origin.gets("/v.bin"))
    assert origin.bytes_sent("/v.bin") == size


def test_second_machine_cp_costs_the_origin_almost_nothing(
    tmp_path: Path, tier: TierRig, origin: FaultServer
) -> None:
    """Two machines ``cp`` the same 64 MiB through the tier, default --prefetch (the
    background fill counts too): the first costs the origin about the object once, the
    second at most 1 % of it."""
    origin.add(PATH, SIZE)
    urls = write_list(tmp_path / "tier.urls", [tier.url(PATH)])

    mnt, cache = machine(tmp_path, "first")
    with mounted(urls, mnt, cache_dir=cache) as mount:
        cp_and_check(mnt / NAME, tmp_path / "copy.bin", PATH, SIZE)
        assert os.getxattr(mnt / NAME, "user.rangefs.etag") == b'"v1"'
        assert mount.stop() == 0
    first = settled_bytes(origin, PATH)

    mnt, cache = machine(tmp_path, "second")
    with mounted(urls, mnt, cache_dir=cache) as mount:
        cp_and_check(mnt / NAME, tmp_path / "copy.bin", PATH, SIZE)
        assert mount.stop() == 0
    second = settled_bytes(origin, PATH) - first

    print(f"\ncp through the tier, {SIZE // MiB} MiB object, default --prefetch:"
          f"\n  origin bytes, first machine:  {mib(first)}"
          f"\n  origin bytes, second machine: {mib(second)}")
    assert SIZE <= first <= SIZE + 4 * SLICE, mib(first)
    assert second <= ORIGIN_SHARE * SIZE, mib(second)


def test_second_machine_random_reads_cost_the_origin_almost_nothing(
    tmp_path: Path, tier: TierRig, origin: FaultServer
) -> None:
    """The first machine reads the object in order (--prefetch none: the origin's count is
    exactly the tier's misses); the second does 200 random preads of 4 KiB..1 MiB, each
    checked, for at most 1 % of the object from the origin."""
    origin.add(PATH, SIZE)
    urls = write_list(tmp_path / "tier.urls", [tier.url(PATH)])

    mnt, cache = machine(tmp_path, "first")
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache) as mount:
        read_and_check(mnt / NAME, PATH, SIZE)
        assert mount.stop() == 0
    first = settled_bytes(origin, PATH)

    rng = random.Random(17)
    mnt, cache = machine(tmp_path, "second")
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache) as mount:
        fd = os.open(mnt / NAME, os.O_RDONLY)
        try:
            for _ in range(200):
                length = rng.randint(4096, MiB)
                offset = rng.randrange(0, SIZE - length + 1)
                data = os.pread(fd, length, offset)
                assert len(data) == length
                check(PATH, offset, data)
        finally:
            os.close(fd)
        assert mount.stop() == 0
    second = settled_bytes(origin, PATH) - first

    print(f"\nrandom preads through the tier, --prefetch none:"
          f"\n  origin bytes, first machine (sequential read): {mib(first)}"
          f"\n  origin bytes, second machine (200 preads):     {mib(second)}")
    assert SIZE <= first <= SIZE + 4 * SLICE, mib(first)
    assert second <= ORIGIN_SHARE * SIZE, mib(second)


def version_of(offset: int, data: bytes, want: int) -> str:
    """Which version ``data`` read at ``offset`` is: "v1" (the old content), "v2" (the new
    one) or "wrong" (neither, or not the ``want`` bytes asked for)."""
    if len(data) != want:
        return "wrong"
    if data == content(PATH, offset, want):
        return "v1"
    if data == content("v2", offset, want):
        return "v2"
    return "wrong"


def read_versions(fd: int, start: int = 0, chunk: int = MiB) -> tuple[list[str], int | None]:
    """Read the object's file ``fd`` in order from ``start``, ``chunk`` bytes a pread: the
    version of each chunk (:func:`version_of`) and the errno that ended the read early
    (None if it reached the end)."""
    seen: list[str] = []
    for offset in range(start, SIZE, chunk):
        try:
            data = os.pread(fd, chunk, offset)
        except OSError as exc:
            return seen, exc.errno
        seen.append(version_of(offset, data, min(chunk, SIZE - offset)))
    return seen, None


def read_file_versions(path: Path) -> tuple[list[str], int | None]:
    """:func:`read_versions` of a file opened for the purpose, from offset 0."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_versions(fd)
    finally:
        os.close(fd)


def errname(err: int | None) -> str:
    return "the end" if err is None else errno.errorcode.get(err, str(err))


def v1_prefix(origin: FaultServer) -> int:
    """Bytes from offset 0 that the tier holds as whole slices of the first version: the
    slices the origin sent whole (the tier caches an answer it read to the end)."""
    whole = {
        r.range for r in origin.gets(PATH) if r.status == 206 and r.bytes_sent == SLICE
    }
    prefix = 0
    while prefix < SIZE and f"bytes={prefix}-{prefix + SLICE - 1}" in whole:
        prefix += SLICE
    return prefix


def test_a_changed_origin_never_mixes_versions_through_the_tier(
    tmp_path: Path, tier: TierRig, origin: FaultServer
) -> None:
    """The origin's object changes (new bytes, ETag "v2") after a first machine has read
    the start of it through the tier (8 MiB, and its read-ahead). The tier still holds
    those slices, with ETag "v1", and answers HEAD with "v1". A second machine (empty
    cache) then reads the whole file in order: it gets exactly the tier's old slices, then
    EIO at the first slice the tier lacks (nginx will not join a "v2" slice to "v1" ones);
    never a byte of "v2". The first machine, reading on, does the same. Once the tier's
    copy is gone (its cache emptied, as after expiry or a purge) a new machine gets "v2"
    whole."""
    origin.add(PATH, SIZE)
    urls = write_list(tmp_path / "tier.urls", [tier.url(PATH)])
    start = 8 * MiB
    args = ("--prefetch", "none", "--read-timeout", "6")

    first_mnt, first_cache = machine(tmp_path, "first")
    with mounted(urls, first_mnt, *args, cache_dir=first_cache, warnings_ok=True) as first:
        fd = os.open(first_mnt / NAME, os.O_RDONLY)
        try:
            check(PATH, 0, os.pread(fd, start, 0))
            before = settled_bytes(origin, PATH)
            prefix = v1_prefix(origin)
            assert start <= prefix < SIZE, f"the tier holds {mib(prefix)} of v1"
            origin.set_version(PATH, etag='"v2"', key="v2")

            mnt, cache = machine(tmp_path, "second")
            with mounted(urls, mnt, *args, cache_dir=cache, warnings_ok=True) as second:
                assert os.path.getsize(mnt / NAME) == SIZE
                began = time.monotonic()
                seen, err = read_file_versions(mnt / NAME)
                took = time.monotonic() - began
                assert os.getxattr(mnt / NAME, "user.rangefs.etag") == b'"v1"'
                second.check_log(warnings_ok=True)
                log = second.stderr()
            print(f"\nthe tier held {mib(prefix)} of v1 when the origin changed to v2"
                  f"\nsecond machine: {seen.count('v1')} MiB of v1, {seen.count('v2')} MiB "
                  f"of v2, then {errname(err)} (after {took:.1f} s)")
            notes = [ln for ln in log.splitlines() if " WARNING " in ln or " ERROR " in ln]
            print("  its log:", *notes[:2], sep="\n    ")
            assert "v2" not in seen and "wrong" not in seen, seen
            assert (seen, err) == (["v1"] * (prefix // MiB), errno.EIO)

            # the first machine, reading on in the same open file: the same outcome
            seen, err = read_versions(fd, start)
            print(f"first machine reading on: {seen.count('v1')} MiB of v1, "
                  f"{seen.count('v2')} MiB of v2, then {errname(err)}")
            assert (seen, err) == (["v1"] * ((prefix - start) // MiB), errno.EIO)
        finally:
            os.close(fd)
        first.check_log(warnings_ok=True)
    wasted = settled_bytes(origin, PATH) - before
    print(f"origin bytes while the tier refused to mix versions: {mib(wasted)}")

    # the tier forgets (expiry, purge): a new machine gets v2 whole
    tier.stop()
    for entry in tier.cache_files():
        entry.unlink()
    tier.start()
    urls = write_list(tmp_path / "tier.urls", [tier.url(PATH)])
    mnt, cache = machine(tmp_path, "third")
    with mounted(urls, mnt, *args, cache_dir=cache) as third:
        seen, err = read_file_versions(mnt / NAME)
        assert (seen, err) == (["v2"] * (SIZE // MiB), None)
        assert os.getxattr(mnt / NAME, "user.rangefs.etag") == b'"v2"'
        assert third.stop() == 0

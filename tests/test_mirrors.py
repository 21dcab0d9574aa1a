"""Mirrors (issue 19): ``mirror=URL`` entries; the same version required of each; reads
fail over; background fill spread over the healthy ones. Real mounts, two or three
in-process origins serving the same bytes (the same content key); every byte checked."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from rangefs.errors import UrlListError
from rangefs.urllist import parse_url_list
from tests import content
from tests.faultserver import FaultServer
from tests.mountutil import mounted, write_list

MIB = 1 << 20
KEY = "/mirrored"


def serve(origin: FaultServer, path: str, size: int, etag: str = '"v1"') -> str:
    origin.add(path, size, key=KEY, etag=etag)
    return origin.url(path)


def body_bytes(origin: FaultServer, path: str) -> int:
    return sum(r.bytes_sent for r in origin.gets(path))


def test_the_list_takes_mirror_fields() -> None:
    [entry] = parse_url_list(
        "http://a.example/x.bin x mirror=http://u:pw@b.example/x.bin mirror=https://c.example/y\n",
        "t")
    assert entry.mirrors == ("http://u:pw@b.example/x.bin", "https://c.example/y")
    assert "pw" not in repr(entry)
    for line, why in (
        ("http://a/x x mirror=ftp://b/x", "mirror: "),
        ("http://a/x x mirror=http://a/x", "given twice"),
        ("http://a/x x mirror=http://b/x mirror=http://b/x", "given twice"),
    ):
        with pytest.raises(UrlListError, match=why):
            parse_url_list(line + "\n", "t")


def test_reads_fail_over_when_the_url_fails(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer,
    origin_factory: Callable[[], FaultServer],
) -> None:
    size = 3 * MIB + 17
    mirror = origin_factory()
    url = serve(origin, "/f.bin", size)
    mirror_url = serve(mirror, "/copy/f.bin", size)
    urls = write_list(tmp_path / "m.urls", [f"{url} f.bin mirror={mirror_url}"])
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache, warnings_ok=True) as m:
        with open(mnt / "f.bin", "rb") as f:
            content.check(KEY, 0, f.read(MIB))  # both serve
            origin.fault_probability("/f.bin", 1.0, [{"kind": "status", "status": 503,
                                                      "method": "GET"}])
            content.check(KEY, MIB, f.read())  # every GET of the URL fails now
        assert body_bytes(mirror, "/copy/f.bin") > 0
        assert "reading from 1 mirror(s) as well" in m.stderr()
        assert "failed" in m.stderr()


def test_background_fill_spreads_over_the_mirrors(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer,
    origin_factory: Callable[[], FaultServer],
) -> None:
    size = 8 * MIB
    second, third = origin_factory(), origin_factory()
    url = serve(origin, "/s.bin", size)
    urls = write_list(tmp_path / "s.urls", [
        f"{url} s.bin mirror={serve(second, '/s.bin', size)} "
        f"mirror={serve(third, '/s.bin', size)}"])
    with mounted(urls, mnt, "--prefetch", "open", "--block-size", "64K", cache_dir=cache):
        content.check(KEY, 0, (mnt / "s.bin").read_bytes())
    sent = [body_bytes(o, "/s.bin") for o in (origin, second, third)]
    assert all(n > 0 for n in sent), sent  # each mirror served part of it
    assert sum(sent) == size  # and no block twice


def test_a_mirror_of_another_version_is_left_out(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer,
    origin_factory: Callable[[], FaultServer],
) -> None:
    size = MIB
    other = origin_factory()
    url = serve(origin, "/v.bin", size)
    other.add("/v.bin", size, key="/other-bytes", etag='"v2"')
    urls = write_list(tmp_path / "v.urls", [f"{url} v.bin mirror={other.url('/v.bin')}"])
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache, warnings_ok=True) as m:
        content.check(KEY, 0, (mnt / "v.bin").read_bytes())
    assert other.gets("/v.bin") == []
    assert 'left out: another (or a weak) ETag: "v2", not "v1"' in m.stderr()


def test_a_stalled_url_gives_way_to_a_mirror(
    tmp_path: Path, mnt: Path, cache: Path, origin: FaultServer,
    origin_factory: Callable[[], FaultServer],
) -> None:
    size = 2 * MIB
    mirror = origin_factory()
    url = serve(origin, "/st.bin", size)
    mirror_url = serve(mirror, "/st.bin", size)
    urls = write_list(tmp_path / "st.urls", [f"{url} st.bin mirror={mirror_url}"])
    # the URL's bodies stall (120 s) after their first bytes; a read's HTTP read timeout
    # (half of --read-timeout) drops it and the retry goes to the mirror
    origin.fault_probability("/st.bin", 1.0, [{"kind": "stall", "after": 1000,
                                               "seconds": 120, "method": "GET"}])
    with mounted(urls, mnt, "--prefetch", "none", "--read-timeout", "8", cache_dir=cache,
                 warnings_ok=True):
        fd = os.open(mnt / "st.bin", os.O_RDONLY)
        try:
            content.check(KEY, 0, os.pread(fd, size, 0))
        finally:
            os.close(fd)
    assert body_bytes(mirror, "/st.bin") > 0
    origin.clear_faults()

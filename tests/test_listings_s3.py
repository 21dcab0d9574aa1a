"""Listed directories of S3 buckets (issue 19): a list entry whose URL is a bucket or a
prefix in it (path style, ending with '/') is listed with ListObjectsV2 (delimiter '/',
every page), sizes and times from the listing (no HEAD per object). Against moto's S3
server through tests/s3rig.py's front, which records every request."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests import content
from tests.mountutil import file_sizes, mounted, write_list
from tests.s3rig import S3Rig

OBJECTS = {
    "top.bin": 70_001,
    "dir/a.bin": 3,
    "dir/c d.bin": 65_536,
    "dir/sub/b.bin": 200_000,
    "dir/ü.txt": 5,
}
MANY = 1_001  # more than one page (1,000 keys)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Rig]:
    with S3Rig(tmp_path_factory.mktemp("s3")) as rig:
        rig.create_bucket("bkt")
        client = rig.client()

        def put(key: str, data: bytes) -> None:  # readable by anyone, as a public data set
            client.put_object(Bucket="bkt", Key=key, Body=data, ACL="public-read")

        for key, size in OBJECTS.items():
            put(key, content.content(key, 0, size))
        put("dir/", b"")  # a "directory marker" object: not a file
        for i in range(MANY):
            put(f"many/k{i:04d}", b"%d" % i)
        yield rig


def test_a_bucket_is_listed_page_by_page_without_heads(s3: S3Rig, tmp_path: Path, mnt: Path,
                                                       cache: Path) -> None:
    urls = write_list(tmp_path / "l.urls", [f"{s3.url_endpoint}/bkt/ b"])
    before = len(s3.requests())
    with mounted(urls, mnt, "--prefetch", "none", cache_dir=cache):
        assert sorted(os.listdir(mnt / "b")) == ["dir", "many", "top.bin"]
        assert file_sizes(mnt / "b" / "dir") == {k[4:]: v for k, v in OBJECTS.items()
                                           if k.startswith("dir/")}
        many = mnt / "b" / "many"
        assert len(os.listdir(many)) == MANY
        assert (many / "k1000").stat().st_size == 4
        asked = s3.requests()[before:]
        assert {r.method for r in asked} == {"GET"}  # listings only: no HEAD, no object GET
        assert [r.query.get("prefix") for r in asked if r.query.get("list-type") == "2"] == [
            "", "dir/", "dir/sub/", "many/", "many/"]  # the bucket's own GET, then pages
        for key, size in OBJECTS.items():
            assert (mnt / "b" / key).read_bytes() == content.content(key, 0, size)
        assert (many / "k0999").read_bytes() == b"999"
    heads = sorted(unquote(r.path) for r in s3.requests()[before:] if r.method == "HEAD")
    assert heads == sorted(["/bkt/many/k0999", *(f"/bkt/{k}" for k in OBJECTS)])  # per open


def test_a_prefix_of_a_bucket_and_a_remount_that_lists_nothing(
        s3: S3Rig, tmp_path: Path, mnt: Path, cache: Path) -> None:
    urls = write_list(tmp_path / "l.urls", [f"{s3.url_endpoint}/bkt/dir/ d"])
    expected = {k[4:]: v for k, v in OBJECTS.items() if k.startswith("dir/")}
    with mounted(urls, mnt, cache_dir=cache):
        assert file_sizes(mnt / "d") == expected
        assert (mnt / "d" / "sub" / "b.bin").read_bytes() == \
            content.content("dir/sub/b.bin", 0, 200_000)
    # the listings are remembered, and where the bucket is: no listing request now
    before = len(s3.requests())
    with mounted(urls, mnt, cache_dir=cache):
        assert file_sizes(mnt / "d") == expected
        assert (mnt / "d" / "sub" / "b.bin").read_bytes() == \
            content.content("dir/sub/b.bin", 0, 200_000)
    assert [r for r in s3.requests()[before:] if r.method == "GET" and not r.range] == []

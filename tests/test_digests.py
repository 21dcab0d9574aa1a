from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
import trio
import trio.testing

from rangefs import digests
from rangefs.digests import (
    Digest,
    Hasher,
    hash_file,
    parse_digest,
    parse_legacy_digest,
    parse_repr_digest,
)
from rangefs.errors import DigestMismatch

HELLO = b"hello world"
ALGORITHMS = ("md5", "sha1", "sha256", "sha512")
# RFC 9530 section 3 example: sha-256 of '{"hello": "world"}'
RFC_SHA256_B64 = "X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="
RFC_SHA256_HEX = hashlib.sha256(b'{"hello": "world"}').hexdigest()
EMPTY_SHA256_B64 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


def raw(algorithm: str, data: bytes = HELLO) -> bytes:
    return hashlib.new(algorithm, data).digest()


def b64(algorithm: str, data: bytes = HELLO) -> str:
    return base64.b64encode(raw(algorithm, data)).decode()


# --- Digest ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("sha256", "sha256"),
        ("SHA-256", "sha256"),
        ("Sha-512", "sha512"),
        ("SHA1", "sha1"),
        ("sha-1", "sha1"),
        ("MD5", "md5"),
    ],
)
def test_digest_accepts_aliases(alias: str, canonical: str) -> None:
    d = Digest(alias, raw(canonical))
    assert d.algorithm == canonical
    assert d.expected == raw(canonical)


def test_digest_rejects_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match="unsupported digest algorithm 'crc32c'"):
        Digest("crc32c", b"\0" * 4)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_digest_rejects_wrong_length(algorithm: str) -> None:
    with pytest.raises(ValueError, match=r"must be .* bytes"):
        Digest(algorithm, raw(algorithm)[:-1])
    with pytest.raises(ValueError):
        Digest(algorithm, b"")


def test_digest_rejects_text_expected() -> None:
    with pytest.raises(ValueError, match="raw bytes"):
        Digest("sha256", RFC_SHA256_HEX)  # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hex_and_base64_round_trip(algorithm: str) -> None:
    from_hex = Digest.from_text(algorithm, raw(algorithm).hex())
    from_b64 = Digest.from_text(algorithm, b64(algorithm))
    from_b64_unpadded = Digest.from_text(algorithm, b64(algorithm).rstrip("="))
    assert from_hex == from_b64 == from_b64_unpadded
    assert from_hex.hex == raw(algorithm).hex()
    assert from_hex.base64 == b64(algorithm)
    assert str(from_hex) == f"{algorithm}:{raw(algorithm).hex()}"
    assert Digest.from_text(algorithm, raw(algorithm).hex().upper()) == from_hex


def test_from_text_url_safe_base64() -> None:
    data = bytes(range(250, 256)) * 6  # contains bytes that encode to '+' and '/'
    expected = hashlib.sha256(data).digest()
    urlsafe = base64.urlsafe_b64encode(expected).decode()
    assert Digest.from_text("sha256", urlsafe).expected == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("zz" * 31 + "z!", "neither 64 hex digits nor base64"),
        ("zz" * 32, "got 48 bytes"),
        ("aabbcc", "must be 32 bytes"),
        ("ab" * 31, "must be 32 bytes"),
        ("é" * 44, "neither"),
    ],
)
def test_from_text_rejects(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Digest.from_text("sha256", value)


def test_digest_is_frozen_and_hashable() -> None:
    d = Digest("sha256", raw("sha256"))
    with pytest.raises(AttributeError):
        d.algorithm = "md5"  # type: ignore[misc]
    assert {d, Digest("SHA-256", raw("sha256"))} == {d}


# --- parse_digest ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f"sha256:{RFC_SHA256_HEX}",
        f"SHA256:{RFC_SHA256_HEX.upper()}",
        f"sha256:{RFC_SHA256_B64}",
        f"sha-256:{RFC_SHA256_B64}",
        f"sha-256=:{RFC_SHA256_B64}:",
        f"sha256={RFC_SHA256_HEX}",
        f"  sha256:{RFC_SHA256_HEX}  ",
    ],
)
def test_parse_digest_forms(text: str) -> None:
    d = parse_digest(text)
    assert d.algorithm == "sha256"
    assert d.hex == RFC_SHA256_HEX


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sha256", "expected ALGORITHM:VALUE"),
        (":abcd", "algorithm is missing"),
        (f"crc32:{RFC_SHA256_HEX}", "unsupported digest algorithm"),
        ("sha256:", "empty"),
        (f"sha256:{RFC_SHA256_HEX[:-2]}", "must be 32 bytes"),
        (f"sha-256=:{RFC_SHA256_B64}", "byte sequence"),
        (f"sha-256=:{RFC_SHA256_B64[:-4]}:", "must be 32 bytes"),
        ("sha256:not-hex-nor-base64!", "neither"),
    ],
)
def test_parse_digest_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_digest(text)


# --- parse_repr_digest (RFC 9530) -----------------------------------------------------


def test_repr_digest_rfc_example() -> None:
    d = parse_repr_digest(f"sha-256=:{RFC_SHA256_B64}:")
    assert d == Digest("sha256", bytes.fromhex(RFC_SHA256_HEX))


def test_repr_digest_seed_scenario_43() -> None:
    d = parse_repr_digest(f"sha-256=:{EMPTY_SHA256_B64}:")
    assert d is not None
    assert d.expected == hashlib.sha256(b"").digest()


def test_repr_digest_skips_unknown_members() -> None:
    header = f"unixsum=:MTIz:, crc32c=:AAAAAA==:, sha-256=:{RFC_SHA256_B64}:, custom=:Zm9v:"
    d = parse_repr_digest(header)
    assert d is not None and d.hex == RFC_SHA256_HEX


@pytest.mark.parametrize(
    "bad_member",
    [
        "sha-512=:!!!notbase64!!!:",  # bad base64
        "sha-512=:AAAA:",  # wrong length
        "sha-512=AAAA",  # not a byte sequence
        "sha-512=:AAAA",  # missing closing colon
        "sha-512",  # no value (boolean true in RFC 8941)
        '=:AAAA:',  # no key
        "sha-512=?1",  # boolean
        'sha-512="a, b; c"',  # a string with separators inside
    ],
)
def test_repr_digest_skips_malformed_members(bad_member: str) -> None:
    header = f"{bad_member}, sha-256=:{RFC_SHA256_B64}:"
    d = parse_repr_digest(header)
    assert d is not None
    assert (d.algorithm, d.hex) == ("sha256", RFC_SHA256_HEX)


def test_repr_digest_ignores_parameters() -> None:
    d = parse_repr_digest(f"sha-256=:{RFC_SHA256_B64}:;foo=bar;baz, md5=:{b64('md5')}:;x=\"y,z\"")
    assert d is not None and d.algorithm == "sha256"


def test_repr_digest_preference_order() -> None:
    members = {a: f"{a.replace('sha', 'sha-')}=:{b64(a)}:" for a in ALGORITHMS}
    # weakest first in the header: the strongest must still win
    order = ["md5", "sha1", "sha256", "sha512"]
    for i in range(len(order)):
        present = order[: i + 1]
        header = ", ".join(members[a] for a in present)
        d = parse_repr_digest(header)
        assert d is not None
        assert d.algorithm == present[-1]
        assert d.expected == raw(present[-1])


def test_repr_digest_case_spacing_and_commas() -> None:
    header = f" ,, SHA-256 = :{RFC_SHA256_B64}: ,,, "
    d = parse_repr_digest(header)
    assert d is not None and d.hex == RFC_SHA256_HEX


def test_repr_digest_sha_means_sha1() -> None:
    d = parse_repr_digest(f"sha=:{b64('sha1')}:")
    assert d == Digest("sha1", raw("sha1"))


def test_repr_digest_repeated_key_last_wins() -> None:
    other = base64.b64encode(hashlib.sha256(b"x").digest()).decode()
    d = parse_repr_digest(f"sha-256=:{other}:, sha-256=:{RFC_SHA256_B64}:")
    assert d is not None and d.hex == RFC_SHA256_HEX


@pytest.mark.parametrize(
    "header",
    [None, "", "   ", ",,,", "unixsum=:MTIz:", "sha-256=:AAAA:", "sha-256", "garbage"],
)
def test_repr_digest_none_when_nothing_usable(header: str | None) -> None:
    assert parse_repr_digest(header) is None


# --- parse_legacy_digest (RFC 3230) ---------------------------------------------------


def test_legacy_digest_prefers_strongest() -> None:
    header = f"MD5={b64('md5')}, SHA={b64('sha1')}, SHA-256={b64('sha256')}"
    d = parse_legacy_digest(header)
    assert d == Digest("sha256", raw("sha256"))
    header += f",SHA-512={b64('sha512')}"
    assert parse_legacy_digest(header) == Digest("sha512", raw("sha512"))


def test_legacy_digest_skips_unknown_and_bad() -> None:
    header = f"UNIXsum=30637, SHA-512=bad!, SHA-256={b64('sha256')}"
    assert parse_legacy_digest(header) == Digest("sha256", raw("sha256"))


def test_legacy_digest_tolerates_hex() -> None:
    assert parse_legacy_digest(f"md5={raw('md5').hex()}") == Digest("md5", raw("md5"))


@pytest.mark.parametrize("header", [None, "", "UNIXsum=30637", "SHA-256", "SHA-256=", "x=y"])
def test_legacy_digest_none_when_nothing_usable(header: str | None) -> None:
    assert parse_legacy_digest(header) is None


# --- Hasher ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hasher_validates_hello_world(algorithm: str) -> None:
    for encoded in (raw(algorithm).hex(), b64(algorithm)):
        hasher = Hasher(Digest.from_text(algorithm, encoded))
        hasher.update(b"hello ")
        hasher.update(memoryview(b"world"))
        assert hasher.bytes_hashed == len(HELLO)
        assert hasher.hexdigest() == raw(algorithm).hex()
        assert hasher.matches()
        hasher.verify()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hasher_mismatch_names_expected_and_actual(algorithm: str) -> None:
    hasher = Hasher(Digest(algorithm, raw(algorithm)), what="big.iso")
    hasher.update(b"goodbye world")
    assert not hasher.matches()
    with pytest.raises(DigestMismatch) as info:
        hasher.verify()
    message = str(info.value)
    assert raw(algorithm).hex() in message
    assert raw(algorithm, b"goodbye world").hex() in message
    assert "big.iso" in message and algorithm in message


def test_hasher_empty_input() -> None:
    hasher = Hasher(Digest("sha256", hashlib.sha256(b"").digest()))
    hasher.verify()
    hasher.update(b"x")
    with pytest.raises(DigestMismatch):
        hasher.verify()


# --- hash_file ------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [*ALGORITHMS, "SHA-256"])
async def test_hash_file(tmp_path: Path, algorithm: str) -> None:
    # spans several chunks and several thread calls, with a partial last chunk
    data = bytes(range(256)) * (4096 * 9 + 7)
    assert len(data) > digests.CHUNK_SIZE * 9
    path = tmp_path / "obj"
    path.write_bytes(data)
    expected = hashlib.new(digests.canonical_algorithm(algorithm), data).digest()
    assert await hash_file(path, algorithm) == expected
    assert await hash_file(str(path), algorithm) == expected


async def test_hash_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert await hash_file(path, "sha256") == hashlib.sha256(b"").digest()


async def test_hash_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await hash_file(tmp_path / "missing", "sha256")
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported"):
        await hash_file(tmp_path / "f", "crc32")


async def test_hash_file_cancellable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digests, "CHUNK_SIZE", 1)
    monkeypatch.setattr(digests, "_CHUNKS_PER_THREAD_CALL", 1)
    path = tmp_path / "obj"
    path.write_bytes(b"x" * 100_000)  # 100k thread calls: far longer than the deadline
    with trio.move_on_after(0.05) as scope:
        await hash_file(path, "sha256")
    assert scope.cancelled_caught
    await trio.testing.wait_all_tasks_blocked()

"""Expected digests of objects: parsing, streaming checks and whole-file hashing.

A :class:`Digest` is an algorithm (``sha256``, ``sha512``, ``sha1`` or ``md5``) and the raw
expected bytes. It comes from a URL list (``sha256:HEX``), from an RFC 9530 ``Repr-Digest``
header (:func:`parse_repr_digest`) or from a legacy RFC 3230 ``Digest`` header
(:func:`parse_legacy_digest`). Unlike the seed, a digest here is compared, and unknown or
malformed header members are skipped instead of making the object unusable.

Everything is synchronous and pure except :func:`hash_file`, which hashes in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from typing import BinaryIO

import trio

from rangefs.errors import DigestMismatch

log = logging.getLogger(__name__)

#: Digest size in bytes of every supported algorithm, by canonical name.
DIGEST_SIZES: dict[str, int] = {"sha256": 32, "sha512": 64, "sha1": 20, "md5": 16}

#: Strongest first: the order in which a header's members are preferred.
PREFERENCE: tuple[str, ...] = ("sha512", "sha256", "sha1", "md5")

_ALIASES: dict[str, str] = {
    "sha256": "sha256",
    "sha-256": "sha256",
    "sha512": "sha512",
    "sha-512": "sha512",
    "sha1": "sha1",
    "sha-1": "sha1",
    "md5": "md5",
}

# "sha" is SHA-1 in the RFC 3230 / RFC 9530 registries; only header parsing accepts it.
_HEADER_ALIASES: dict[str, str] = {**_ALIASES, "sha": "sha1"}

#: Bytes read per chunk by :func:`hash_file`.
CHUNK_SIZE = 1 << 20
_CHUNKS_PER_THREAD_CALL = 8

_HEX = re.compile(r"[0-9a-fA-F]+")


def canonical_algorithm(name: str) -> str:
    """Return the canonical name (``sha256`` ...) of ``name``; aliases such as ``SHA-256``
    are accepted case-insensitively. ValueError for an unsupported algorithm."""
    canonical = _ALIASES.get(name.strip().lower())
    if canonical is None:
        supported = ", ".join(DIGEST_SIZES)
        raise ValueError(f"unsupported digest algorithm {name!r} (supported: {supported})")
    return canonical


def decode_digest_value(algorithm: str, text: str) -> bytes:
    """Decode ``text``, hex or standard/url-safe base64 (padding optional), into the raw
    digest of ``algorithm``. The two encodings never have the same length for a given
    algorithm, so there is no ambiguity. ValueError if it decodes to the wrong length."""
    algorithm = canonical_algorithm(algorithm)
    size = DIGEST_SIZES[algorithm]
    value = text.strip()
    if not value:
        raise ValueError(f"empty {algorithm} digest")
    if len(value) == 2 * size and _HEX.fullmatch(value):
        return bytes.fromhex(value)
    raw = _b64decode(value)
    if raw is None:
        raise ValueError(
            f"{algorithm} digest {value!r} is neither {2 * size} hex digits nor base64"
        )
    if len(raw) != size:
        raise ValueError(
            f"{algorithm} digest must be {size} bytes ({2 * size} hex digits), "
            f"got {len(raw)} bytes"
        )
    return raw


def _b64decode(value: str) -> bytes | None:
    """Strict base64 (standard or url-safe alphabet, padding optional) or None."""
    if not value.isascii():
        return None
    if "-" in value or "_" in value:
        value = value.replace("-", "+").replace("_", "/")
    value += "=" * (-len(value) % 4)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Digest:
    """An expected digest: canonical ``algorithm`` and the raw ``expected`` bytes.

    ``algorithm`` may be given as an alias (``SHA-256``) and is stored canonical. ``expected``
    must be raw bytes of the algorithm's size; to build one from text use
    :meth:`from_text` or :func:`parse_digest`. ValueError otherwise.
    """

    algorithm: str
    expected: bytes

    def __post_init__(self) -> None:
        algorithm = self.algorithm
        if algorithm not in DIGEST_SIZES:
            algorithm = canonical_algorithm(algorithm)
            object.__setattr__(self, "algorithm", algorithm)
        if not isinstance(self.expected, bytes):
            raise ValueError("Digest.expected must be raw bytes; use Digest.from_text for text")
        size = DIGEST_SIZES[algorithm]
        if len(self.expected) != size:
            raise ValueError(
                f"{algorithm} digest must be {size} bytes, got {len(self.expected)}"
            )

    @classmethod
    def from_text(cls, algorithm: str, value: str) -> Digest:
        """A digest from its hex or base64 text (see :func:`decode_digest_value`)."""
        algorithm = canonical_algorithm(algorithm)
        return cls(algorithm, decode_digest_value(algorithm, value))

    @property
    def hex(self) -> str:
        """The expected digest as lower-case hex."""
        return self.expected.hex()

    @property
    def base64(self) -> str:
        """The expected digest as standard padded base64 (as in ``Repr-Digest``)."""
        return base64.b64encode(self.expected).decode("ascii")

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(text: str) -> Digest:
    """Parse a digest written by a user: ``sha256:HEX``, ``sha256:BASE64``,
    ``sha-256=:BASE64:`` (one RFC 9530 member) or ``sha256=HEX``/``sha256=BASE64``.
    The algorithm is case-insensitive. ValueError with a clear message otherwise."""
    stripped = text.strip()
    colon = stripped.find(":")
    equals = stripped.find("=")
    if colon < 0 and equals < 0:
        raise ValueError(f"malformed digest {text!r}: expected ALGORITHM:VALUE, e.g. sha256:HEX")
    if equals >= 0 and (colon < 0 or equals < colon):
        algorithm, value = stripped[:equals], stripped[equals + 1 :]
        if value.startswith(":"):
            if len(value) < 2 or not value.endswith(":"):
                raise ValueError(f"malformed digest {text!r}: byte sequence must be :BASE64:")
            value = value[1:-1]
    else:
        algorithm, value = stripped[:colon], stripped[colon + 1 :]
    if not algorithm:
        raise ValueError(f"malformed digest {text!r}: the algorithm is missing")
    return Digest.from_text(algorithm, value)


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    """Split on ``separator`` except inside a double-quoted string (with backslash escapes)."""
    parts: list[str] = []
    current: list[str] = []
    in_string = False
    escaped = False
    for char in text:
        if in_string:
            current.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
            current.append(char)
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _choose(candidates: dict[str, bytes]) -> Digest | None:
    for algorithm in PREFERENCE:
        raw = candidates.get(algorithm)
        if raw is not None:
            return Digest(algorithm, raw)
    return None


def _check_size(algorithm: str, raw: bytes, member: str) -> bool:
    if len(raw) != DIGEST_SIZES[algorithm]:
        log.debug("skipping digest member %r: wrong length for %s", member, algorithm)
        return False
    return True


def parse_repr_digest(header: str | None) -> Digest | None:
    """The strongest usable digest of an RFC 9530 ``Repr-Digest`` (or ``Content-Digest``)
    header, a structured-field dictionary such as ``sha-256=:BASE64:, unixsum=:...:``.

    Unknown algorithms, malformed members and wrong lengths are skipped (logged at DEBUG);
    parameters (``;x=y``) are ignored; a repeated key keeps its last value (RFC 8941).
    Preference: sha512 > sha256 > sha1 > md5. None if nothing usable (or ``header`` is None).
    """
    if not header:
        return None
    candidates: dict[str, bytes] = {}
    for member in _split_outside_quotes(header, ","):
        member = member.strip(" \t")
        if not member:
            continue
        item = _split_outside_quotes(member, ";")[0].strip(" \t")
        key, sep, value = item.partition("=")
        algorithm = _HEADER_ALIASES.get(key.strip().lower())
        if algorithm is None or not sep:
            log.debug("skipping digest member %r: unknown algorithm or no value", member)
            continue
        value = value.strip()
        if len(value) < 2 or value[0] != ":" or value[-1] != ":":
            log.debug("skipping digest member %r: value is not a byte sequence", member)
            continue
        raw = _b64decode(value[1:-1])
        if raw is None:
            log.debug("skipping digest member %r: invalid base64", member)
            continue
        if _check_size(algorithm, raw, member):
            candidates[algorithm] = raw
    return _choose(candidates)


def parse_legacy_digest(header: str | None) -> Digest | None:
    """The strongest usable digest of an RFC 3230 ``Digest`` header such as
    ``SHA-256=BASE64, MD5=BASE64`` (hex values are tolerated). Same skipping and preference
    rules as :func:`parse_repr_digest`."""
    if not header:
        return None
    candidates: dict[str, bytes] = {}
    for member in header.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        key, sep, value = member.partition("=")
        algorithm = _HEADER_ALIASES.get(key.strip().lower())
        if algorithm is None or not sep:
            log.debug("skipping digest member %r: unknown algorithm or no value", member)
            continue
        try:
            raw = decode_digest_value(algorithm, value)
        except ValueError:
            log.debug("skipping digest member %r: undecodable value", member)
            continue
        candidates.setdefault(algorithm, raw)
    return _choose(candidates)


class Hasher:
    """Hashes bytes as they stream by and checks them against ``digest``.

    Synchronous; one owner. ``what`` names the object in a mismatch message (never give it
    a URL with credentials).
    """

    def __init__(self, digest: Digest, *, what: str = "object") -> None:
        self.digest = digest
        self.what = what
        self.bytes_hashed = 0
        self._hash = hashlib.new(digest.algorithm)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Feed the next bytes of the object, in order."""
        self._hash.update(data)
        self.bytes_hashed += len(data)

    def hexdigest(self) -> str:
        """The digest of the bytes fed so far, lower-case hex."""
        return self._hash.hexdigest()

    def matches(self) -> bool:
        """True if the bytes fed so far hash to the expected digest."""
        return self._hash.digest() == self.digest.expected

    def verify(self) -> None:
        """Raise DigestMismatch (naming expected and actual hex) unless the bytes fed so far
        hash to the expected digest."""
        if not self.matches():
            raise DigestMismatch(
                f"{self.what}: {self.digest.algorithm} mismatch after {self.bytes_hashed} bytes: "
                f"expected {self.digest.hex}, got {self.hexdigest()}"
            )


def _hash_chunks(handle: BinaryIO, hasher: hashlib._Hash, chunks: int) -> bool:
    """Read and hash up to ``chunks`` chunks; True at end of file. Runs in a worker thread."""
    for _ in range(chunks):
        data = handle.read(CHUNK_SIZE)
        if not data:
            return True
        hasher.update(data)
    return False


async def hash_file(path: str | os.PathLike[str], algorithm: str) -> bytes:
    """The raw digest of the file at ``path`` with ``algorithm`` (aliases accepted).

    Reads in 1 MiB chunks in worker threads (a few MiB per thread call), so cancellation
    takes effect between calls and leaves no thread behind. OSError propagates as is.
    """
    hasher = hashlib.new(canonical_algorithm(algorithm))
    handle: BinaryIO = await trio.to_thread.run_sync(open, os.fspath(path), "rb")
    try:
        while not await trio.to_thread.run_sync(
            _hash_chunks, handle, hasher, _CHUNKS_PER_THREAD_CALL
        ):
            pass
    finally:
        handle.close()
    return hasher.digest()


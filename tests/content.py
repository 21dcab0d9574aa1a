"""Test content: the bytes of an object are a pure function of (key, offset).

Every test object is a window onto one pseudo-random table of a PRIME length ``P``
(generated once from a fixed seed), starting at a phase that depends on the key. So any
read can be checked without keeping a copy, a block placed at the wrong offset is caught
(block sizes are powers of two, never multiples of ``P``), and two keys — for instance two
versions of one object — give different bytes at the same offset.

Nothing here loops over bytes in Python: slices of a table repeated a few times, ``join``
and ``memcmp`` do the work, so hundreds of MiB are cheap.
"""

from __future__ import annotations

import functools
import hashlib
import random

P = 65521
"""Length of the table, a prime: the content of a key repeats every ``P`` bytes."""

MAX_VIEW = 1 << 20
"""Longest slice :func:`view` hands out without copying (1 MiB)."""

_SEED = 0x72616E6765  # "range"
TABLE: bytes = random.Random(_SEED).randbytes(P)
_REPEATED = memoryview(TABLE * (MAX_VIEW // P + 2))  # at least MAX_VIEW + P bytes


@functools.lru_cache(maxsize=4096)
def phase(key: str) -> int:
    """Where in the table the byte at offset 0 of ``key`` sits, in ``[0, P)``."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % P


def view(key: str, offset: int, length: int) -> memoryview:
    """A zero-copy read-only view of ``content(key, offset, length)``; ``length <= MAX_VIEW``."""
    if offset < 0 or not 0 <= length <= MAX_VIEW:
        raise ValueError(f"bad view offset={offset} length={length}")
    start = (phase(key) + offset) % P
    return _REPEATED[start : start + length]


def content(key: str, offset: int, length: int) -> bytes:
    """The ``length`` bytes of object ``key`` starting at byte ``offset`` (both >= 0)."""
    if length <= MAX_VIEW:
        return bytes(view(key, offset, length))
    start = (phase(key) + offset) % P
    rotated = TABLE[start:] + TABLE[:start]
    whole, rest = divmod(length, P)
    return b"".join([rotated] * whole + [rotated[:rest]])


def iter_content(key: str, offset: int, length: int, chunk: int = MAX_VIEW) -> list[memoryview]:
    """``content(key, offset, length)`` as zero-copy views of at most ``chunk`` bytes each."""
    chunk = min(chunk, MAX_VIEW)
    return [view(key, offset + i, min(chunk, length - i)) for i in range(0, length, chunk)]


@functools.lru_cache(maxsize=256)
def digest_of(key: str, size: int, algorithm: str = "sha256") -> bytes:
    """The raw ``hashlib`` digest of the first ``size`` bytes of ``key`` (cached)."""
    hasher = hashlib.new(algorithm)
    for part in iter_content(key, 0, size):
        hasher.update(part)
    return hasher.digest()


def sha256_of(key: str, size: int) -> str:
    """Hex SHA-256 of the first ``size`` bytes of ``key``, as in a ``sha256:HEX`` URL list."""
    return digest_of(key, size, "sha256").hex()


def check(key: str, offset: int, data: bytes | bytearray | memoryview) -> None:
    """Assert that ``data`` is ``content(key, offset, len(data))``.

    Raises AssertionError naming the first wrong offset (absolute, in the object) and the
    bytes found and expected there.
    """
    data = memoryview(data).cast("B")
    for pos in range(0, len(data), MAX_VIEW):
        got = bytes(data[pos : pos + MAX_VIEW])  # bytes == bytes is a memcmp; views are slower
        want = bytes(view(key, offset + pos, len(got)))
        if got == want:
            continue
        lo, hi = 0, len(got)  # the first difference is in [lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if got[lo:mid] == want[lo:mid]:
                lo = mid
            else:
                hi = mid
        bad = offset + pos + lo
        raise AssertionError(
            f"content of {key!r} wrong at offset {bad}: got 0x{got[lo]:02x}, "
            f"want 0x{want[lo]:02x} (data starts at {offset}, {len(data)} bytes)"
        )

"""Block arithmetic and the block bitmap (``ByteRangesTracker``, ``ByteRanges``).

An object of ``size`` bytes is cut into ``num_blocks(size, block_size)`` blocks on a fixed
grid; block ``i`` covers the inclusive byte range ``[i*bs, min((i+1)*bs, size) - 1]`` (the
last block may be short). Ranges are inclusive at both ends, as in HTTP ``bytes=a-b``.

Bitmap layout: a packed ``bytearray`` with one bit per block, LSB first: block ``i`` is bit
``i % 8`` of byte ``i // 8``. Read as little-endian 64-bit words this is exactly the seed's
layout (block ``i`` = bit ``i % 64`` of word ``i // 64``), so ``to_json`` reproduces the
seed's index JSON byte for byte. Bits past ``num_blocks`` are always clear; loaders reject
data where they are not.

Costs: ``set``/``clear``/``is_set`` O(1); ``count_set``, ``cached_bytes`` and ``complete``
O(1) (a counter is maintained); ``first_set``/``first_clear``/``next_*`` skip whole 0x00 /
0xff bytes with a C-level regex scan, so searching a multi-megabyte bitmap is fast.

Threading: neither class locks. ``ByteRangesTracker`` may be used from any one thread.
``ByteRanges`` adds trio events and must only be used from the trio thread; because trio is
cooperative, a check followed by a subscribe with no ``await`` between them cannot miss a
wake-up (the seed's lost-wake-up bug cannot happen).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

import trio

__all__ = [
    "ByteRange",
    "ByteRanges",
    "ByteRangesTracker",
    "block_span",
    "num_blocks",
    "range_for_index",
    "ranges",
]

_NOT_ZERO = re.compile(rb"[^\x00]")
_NOT_FF = re.compile(rb"[^\xff]")
_HEX_WORD = re.compile(r"[0-9a-fA-F]{1,16}")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """An inclusive byte range ``[start:end]`` (HTTP convention)."""

    start: int
    end: int

    @property
    def size(self) -> int:
        """Number of bytes covered: ``end - start + 1``, or 0 if start < 0 or end < start."""
        if self.start < 0 or self.end < self.start:
            return 0
        return self.end - self.start + 1

    def __str__(self) -> str:
        return f"[{self.start}:{self.end}]"


def num_blocks(size: int, block_size: int) -> int:
    """Number of blocks covering ``size`` bytes (ceil); 0 for size 0.

    Raises ValueError for ``block_size <= 0`` or ``size < 0``.
    """
    if block_size <= 0:
        raise ValueError(f"block size must be positive, not {block_size}")
    if size < 0:
        raise ValueError(f"size must not be negative, not {size}")
    return -(-size // block_size)


def range_for_index(index: int, size: int, block_size: int) -> ByteRange:
    """Byte range of block ``index``: ``[i*bs, min((i+1)*bs, size) - 1]``.

    Unlike the seed, an index outside ``[0, num_blocks)`` raises ValueError (as do a bad size
    or block size) instead of returning a bogus range.
    """
    n = num_blocks(size, block_size)
    if not 0 <= index < n:
        raise ValueError(f"block index {index} out of range [0, {n})")
    start = index * block_size
    return ByteRange(start, min(start + block_size, size) - 1)


def ranges(start: int, end: int, block_size: int) -> Iterator[ByteRange]:
    """Split the inclusive range ``[start:end]`` into pieces of ``block_size`` laid from
    ``start`` (not from the global block grid); the last piece may be short.

    Yields nothing if ``block_size <= 0`` or ``end < start`` (the seed yielded a bogus range
    for ``end < start - 1``).
    """
    if block_size <= 0 or end < start:
        return
    pos = start
    while pos <= end:
        last = min(pos + block_size - 1, end)
        yield ByteRange(pos, last)
        pos = last + 1


def block_span(offset: int, length: int, block_size: int) -> tuple[int, int]:
    """First and last block index touched by ``length`` bytes at ``offset`` (inclusive).

    ValueError unless ``length > 0``, ``offset >= 0`` and ``block_size > 0``.
    """
    if length <= 0 or offset < 0 or block_size <= 0:
        raise ValueError(
            f"bad span: offset {offset}, length {length}, block size {block_size}"
        )
    return offset // block_size, (offset + length - 1) // block_size


def _lowest_bit(v: int) -> int:
    return (v & -v).bit_length() - 1


class ByteRangesTracker:
    """A bitmap of blocks of one object: 1 bit per block, no locking.

    Byte-position methods (``block``, ``set``, ``clear``, ``is_set``, ``is_clear``) follow the
    seed: out-of-range positions are ignored by ``set``/``clear`` and are neither set nor clear.
    Block-index methods (``*_block``) raise IndexError for an index out of range, except
    ``is_block_set``, which answers False.
    """

    __slots__ = ("_bits", "_block_size", "_count", "_num_blocks", "_size")

    def __init__(self, size: int, block_size: int) -> None:
        self._num_blocks = num_blocks(size, block_size)
        self._size = size
        self._block_size = block_size
        self._bits = bytearray((self._num_blocks + 7) >> 3)
        self._count = 0

    # -- geometry -------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Object size in bytes."""
        return self._size

    @property
    def block_size(self) -> int:
        """Block size in bytes."""
        return self._block_size

    @property
    def num_blocks(self) -> int:
        """Number of blocks (the last may be short)."""
        return self._num_blocks

    def block(self, pos: int) -> int:
        """Block index holding byte ``pos``, or -1 if ``pos`` is outside ``[0, size)``."""
        if pos < 0 or pos >= self._size:
            return -1
        return pos // self._block_size

    def block_range(self, index: int) -> ByteRange:
        """Byte range of block ``index`` (ValueError if out of range)."""
        return range_for_index(index, self._size, self._block_size)

    # -- single bits ----------------------------------------------------------------------

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self._num_blocks:
            raise IndexError(f"block index {index} out of range [0, {self._num_blocks})")

    def set_block(self, index: int) -> bool:
        """Mark block ``index`` set; True if it was clear before."""
        self._check_index(index)
        mask = 1 << (index & 7)
        b = self._bits[index >> 3]
        if b & mask:
            return False
        self._bits[index >> 3] = b | mask
        self._count += 1
        return True

    def clear_block(self, index: int) -> bool:
        """Mark block ``index`` clear; True if it was set before."""
        self._check_index(index)
        mask = 1 << (index & 7)
        b = self._bits[index >> 3]
        if not b & mask:
            return False
        self._bits[index >> 3] = b & ~mask
        self._count -= 1
        return True

    def is_block_set(self, index: int) -> bool:
        """True if block ``index`` is set; False if clear or out of range."""
        if not 0 <= index < self._num_blocks:
            return False
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def set(self, pos: int) -> None:
        """Set the block holding byte ``pos``; ignored if ``pos`` is out of range."""
        i = self.block(pos)
        if i >= 0:
            self.set_block(i)

    def clear(self, pos: int) -> None:
        """Clear the block holding byte ``pos``; ignored if ``pos`` is out of range."""
        i = self.block(pos)
        if i >= 0:
            self.clear_block(i)

    def is_set(self, pos: int) -> bool:
        """True if the block holding byte ``pos`` is set (False out of range)."""
        i = self.block(pos)
        return i >= 0 and self.is_block_set(i)

    def is_clear(self, pos: int) -> bool:
        """True if the block holding byte ``pos`` is clear (False out of range, as the seed)."""
        i = self.block(pos)
        return i >= 0 and not self.is_block_set(i)

    # -- searching ------------------------------------------------------------------------

    def _find(self, start: int, stop: int | None, want_set: bool) -> int | None:
        n = self._num_blocks
        start = max(start, 0)
        stop = n if stop is None else min(stop, n)
        if start >= stop:
            return None
        bits = self._bits
        flip = 0 if want_set else 0xFF
        byte_i = start >> 3
        v = (bits[byte_i] ^ flip) & (0xFF << (start & 7)) & 0xFF
        if not v:
            m = (_NOT_ZERO if want_set else _NOT_FF).search(bits, byte_i + 1, (stop + 7) >> 3)
            if m is None:
                return None
            byte_i = m.start()
            v = bits[byte_i] ^ flip
        found = (byte_i << 3) + _lowest_bit(v)
        return found if found < stop else None

    def first_set(self, start: int = 0, stop: int | None = None) -> int | None:
        """Lowest set block index in ``[start, stop)`` (stop defaults to num_blocks), or None."""
        return self._find(start, stop, True)

    def first_clear(self, start: int = 0, stop: int | None = None) -> int | None:
        """Lowest clear block index in ``[start, stop)`` (stop defaults to num_blocks), or None."""
        return self._find(start, stop, False)

    def next_set(self, start: int) -> tuple[int, ByteRange] | None:
        """Seed ``NextSet``: the first set block ``i >= start`` (a block index) as
        ``(i + 1, range of i)``; feed ``i + 1`` back in to continue. None when there is none.
        """
        i = self._find(start, None, True)
        if i is None:
            return None
        return i + 1, range_for_index(i, self._size, self._block_size)

    def next_clear(self, start: int) -> tuple[int, ByteRange] | None:
        """Seed ``NextClear``: like ``next_set`` for clear blocks."""
        i = self._find(start, None, False)
        if i is None:
            return None
        return i + 1, range_for_index(i, self._size, self._block_size)

    def all_set(self, start: int = 0) -> Iterator[ByteRange]:
        """Ranges of the set blocks from block ``start`` on, one per block, in order.

        Each step searches afresh, so the bitmap may be changed while iterating (a change
        behind the cursor is not seen, one ahead of it is).
        """
        nxt = self.next_set(start)
        while nxt is not None:
            yield nxt[1]
            nxt = self.next_set(nxt[0])

    def all_clear(self, start: int = 0) -> Iterator[ByteRange]:
        """Ranges of the clear blocks from block ``start`` on; see ``all_set``."""
        nxt = self.next_clear(start)
        while nxt is not None:
            yield nxt[1]
            nxt = self.next_clear(nxt[0])

    # -- totals ---------------------------------------------------------------------------

    def count_set(self) -> int:
        """Number of set blocks (O(1))."""
        return self._count

    def cached_bytes(self) -> int:
        """Bytes covered by set blocks, counting the short last block at its real size."""
        total = self._count * self._block_size
        n = self._num_blocks
        if n and self.is_block_set(n - 1):
            total -= n * self._block_size - self._size
        return total

    def complete(self) -> bool:
        """True if every block is set (always True for a 0-byte object)."""
        return self._count == self._num_blocks

    # -- serialisation --------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The packed bitmap: ``ceil(num_blocks / 8)`` bytes, LSB first."""
        return bytes(self._bits)

    def _load(self, data: bytes | bytearray) -> None:
        """Replace the bits with ``data`` (already the right length); recompute the count."""
        self._bits[:] = data
        self._count = int.from_bytes(self._bits, "little").bit_count()

    def _check_padding(self, data: bytes | bytearray) -> None:
        tail_bits = self._num_blocks & 7
        if data and tail_bits and data[-1] >> tail_bits:
            raise ValueError(f"bits set beyond block {self._num_blocks - 1}")

    @classmethod
    def from_bytes(cls, size: int, block_size: int, data: bytes | bytearray) -> Self:
        """Rebuild from ``to_bytes`` output. ValueError if the length does not match the
        geometry or a bit past the last block is set."""
        tracker = cls(size, block_size)
        expected = len(tracker._bits)
        if len(data) != expected:
            raise ValueError(
                f"bitmap of {len(data)} bytes, expected {expected} for size {size}, "
                f"block size {block_size}"
            )
        tracker._check_padding(data)
        tracker._load(data)
        return tracker

    def to_json(self) -> str:
        """The seed's index JSON, byte for byte: compact, fixed key order, content_size as a
        decimal string, one lowercase hex uint64 word (no leading zeros) per 64 blocks."""
        nwords = (self._num_blocks + 63) >> 6
        padded = bytes(self._bits) + bytes(nwords * 8 - len(self._bits))
        words = [
            format(int.from_bytes(padded[k : k + 8], "little"), "x")
            for k in range(0, nwords * 8, 8)
        ]
        doc = {"content_size": str(self._size), "block_size": self._block_size, "ranges": words}
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Parse ``to_json`` output. ValueError (with a reason) for: invalid JSON, a missing or
        non-decimal ``content_size``, ``block_size`` <= 0, no ``ranges`` key, a bad hex word,
        a word count other than ``ceil(num_blocks / 64)`` (``null`` / ``[]`` only for size 0),
        or a bit set past the last block. Stricter than the seed, which did not check counts.
        """
        doc: Any = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("index JSON is not an object")
        cs = doc.get("content_size")
        if not isinstance(cs, str) or not cs.isascii() or not cs.isdecimal():
            raise ValueError(f"content_size must be a decimal string, not {cs!r}")
        size = int(cs)
        bs = doc.get("block_size")
        if not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0:
            raise ValueError(f"block_size must be a positive integer, not {bs!r}")
        if "ranges" not in doc:
            raise ValueError("ranges missing")
        words = doc["ranges"]
        if words is None:
            words = []
        if not isinstance(words, list):
            raise ValueError("ranges must be a list")
        tracker = cls(size, bs)
        nwords = (tracker._num_blocks + 63) >> 6
        if len(words) != nwords:
            raise ValueError(f"ranges has {len(words)} words, expected {nwords}")
        raw = bytearray()
        for w in words:
            if not isinstance(w, str) or not _HEX_WORD.fullmatch(w):
                raise ValueError(f"bad ranges word {w!r}")
            raw += int(w, 16).to_bytes(8, "little")
        nbytes = len(tracker._bits)
        if any(raw[nbytes:]):
            raise ValueError(f"bits set beyond block {tracker._num_blocks - 1}")
        data = raw[:nbytes]
        tracker._check_padding(data)
        tracker._load(data)
        return tracker


class ByteRanges(ByteRangesTracker):
    """A ``ByteRangesTracker`` with trio notifications. Trio thread only; no locks.

    - ``tail()``: the set prefix from block 0 (kept incrementally, O(1)).
    - ``notify()``: an event set on the next extension of that prefix. Idiom: subscribe,
      then check ``tail()``, then wait — or simply ``await wait_tail(after)``.
    - ``block_event(i)``: an event set when block ``i`` becomes set. Pending events are kept
      only for blocks somebody waits for, and are dropped once fired.
    - ``reset()``: clear every bit (the remote changed); no event fires, pending events stay
      pending until their block is set again.
    """

    __slots__ = ("_block_events", "_notify_event", "_prefix")

    def __init__(self, size: int, block_size: int) -> None:
        super().__init__(size, block_size)
        self._prefix = 0  # number of set blocks at the start; == first clear block index
        self._notify_event: trio.Event | None = None
        self._block_events: dict[int, trio.Event] = {}

    def _load(self, data: bytes | bytearray) -> None:
        super()._load(data)
        first = self.first_clear(0)
        self._prefix = self._num_blocks if first is None else first

    def set_block(self, index: int) -> bool:
        """Set block ``index``; fires its ``block_event`` and, if the prefix grows, ``notify``.
        Returns True if the block was clear before."""
        if not super().set_block(index):
            return False
        ev = self._block_events.pop(index, None)
        if ev is not None:
            ev.set()
        if index == self._prefix:
            nxt = self.first_clear(index + 1)
            self._prefix = self._num_blocks if nxt is None else nxt
            nev = self._notify_event
            if nev is not None:
                self._notify_event = None
                nev.set()
        return True

    def clear_block(self, index: int) -> bool:
        """Clear block ``index`` (shrinks the prefix if needed; fires nothing)."""
        if not super().clear_block(index):
            return False
        self._prefix = min(self._prefix, index)
        return True

    def reset(self) -> None:
        """Clear every bit (the remote object changed). No event fires."""
        self._bits[:] = bytes(len(self._bits))
        self._count = 0
        self._prefix = 0

    def tail(self) -> ByteRange | None:
        """The contiguous set range from byte 0: ``[0:end]``, or None if block 0 is clear."""
        if self._prefix == 0:
            return None
        return ByteRange(0, min(self._prefix * self._block_size, self._size) - 1)

    def notify(self) -> trio.Event:
        """An event set on the next extension of the set prefix; already set if complete.

        All callers share one event until it fires. There is no pending flag: subscribe
        first, then check ``tail()`` (no ``await`` in between), then wait.
        """
        if self.complete():
            ev = trio.Event()
            ev.set()
            return ev
        if self._notify_event is None:
            self._notify_event = trio.Event()
        return self._notify_event

    async def wait_tail(self, after: int) -> ByteRange:
        """Wait until the prefix extends past byte ``after`` (``tail().end > after``), then
        return it. Returns at once if that already holds, or if every block is set (then the
        full range, which is ``[0:-1]`` for a 0-byte object). The state is per call, so no
        caller misses an extension. Cancellable; a checkpoint even when it returns at once.
        """
        await trio.lowlevel.checkpoint()
        while True:
            # No await between this check and the subscribe below: nothing can slip between.
            t = self.tail()
            if t is not None and t.end > after:
                return t
            if self.complete():
                return t if t is not None else ByteRange(0, -1)
            await self.notify().wait()

    def block_event(self, index: int) -> trio.Event:
        """An event set when block ``index`` becomes set (already set if it is).

        IndexError if ``index`` is out of range. Callers waiting on the same block share one
        event.
        """
        self._check_index(index)
        if self.is_block_set(index):
            ev = trio.Event()
            ev.set()
            return ev
        pending = self._block_events.get(index)
        if pending is None:
            pending = self._block_events[index] = trio.Event()
        return pending

    def pending_block_events(self) -> int:
        """Number of blocks somebody waits for (for tests and statistics)."""
        return len(self._block_events)

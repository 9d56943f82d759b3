"""Content-defined chunking: where to cut a data file into objects so that an edit moves few boundaries.

Two chunkers, both specified exactly in docs/manifest.md ("Data files") so that
another implementation cuts at the same offsets:

* ``gear`` (any bytes; parquet): FastCDC-style cuts on a 64-bit gear hash of
  the 64 bytes ending at each position, with a stricter mask below the average
  size and a looser one above it ("normalized chunking"), and hard min/max
  sizes. The window hash is computed with numpy for a whole block at once (six
  shift-and-add doubling steps give the 64-byte window), so chunking runs at
  hundreds of MB/s without a compiled extension.
* ``lines`` (jsonl): cuts only after a line feed. Each line's CRC-32 decides,
  with a probability proportional to its length (normalized like the gear
  chunker's), whether a chunk ends after it, so a chunk holds about ``avg``
  bytes whatever the row size, and inserting or deleting rows only moves the
  boundaries next to the edit.

Both are streaming: `chunk_stream` reads fixed-size blocks and yields pieces of
the input with a flag saying whether a chunk ends after that piece; memory
stays at a block or two whatever the file (or line) size.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections import namedtuple

from fmhub.base.errors import ManifestError

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Callable, Iterator

    import numpy as np

    Read = Callable[[int], bytes]  # returns up to n bytes, b"" at the end


# numpy is imported inside the functions that hash: the git filter process
# imports this module (through the manifest) for every git command, most of
# which never chunk anything.

BLOCK = 1 << 20  # bytes read and hashed at a time
WINDOW = 64  # bytes the gear hash depends on (a 64-bit hash shifted left once per byte forgets older bytes)

METHODS = ("gear", "lines")


class Chunking(namedtuple("Chunking", "method min_size avg_size max_size")):
    """A chunking method and its sizes in bytes, as written on a manifest's ``chunking`` line.

    A named tuple, not a dataclass: git's filter imports this module for every git command.
    """

    __slots__ = ()

    def __new__(cls, method: str, min_size: int, avg_size: int, max_size: int) -> "Chunking":
        if method not in METHODS:
            raise ManifestError(f"unknown chunking method {method!r} (this fmhub knows {', '.join(METHODS)}); upgrade fmhub")
        if not (WINDOW <= min_size < avg_size < max_size) or avg_size & (avg_size - 1):
            raise ManifestError(
                f"chunking sizes {min_size} {avg_size} {max_size} are invalid "
                f"(want {WINDOW} <= min < avg < max, avg a power of two)"
            )
        return super().__new__(cls, method, min_size, avg_size, max_size)

    def line(self) -> str:
        return f"{self.method} {self.min_size} {self.avg_size} {self.max_size}"

    @classmethod
    def parse(cls, text: str) -> "Chunking":
        from fmhub.base.units import parse_uint

        words = text.split(" ")
        sizes = [parse_uint(w) for w in words[1:]]
        if len(words) != 4 or None in sizes:
            raise ManifestError(f"malformed chunking {text[:100]!r} (want 'METHOD MIN AVG MAX')")
        return cls(words[0], *sizes)


# 16 KiB / 64 KiB / 256 KiB: small enough that a few edited rows cost a few
# objects, large enough that a 100 GB dataset is ~1.6 M objects, not 100 M.
DEFAULT_GEAR = Chunking("gear", 16 << 10, 64 << 10, 256 << 10)
DEFAULT_LINES = Chunking("lines", 16 << 10, 64 << 10, 256 << 10)


def gear_values() -> list[int]:
    """G[b] = the first 8 bytes, little-endian, of sha256(b"fmhub gear " + bytes([b])): fixed, reproducible anywhere."""
    return [int.from_bytes(hashlib.sha256(b"fmhub gear " + bytes([b])).digest()[:8], "little") for b in range(256)]


@functools.lru_cache(maxsize=1)
def _gear_table() -> "np.ndarray":
    import numpy as np

    return np.array(gear_values(), dtype=np.uint64)


def gear_mask_bits(avg_size: int) -> tuple[int, int]:
    """(bits below avg, bits from avg on): a cut needs that many top bits of the hash to be zero.

    ``log2(avg) + 2`` and ``log2(avg) - 2`` (FastCDC's normalization level 2).
    Top bits, because bit k of a gear hash depends on the last k + 1 bytes only:
    the top bits see the whole 64-byte window.
    """
    bits = avg_size.bit_length() - 1
    return bits + 2, bits - 2


_SUB = 1 << 18  # bytes hashed per numpy pass: the u64 arrays stay in cache


def gear_hashes(data: bytes | memoryview, context: bytes = b"") -> "np.ndarray":
    """h[i] for each byte of ``data``: sum over k < 64 of G[byte at i - k] << k, mod 2**64.

    ``context`` is up to 63 bytes that precede ``data`` in the file (bytes
    before the start of the file contribute nothing). Equal to the classic
    rolling ``h = (h << 1) + G[b]`` once 64 bytes have been seen.
    """
    import numpy as np

    gear = _gear_table()
    context = bytes(context[-(WINDOW - 1):]) if context else b""
    raw = np.frombuffer(context + bytes(data) if context else data, dtype=np.uint8)
    out = np.empty(len(raw) - len(context), dtype=np.uint64)
    tmp = np.empty(_SUB + WINDOW, dtype=np.uint64)
    for at in range(len(context), len(raw), _SUB):
        lo = max(0, at - (WINDOW - 1))  # the 63 bytes before this piece complete its first windows
        h = np.take(gear, raw[lo : at + _SUB])
        span = 1
        while span < WINDOW:  # window 2, 4, ..., 64: h[i] += h[i - span] << span
            t = tmp[: len(h) - span]
            np.left_shift(h[:-span], np.uint64(span), out=t)
            np.add(h[span:], t, out=h[span:])
            span *= 2
        out[at - len(context) : at - len(context) + len(h) - (at - lo)] = h[at - lo :]
    return out


def gear_cuts(data: bytes | memoryview, context: bytes, start: int, chunking: Chunking) -> tuple[list[int], int]:
    """Cut points in ``data`` for the gear chunker, as offsets into ``data`` (a chunk ends just before each).

    ``start`` is how many bytes of the current chunk precede ``data``. Returns
    the cuts and the length of the chunk left open at the end of ``data``.
    """
    import numpy as np

    n = len(data)
    if n == 0:
        return [], start
    bits_s, bits_l = gear_mask_bits(chunking.avg_size)
    h = gear_hashes(data, context)
    # "the top b bits are zero" is "h < 2**(64 - b)"; the stricter set is a subset of the looser one
    cand_l = np.flatnonzero(h < np.uint64(1 << (64 - bits_l)))
    cand_s = cand_l[h[cand_l] < np.uint64(1 << (64 - bits_s))]
    cuts: list[int] = []
    s = -start  # where the open chunk began, relative to data (negative: in an earlier block)
    while True:
        # a chunk [s, i] may end at byte i when its length i - s + 1 is in [min, avg) and h has
        # bits_s top zero bits, in [avg, max) and h has bits_l top zero bits, or equals max
        end = _first_in(cand_s, s + chunking.min_size - 1, s + chunking.avg_size - 2)
        if end is None:
            end = _first_in(cand_l, s + chunking.avg_size - 1, s + chunking.max_size - 2)
        if end is None:
            end = s + chunking.max_size - 1
        if end >= n:
            return cuts, n - s
        cuts.append(end + 1)
        s = end + 1


def _first_in(cands: "np.ndarray", lo: int, hi: int) -> int | None:
    """The smallest candidate in [lo, hi] (positions before the block were checked with the previous block), or None."""
    i = int(cands.searchsorted(max(lo, 0)))
    if i < len(cands) and cands[i] <= hi:
        return int(cands[i])
    return None


def line_threshold(length: int, chunk_size: int, chunking: Chunking) -> int:
    """A line of ``length`` bytes that brings the open chunk to ``chunk_size`` bytes (min <= size < max) ends it
    when its CRC-32 is below this.

    The chance is proportional to the line's length, so chunks hold about the
    same number of bytes whatever the row size: ``length / (4 avg)`` while the
    chunk is under avg, ``4 length / avg`` from avg on (the normalization of the
    gear chunker, which narrows the spread of chunk sizes around avg).
    """
    scaled = length << 30 if chunk_size < chunking.avg_size else length << 34
    return min(1 << 32, scaled // chunking.avg_size)


def chunk_stream(read: Read, chunking: Chunking, block: int = BLOCK) -> Iterator[tuple[bytes | memoryview, bool]]:
    """Pieces of the input read through ``read`` in order, each with True when a chunk ends after it.

    The last piece always ends a chunk (an empty input yields nothing). Pieces
    may be memoryviews into a block: consume each before asking for the next.
    """
    if chunking.method == "gear":
        yield from _gear_stream(read, chunking, block)
    else:
        yield from _line_stream(read, chunking, block)


def _read_block(read: Read, block: int) -> bytes:
    parts, got = [], 0
    while got < block:
        part = read(block - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _gear_stream(read: Read, chunking: Chunking, block: int) -> Iterator[tuple[bytes | memoryview, bool]]:
    context = b""
    open_len = 0
    pending: memoryview | None = None  # the tail of the previous block: whether it ends a chunk depends on what follows
    while True:
        data = _read_block(read, block)
        if not data:
            if pending is not None:
                yield pending, True
            return
        if pending is not None:
            yield pending, False
        cuts, open_len = gear_cuts(data, context, open_len, chunking)
        view = memoryview(data)
        prev = 0
        for c in cuts:
            yield view[prev:c], True
            prev = c
        pending = view[prev:] if prev < len(data) else None
        if pending is None:
            open_len = 0
        context = (context + data)[-(WINDOW - 1):] if len(data) < WINDOW - 1 else data[-(WINDOW - 1):]


def _line_stream(read: Read, chunking: Chunking, block: int) -> Iterator[tuple[bytes | memoryview, bool]]:
    import numpy as np

    crc32 = zlib.crc32
    min_size, avg, max_size = chunking.min_size, chunking.avg_size, chunking.max_size
    size = 0  # bytes in the open chunk
    line_crc, line_len = 0, 0  # the line in progress (it may span blocks)
    pending: memoryview | None = None
    while True:
        data = _read_block(read, block)
        if not data:
            if pending is not None:
                yield pending, True
            return
        if pending is not None:
            yield pending, False
        view = memoryview(data)
        prev = start = 0
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        for e in ends.tolist():  # the hot loop (one pass per row): line_threshold inlined
            end = e + 1
            crc = crc32(view[start:end], line_crc)
            line_len += end - start
            size += end - start
            start = end
            # crc < 2**32 always, so comparing with the unclamped threshold is line_threshold's min(2**32, ...)
            if size >= max_size or (size >= min_size and crc < ((line_len << 30) if size < avg else (line_len << 34)) // avg):
                yield view[prev:start], True
                prev, size = start, 0
            line_crc, line_len = 0, 0
        if start < len(data):  # a line continues into the next block
            line_crc = zlib.crc32(view[start:], line_crc)
            line_len += len(data) - start
            size += len(data) - start
        pending = view[prev:] if prev < len(data) else None


def cut_offsets(data: bytes, chunking: Chunking, block: int = BLOCK) -> list[int]:
    """The end offset of every chunk of ``data`` (for tests and other tools; the filter streams instead)."""
    pos = 0
    ends = []
    view = memoryview(data)

    def read(n: int) -> bytes:
        nonlocal pos
        out = bytes(view[pos : pos + n])
        pos += len(out)
        return out

    at = 0
    for piece, end in chunk_stream(read, chunking, block):
        at += len(piece)
        if end:
            ends.append(at)
    return ends

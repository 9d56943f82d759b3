"""The ``planes`` object format: a tensor, or the change to one, as byte planes entropy-coded with zstd.

Spec: docs/manifest.md, "The planes codec". A float's exponent byte is highly
predictable (weights cluster within a few binades) while its low mantissa
bytes are close to random, so bytes of one significance are grouped into a
*plane* and each plane is compressed only when that pays. The sign is moved
to the lowest bit first so that, for BF16 and F32, one plane holds exactly the
exponent. A change between versions is coded per frame of elements as the
cheapest of: nothing (unchanged), the changed elements (sparse), or the
element-wise integer difference, zigzag-mapped so that small updates of
either sign give small numbers, in planes.

Everything here works on one frame (a few MiB) at a time; the reader and
writer of whole objects are in `fmhub.core.tensorio`. Decoding trusts nothing: every
length is checked against what the header and the frame declare before
anything is allocated or decompressed, and a zstd frame must declare exactly
the size expected (python-zstandard would otherwise allocate what a hostile
header claims).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

MAGIC = b"FPL1"
FRAME_BYTES = 1 << 22  # bytes of tensor per frame: the unit of parallel work and of bounded memory
_HEAD = struct.Struct("<4sBBHQI")  # magic, element size, flags, reserved, decoded size, elements per frame
_RECORD = struct.Struct("<BI")  # frame: kind, payload length; plane: mode, length
_COUNT = struct.Struct("<I")
HEADER_SIZE = _HEAD.size
RECORD_SIZE = _RECORD.size

FLOAT = 1  # flags bit 0: elements are IEEE floats: rotate the sign to bit 0 before splitting into planes

RAW, PLANES, SAME, SPARSE, DIFF = range(5)  # frame kinds
KIND_NAMES = {RAW: "raw", PLANES: "planes", SAME: "same", SPARSE: "sparse", DIFF: "diff"}
BASELESS = frozenset({RAW, PLANES})  # kinds a root object (no previous version) may hold
STORED, ZSTD = 0, 1  # plane modes

MAX_WINDOW = 1 << 20  # a zstd frame asking for a bigger window is refused (ours use 2**17)
SAMPLE = 1 << 16  # bytes of a plane compressed first to see whether the rest is worth it
PAYS = 0.97  # a plane is kept compressed only below this fraction of its size
SPARSE_MAX = 4  # sparse is tried when at most 1/4 of the elements changed...
DIFF_MIN = 16  # ...and the difference when at least 1/16 did
LITERAL_TRY = 0.6  # a delta frame above this fraction of raw is also tried without its base

_FLOAT_ITEM = {"F64": 8, "F32": 4, "C64": 4, "F16": 2, "BF16": 2}  # C64: two F32 per element
_INT_ITEM = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2}


class PlanesError(ValueError):
    """A planes object or frame that does not decode (damaged, hostile, or not a planes object)."""


@dataclass(frozen=True)
class Layout:
    """How a tensor of ``size`` bytes is cut: ``item``-byte elements, ``frame`` elements per frame."""

    item: int
    flags: int
    size: int
    frame: int

    @property
    def elements(self) -> int:
        return self.size // self.item

    @property
    def frame_bytes(self) -> int:
        return self.frame * self.item

    def frames(self) -> list[tuple[int, int]]:
        """``(first byte, byte count)`` of each frame, in order."""
        step = self.frame_bytes
        return [(at, min(step, self.size - at)) for at in range(0, self.size, step)]

    def header(self) -> bytes:
        return _HEAD.pack(MAGIC, self.item, self.flags, 0, self.size, self.frame)


def layout_for(dtype: str, size: int) -> Layout:
    """The layout fmhub writes for a tensor of this dtype and size (elements of unknown dtypes are bytes)."""
    item, flags = (_FLOAT_ITEM[dtype], FLOAT) if dtype in _FLOAT_ITEM else (_INT_ITEM.get(dtype, 1), 0)
    if size % item:
        item, flags = 1, 0
    return Layout(item, flags, size, FRAME_BYTES // item)


def parse_header(data: bytes, size: int) -> Layout:
    """The layout an object's first `HEADER_SIZE` bytes declare; PlanesError unless it is sane and decodes ``size`` bytes."""
    if len(data) != HEADER_SIZE:
        raise PlanesError("it is shorter than a planes header")
    magic, item, flags, reserved, declared, frame = _HEAD.unpack(data)
    if magic != MAGIC:
        raise PlanesError("it is not a planes object (no FPL1 magic)")
    if item not in (1, 2, 4, 8) or flags & ~FLOAT or reserved or (flags and item == 1):
        raise PlanesError(f"its header is invalid (element size {item}, flags {flags})")
    if declared != size or size % item:
        raise PlanesError(f"it decodes to {declared} bytes, not the tensor's {size}")
    if frame * item != FRAME_BYTES:
        raise PlanesError(f"its frames hold {frame} elements of {item} bytes; this fmhub reads {FRAME_BYTES}-byte frames")
    return Layout(item, flags, size, frame)


# -- element transforms (numpy, imported lazily: the filter starts without it) ---------------------


def _np():
    import numpy as np

    return np


def _uint(data, item: int):
    np = _np()
    return np.frombuffer(data, dtype=np.dtype(f"<u{item}"))


def _rotl(u, bits: int):
    return (u << 1) | (u >> (bits - 1))


def _rotr(u, bits: int):
    return (u >> 1) | (u << (bits - 1))


def _zigzag(d, item: int):
    np = _np()
    s = d.view(np.dtype(f"<i{item}"))
    return ((s << 1) ^ (s >> (8 * item - 1))).view(d.dtype)


def _unzigzag(z):
    np = _np()
    return (z >> 1) ^ np.negative(z & 1)  # unsigned negation wraps: 0 -> 0, 1 -> all ones


def _split(u, item: int) -> list:
    """The byte planes of unsigned little-endian elements, least significant first (contiguous arrays)."""
    np = _np()
    b = u.view(np.uint8).reshape(-1, item)
    return [np.ascontiguousarray(b[:, j]) for j in range(item)]


def _join(planes: list, item: int):
    np = _np()
    out = np.empty((len(planes[0]), item), np.uint8)
    for j, p in enumerate(planes):
        out[:, j] = p
    return out.view(np.dtype(f"<u{item}")).ravel()


# -- zstd, one compressor per thread (instances are not thread-safe) ------------------------------

_local = threading.local()


def _compressor():
    c = getattr(_local, "c", None)
    if c is None:
        import zstandard

        # Literal-only coding is what float planes need: short matches in a small window cost more
        # than the Huffman-coded literals they replace, so matches must be 7 bytes or longer and the
        # match finder looks at one candidate only (measured: 2.61 bits/exponent vs 2.88 at level 1,
        # at the same speed; the entropy is 2.55).
        params = zstandard.ZstdCompressionParameters(
            window_log=17, chain_log=6, hash_log=6, search_log=1, min_match=7, target_length=0,
            strategy=zstandard.STRATEGY_FAST, write_content_size=True, write_checksum=False,
        )
        c = _local.c = zstandard.ZstdCompressor(compression_params=params)
    return c


def _decompressor():
    d = getattr(_local, "d", None)
    if d is None:
        import zstandard

        d = _local.d = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    return d


def _plane_record(plane) -> bytes:
    """A plane as ``mode u8, length u32, bytes``: zstd when that saves enough, judged on a sample first."""
    data = memoryview(plane).cast("B")
    n = len(data)
    if n > 64:
        c = _compressor()
        if n <= SAMPLE or len(c.compress(data[:SAMPLE])) < PAYS * SAMPLE:
            packed = c.compress(data)
            if len(packed) < PAYS * n:
                return _RECORD.pack(ZSTD, len(packed)) + packed
    return _RECORD.pack(STORED, n) + bytes(data)


def _read_plane(payload: memoryview, at: int, expect: int) -> tuple[memoryview | bytes, int]:
    """The plane starting at ``payload[at]`` (exactly ``expect`` bytes once decoded), and the offset after it."""
    if at + RECORD_SIZE > len(payload):
        raise PlanesError("a plane record is truncated")
    mode, length = _RECORD.unpack_from(payload, at)
    at += RECORD_SIZE
    if length > len(payload) - at:
        raise PlanesError("a plane is longer than its frame")
    body = payload[at : at + length]
    at += length
    if mode == STORED:
        if length != expect:
            raise PlanesError(f"a stored plane holds {length} bytes, not {expect}")
        return body, at
    if mode != ZSTD:
        raise PlanesError(f"unknown plane mode {mode}")
    import zstandard

    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError:
        raise PlanesError("a compressed plane is not a zstd frame") from None
    if declared != expect:  # checked before decompressing: the header's size is what zstd would allocate
        raise PlanesError(f"a compressed plane declares {declared} bytes, not {expect}")
    if zstandard.get_frame_parameters(body).window_size > MAX_WINDOW:  # one-shot decompression ignores max_window_size
        raise PlanesError(f"a compressed plane asks for a window over {MAX_WINDOW} bytes")
    try:
        out = _decompressor().decompress(body, max_output_size=expect, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise PlanesError(f"a compressed plane does not decompress ({exc})") from None
    if len(out) != expect:
        raise PlanesError(f"a compressed plane gave {len(out)} bytes, not {expect}")
    return out, at


# -- frames ----------------------------------------------------------------------------------------


def max_payload(nbytes: int) -> int:
    """The longest payload a valid frame of ``nbytes`` bytes can have: a sparse frame changing every 1-byte
    element, with stored planes (4 bytes of gap and 1 of value each), plus its headers. Readers refuse longer
    records before reading them."""
    return 5 * nbytes + 64


def frame_record(kind: int, payload: bytes = b"") -> bytes:
    return _RECORD.pack(kind, len(payload)) + payload


def parse_record(head: bytes) -> tuple[int, int]:
    """``(kind, payload length)`` from a frame record's first `RECORD_SIZE` bytes."""
    if len(head) != RECORD_SIZE:
        raise PlanesError("a frame record is truncated")
    kind, length = _RECORD.unpack(head)
    if kind not in KIND_NAMES:
        raise PlanesError(f"unknown frame kind {kind}")
    return kind, length


def _literal(new, layout: Layout) -> bytes:
    """A frame that needs no base: its planes, or its raw bytes when planes do not pay."""
    raw = memoryview(new).cast("B")
    if layout.item == 1:
        planes = [raw]
    else:
        u = _uint(raw, layout.item)
        planes = _split(_rotl(u, 8 * layout.item) if layout.flags & FLOAT else u, layout.item)
    payload = b"".join(_plane_record(p) for p in planes)
    return frame_record(PLANES, payload) if len(payload) < len(raw) else frame_record(RAW, bytes(raw))


def encode_frame(new, base, layout: Layout) -> bytes:
    """One frame record for ``new`` (bytes-like), made against ``base`` (the same frame of the previous version) or alone.

    With a base, the smallest of: unchanged, the changed elements, the zigzag
    difference, and (when those are poor) the frame without its base.
    """
    if base is None:
        return _literal(new, layout)
    np = _np()
    item = layout.item
    u, b = _uint(new, item), _uint(base, item)
    differs = u != b
    count = int(np.count_nonzero(differs))
    if count == 0:
        return frame_record(SAME)
    best: bytes | None = None
    if count * SPARSE_MAX <= u.size:  # indices only when few: a dense change would list millions of them
        best = _sparse(np.flatnonzero(differs), u, item)
    if count * DIFF_MIN >= u.size:
        diff = frame_record(DIFF, b"".join(_plane_record(p) for p in _split(_zigzag(u - b, item), item)))
        best = diff if best is None or len(diff) < len(best) else best
    if len(best) > LITERAL_TRY * len(u) * item:
        literal = _literal(new, layout)
        best = literal if len(literal) < len(best) else best
    return best


def _sparse(changed, u, item: int) -> bytes:
    np = _np()
    gaps = np.diff(changed, prepend=0).astype("<u4")
    payload = _COUNT.pack(changed.size) + _plane_record(gaps) + _RECORD.pack(STORED, changed.size * item) + u[changed].tobytes()
    return frame_record(SPARSE, payload)


def decode_frame(kind: int, payload, base, layout: Layout, nbytes: int):
    """The ``nbytes`` bytes of one frame (a bytes-like: numpy array, bytes or memoryview) from its record.

    ``base`` is the previous version's same frame, or None in a root object;
    PlanesError when the record does not decode to exactly ``nbytes`` bytes.
    """
    payload = memoryview(payload).cast("B")
    if kind in BASELESS:
        return _decode_literal(kind, payload, layout, nbytes)
    if base is None:
        raise PlanesError(f"a {KIND_NAMES[kind]} frame needs the previous version, but this object has none")
    base = memoryview(base).cast("B")  # frames may be numpy arrays: count bytes
    if len(base) != nbytes:
        raise PlanesError("the previous version's frame has the wrong size")
    if kind == SAME:
        if len(payload):
            raise PlanesError("an unchanged frame carries bytes")
        return base
    if kind == SPARSE:
        return _decode_sparse(payload, base, layout.item, nbytes)
    return _decode_diff(payload, base, layout.item, nbytes)


def _decode_literal(kind: int, payload: memoryview, layout: Layout, nbytes: int):
    if kind == RAW:
        if len(payload) != nbytes:
            raise PlanesError(f"a raw frame holds {len(payload)} bytes, not {nbytes}")
        return payload
    planes = _planes_of(payload, layout.item, nbytes // layout.item)
    if layout.item == 1:
        return planes[0]
    u = _join([_np().frombuffer(p, _np().uint8) for p in planes], layout.item)
    return _rotr(u, 8 * layout.item) if layout.flags & FLOAT else u


def _planes_of(payload: memoryview, item: int, count: int) -> list:
    planes, at = [], 0
    for _ in range(item):
        plane, at = _read_plane(payload, at, count)
        planes.append(plane)
    if at != len(payload):
        raise PlanesError("a frame has bytes after its last plane")
    return planes


def _decode_diff(payload: memoryview, base, item: int, nbytes: int):
    np = _np()
    planes = _planes_of(payload, item, nbytes // item)
    z = _join([np.frombuffer(p, np.uint8) for p in planes], item)
    return _uint(base, item) + _unzigzag(z)  # wraps modulo 2**bits, as the encoder subtracted


def _decode_sparse(payload: memoryview, base, item: int, nbytes: int):
    np = _np()
    n = nbytes // item
    if len(payload) < _COUNT.size:
        raise PlanesError("a sparse frame is truncated")
    (count,) = _COUNT.unpack_from(payload, 0)
    if not 0 < count <= n:
        raise PlanesError(f"a sparse frame changes {count} of {n} elements")
    gaps, at = _read_plane(payload, _COUNT.size, 4 * count)
    values, at = _read_plane(payload, at, count * item)
    if at != len(payload):
        raise PlanesError("a sparse frame has bytes after its values")
    gaps = np.frombuffer(gaps, "<u4")
    if count > 1 and not gaps[1:].all():
        raise PlanesError("a sparse frame's indices are not ascending")
    idx = np.cumsum(gaps, dtype=np.int64)
    if idx[-1] >= n:
        raise PlanesError("a sparse frame's index is past the end of its frame")
    out = _uint(base, item).copy()
    out[idx] = _uint(values, item)
    return out


# -- whole objects in memory (the codec plugin's ``encode``/``decode``; `fmhub.core.tensorio` streams) --------


def encode_object(new, base, dtype: str) -> bytes:
    """A whole planes object for ``new``, against ``base`` (a delta) or alone (a root), frame after frame."""
    layout = layout_for(dtype, len(new))
    new, base = memoryview(new).cast("B"), memoryview(base).cast("B") if base is not None else None
    parts = [layout.header()]
    for at, n in layout.frames():
        parts.append(encode_frame(new[at : at + n], base[at : at + n] if base is not None else None, layout))
    return b"".join(parts)


def decode_object(data, base, size: int) -> bytearray:
    """The ``size`` bytes a whole planes object decodes to (``base``: the previous version, None for a root)."""
    data = memoryview(data).cast("B")
    layout = parse_header(bytes(data[:HEADER_SIZE]), size)
    base = memoryview(base).cast("B") if base is not None else None
    if base is not None and len(base) != size:
        raise PlanesError(f"the previous version is {len(base)} bytes, not {size}")
    out, pos = bytearray(size), HEADER_SIZE
    for at, n in layout.frames():
        kind, length = parse_record(bytes(data[pos : pos + RECORD_SIZE]))
        pos += RECORD_SIZE
        if length > len(data) - pos:
            raise PlanesError("a frame is truncated")
        frame = decode_frame(kind, data[pos : pos + length], base[at : at + n] if base is not None else None, layout, n)
        out[at : at + n] = memoryview(frame).cast("B")
        pos += length
    if pos != len(data):
        raise PlanesError("it has bytes after its last frame")
    return out

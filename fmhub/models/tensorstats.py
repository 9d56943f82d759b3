"""Reading one tensor's raw elements: decoding every safetensors dtype to float64, and per-tensor statistics.

A `Codec` says how to read a run of elements of one dtype: native numbers
through numpy, BF16 by bit shifting, the 8-bit float formats and F4 (E2M1, two
per byte, low nibble first) by a 256- or 16-entry table. F6 and unknown dtypes
are not decoded (compared by bytes only). Decoding needs numpy only, not torch.

`Reader` streams a tensor's bytes (`fmhub.models.views.TensorRef`) in chunks
(`CHUNK_ELEMS` elements, `chunk_elems_for` aligns them to whole bytes), so
memory stays at a few chunks whatever the tensor size; `norm` and `sha256` are
computed that way, and `sumsq`, `maxabs` and `nanmax` fold decoded chunks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from fmhub.base.errors import CorruptCheckpoint
from fmhub.models.views import TensorRef

CHUNK_ELEMS = 1 << 22  # elements per side read and decoded at a time
READ_CHUNK = 1 << 20  # bytes per read when only hashing / comparing


class Reader:
    """Sequential reads of one tensor's bytes, with re-reads of earlier ranges."""

    def __init__(self, ref: TensorRef) -> None:
        self.ref = ref
        self._f, self._base = ref.open()
        self._f.seek(self._base)
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = self._read_exact(n)
        self.pos += n
        return data

    def read_at(self, pos: int, n: int) -> bytes:
        self._f.seek(self._base + pos)
        data = self._read_exact(n)
        self._f.seek(self._base + self.pos)
        return data

    def _read_exact(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            part = self._f.read(n - got)
            if not part:
                raise CorruptCheckpoint(f"{self.ref.path}: tensor {self.ref.name!r} is truncated (the file changed while being read?)")
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



def _np():
    import numpy

    return numpy


def _minifloat_table(ebits: int, mbits: int, bias: int, kind: str) -> list[float]:
    """Value of every code of a small float format. kind: ieee (Inf/NaN at max exponent), fn (NaN at all ones,
    no Inf), fnuz (NaN at the negative-zero code, no Inf), finite (no special values)."""
    n = 1 << (1 + ebits + mbits)
    emax, mmax = (1 << ebits) - 1, (1 << mbits) - 1
    out = []
    for code in range(n):
        sign = -1.0 if code >> (ebits + mbits) & 1 else 1.0
        e, m = (code >> mbits) & emax, code & mmax
        if kind == "fnuz" and code == n >> 1:
            out.append(math.nan)
        elif kind == "ieee" and e == emax:
            out.append(sign * math.inf if m == 0 else math.nan)
        elif kind == "fn" and e == emax and m == mmax:
            out.append(math.nan)
        elif e == 0:
            out.append(sign * math.ldexp(m / (1 << mbits), 1 - bias))
        else:
            out.append(sign * math.ldexp(1 + m / (1 << mbits), e - bias))
    return out


_TABLE_FORMATS = {
    "F8_E4M3": (4, 3, 7, "fn"),
    "F8_E5M2": (5, 2, 15, "ieee"),
    "F8_E4M3FNUZ": (4, 3, 8, "fnuz"),
    "F8_E5M2FNUZ": (5, 2, 16, "fnuz"),
    "F4": (2, 1, 1, "finite"),
}
_NATIVE = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "C64": "<c8",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "u1",
}
_BITS_VIEW = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}
_tables: dict[str, Any] = {}


def _table(dtype: str):
    np = _np()
    if dtype not in _tables:
        if dtype == "F8_E8M0":
            vals = [math.nan if c == 255 else math.ldexp(1.0, c - 127) for c in range(256)]
        else:
            vals = _minifloat_table(*_TABLE_FORMATS[dtype])
        _tables[dtype] = np.array(vals, dtype=np.float64)
    return _tables[dtype]


@dataclass(frozen=True)
class Codec:
    """How to read a run of raw elements of one dtype."""

    dtype: str
    bits: int | None  # per element; None: unknown (compared as bytes)
    decodable: bool

    @property
    def chunk_align(self) -> int:
        """Elements per whole number of bytes."""
        return 2 if self.bits == 4 else (4 if self.bits == 6 else 1)

    def nbytes(self, elems: int) -> int:
        return elems * (self.bits or 8) // 8

    def values(self, raw: bytes):
        """float64 (complex128 for C64) array of the elements in ``raw``."""
        np = _np()
        d = self.dtype
        if d in _NATIVE:
            a = np.frombuffer(raw, dtype=_NATIVE[d])
            return a.astype(np.complex128 if d == "C64" else np.float64)
        if d == "BF16":
            return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if d == "F4":
            b = np.frombuffer(raw, dtype=np.uint8)
            codes = np.empty(b.size * 2, dtype=np.uint8)
            codes[0::2], codes[1::2] = b & 0xF, b >> 4
            return _table(d)[codes]
        if d in _TABLE_FORMATS or d == "F8_E8M0":
            return _table(d)[np.frombuffer(raw, dtype=np.uint8)]
        raise ValueError(f"cannot decode {d}")

    def count_diff(self, a: bytes, b: bytes) -> tuple[int, Any]:
        """(elements whose bits differ, boolean mask of them or None when not per element)."""
        np = _np()
        if self.bits in (8, 16, 32, 64):
            dt = _BITS_VIEW[self.bits // 8]
            neq = np.frombuffer(a, dtype=dt) != np.frombuffer(b, dtype=dt)
            return int(np.count_nonzero(neq)), neq
        if self.bits == 4:
            x = np.frombuffer(a, dtype=np.uint8) ^ np.frombuffer(b, dtype=np.uint8)
            neq = np.empty(x.size * 2, dtype=bool)
            neq[0::2], neq[1::2] = (x & 0xF) != 0, (x >> 4) != 0
            return int(np.count_nonzero(neq)), neq
        return -1, None  # F6 / unknown: no element boundaries we can trust

    def values_where(self, raw: bytes, mask) -> Any:
        """``self.values(raw)[mask]`` without decoding the elements outside ``mask`` (whole-byte elements only)."""
        np = _np()
        if self.bits in (8, 16, 32, 64) and self.dtype != "C64":
            return self.values(np.frombuffer(raw, dtype=_BITS_VIEW[self.bits // 8])[mask].tobytes())
        return self.values(raw)[mask]


def codec(dtype: str) -> Codec:
    """How to read elements of the safetensors ``dtype`` (its width from `fmhub.core.tensors.DTYPE_BITS`)."""
    from fmhub.core.tensors import DTYPE_BITS

    bits = DTYPE_BITS.get(dtype)
    decodable = dtype in _NATIVE or dtype in _TABLE_FORMATS or dtype in ("BF16", "F8_E8M0")
    return Codec(dtype, bits, decodable)


def sumsq(x) -> float:
    """Σ|x|² of a decoded array, in float64."""
    np = _np()
    if x.size == 0:
        return 0.0
    if np.iscomplexobj(x):
        return float(np.vdot(x, x).real)
    return float(np.dot(x, x))


def maxabs(x) -> float:
    """max |x| of a decoded array (0 for an empty one)."""
    np = _np()
    return float(np.max(np.abs(x))) if x.size else 0.0


def nanmax(a: float, b: float) -> float:
    """max that lets NaN win (a NaN change must show)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


def chunk_elems_for(c: Codec, chunk_elems: int) -> int:
    """``chunk_elems`` rounded down to a whole number of bytes of ``c``'s elements (at least one such run)."""
    return max(chunk_elems - chunk_elems % c.chunk_align, c.chunk_align)


def norm(ref: TensorRef, chunk_elems: int = CHUNK_ELEMS) -> float | None:
    """‖ref‖ (L2 over all elements, float64), streamed; None for a dtype that is not decoded."""
    c = codec(ref.dtype)
    if not c.decodable:
        return None
    step = c.nbytes(chunk_elems_for(c, chunk_elems))
    total = 0.0
    with Reader(ref) as r:
        left = ref.size
        while left:
            k = min(step, left)
            total += sumsq(c.values(r.read(k)))
            left -= k
    return math.sqrt(total)


def sha256(ref: TensorRef) -> str:
    """The hex sha256 of a tensor's bytes, streamed."""
    h = hashlib.sha256()
    with Reader(ref) as r:
        left = ref.size
        while left:
            k = min(READ_CHUNK, left)
            h.update(r.read(k))
            left -= k
    return h.hexdigest()

"""The ``lowrank-fixed`` delta codec: a low-rank update with integer factors, so matrix products are exact.

A LoRA merged into its base changes every element of a weight matrix by a
rank-r update ΔW = P·F. The ``lowrank`` codec (`fmhub.lowrank`) stores float
factors and defines decoding element by element, in a fixed order, because a
BLAS product is not reproducible bit for bit; that makes it slow. Here the
factors are integers below 2^20 with one power-of-two quantum for the whole
product: ΔW = (A·B)·2^E. Every product a·b is below 2^40 and every sum of at
most 64 of them below 2^46, so a float64 matrix product of A and B is exact in
any order, with or without fused multiply-add, on every machine. Decoding is a
BLAS call, one addition and one rounding per element (spec: docs/manifest.md,
"lowrank-fixed").

Encoding is bounded in time and memory: the change is held once in float32,
its factors come from a seeded randomized range finder (rank given by
`fmhub.lowrank.probe_rank`), and the exact rebuild is checked frame by frame;
elements the factors miss go into a patch (`fmhub.sparse_index`).
"""

from __future__ import annotations

import math
import struct
import time

from fmhub.floats import ITEMSIZE, round_bits, to_float64
from fmhub.sparse_index import decode_patch, encode_patch

NAME = "lowrank-fixed"
MAGIC = b"FLQ1"
_HEAD = struct.Struct("<4sIIIi")  # magic, rows m, columns k, rank r, quantum exponent E
FACTOR_BITS = 20  # |a|, |b| <= 2**20: products below 2**40, sums of 64 below 2**46 < 2**53
MAX_RANK = 64
E_RANGE = (-1000, 900)  # keeps (A·B)·2**E a normal float64, away from under- and overflow
MAX_PATCH = 8  # an encode whose patch holds more than 1/8 of the elements is abandoned
ROWS_PER_STEP = 1 << 16  # elements per decode step, in whole rows: bounded temporaries


def _np():
    import numpy as np

    return np


class OutOfTime(Exception):
    """An encode passed its deadline; the caller stores the change another way."""


def _matrix(dtype: str, shape) -> tuple[int, int, int]:
    return shape[0], math.prod(shape[1:]), ITEMSIZE[dtype]


def rebuild(base, a, b, e: int, dtype: str):
    """The new bits of the rows ``a`` covers: ``round(base + (a @ b) * 2**e)``; ``base`` holds exactly those rows."""
    np = _np()
    update = (a @ b).ravel()  # exact: integers below 2**46
    return round_bits(to_float64(base, dtype) + np.ldexp(update, e), dtype)


def pack(a, b, e: int, patch: bytes) -> bytes:
    m, r = a.shape
    return _HEAD.pack(MAGIC, m, b.shape[1], r, e) + a.astype("<i4").tobytes() + b.astype("<i4").tobytes() + patch


class Decoder:
    """A ``lowrank-fixed`` delta parsed once, applied to any run of whole or partial rows (a frame at a time)."""

    def __init__(self, delta, dtype: str, shape: tuple[int, ...]) -> None:
        np = _np()
        delta = memoryview(delta).cast("B")
        if len(delta) < _HEAD.size:
            raise ValueError("it is shorter than a lowrank-fixed header")
        magic, m, k, r, e = _HEAD.unpack_from(delta, 0)
        item = ITEMSIZE.get(dtype)
        fits = item is not None and shape is not None and len(shape) >= 2 and (m, k) == (shape[0], math.prod(shape[1:]))
        if magic != MAGIC or not fits or not 0 < r <= MAX_RANK or not E_RANGE[0] <= e <= E_RANGE[1]:
            raise ValueError("it is not a lowrank-fixed delta for this tensor (its rows, columns, rank or scale do not fit)")
        at = _HEAD.size
        if len(delta) < at + 4 * r * (m + k):
            raise ValueError("its factors are truncated")
        a = np.frombuffer(delta, "<i4", m * r, at).reshape(m, r)
        b = np.frombuffer(delta, "<i4", r * k, at + 4 * m * r).reshape(r, k)
        if np.abs(a).max() > 1 << FACTOR_BITS or np.abs(b).max() > 1 << FACTOR_BITS:
            raise ValueError(f"its factors exceed 2**{FACTOR_BITS}, so their product would not be exact")
        self.a, self.b = a.astype(np.float64), b.astype(np.float64)
        idx, patch_item, values, end = decode_patch(delta, at + 4 * r * (m + k), m * k)
        if end != len(delta) or patch_item != item:
            raise ValueError("its patch does not fit the tensor")
        self.idx = idx.astype(np.int64)
        if self.idx.size > 1 and not (np.diff(self.idx) > 0).all():
            raise ValueError("its patch indices are not ascending")
        self.values = np.frombuffer(values, f"<u{item}")
        self.e, self.dtype, self.item, self.k = e, dtype, item, k

    def apply(self, base, at: int, nbytes: int):
        """Elements ``[at/item, (at+nbytes)/item)`` of the new version, from the same elements of ``base``."""
        np = _np()
        e0, count, k = at // self.item, nbytes // self.item, self.k
        i0, i1 = e0 // k, -(-(e0 + count) // k)
        off = e0 - i0 * k
        rows = np.zeros((i1 - i0) * k, f"<u{self.item}")
        rows[off : off + count] = np.frombuffer(memoryview(base).cast("B"), f"<u{self.item}")
        out = rebuild(rows.tobytes(), self.a[i0:i1], self.b, self.e, self.dtype)[off : off + count]
        lo, hi = np.searchsorted(self.idx, [e0, e0 + count])
        out[self.idx[lo:hi] - e0] = self.values[lo:hi]
        return out


class LowRankFixed:
    """The codec plugin's face: whole-tensor ``encode``/``decode`` (fmhub itself streams through `Decoder`)."""

    name = NAME

    def encode(self, base, new, dtype, shape=None):
        from fmhub.lowrank import probe_rank

        if shape is None or dtype not in ITEMSIZE or len(shape) < 2 or len(base) != len(new):
            return None
        rank = probe_rank(base, new, dtype, shape)
        return encode(base, new, dtype, shape, rank, time.monotonic() + 3600) if rank else None

    def decode(self, base, delta, dtype):
        """Whole-tensor decode: the codec API gives no shape, so the delta's own (m, k) are used, checked against the size."""
        if len(delta) < _HEAD.size:
            raise ValueError("it is shorter than a lowrank-fixed header")
        _magic, m, k, _r, _e = _HEAD.unpack_from(delta, 0)
        if m * k * ITEMSIZE.get(dtype, 0) != len(base):
            raise ValueError("it is not a lowrank-fixed delta for this tensor")
        dec = Decoder(delta, dtype, (m, k))
        return bytearray(memoryview(dec.apply(base, 0, len(base))).cast("B"))


# -- encoding ----------------------------------------------------------------------------------------


def _change_f32(base, new, dtype: str, m: int, k: int):
    """new - base as an m x k float32 matrix, converted a block of rows at a time (no float64 copy of the whole)."""
    np = _np()
    item = ITEMSIZE[dtype]
    out = np.empty((m, k), np.float32)
    rows = max(1, ROWS_PER_STEP // k)
    for i in range(0, m, rows):
        j = min(m, i + rows)
        lo, hi = i * k * item, j * k * item
        out[i:j] = (to_float64(new[lo:hi], dtype) - to_float64(base[lo:hi], dtype)).reshape(j - i, k)
    return out


def _factors(d, rank: int, deadline: float):
    """Rank-``rank`` float factors of ``d`` by a seeded randomized range finder with one power iteration (float32 BLAS)."""
    np = _np()
    m, k = d.shape
    q = min(rank + 8, m, k)
    basis, _ = np.linalg.qr(d @ np.random.default_rng(0).standard_normal((k, q)).astype(np.float32))
    if time.monotonic() > deadline:
        raise OutOfTime
    basis, _ = np.linalg.qr(d @ (d.T @ basis))
    ub, s, vt = np.linalg.svd((basis.T @ d).astype(np.float64), full_matrices=False)
    return (basis.astype(np.float64) @ ub)[:, :rank] * s[:rank], vt[:rank]


def quantize(p, f) -> tuple[object, object, int]:
    """Integer factors A, B (|entries| <= 2**20) and E with A·B·2**E ≈ p·f: per rank t, A's column and B's row get
    scales 2**p_t and 2**(E - p_t), so every product shares the quantum 2**E."""
    np = _np()
    pmax, fmax = np.abs(p).max(axis=0), np.abs(f).max(axis=1)
    keep = (pmax > 0) & (fmax > 0)
    p, f, pmax, fmax = p[:, keep], f[keep], pmax[keep], fmax[keep]
    if p.shape[1] == 0:
        return np.zeros((p.shape[0], 1)), np.zeros((1, f.shape[1])), 0
    pe = np.ceil(np.log2(pmax)).astype(np.int64) - FACTOR_BITS
    e = int((np.ceil(np.log2(pmax)) + np.ceil(np.log2(fmax))).max()) - 2 * FACTOR_BITS
    a = np.rint(np.ldexp(p, -pe[None, :]))
    b = np.rint(np.ldexp(f, (pe - e)[:, None]))
    return a, b, e


def encode(base, new, dtype: str, shape, rank: int, deadline: float) -> bytes | None:
    """A ``lowrank-fixed`` delta of rank ``rank`` that rebuilds ``new`` exactly (a patch holds what the factors miss),
    or None when it is not done by ``deadline`` (`time.monotonic`), or its patch would hold over 1/8 of the elements."""
    np = _np()
    m, k, item = _matrix(dtype, shape)
    try:
        d = _change_f32(base, new, dtype, m, k)
        if not np.isfinite(d).all():
            return None
        a, b, e = quantize(*_factors(d, min(rank, MAX_RANK, m, k), deadline))
        del d
        if not E_RANGE[0] <= e <= E_RANGE[1]:
            return None
        new_bits = np.frombuffer(new, f"<u{item}")
        bad = _mismatches(base, new_bits, a, b, e, dtype, k, deadline)
    except OutOfTime:
        return None
    if bad.size * MAX_PATCH > new_bits.size:
        return None
    return pack(a, b, e, encode_patch(bad, new_bits[bad].tobytes(), m * k, item))


def _mismatches(base, new_bits, a, b, e: int, dtype: str, k: int, deadline: float):
    """Indices of the elements the exact rebuild does not reproduce, a block of rows at a time, in the frame pool."""
    np = _np()
    from fmhub.tensorio import ordered

    item = ITEMSIZE[dtype]
    m = a.shape[0]
    rows = max(1, ROWS_PER_STEP // k)
    view = memoryview(base).cast("B")

    def job(i: int, j: int):
        def run():
            if time.monotonic() > deadline:
                raise OutOfTime
            bits = rebuild(view[i * k * item : j * k * item], a[i:j], b, e, dtype)
            return np.flatnonzero(bits != new_bits[i * k : j * k]) + i * k

        return run

    found = list(ordered(job(i, min(m, i + rows)) for i in range(0, m, rows)))
    return np.concatenate(found) if found else np.empty(0, np.int64)

"""The ``lowrank`` delta encoding, for updates such as a LoRA merged into its base (numpy only; the codec plugin is
``plugins/delta_lowrank.py``).

A merged LoRA changes every element of a weight matrix, so ``sparse`` and
``xor-zlib`` cannot shrink it, but the change ``new - base`` has rank r. This
codec stores two factors P (m × r) and F (r × k) and a patch of the elements
the low-rank rebuild does not reproduce, so decoding is exact (or, on request,
within a tolerance: `encode_within`).

Decoding is defined element by element so that every machine gets the same
bits (spec: docs/manifest.md, "lowrank"): in float64, ``acc = base`` then
``acc += P[:, t] * F[t, :]`` for t = 0 … r-1 (each product and sum rounded
once, in that order; no fused multiply-add), then ``acc`` is rounded to the
tensor's dtype (F32: nearest-even; F16 and BF16: to F32 first, then nearest-
even), then the patch overwrites its elements. Matrix products are used only
when encoding, where they need not be reproducible.
"""

from __future__ import annotations

import math
import struct

from fmhub.core.floats import ITEMSIZE, round_bits, to_float64
from fmhub.core.sparse_index import decode_patch, encode_patch

TYPE_CHECKING = False  # typing is for annotations only: importing it costs start-up time
if TYPE_CHECKING:
    from typing import Iterator

MAX_RANK = 64
MAX_TENSOR_BYTES = 256 << 20  # encoding holds the tensor in float64 a few times over
ROW_BLOCK = 1 << 16  # elements per decode block: bounded temporaries whatever the tensor's size
TILE_FACTORS = 1 << 20  # elements of a block's float64 copies of its factor slices (8 MiB), whatever the row width
REFINE_ITERATIONS = 16
EXACT_SVD_ELEMENTS = 1 << 18  # smaller matrices get an exact SVD, bigger ones a seeded randomized one
_HEAD = struct.Struct("<4sBIII")  # magic, factor precision (4 or 8 bytes), rows, columns, rank


def _np():
    import numpy as np

    return np


def tiles(e0: int, count: int, k: int, limit: int = ROW_BLOCK) -> Iterator[tuple[int, int, int, int]]:
    """Rectangles ``(i0, i1, c0, c1)`` of an m × k matrix that cover elements [e0, e0 + count) in row-major order.

    Each holds at most ``limit`` elements (or one row's width when that is below
    it) and is contiguous in row-major order: whole rows, or part of one row. So
    work on a run of elements is bounded by the run, never by the row width.
    """
    e, end = e0, e0 + count
    while e < end:
        i, c = divmod(e, k)
        if c == 0 and end - e >= k and k <= limit:
            rows = min((end - e) // k, limit // k)
            yield i, i + rows, 0, k
            e += rows * k
        else:
            c1 = min(k, c + limit, c + end - e)
            yield i, i + 1, c, c1
            e += c1 - c


def tile_limit(k: int, r: int, elements: int) -> int:
    """The ``limit`` of `tiles` for a rank-``r`` product: at most ``elements`` per tile, and a tile's slices of both
    factors (rows × r and r × width) within `TILE_FACTORS`, so they can be converted to float64 a tile at a time."""
    if k * r > TILE_FACTORS:  # a row is too wide for its factor slice: tiles are parts of one row
        return max(1, min(elements, TILE_FACTORS // r))
    return min(elements, max(1, TILE_FACTORS // r) * k)  # whole rows, at most TILE_FACTORS // r of them


def rebuild_run(base64, p, f, dtype: str, e0: int):
    """The rounded low-rank rebuild of elements [e0, e0 + base64.size), by the element-wise order the spec fixes.

    Each element is ``base + p[i, 0]·f[0, j] + … + p[i, r-1]·f[r-1, j]`` summed in
    that order, whatever tile it falls in, so a run gives the same bits as the
    whole tensor."""
    np = _np()
    k = f.shape[1]
    out = np.empty(base64.size, dtype=f"<u{ITEMSIZE[dtype]}")
    pos = 0
    for i0, i1, c0, c1 in tiles(e0, base64.size, k, tile_limit(k, p.shape[1], ROW_BLOCK)):
        n = (i1 - i0) * (c1 - c0)
        acc = base64[pos : pos + n].reshape(i1 - i0, c1 - c0).copy()
        pt, ft = p[i0:i1].astype(np.float64), f[:, c0:c1].astype(np.float64)  # exact; contiguous, so the loop is fast
        for t in range(p.shape[1]):
            acc += np.multiply.outer(pt[:, t], ft[t])
        out[pos : pos + n] = round_bits(acc.ravel(), dtype)
        pos += n
    return out


def rebuild_bits(base64, p, f, dtype: str, k: int):
    """The rounded low-rank rebuild of every element of the m × k matrix, by the element-wise order the spec fixes."""
    return rebuild_run(base64, p, f, dtype, 0)


def _factors(d, rmax: int):
    """Left factor scaled by the singular values, and right factor, of the best rank-``rmax`` approximation of ``d``."""
    np = _np()
    m, k = d.shape
    if m * k <= EXACT_SVD_ELEMENTS:
        u, s, vt = np.linalg.svd(d, full_matrices=False)
    else:  # seeded randomized range finder with two power iterations (Halko et al.)
        q = min(rmax + 10, m, k)
        y = d @ np.random.default_rng(0).standard_normal((k, q))
        for _ in range(2):
            y, _ = np.linalg.qr(y)
            y = d @ (d.T @ y)
        basis, _ = np.linalg.qr(y)
        ub, s, vt = np.linalg.svd(basis.T @ d, full_matrices=False)
        u = basis @ ub
    return u[:, :rmax] * s[:rmax], vt[:rmax], s


def half_gaps(new64, dtype: str):
    """Half the distance from each value to the next one representable in ``dtype`` (away from zero).

    Any real within this of a value rounds to it (a little less below a power
    of two, which only makes the refinement below aim a bit off centre)."""
    np = _np()
    if dtype == "BF16":
        gap = np.spacing(np.abs(new64).astype(np.float32)).astype(np.float64) * 65536.0
    else:
        gap = np.spacing(np.abs(new64).astype({"F64": np.float64, "F32": np.float32, "F16": np.float16}[dtype])).astype(np.float64)
    return gap * 0.5


def _refine(d, hg, p, f, iterations: int = REFINE_ITERATIONS, step: float = 1.9):
    """A rank-r fit of ``d`` nudged towards one that rounds to the same values (over-relaxed alternating projections).

    The truncated SVD fits ``d`` = new - base, which carries the new values'
    rounding error; the true update lies within ``hg`` of ``d`` element-wise
    and has rank r. Moving the fit towards that box and re-projecting onto rank
    r pulls it towards the true update, so fewer elements need a patch (about
    9% -> 3% of them for a float32 LoRA merge)."""
    np = _np()
    for _ in range(iterations):
        a = p @ f
        c = a - d
        np.clip(c, -hg, hg, out=c)
        c += d
        c -= a
        c *= step
        c += a
        q, _ = np.linalg.qr(c @ f.T)  # warm start: one subspace iteration from the current fit
        u, s, vt = np.linalg.svd(q.T @ c, full_matrices=False)
        p, f = (q @ u) * s, vt
    return p, f


def _knee(s, rmax: int) -> int | None:
    """The rank where the singular values fall off a cliff (an exactly low-rank update plus rounding noise)."""
    for r in range(1, min(rmax, len(s) - 1) + 1):
        if s[r] <= s[r - 1] * 1e-4 or s[r] == 0:
            return r
    return None


def pack(p, f, patch: bytes) -> bytes:
    """A delta from its factors (float32 or float64 arrays, m × r and r × k) and an encoded patch."""
    m, r = p.shape
    return _HEAD.pack(b"FLR1", p.dtype.itemsize, m, f.shape[1], r) + p.astype(f"<f{p.dtype.itemsize}").tobytes() \
        + f.astype(f"<f{f.dtype.itemsize}").tobytes() + patch


def exact_factors(p64, f64):
    """The factors as float32 when that loses nothing, else as float64 (a LoRA scaled by a power of two is float32)."""
    np = _np()
    p32, f32 = p64.astype(np.float32), f64.astype(np.float32)
    if np.array_equal(p32.astype(np.float64), p64) and np.array_equal(f32.astype(np.float64), f64):
        return p32, f32
    return p64, f64


def from_factors(base, dtype: str, p64, f64) -> tuple[bytes, bytes]:
    """``(new bytes, delta)``: ``base + p64 @ f64`` rounded as the spec fixes, and the patch-free delta that rebuilds it.

    This is how fmhub merges a LoRA into its base: the merged weight is defined
    by the same element-wise arithmetic the codec decodes with, so storing it
    needs only the adapter's factors."""
    np = _np()
    p, f = exact_factors(np.asarray(p64, np.float64), np.asarray(f64, np.float64))
    bits = rebuild_bits(to_float64(base, dtype), p.astype(np.float64), f.astype(np.float64), dtype, f.shape[1])
    return bits.tobytes(), pack(p, f, encode_patch(np.empty(0, np.int64), b"", bits.size, ITEMSIZE[dtype]))


class LowRank:
    """``new - base`` as P·F (rank ≤ 64) plus a patch of the elements that rebuild does not reproduce.

    Layout: ``b"FLR1"``, u8 factor precision (4: float32, 8: float64), u32 rows
    m, u32 columns k (a tensor of shape [m, ...] is an m × k matrix), u32 rank
    r, P (m × r) and F (r × k) row-major little-endian, then a patch
    (`fmhub.core.sparse_index`) of exact element bits.
    """

    name = "lowrank"

    def encode(self, base, new, dtype, shape=None):
        found = self.encode_within(base, new, dtype, shape, 0.0)
        return found[0] if found is not None else None

    def encode_within(self, base, new, dtype, shape, tolerance: float):
        """``(delta, max error)``: the smallest delta whose rebuild is within ``tolerance`` of ``new`` element-wise
        (bit-exact for 0), or None for tensors this codec does not take (not a float matrix, non-finite values)."""
        np = _np()
        item = ITEMSIZE.get(dtype)
        if item is None or shape is None or len(shape) < 2 or len(new) != len(base) or len(new) > MAX_TENSOR_BYTES:
            return None
        m, k = shape[0], math.prod(shape[1:])
        if m < 2 or k < 2 or m * k * item != len(new):
            return None
        rmax = min(MAX_RANK, m - 1, k - 1, len(new) // (2 * 4 * (m + k)))
        if rmax < 1:
            return None
        b64 = to_float64(base, dtype)
        n64 = to_float64(new, dtype)
        if not (np.isfinite(b64).all() and np.isfinite(n64).all()):
            return None
        new_bits = np.frombuffer(new, f"<u{item}")
        d = (n64 - b64).reshape(m, k)
        p_all, f_all, s = _factors(d, rmax)
        hg = half_gaps(n64, dtype).reshape(m, k) if tolerance == 0 else None
        best = None
        knee = _knee(s, rmax)
        fits = [(p_all[:, :knee], f_all[:knee])] if knee else [(p_all, f_all)]
        if knee and hg is not None:
            fits.append(_refine(d, hg, *fits[0]))
        for p64, f64 in fits:
            found = self._try(b64, n64, new_bits, p64, f64, dtype, tolerance, best)
            if found is not None:
                best = found
                if best[2] == 0:
                    break
        return None if best is None else (best[0], best[1])

    def _try(self, b64, n64, new_bits, p64, f64, dtype, tolerance, best):
        """The delta for one fit, at whichever factor precision makes it smaller: (delta, max error, patched count)."""
        np = _np()
        m, r = p64.shape
        k = f64.shape[1]
        item = ITEMSIZE[dtype]
        out = None
        for precision in (4, 8):
            p = p64.astype(f"<f{precision}")
            f = f64.astype(f"<f{precision}")
            bits = rebuild_bits(b64, p.astype(np.float64), f.astype(np.float64), dtype, k)
            if tolerance > 0:
                err = np.abs(to_float64(bits.tobytes(), dtype) - n64)
                bad = np.flatnonzero(~(err <= tolerance))
                err[bad] = 0.0
                max_err = float(err.max()) if err.size else 0.0
            else:
                bad = np.flatnonzero(bits != new_bits)
                max_err = 0.0
            delta = pack(p, f, encode_patch(bad, new_bits[bad].tobytes(), m * k, item))
            if (best is None or len(delta) < len(best[0])) and (out is None or len(delta) < len(out[0])):
                out = (delta, max_err, bad.size)
            if bad.size == 0:
                break  # float64 factors cannot do better than nothing to patch
        return out

    def decode(self, base, delta, dtype):
        """Whole-tensor decode: the codec API gives no shape, so the delta's own (m, k) are used, checked against the size."""
        if len(delta) < _HEAD.size:
            raise ValueError("it is shorter than a lowrank header")
        _magic, _precision, m, k, _r = _HEAD.unpack_from(delta, 0)
        if m * k * ITEMSIZE.get(dtype, 0) != len(base):
            raise ValueError("not a lowrank delta for this tensor")
        out = RangeDecoder(delta, dtype, (m, k)).apply(base, 0, len(base))
        return bytearray(out.tobytes())


def _check_head(delta, dtype: str, shape) -> tuple[int, int, int]:
    """(m, k, r) of a lowrank delta that fits a tensor of this dtype and shape; ValueError otherwise."""
    if len(delta) < _HEAD.size:
        raise ValueError("it is shorter than a lowrank header")
    magic, precision, m, k, r = _HEAD.unpack_from(delta, 0)
    mk = _matrix(dtype, shape) if shape is not None else None
    if magic != b"FLR1" or precision not in (4, 8) or mk is None or (m, k) != mk[:2] or not 0 < r <= MAX_RANK:
        raise ValueError("it is not a lowrank delta for this tensor (its rows, columns or rank do not fit)")
    return m, k, r


class RangeDecoder:
    """A ``lowrank`` delta parsed once and applied to any run of a tensor's elements (a frame at a time).

    Gives the same bits as `LowRank.decode`: each element's arithmetic does not
    depend on its neighbours, so only the run's own elements are rebuilt (memory
    and time bounded by the run, not by the row width). ValueError when the
    delta does not fit the tensor.
    """

    def __init__(self, delta: bytes, dtype: str, shape: tuple[int, ...]) -> None:
        np = _np()
        m, k, r = _check_head(delta, dtype, shape)
        precision, item = delta[4], ITEMSIZE[dtype]
        at = _HEAD.size
        if len(delta) < at + (m + k) * r * precision:
            raise ValueError("its factors are truncated")
        # kept as stored (views of the delta), converted a tile at a time: no float64 copy of the whole factors
        self.p = np.frombuffer(delta, f"<f{precision}", m * r, at).reshape(m, r)
        at += m * r * precision
        self.f = np.frombuffer(delta, f"<f{precision}", r * k, at).reshape(r, k)
        at += r * k * precision
        idx, patch_item, values, end = decode_patch(delta, at, m * k)
        if end != len(delta) or patch_item != item:
            raise ValueError("its patch does not fit the tensor")
        self.idx = idx.astype(np.int64)
        if self.idx.size > 1 and not (np.diff(self.idx) > 0).all():
            raise ValueError("its patch indices are not ascending")
        self.values = np.frombuffer(values, f"<u{item}")
        self.dtype, self.item, self.k = dtype, item, k

    def apply(self, base, at: int, nbytes: int):
        """Elements ``[at/item, (at+nbytes)/item)`` of the new version, from the same elements of ``base``."""
        np = _np()
        e0, count = at // self.item, nbytes // self.item
        base64 = to_float64(base, self.dtype)
        if base64.size != count or e0 + count > self.p.shape[0] * self.k:
            raise ValueError(f"elements [{e0}, {e0 + count}) do not fit the tensor or the {base64.size} given")
        out = rebuild_run(base64, self.p, self.f, self.dtype, e0)
        lo, hi = np.searchsorted(self.idx, [e0, e0 + count])
        out[self.idx[lo:hi] - e0] = self.values[lo:hi]
        return out


# -- the probe that decides whether a low-rank encode is worth trying ------------------------------------

PROBE_FRAME = 1 << 22  # the probe looks at the rows in the first frame (`fmhub.core.planes.FRAME_BYTES`) only
PROBE_ROWS, PROBE_COLS = 256, 256
MIN_PROBE_ROWS = 32
FAST_MAX_ELEMENTS = 1 << 24  # a 4096 x 4096 matrix: `fmhub.core.lowrank_fixed.encode` holds the change once in float32
CLIFF = 3.0  # a singular value this many times the next one ends the update's rank (the rest is rounding noise)


def _matrix(dtype: str, shape) -> tuple[int, int, int] | None:
    """(rows, columns, element size) of a float tensor seen as a matrix, or None."""
    item = ITEMSIZE.get(dtype)
    if item is None or shape is None or len(shape) < 2:
        return None
    m, k = shape[0], math.prod(shape[1:])
    return (m, k, item) if m >= 2 and k >= 2 else None


def probe_bytes(dtype: str, shape) -> int:
    """How many leading bytes of each version `probe_rank` reads (whole rows within the first frame)."""
    mk = _matrix(dtype, shape)
    if mk is None:
        return 0
    m, k, item = mk
    return min(m, PROBE_ROWS, PROBE_FRAME // (k * item)) * k * item


def worth_probing(dtype: str, shape, size: int) -> bool:
    """A float matrix small enough for `fmhub.core.lowrank_fixed.encode` with enough rows in its first frame to probe."""
    mk = _matrix(dtype, shape)
    return mk is not None and mk[0] * mk[1] <= FAST_MAX_ELEMENTS and probe_bytes(dtype, shape) >= MIN_PROBE_ROWS * mk[1] * mk[2]


def probe_rank(base, new, dtype: str, shape) -> int | None:
    """The rank of ``new - base`` as seen on its first rows and a sample of columns, when it is low; else None.

    A merged LoRA is a rank-r update plus rounding noise: its singular values
    fall off a cliff after r. A fine-tune's are spread out. The sample is the
    first rows (one frame: no other frame need be decoded) and up to 512
    columns, chosen with a fixed seed so the answer is repeatable.
    """
    np = _np()
    nbytes = probe_bytes(dtype, shape)
    m, k, item = _matrix(dtype, shape)
    rows = nbytes // (k * item)
    base, new = memoryview(base).cast("B"), memoryview(new).cast("B")  # frames may be numpy arrays: slice bytes
    if rows < MIN_PROBE_ROWS or len(base) < nbytes or len(new) < nbytes:
        return None
    d = (to_float64(new[:nbytes], dtype) - to_float64(base[:nbytes], dtype)).reshape(rows, k)
    if not np.isfinite(d).all():
        return None
    if k > PROBE_COLS:
        d = d[:, np.sort(np.random.default_rng(0).choice(k, PROBE_COLS, replace=False))]
    # the top singular values of a random sketch (seeded) show the same cliff as the matrix's own, for a
    # fraction of the cost of a full decomposition
    sketch = d @ np.random.default_rng(1).standard_normal((d.shape[1], min(d.shape[1], MAX_RANK + 16)))
    s = np.sqrt(np.clip(np.linalg.eigvalsh(sketch.T @ sketch)[::-1], 0, None))  # its singular values, from an 80 x 80
    if s.size == 0 or s[0] == 0:
        return None
    limit = min(MAX_RANK, rows // 4, s.size - 1)
    for r in range(1, limit + 1):
        if s[r] == 0 or s[r - 1] >= CLIFF * s[r]:
            return r
    return None

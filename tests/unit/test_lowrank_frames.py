"""The lowrank and lowrank-fixed links decoded a frame at a time: bit for bit what the whole-matrix arithmetic of the
spec gives (docs/manifest.md, "lowrank" and "The lowrank-fixed codec"), in memory bounded by the frame, not the row.

The references here are written out whole-matrix, as the spec states them, independently of the decoders: a frame
that starts mid-row, a row wider than a frame, or a row split into tiles must not change a single bit.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fmhub.core import planes
from fmhub.core import tensorio
from fmhub.base.errors import CorruptObject
from fmhub.core.floats import ITEMSIZE, round_bits, to_float64
from fmhub.core.lowrank import ROW_BLOCK, TILE_FACTORS, RangeDecoder, pack, tile_limit, tiles
from fmhub.core.lowrank_fixed import MAGIC, Decoder, _predict_run
from fmhub.core.manifest import Delta, TensorEntry
from fmhub.core.sparse_index import encode_patch
from fmhub.core.store import ObjectStore

FLQ_HEAD = struct.Struct("<4sIIIi")
NP_DTYPE = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
# (dtype, m, k, rank): rows wider than a frame and frames starting mid-row; rows split into column tiles (k > ROW_BLOCK);
# several whole rows per tile (k < ROW_BLOCK); a rank high enough that the factor slices split rows (k·r > TILE_FACTORS)
SHAPES = [("F32", 3, 700_001, 3), ("BF16", 3, 1_000_003, 2), ("F16", 5, 70_001, 3), ("F32", 40, 30_011, 4),
          ("F64", 2, 300_007, 3), ("F32", 6, 20_011, 64)]


def tensor_bits(n: int, dtype: str, seed: int) -> bytes:
    """Weights-like values of ``dtype`` (BF16: F32 values cut to their upper half)."""
    x = np.random.default_rng(seed).standard_normal(n) * 0.05
    if dtype == "BF16":
        return (x.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return x.astype(NP_DTYPE[dtype]).tobytes()


def frames(size: int):
    return [(at, min(planes.FRAME_BYTES, size - at)) for at in range(0, size, planes.FRAME_BYTES)]


def by_frames(apply, base: bytes) -> bytes:
    """The new version, each frame decoded on its own from the same frame of ``base``."""
    view = memoryview(base)
    return b"".join(memoryview(apply(view[at : at + n], at, n)).cast("B").tobytes() for at, n in frames(len(base)))


# -- the spec's arithmetic, whole-matrix ---------------------------------------------------------------------


def lowrank_reference(base: bytes, p, f, dtype: str, idx, values: bytes) -> bytes:
    """``lowrank``: acc = base, acc += P[:, t] * F[t, :] for t in order, in float64; round; then the patch."""
    m, k = p.shape[0], f.shape[1]
    acc = to_float64(base, dtype).reshape(m, k).copy()
    for t in range(p.shape[1]):
        acc += np.multiply.outer(p[:, t].astype(np.float64), f[t].astype(np.float64))
    out = round_bits(acc.ravel(), dtype).copy()
    out[idx] = np.frombuffer(values, out.dtype)
    return out.tobytes()


def fixed_prediction(base: bytes, a, b, e: int, dtype: str):
    """``lowrank-fixed``: round(base + (A·B)·2**E), the product exact in float64."""
    return round_bits(to_float64(base, dtype) + np.ldexp((a.astype(np.float64) @ b.astype(np.float64)).ravel(), e), dtype)


# -- deltas ----------------------------------------------------------------------------------------------------


def lowrank_delta(m: int, k: int, r: int, dtype: str, precision: int, seed: int):
    """A lowrank delta with random factors and a patch of a few elements; its (P, F, patch indices, patch values)."""
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal((m, r)) * 0.1).astype(f"<f{precision}")
    f = (rng.standard_normal((r, k)) * 0.1).astype(f"<f{precision}")
    idx = np.sort(rng.choice(m * k, 7, replace=False)).astype(np.int64)
    values = tensor_bits(7, dtype, seed + 1)
    return pack(p, f, encode_patch(idx, values, m * k, ITEMSIZE[dtype])), p, f, idx, values


def fixed_factors(m: int, k: int, r: int, seed: int):
    rng = np.random.default_rng(seed)
    limit = 1 << 20
    return rng.integers(-limit, limit + 1, (m, r), dtype=np.int32), rng.integers(-limit, limit + 1, (r, k), dtype=np.int32)


def fixed_delta(base: bytes, new: bytes, a, b, e: int, dtype: str) -> bytes:
    """A lowrank-fixed delta whose residual frames are coded against the reference prediction, not the decoder's."""
    m, k = a.shape[0], b.shape[1]
    guess = memoryview(fixed_prediction(base, a, b, e, dtype)).cast("B")
    layout = planes.layout_for(dtype, len(new))
    residual = b"".join(planes.encode_frame(memoryview(new)[at : at + n], guess[at : at + n], layout) for at, n in frames(len(new)))
    return FLQ_HEAD.pack(MAGIC, m, k, a.shape[1], e) + a.astype("<i4").tobytes() + b.astype("<i4").tobytes() + residual


def mispredicted(guess, seed: int) -> bytes:
    """The prediction with the low bit of about 1 % of its elements flipped: what a merge's own rounding looks like."""
    out = guess.copy()
    flip = np.random.default_rng(seed).random(out.size) < 0.01
    out[flip] ^= 1
    return out.tobytes()


# -- tiles -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 7, 8, 16, 17])
@pytest.mark.parametrize("limit", [1, 4, 8, 20])
def test_tiles_cover_a_run_in_order_each_within_the_limit(k, limit):
    total = 4 * k
    for e0 in range(total):
        for count in range(1, total - e0 + 1):
            covered = []
            for i0, i1, c0, c1 in tiles(e0, count, k, limit):
                assert i1 > i0 and c1 > c0 and (i1 - i0 == 1 or (c0, c1) == (0, k))  # part of one row, or whole rows
                assert (i1 - i0) * (c1 - c0) <= max(limit, k if c0 == 0 and c1 == k and i1 - i0 == 1 else limit)
                covered += [i * k + c for i in range(i0, i1) for c in range(c0, c1)]
            assert covered == list(range(e0, e0 + count)), (e0, count)


def test_tiles_of_a_wide_row_are_bounded_by_the_limit_not_the_row():
    k = 1 << 30
    assert all((i1 - i0) * (c1 - c0) <= ROW_BLOCK for i0, i1, c0, c1 in tiles(k - 5, 1 << 20, k))


@pytest.mark.parametrize("k", [2, 3, 100, 4096, 16_385, 1 << 18, 1 << 30])
@pytest.mark.parametrize("r", [1, 7, 64])
def test_tile_limit_bounds_the_factor_slices_a_tile_converts(k, r):
    """A tile converts its rows of P (rows × r) and columns of F (r × width) to float64: both stay bounded."""
    for elements in (ROW_BLOCK, 1 << 18):
        limit = tile_limit(k, r, elements)
        for i0, i1, c0, c1 in tiles(3 * k // 2, 4 * elements, k, limit):
            assert (i1 - i0) * (c1 - c0) <= elements
            assert (i1 - i0) * r <= TILE_FACTORS and r * (c1 - c0) <= TILE_FACTORS


# -- bit for bit: frames against the whole matrix ---------------------------------------------------------------


@pytest.mark.parametrize("dtype,m,k,r", SHAPES)
@pytest.mark.parametrize("precision", [4, 8])
def test_lowrank_frames_match_the_whole_matrix_bit_for_bit(dtype, m, k, r, precision):
    base = tensor_bits(m * k, dtype, 1)
    delta, p, f, idx, values = lowrank_delta(m, k, r, dtype, precision, 2)
    want = lowrank_reference(base, p, f, dtype, idx, values)
    got = by_frames(RangeDecoder(delta, dtype, (m, k)).apply, base)
    assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()


@pytest.mark.parametrize("dtype,m,k,r", SHAPES[:3])
def test_lowrank_any_run_of_elements_matches_the_whole_matrix(dtype, m, k, r):
    """Runs that start and end anywhere (mid-row, at a row's end, across several rows) decode as the whole does."""
    base = tensor_bits(m * k, dtype, 3)
    delta, p, f, idx, values = lowrank_delta(m, k, r, dtype, 4, 4)
    want = memoryview(lowrank_reference(base, p, f, dtype, idx, values))
    rd, item = RangeDecoder(delta, dtype, (m, k)), ITEMSIZE[dtype]
    for e0, count in [(0, 1), (k - 1, 2), (k - 3, k + 7), (1, m * k - 1), (int(idx[0]), 1), (k, k), (m * k - 5, 5)]:
        at, n = e0 * item, count * item
        assert rd.apply(memoryview(base)[at : at + n], at, n).tobytes() == want[at : at + n], (e0, count)


@pytest.mark.parametrize("dtype,m,k,r", SHAPES)
def test_lowrank_fixed_predictions_match_the_whole_matrix_bit_for_bit(dtype, m, k, r):
    base = tensor_bits(m * k, dtype, 5)
    a, b = fixed_factors(m, k, r, 6)
    e = -48 - r.bit_length() // 2  # updates of a few percent of the weights: each product is about 2**40
    want = fixed_prediction(base, a, b, e, dtype).tobytes()
    item = ITEMSIZE[dtype]
    got = by_frames(lambda frame, at, n: _predict_run(frame, a, b, e, dtype, item, at, n), base)
    assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()


@pytest.mark.parametrize("dtype,m,k,r", SHAPES)
def test_lowrank_fixed_frames_rebuild_the_new_version_bit_for_bit(dtype, m, k, r):
    """Residual frames coded against the whole-matrix prediction decode to the new version frame by frame."""
    base = tensor_bits(m * k, dtype, 7)
    a, b = fixed_factors(m, k, r, 8)
    new = mispredicted(fixed_prediction(base, a, b, -47, dtype), 9)
    got = by_frames(Decoder(fixed_delta(base, new, a, b, -47, dtype), dtype, (m, k)).apply, base)
    assert got == new


# -- memory and time: bounded by the frame, not the row -------------------------------------------------------------

WIDE = (2, 1 << 22)  # a 32 MiB F32 tensor whose rows are each two frames wide


def decode_traced(decoder, base_frame: bytes, size: int) -> tuple[int, float]:
    """Peak traced bytes (numpy's allocations included) and seconds, decoding every frame in turn."""
    tracemalloc.start()
    try:
        t = time.monotonic()
        for at, n in frames(size):
            decoder.apply(memoryview(base_frame)[:n], at, n)
        return tracemalloc.get_traced_memory()[1], time.monotonic() - t
    finally:
        tracemalloc.stop()


def test_lowrank_frames_of_wide_rows_take_memory_of_a_few_frames():
    m, k = WIDE
    p, f = np.ones((m, 1), "<f4"), np.full((1, k), 0.5, "<f4")
    delta = pack(p, f, encode_patch(np.empty(0, np.int64), b"", m * k, 4))
    peak, secs = decode_traced(RangeDecoder(delta, "F32", WIDE), bytes(planes.FRAME_BYTES), m * k * 4)
    assert peak < 16 * planes.FRAME_BYTES, f"peak {peak >> 20} MiB"  # whole rows took ~10x a row: hundreds of MiB
    assert secs < 30


def test_lowrank_fixed_frames_of_wide_rows_take_memory_of_a_few_frames():
    m, k = WIDE
    size = m * k * 4
    same = planes.frame_record(planes.SAME) * math.ceil(size / planes.FRAME_BYTES)
    delta = FLQ_HEAD.pack(MAGIC, m, k, 1, 0) + np.ones(m, "<i4").tobytes() + np.ones(k, "<i4").tobytes() + same
    peak, secs = decode_traced(Decoder(delta, "F32", WIDE), bytes(planes.FRAME_BYTES), size)
    assert peak < 16 * planes.FRAME_BYTES, f"peak {peak >> 20} MiB"
    assert secs < 30


# -- a residual frame that does not decode, read through a chain --------------------------------------------------


def test_lowrank_fixed_frame_that_does_not_decode_is_a_one_line_corrupt_object(tmp_path):
    store = ObjectStore.create(str(tmp_path / "lfs"))
    m, k = 2, 512
    base = bytes(m * k * 4)
    bad = planes.frame_record(planes.RAW, b"\x00" * 5)  # a raw frame must hold all 4096 bytes of its frame
    delta = FLQ_HEAD.pack(MAGIC, m, k, 1, 0) + bytes(4 * (m + k)) + bad
    root, link = put(store, base), put(store, delta)
    new_oid = hashlib.sha256(b"the new version, not in the store").hexdigest()  # else the store's copy is read instead
    entry = TensorEntry("w", "F32", (m, k), len(base), new_oid, root=root, deltas=(Delta("lowrank-fixed", link, len(delta)),))
    with pytest.raises(CorruptObject) as info:
        tensorio.read_tensor(store, entry)
    msg = str(info.value)
    assert "\n" not in msg and "tensor 'w' (delta 1 of 1)" in msg and "frame at byte 0" in msg and "raw frame" in msg, msg


def put(store: ObjectStore, data: bytes) -> str:
    oid = hashlib.sha256(data).hexdigest()
    path = Path(store.object_path(oid))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return oid

"""Exact conversions between the bits of safetensors float dtypes and numpy float64 (numpy only, imported lazily).

Every F32, F16 and BF16 value is exactly a float64, so arithmetic can be done
in float64 and rounded back once; `round_bits` fixes how (docs/manifest.md,
"lowrank"), so every machine gets the same bits.
"""

from __future__ import annotations

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _np():
    import numpy as np

    return np


def to_float64(data, dtype: str):
    """A tensor's raw little-endian bytes as a flat float64 array (exact: every F32/F16/BF16 value is a float64)."""
    np = _np()
    if dtype == "BF16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.frombuffer(data, {"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype]).astype(np.float64)


def round_bits(x, dtype: str):
    """float64 values rounded to ``dtype``, as unsigned ints holding the dtype's bits."""
    np = _np()
    if dtype == "F64":
        return x.view("<u8")
    f32 = x.astype("<f4")
    if dtype == "F32":
        return f32.view("<u4")
    if dtype == "F16":
        return f32.astype("<f2").view("<u2")
    bits = f32.view("<u4")  # BF16: round the upper half to nearest, ties to even
    rounded = ((bits >> 16) & 1) + bits  # uint32: only a NaN's payload can carry past the top, and NaNs are redone below
    rounded += 0x7FFF
    rounded >>= 16
    out = rounded.astype("<u2")
    nan = np.isnan(f32)
    if nan.any():
        out[nan] = (bits[nan] >> 16) | 0x40  # keep NaN a (quiet) NaN
    return out

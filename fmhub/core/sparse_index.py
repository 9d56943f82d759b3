"""Sorted element indices as zlib-compressed gaps: the index half of a sparse patch (spec: docs/manifest.md).

Indices of changed elements are ascending and often clustered, so the gaps
between them are small and repetitive and compress to about a byte each.
Layout of a patch, shared by the ``sparse`` and ``lowrank`` delta codecs:
u8 index width (4 or 8), u8 element size, u64 count, u64 length of the index
block, the index block (zlib of the gaps as little-endian unsigned ints of the
index width, the first gap from 0), then the values' raw bytes in index order.
"""

from __future__ import annotations

import struct
import zlib

_HEAD = struct.Struct("<BBQQ")


def encode_patch(idx, values: bytes, n_elements: int, itemsize: int) -> bytes:
    """A patch setting the elements at ascending ``idx`` (a numpy integer array) to ``values``."""
    import numpy as np

    width = 4 if n_elements < 2**32 else 8
    gaps = np.diff(idx, prepend=0).astype(f"<u{width}")
    block = zlib.compress(gaps.tobytes(), 6)
    return _HEAD.pack(width, itemsize, idx.size, len(block)) + block + values


def decode_patch(data, at: int = 0, n_elements: int | None = None):
    """``(indices, itemsize, values bytes, end offset)`` of the patch starting at ``data[at]``.

    ValueError when the patch is damaged. Sizes are checked against the data
    before anything is inflated, and the index block is inflated no further
    than the count it declares (a zlib bomb stops there); with ``n_elements``
    every index must also be below it.
    """
    import numpy as np

    if at + _HEAD.size > len(data):
        raise ValueError("patch header is truncated")
    width, itemsize, count, block_len = _HEAD.unpack_from(data, at)
    if width not in (4, 8) or itemsize not in (1, 2, 4, 8):
        raise ValueError(f"bad index width {width} or element size {itemsize}")
    at += _HEAD.size
    if block_len > len(data) - at or count * itemsize > len(data) - at - block_len:
        raise ValueError("patch is truncated")
    if n_elements is not None and count > n_elements:
        raise ValueError(f"patch changes {count} elements of {n_elements}")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data[at : at + block_len], count * width)
    except zlib.error as exc:
        raise ValueError(f"patch index block does not inflate ({exc})") from None
    if len(raw) != count * width or inflater.unconsumed_tail:
        raise ValueError("patch index block does not hold the indices it declares")
    gaps = np.frombuffer(raw, dtype=f"<u{width}")
    if count > 1 and not gaps[1:].all():
        raise ValueError("patch indices are not ascending")
    idx = np.cumsum(gaps, dtype=np.uint64)
    if count > 1 and not (idx[1:] > idx[:-1]).all():  # a sum that wrapped past 2**64 comes back smaller
        raise ValueError("patch indices wrap around")
    if n_elements is not None and count and idx[-1] >= n_elements:
        raise ValueError("patch index is past the end of the tensor")
    at += block_len
    end = at + count * itemsize
    return idx, itemsize, data[at:end], end

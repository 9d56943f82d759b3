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


def decode_patch(data, at: int = 0):
    """``(indices, itemsize, values bytes, end offset)`` of the patch starting at ``data[at]``."""
    import numpy as np

    width, itemsize, count, block_len = _HEAD.unpack_from(data, at)
    if width not in (4, 8):
        raise ValueError(f"bad index width {width}")
    at += _HEAD.size
    gaps = np.frombuffer(zlib.decompress(data[at : at + block_len]), dtype=f"<u{width}", count=count)
    idx = np.cumsum(gaps, dtype=np.uint64)
    at += block_len
    end = at + count * itemsize
    if end > len(data):
        raise ValueError("patch values are truncated")
    return idx, itemsize, data[at:end], end

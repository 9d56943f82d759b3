"""Built-in plugin: lossless delta codecs ``sparse`` and ``xor-zlib`` (numpy only, imported lazily)."""

from __future__ import annotations

import struct
import zlib

from fmhub import hookimpl

# safetensors dtype names -> bytes per element; an unknown dtype is diffed byte by byte
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def _elements(data, itemsize: int):
    import numpy as np

    return np.frombuffer(data, dtype=np.dtype(f"<u{itemsize}") if itemsize in (2, 4, 8) else np.uint8)


class Sparse:
    """The elements that changed: their indices and new values, compared bit by bit (so -0.0 vs 0.0 and NaNs count).

    Layout: ``b"FSP1"``, u8 index width (4 or 8), u8 element size, u64 count,
    u64 length of the index block, the index block (zlib of the gaps between
    ascending indices, little-endian, the first gap from 0), then the new
    values' raw bytes in index order. Gaps are small and repetitive, so the
    indices cost about a byte each instead of four.
    """

    name = "sparse"

    def encode(self, base, new, dtype):
        import numpy as np

        if len(base) != len(new):
            return None
        item = ITEMSIZE.get(dtype, 1)
        if len(new) % item:
            item = 1
        b, n = _elements(base, item), _elements(new, item)
        idx = np.flatnonzero(b != n)
        width = 4 if n.size < 2**32 else 8
        if idx.size * item >= len(new):
            return None
        gaps = np.diff(idx, prepend=0).astype(f"<u{width}")
        block = zlib.compress(gaps.tobytes(), 6)
        return b"FSP1" + struct.pack("<BBQQ", width, item, idx.size, len(block)) + block + n[idx].tobytes()

    def decode(self, base, delta, dtype):
        import numpy as np

        if delta[:4] != b"FSP1":
            raise ValueError("not a sparse delta")
        width, item, count, block_len = struct.unpack_from("<BBQQ", delta, 4)
        at = 4 + 18
        gaps = np.frombuffer(zlib.decompress(delta[at : at + block_len]), dtype=f"<u{width}", count=count)
        idx = np.cumsum(gaps, dtype=np.uint64)
        at += block_len
        out = bytearray(base)
        view = _elements(out, item)  # writable: over the bytearray
        view[idx] = _elements(delta[at : at + count * item], item)
        return out


class XorZlib:
    """Bitwise XOR with the previous version, zlib-compressed: small when few bits changed anywhere in the tensor.

    Layout: ``b"FXZ1"`` then the zlib stream of ``base XOR new``.
    """

    name = "xor-zlib"

    def encode(self, base, new, dtype):
        import numpy as np

        if len(base) != len(new):
            return None
        x = np.bitwise_xor(np.frombuffer(base, np.uint8), np.frombuffer(new, np.uint8))
        return b"FXZ1" + zlib.compress(x.tobytes(), 1)

    def decode(self, base, delta, dtype):
        import numpy as np

        if delta[:4] != b"FXZ1":
            raise ValueError("not an xor-zlib delta")
        x = np.frombuffer(zlib.decompress(delta[4:]), np.uint8)
        return bytearray(np.bitwise_xor(np.frombuffer(base, np.uint8), x).tobytes())


@hookimpl
def fmhub_delta_codecs():
    return [Sparse(), XorZlib()]

"""Built-in plugin: the lossless delta codecs ``planes`` (what fmhub writes), ``sparse`` and ``xor-zlib`` (read, and
offered to `fmhub repack` no more: planes' sparse and difference frames supersede them). numpy is imported lazily."""

from __future__ import annotations

import zlib

from fmhub import hookimpl
from fmhub.core.sparse_index import decode_patch, encode_patch

# safetensors dtype names -> bytes per element; an unknown dtype is diffed byte by byte
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def _elements(data, itemsize: int):
    import numpy as np

    return np.frombuffer(data, dtype=np.dtype(f"<u{itemsize}") if itemsize in (2, 4, 8) else np.uint8)


class Sparse:
    """The elements that changed: their indices and new values, compared bit by bit (so -0.0 vs 0.0 and NaNs count).

    Layout: ``b"FSP1"`` then a patch of the new values (`fmhub.core.sparse_index`): about a
    byte per changed element for its index, plus its new bits.
    """

    name = "sparse"

    def encode(self, base, new, dtype, shape=None):
        import numpy as np

        if len(base) != len(new):
            return None
        item = ITEMSIZE.get(dtype, 1)
        if len(new) % item:
            item = 1
        b, n = _elements(base, item), _elements(new, item)
        idx = np.flatnonzero(b != n)
        if idx.size * item >= len(new):
            return None
        return b"FSP1" + encode_patch(idx, n[idx].tobytes(), n.size, item)

    def decode(self, base, delta, dtype):
        if delta[:4] != b"FSP1":
            raise ValueError("not a sparse delta")
        idx, item, values, _ = decode_patch(delta, 4, len(base))
        out = bytearray(base)
        view = _elements(out, item)  # writable: over the bytearray
        view[idx] = _elements(values, item)
        return out


class XorZlib:
    """Bitwise XOR with the previous version, zlib-compressed: small when few bits changed anywhere in the tensor.

    Layout: ``b"FXZ1"`` then the zlib stream of ``base XOR new``.
    """

    name = "xor-zlib"

    def encode(self, base, new, dtype, shape=None):
        import numpy as np

        if len(base) != len(new):
            return None
        x = np.bitwise_xor(np.frombuffer(base, np.uint8), np.frombuffer(new, np.uint8))
        return b"FXZ1" + zlib.compress(x.tobytes(), 1)

    def decode(self, base, delta, dtype):
        import numpy as np

        if delta[:4] != b"FXZ1":
            raise ValueError("not an xor-zlib delta")
        inflater = zlib.decompressobj()
        try:
            x = inflater.decompress(delta[4:], max(len(base), 1))  # never more than the tensor (0 would mean no limit)
        except zlib.error as exc:
            raise ValueError(f"an xor-zlib delta that does not inflate ({exc})") from None
        if len(x) != len(base) or inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("an xor-zlib delta that does not inflate to the tensor's size")
        x = np.frombuffer(x, np.uint8)
        return bytearray(np.bitwise_xor(np.frombuffer(base, np.uint8), x).tobytes())


class Planes:
    """Byte planes entropy-coded with zstd, frame by frame (`fmhub.core.planes`; spec: docs/manifest.md).

    As a delta each frame is coded as unchanged, its changed elements, or the
    zigzag difference; as a root (no previous version) as its planes. fmhub
    streams these objects frame by frame (`fmhub.core.tensorio`); ``encode`` and
    ``decode`` here hold whole tensors, for `fmhub repack` and packed objects.
    """

    name = "planes"

    def encode(self, base, new, dtype, shape=None):
        from fmhub.core.planes import encode_object

        if base is not None and len(base) != len(new):
            return None
        return encode_object(new, base, dtype)

    def decode(self, base, delta, dtype):
        from fmhub.core.planes import decode_object

        return decode_object(delta, base, len(base))


@hookimpl
def fmhub_delta_codecs():
    return [Planes(), Sparse(), XorZlib()]

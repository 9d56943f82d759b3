"""ZipNN alone, the reference for fmhub's float-aware codec: ratio and speed per version, and whether it round-trips.

For every version each tensor is compressed whole with ``zipnn.ZipNN`` (bytes in,
dtype bfloat16), decompressed and compared with the original; for the versions
derived from v0 the XOR with v0's tensor is compressed too (what zipnn's delta
mode does), as the floor a delta codec should beat. Tensors come straight from
ckpt_gen (no files): only the zipnn calls are timed.

zipnn 0.5.4's ``compress`` rewrites its input buffer in place (even a ``bytes``
object); comparing the decompressed bytes with that buffer makes a correct round
trip look wrong. So it is given a copy (a ``bytearray``: given a memoryview of a
numpy array it corrupts the heap), the result is compared with the untouched
original, and whether the copy changed is reported on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ckpt_gen import Shape, tensor_versions


@dataclass
class _Tally:
    raw: int = 0
    packed: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    differing_bytes: int = 0
    input_clobbered: bool = False

    def result(self) -> dict:
        out = {"raw_bytes": self.raw, "compressed_bytes": self.packed, "ratio": self.packed / self.raw,
               "encode_mb_s": self.raw / self.encode_s / 1e6 if self.encode_s else None}
        if self.decode_s:
            out.update(decode_mb_s=self.raw / self.decode_s / 1e6, bit_exact=self.differing_bytes == 0,
                       differing_bytes=self.differing_bytes, compress_modified_its_input=self.input_clobbered)
        return out


def _compress(z, data: np.ndarray, tally: _Tally) -> bytes:
    scratch = bytearray(data)  # zipnn writes into its input (and a memoryview of a numpy array crashes it: free(): invalid pointer)
    t0 = time.perf_counter()
    packed = z.compress(scratch)
    tally.encode_s += time.perf_counter() - t0
    tally.raw += data.nbytes
    tally.packed += len(packed)
    tally.input_clobbered |= scratch != data.tobytes()
    return packed


def _round_trip(z, data: np.ndarray, tally: _Tally) -> None:
    packed = _compress(z, data, tally)
    t0 = time.perf_counter()
    back = np.frombuffer(z.decompress(packed), np.uint8)
    tally.decode_s += time.perf_counter() - t0
    want = data.view(np.uint8)
    tally.differing_bytes += int(np.count_nonzero(back != want)) if back.size == want.size else want.size


def run_zipnn(shape: Shape, seed: int, versions: list[str], threads: int, log) -> dict:
    """{version: {"full": {...}, "xor_vs_v0": {...}}}; ``full`` round-trips every tensor."""
    import zipnn

    z = zipnn.ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=threads)
    out = {}
    for version in versions:
        log(f"zipnn: {version}")
        full, xor = _Tally(), _Tally()
        for t in tensor_versions(shape, seed, version):
            _round_trip(z, t.new, full)
            if version != "v0":
                _compress(z, np.bitwise_xor(t.base, t.new), xor)
        out[version] = {"full": full.result(), **({"xor_vs_v0": xor.result()} if version != "v0" else {})}
    return out

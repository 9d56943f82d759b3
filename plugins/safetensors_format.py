"""Built-in plugin: the safetensors checkpoint format.

File layout (https://github.com/huggingface/safetensors): an 8-byte
little-endian header length N, N bytes of JSON (possibly padded with spaces),
then the data buffer, which the tensors' ``data_offsets`` must cover exactly.
"""

from __future__ import annotations

import json
import math
import struct

from fmhub.core.tensors import DTYPE_BITS
from fmhub import hookimpl
from fmhub.base import boundedjson
from fmhub.base.errors import CorruptCheckpoint
from fmhub.plugin.records import Layout, TensorInfo

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Mapping, Sequence

    from fmhub.plugin.interfaces import ReadExact


MAX_HEADER = 100_000_000  # the safetensors library's own limit
MAX_DEPTH = 3  # {name: {"shape": [..]}}: deeper is never a safetensors header



class SafetensorsFormat:
    name = "safetensors"

    def sniff(self, head: bytes) -> bool:
        if len(head) < 9:
            return False
        (n,) = struct.unpack("<Q", head[:8])
        return 2 <= n <= MAX_HEADER and head[8:9] == b"{"

    def diagnose(self, head: bytes) -> str | None:
        """Why a file that begins like a safetensors file is not read as one (its header is over the limit)."""
        if len(head) < 9 or head[8:9] != b"{":
            return None
        (n,) = struct.unpack("<Q", head[:8])
        return f"its safetensors header length {n} is over the limit of {MAX_HEADER} bytes" if n > MAX_HEADER else None

    def read_layout(self, read_exact: ReadExact, path: str) -> Layout:
        prefix = read_exact(8)
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER:
            raise CorruptCheckpoint(f"{path}: header length {n} is over the safetensors limit; the file is corrupt or not safetensors")
        raw = read_exact(n)
        try:  # bounded: a header is untrusted input (a nested one would otherwise exhaust the recursion limit)
            header = boundedjson.loads(raw, max_depth=MAX_DEPTH, object_pairs_hook=_no_duplicates)
        except ValueError as exc:
            raise CorruptCheckpoint(f"{path}: safetensors header is not valid JSON ({exc}); the file is corrupt") from None
        if not isinstance(header, dict):
            raise CorruptCheckpoint(f"{path}: safetensors header is not a JSON object; the file is corrupt")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise CorruptCheckpoint(f"{path}: __metadata__ must map strings to strings")
        spans = []
        for name, info in header.items():
            spans.append((*_check_entry(path, name, info), name))
        spans.sort(key=lambda s: (s[0], s[1]))  # stable: ties (empty tensors) keep header order
        expected = 0
        tensors = []
        for begin, end, dtype, shape, name in spans:
            if begin != expected:
                what = "overlaps the previous tensor" if begin < expected else f"leaves a gap of {begin - expected} bytes before it"
                raise CorruptCheckpoint(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] {what}; the header lies about offsets")
            expected = end
            tensors.append(TensorInfo(name, dtype, shape, end - begin))
        return Layout(prefix + raw, tuple(tensors), metadata, expected)

    def build_header(self, tensors: Sequence[TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
        obj: dict = {}
        if metadata is not None:
            obj["__metadata__"] = dict(metadata)
        offset = 0
        for t in tensors:
            obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.size]}
            offset += t.size
        raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k!r} appears twice")
        d[k] = v
    return d


def _check_entry(path: str, name: str, info) -> tuple[int, int, str, tuple[int, ...]]:
    bad = f"{path}: tensor {name!r}:"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CorruptCheckpoint(f"{bad} header entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or not dtype.replace("_", "").isalnum():
        raise CorruptCheckpoint(f"{bad} bad dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CorruptCheckpoint(f"{bad} bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise CorruptCheckpoint(f"{bad} bad data_offsets {offsets!r}")
    begin, end = offsets
    bits = DTYPE_BITS.get(dtype)
    if bits is not None:
        nbits = math.prod(shape) * bits
        if nbits % 8 or nbits // 8 != end - begin:
            raise CorruptCheckpoint(
                f"{bad} {dtype}{shape} needs {nbits / 8:g} bytes but data_offsets [{begin}, {end}] give {end - begin}; the header lies"
            )
    return begin, end, dtype, tuple(shape)


@hookimpl
def fmhub_checkpoint_formats():
    return [SafetensorsFormat()]

"""Fuzz tests for everything fmhub parses from a remote: manifests, safetensors headers, delta objects, bounded JSON.

Inputs are true encodings mutated the ways an attacker would (flipped bytes,
cut or extended objects, counts and sizes overwritten with huge values), plus
arbitrary text. The property each time: a clear error of the documented kind
(never another exception, which would reach the user as a traceback) and no
allocation beyond a bound set by the sizes the caller declared.
"""

from __future__ import annotations

import json
import re
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmhub.base import boundedjson
from fmhub.core.chunking import Chunking
from fmhub.base.errors import CorruptCheckpoint, FmhubError, ManifestError
from fmhub.core.manifest import Manifest

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- mutations ------------------------------------------------------------------------------------

HUGE = st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1])


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` after a few attacker's edits: flips, cuts, insertions, and huge little-endian integers written in."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "u64", "u32", "u8"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del out[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            width = {"u64": 8, "u32": 4, "u8": 1}[kind]
            value = draw(HUGE) % (1 << (8 * width))
            out[at : at + width] = value.to_bytes(width, "little")
    return bytes(out)


def _rng_tensor(seed: int, n: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


# -- manifests ------------------------------------------------------------------------------------


def _sample_manifest() -> bytes:
    oid = "ab" * 32
    return (
        "fmhub manifest 4\nformat safetensors\nsize 56\n"
        f"header sha256:{oid} 8\n"
        'metadata {"format":"pt"}\n'
        f'tensor "a.weight" F32 [2,2] 16 sha256:{oid}\n'
        f'tensor "b" BF16 [8] 16 sha256:{oid} from planes sha256:{oid} 40 delta planes sha256:{oid} 12\n'
        f'tensor "c" F32 [4] 16 sha256:{oid} from sha256:{oid} delta lowrank sha256:{oid} 9 approx sha256:{oid} maxerr 0.1 tolerance 0.5\n'
    ).encode()


def _sample_data_manifest() -> bytes:
    oid = "cd" * 32
    return (f"fmhub manifest 3\nformat jsonl\nsize 30\nchunking gear 16384 65536 262144\nsha256 {oid}\n"
            f"chunk 10 sha256:{oid}\nchunk 20 sha256:{oid}\n").encode()


def test_the_samples_parse():
    assert len(Manifest.from_bytes(_sample_manifest()).tensors) == 3
    assert Manifest.from_bytes(_sample_data_manifest()).size == 30


@FUZZ
@given(st.data())
def test_manifest_parser_gives_only_manifest_errors(data):
    sample = data.draw(st.sampled_from([_sample_manifest(), _sample_data_manifest()]))
    text = data.draw(mutated(sample))
    try:
        m = Manifest.from_bytes(text, "fuzz")
    except ManifestError:
        return
    # whatever parses must write back to bytes that parse to the same manifest (a canonical form)
    assert Manifest.from_bytes(m.to_bytes(), "again") == m


UNICODE_DIGITS = st.sampled_from(["\u00b2", "\u0664", "\u0967", "\uff11", "\U0001d7d9", "1_0", "+1", " 1", "01", "1e3"])


@FUZZ
@given(st.data())
def test_numbers_in_a_manifest_are_ascii_digits_only(data):
    sample = _sample_manifest().decode()
    numbers = [w for w in sample.replace("[", " ").replace("]", " ").replace(",", " ").split() if w.isdigit()]
    target = data.draw(st.sampled_from(numbers))
    bad = data.draw(UNICODE_DIGITS)
    spelled = f"{target}{bad}" if bad[0] not in "0+ " else f"{bad}{target}"
    text, n = re.subn(rf"(?<=[ \[,]){target}(?=[ \],\n])", spelled, sample, count=1)
    assert n == 1
    with pytest.raises(ManifestError):
        Manifest.from_bytes(text.encode(), "fuzz")


@FUZZ
@given(st.text(max_size=200))
def test_chunking_lines_give_only_manifest_errors(text):
    try:
        Chunking.parse(text)
    except ManifestError:
        pass


def test_a_manifest_over_the_limit_is_refused_before_parsing(monkeypatch):
    import fmhub.core.manifest as manifest

    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(ManifestError, match="over the limit of 1000 bytes"):
        Manifest.from_bytes(_sample_manifest() + b"x" * 1000)


# -- safetensors headers --------------------------------------------------------------------------


def _layout(raw: bytes):
    from fmhub.core.formats import format_named

    view = memoryview(raw)
    pos = 0

    def read_exact(n: int) -> bytes:
        nonlocal pos
        if n > len(view) - pos:
            raise CorruptCheckpoint("fuzz: truncated")
        pos += n
        return bytes(view[pos - n : pos])

    return format_named("safetensors").read_layout(read_exact, "fuzz")


def _sample_header() -> bytes:
    obj = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
           "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}
    raw = json.dumps(obj).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=30,
)


@FUZZ
@given(st.data())
def test_safetensors_headers_give_only_corrupt_checkpoint(data):
    if data.draw(st.booleans()):
        raw = data.draw(mutated(_sample_header()))
    else:  # a well-framed header around any JSON value, or brackets nested far past any real header
        body = data.draw(JSONISH.map(lambda v: json.dumps(v).encode()) | st.integers(1, 5000).map(lambda d: b"[" * d + b"]" * d))
        raw = struct.pack("<Q", len(body)) + body
    try:
        _layout(raw)
    except CorruptCheckpoint:
        pass


def test_an_oversized_header_names_the_limit(tmp_path):
    from fmhub.core.checkpoint import clean
    from fmhub.core.store import ObjectStore

    store = ObjectStore.create(str(tmp_path / "lfs"))
    for n in (2**63, 200_000_000):
        data = struct.pack("<Q", n) + b'{"__metadata__":{"x":"' + b"y" * 100
        with pytest.raises(CorruptCheckpoint, match=f"header length {n} is over the limit of 100000000"):
            clean(_Reader(data), store, "big.safetensors")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int) -> bytes:
        self.pos += n
        return self.data[self.pos - n : self.pos]


# -- delta and planes decoders --------------------------------------------------------------------


def _codecs():
    from fmhub.core.codecs import codecs

    return codecs()


def _bounded(call, budget: int):
    """Run ``call``; its errors pass through; fail if it allocated more than ``budget`` bytes at its peak."""
    tracemalloc.start()
    try:
        return call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= budget, f"allocated {peak} bytes, over the bound {budget}"


@st.composite
def delta_case(draw):
    """(codec name, base bytes, a true delta from base to new, dtype, shape)."""
    name = draw(st.sampled_from(["planes", "sparse", "xor-zlib", "lowrank"]))
    rows, cols = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    base = _rng_tensor(draw(st.integers(0, 99)), rows * cols)
    new = base.copy()
    changed = draw(st.lists(st.integers(0, rows * cols - 1), max_size=8))
    new[changed] += 1.0
    if name == "lowrank":
        new = new + np.outer(_rng_tensor(1, rows), _rng_tensor(2, cols)).ravel().astype(np.float32) * 0.01
    delta = _codecs()[name].encode(base.tobytes(), new.tobytes(), "F32", (rows, cols))
    if delta is None:  # the codec declined (not worth it): fuzz a planes root instead
        name, delta = "planes", _codecs()["planes"].encode(None, new.tobytes(), "F32", (rows, cols))
        base = None
    return name, (base.tobytes() if base is not None else None), delta, (rows, cols)


@FUZZ
@given(st.data())
def test_delta_decoders_give_only_value_errors_within_the_declared_size(data):
    name, base, delta, shape = data.draw(delta_case())
    bad = data.draw(mutated(delta))
    size = 4 * shape[0] * shape[1]
    budget = 16 * size + 4 * len(bad) + (1 << 20)  # a few copies of the tensor, never what the delta claims
    codec = _codecs()[name]
    try:
        if base is None:
            from fmhub.core.planes import decode_object

            out = _bounded(lambda: decode_object(bad, None, size), budget)
        else:
            out = _bounded(lambda: codec.decode(base, bad, "F32"), budget)
    except ValueError:  # the documented failure: PlanesError and the patch errors are ValueErrors
        return
    assert len(out) == size


@FUZZ
@given(st.data())
def test_range_decoders_give_only_value_errors(data):
    from fmhub.core.lowrank import RangeDecoder
    from fmhub.core.lowrank_fixed import Decoder

    rows, cols = data.draw(st.integers(2, 12)), data.draw(st.integers(2, 12))
    base = _rng_tensor(3, rows * cols)
    new = base + np.outer(_rng_tensor(4, rows), _rng_tensor(5, cols)).ravel().astype(np.float32)
    codec = _codecs()[data.draw(st.sampled_from(["lowrank", "lowrank-fixed"]))] if "lowrank-fixed" in _codecs() else _codecs()["lowrank"]
    delta = codec.encode(base.tobytes(), new.tobytes(), "F32", (rows, cols))
    if delta is None:
        return
    bad = data.draw(mutated(delta))
    cls = Decoder if codec.name == "lowrank-fixed" else RangeDecoder
    try:
        decoder = _bounded(lambda: cls(bad, "F32", (rows, cols)), 64 * rows * cols + 4 * len(bad) + (1 << 20))
        decoder.apply(base.tobytes(), 0, min(4 * rows * cols, 1 << 20))
    except ValueError:
        pass


# -- bounded JSON ---------------------------------------------------------------------------------


@FUZZ
@given(st.one_of(st.text(max_size=300), JSONISH.map(json.dumps), st.integers(1, 100_000).map(lambda d: "[" * d),
                 st.integers(1, 300).map(lambda d: "9" * d)))
def test_bounded_json_gives_only_its_own_error(text):
    try:
        boundedjson.loads(text)
    except boundedjson.JSONLimitError as exc:
        assert "\n" not in str(exc)


def test_bounded_json_limits():
    assert boundedjson.loads('{"a": [1, {"b": "[[[["}]}') == {"a": [1, {"b": "[[[["}]}
    for text, why in [("[" * 65 + "]" * 65, "nested deeper"), ("1" * 41, "41 digits"), ("1e999", "out of range"),
                      ("NaN", "not a JSON number"), ('"\\', "not valid JSON")]:
        with pytest.raises(boundedjson.JSONLimitError, match=why):
            boundedjson.loads(text)


def test_bounded_json_depth_is_linear_on_hostile_strings():
    import time

    text = '["' + '\\"' * 2_000_000  # an unterminated string of escaped quotes: quadratic for a naive scanner
    start = time.perf_counter()
    with pytest.raises(boundedjson.JSONLimitError):
        boundedjson.loads(text)
    assert time.perf_counter() - start < 30  # ~0.05 s; a quadratic scan would take hours, not a loaded machine's 10x


def test_errors_are_fmhub_errors():
    assert issubclass(ManifestError, FmhubError) and issubclass(CorruptCheckpoint, FmhubError)

"""The ``planes`` codec and encoded roots (docs/manifest.md, "Encoded roots (version 4)" and "The planes codec").

Three parts: the spec's test vectors and bit-exact round trips (every dtype
family, roots and links, every frame kind, across frame boundaries); hostile
objects, one test per check, each built so that it would decode (or fail some
other way) if that check were missing; and corrupt or lying objects and
manifests met by a real ``git checkout``.

Hostile-input tests assert the exception *type* and a phrase of its message:
a bare ``ValueError`` or ``IndexError`` from numpy is what a missing check
looks like, so it must not satisfy them.
"""

from __future__ import annotations

import functools
import hashlib
import io
import shutil
import struct
import tracemalloc
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import commit_checkpoint as commit, committed_manifest as manifest, fmhub, git, isolate_git, sha256_file

from fmhub.core import planes
from fmhub.core import tensorio
from fmhub.base.errors import CorruptObject, FmhubError
from fmhub.core.lowrank import MAX_RANK, RangeDecoder
from fmhub.core.manifest import Delta, Manifest, TensorEntry
from fmhub.core.planes import DIFF, PLANES, RAW, SAME, SPARSE, STORED, ZSTD, PlanesError
from fmhub.core.sparse_index import decode_patch, encode_patch
from fmhub.core.store import ObjectStore
from fmhub_plugins.delta_codecs import XorZlib

FRAME = planes.FRAME_BYTES
MiB = 1 << 20
CKPT = "model.safetensors"


# -- building objects by hand ---------------------------------------------------------------------


def head(item: int, flags: int, size: int, frame: int | None = None, reserved: int = 0, magic: bytes = b"FPL1") -> bytes:
    return struct.pack("<4sBBHQI", magic, item, flags, reserved, size, FRAME // item if frame is None else frame)


def rec(kind: int, body: bytes = b"", length: int | None = None) -> bytes:
    """A frame record (kind) or a plane record (mode): u8, u32 length, body."""
    return struct.pack("<BI", kind, len(body) if length is None else length) + body


def sparse_payload(gaps, values: bytes, count: int | None = None) -> bytes:
    g = np.asarray(gaps, "<u4").tobytes()
    return struct.pack("<I", len(gaps) if count is None else count) + rec(STORED, g) + rec(STORED, values)


def zstd_frame(content: bytes, declared: int | None, window_log: int | None = None) -> bytes:
    """A hand-made zstd frame (RFC 8878) holding ``content`` in one raw block.

    ``declared``: its Frame_Content_Size (None: not declared). Without ``window_log`` the frame is
    single-segment (its window is its content size); with it, a Window_Descriptor asks for 2**window_log.
    """
    if declared is None:
        assert window_log is not None, "a frame without a content size needs a window descriptor"
        fhd, fcs = 0x00, b""
    else:
        fhd, fcs = 0xC0, struct.pack("<Q", declared)  # Frame_Content_Size_flag 3: 8 bytes
    if window_log is None:
        fhd |= 0x20  # Single_Segment_flag
        wd = b""
    else:
        wd = bytes([(window_log - 10) << 3])
    block = struct.pack("<I", (len(content) << 3) | 1)[:3] + content  # Last_Block, Raw_Block
    return struct.pack("<IB", 0xFD2FB528, fhd) + wd + fcs + block


def frames_of(obj: bytes) -> list[tuple[int, int, int]]:
    """(kind, payload offset, payload length) of each frame record of a well-formed object."""
    out, at = [], planes.HEADER_SIZE
    while at < len(obj):
        kind, length = struct.unpack_from("<BI", obj, at)
        out.append((kind, at + 5, length))
        at += 5 + length
    return out


def planes_of(obj: bytes, payload_at: int, item: int) -> list[tuple[int, int, int]]:
    """(mode, body offset, body length) of the plane records of a planes/diff frame."""
    out, at = [], payload_at
    for _ in range(item):
        mode, length = struct.unpack_from("<BI", obj, at)
        out.append((mode, at + 5, length))
        at += 5 + length
    return out


# -- data -----------------------------------------------------------------------------------------


def sha(data) -> str:
    return hashlib.sha256(data).hexdigest()


def floats(n: int, seed: int = 0, dtype=np.float32) -> bytes:
    """Weights-like floats: their exponent planes compress, their mantissas do not."""
    return (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(dtype).tobytes()


def bf16(n: int, seed: int = 0) -> bytes:
    bits = np.frombuffer(floats(n, seed), np.uint32) >> 16
    return bits.astype("<u2").tobytes()


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# -- a store to read chains from ---------------------------------------------------------------------


@pytest.fixture
def store(tmp_path) -> ObjectStore:
    return ObjectStore.create(str(tmp_path / "lfs"))


def put(store: ObjectStore, data: bytes, oid: str | None = None) -> str:
    """Place ``data`` in the store as ``oid`` (its own sha256 unless given: a forged name simulates a damaged object)."""
    oid = oid or sha(data)
    p = Path(store.object_path(oid))
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists():
        p.chmod(0o644)
    p.write_bytes(data)
    return oid


def coded_root(store: ObjectStore, data: bytes, obj: bytes, dtype: str = "F32", name: str = "w") -> TensorEntry:
    """The entry of a tensor whose chain is the planes object ``obj`` alone (``data``: what it should decode to)."""
    item = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(dtype, 1)
    return TensorEntry(
        name, dtype, (len(data) // item,), len(data), sha(data), root=put(store, obj), root_codec="planes", root_size=len(obj)
    )


def linked(store: ObjectStore, base: TensorEntry, new: bytes, delta: bytes, codec: str = "planes", shape=None) -> TensorEntry:
    """``base``'s chain plus one link ``delta`` that should give ``new``."""
    d = Delta(codec, put(store, delta), len(delta))
    root = base.root if base.root is not None else base.oid
    return TensorEntry(base.name, base.dtype, shape or base.shape, len(new), sha(new), root=root, deltas=base.deltas + (d,),
                       root_codec=base.root_codec, root_size=base.root_size)


def raw_entry(store: ObjectStore, data: bytes, dtype: str = "F32", name: str = "w", shape=None) -> TensorEntry:
    item = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(dtype, 1)
    put(store, data)
    return TensorEntry(name, dtype, shape or (len(data) // item,), len(data), sha(data))


def read(store: ObjectStore, entry: TensorEntry) -> bytes:
    return bytes(tensorio.read_tensor(store, entry))


@contextmanager
def refused(exc_type, *needles: str):
    """The block raises ``exc_type`` with a one-line message holding every needle."""
    with pytest.raises(exc_type) as info:
        yield info
    msg = str(info.value)
    assert msg and "\n" not in msg, repr(msg)
    for needle in needles:
        assert needle in msg, (needle, msg)


@contextmanager
def peak_allocation_below(limit: int):
    """Python-level allocations (bytes objects, numpy buffers) inside the block stay under ``limit`` bytes."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"allocated {peak} bytes at the peak"


# == 1. the spec: test vectors ========================================================================

# docs/manifest.md, "Test vectors"
VECTOR_VALUES = bytes.fromhex("803f00c0003f404000000080e0408044")  # BF16 1, -2, 0.5, 3, 0, -0.0, 7, 1024
VECTOR_ROOT = bytes.fromhex("46504c31 02 01 0000 1000000000000000 00002000  00 10000000 803f00c0003f404000000080e0408044")
ONES = bytes.fromhex("803f") * 64
ONES_ROOT = bytes.fromhex("46504c31 02 01 0000 8000000000000000 00002000 00 80000000") + ONES
ONES_LINK = bytes.fromhex(
    "46504c31 02 01 0000 8000000000000000 00002000  03 14000000 01000000 00 04000000 01000000 00 02000000 20c0"
)


def test_vector_values_are_the_bf16_bits_the_spec_lists():
    torch = pytest.importorskip("torch")
    t = torch.tensor([1, -2, 0.5, 3, 0, -0.0, 7, 1024], dtype=torch.bfloat16)
    assert t.view(torch.int16).numpy().astype("<i2").tobytes() == VECTOR_VALUES


def test_vector_small_root_is_one_raw_frame():
    assert planes.encode_object(VECTOR_VALUES, None, "BF16") == VECTOR_ROOT
    assert bytes(planes.decode_object(VECTOR_ROOT, None, 16)) == VECTOR_VALUES


def test_vector_ones_root():
    assert planes.encode_object(ONES, None, "BF16") == ONES_ROOT
    assert bytes(planes.decode_object(ONES_ROOT, None, 128)) == ONES


def test_vector_one_changed_element_is_a_sparse_link():
    new = bytearray(ONES)
    new[2:4] = bytes.fromhex("20c0")  # element 1 = -2.5
    assert planes.encode_object(bytes(new), ONES, "BF16") == ONES_LINK
    assert bytes(planes.decode_object(ONES_LINK, ONES, 128)) == bytes(new)


def test_vectors_decode_through_the_streaming_reader(store):
    root = coded_root(store, ONES, ONES_ROOT, "BF16")
    new = bytearray(ONES)
    new[2:4] = bytes.fromhex("20c0")
    assert read(store, root) == ONES
    assert read(store, linked(store, root, bytes(new), ONES_LINK)) == bytes(new)


# == 1. the spec: layouts and round trips ================================================================

# dtype -> (element size, FLOAT flag) the writer must pick (docs: "The writer picks s and the flag from the dtype")
LAYOUTS = {
    "F64": (8, 1), "F32": (4, 1), "C64": (4, 1), "F16": (2, 1), "BF16": (2, 1),
    "I64": (8, 0), "U64": (8, 0), "I32": (4, 0), "U32": (4, 0), "I16": (2, 0), "U16": (2, 0),
    "U8": (1, 0), "I8": (1, 0), "BOOL": (1, 0), "F8_E4M3": (1, 0), "F8_E5M2": (1, 0), "SOMETHING_NEW": (1, 0),
}


@pytest.mark.parametrize("dtype", sorted(LAYOUTS))
def test_writer_picks_the_element_size_and_float_flag_of_the_dtype(dtype):
    item, flags = LAYOUTS[dtype]
    obj = planes.encode_object(bytes(16 * 8), None, dtype)
    assert obj[4:6] == bytes([item, flags])
    assert struct.unpack_from("<I", obj, 16)[0] * item == FRAME


@pytest.mark.parametrize("dtype", ["F64", "F32", "BF16", "I32"])
def test_a_size_not_a_multiple_of_the_element_is_cut_into_bytes(dtype):
    obj = planes.encode_object(bytes(4099), None, dtype)
    assert obj[4:6] == b"\x01\x00"
    assert bytes(planes.decode_object(obj, None, 4099)) == bytes(4099)


# Element bit patterns worth meeting: zeros of both signs, NaNs with payloads (quiet, signalling, negative),
# infinities, subnormals, extremes.
SPECIALS = {
    item: np.array(bits, f"<u{item}")
    for item, bits in {
        8: [0, 1 << 63, 0x7FF8000000000001, 0xFFF0000000000001, 0x7FF0000000000000, 1, 0x7FEFFFFFFFFFFFFF, 0x3FF0000000000000],
        4: [0, 1 << 31, 0x7FC00001, 0xFF800001, 0x7F800000, 1, 0x7F7FFFFF, 0x3F800000],
        2: [0, 1 << 15, 0x7E01, 0xFC01, 0x7C00, 1, 0x7F81, 0xFF81],
        1: [0, 0x80, 0x7F, 0xFF, 0x01, 0x78, 0xF8],
    }.items()
}
ROUND_TRIP_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "U8", "BOOL", "F8_E4M3"]
NP_FLOAT = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def sample_bytes(dtype: str, n: int, style: str, seed: int) -> bytes:
    """``n`` elements of ``dtype`` in one of a few styles that steer the writer into different codings."""
    item = LAYOUTS[dtype][0]
    rng = np.random.default_rng(seed)
    if style == "random":  # incompressible: raw frames
        return random_bytes(n * item, seed)
    if style == "constant":
        return rng.integers(0, 256, item, dtype=np.uint8).tobytes() * n
    if style == "specials":
        return rng.choice(SPECIALS[item], n).tobytes()
    # "weights": what a checkpoint holds (compressible exponent planes; small integers; mostly-zero bytes)
    if dtype in NP_FLOAT:
        return floats(n, seed, NP_FLOAT[dtype])
    if dtype == "BF16":
        return bf16(n, seed)
    if dtype == "BOOL":
        return (rng.random(n) < 0.1).astype(np.uint8).tobytes()
    return rng.integers(-40, 40, n).astype(f"<i{item}").tobytes()


def odd_tail(data: bytes, odd: bool) -> bytes:
    return data + b"\x07\x03\x01" if odd else data  # 3 more bytes: the size is no longer a multiple of the element


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(ROUND_TRIP_DTYPES),
    n=st.integers(1, 3000),
    style=st.sampled_from(["random", "constant", "specials", "weights"]),
    seed=st.integers(0, 2**32 - 1),
    odd=st.booleans(),
)
def test_roots_round_trip_bit_for_bit(dtype, n, style, seed, odd):
    data = odd_tail(sample_bytes(dtype, n, style, seed), odd)
    obj = planes.encode_object(data, None, dtype)
    assert all(kind in (RAW, PLANES) for kind, _, _ in frames_of(obj))  # a root needs no previous version
    assert bytes(planes.decode_object(obj, None, len(data))) == data


def changed(base: bytes, dtype: str, how: str, seed: int, odd: bool) -> bytes:
    """The next version of ``base`` (``odd``: its 3-byte tail too)."""
    item = 1 if odd else LAYOUTS[dtype][0]
    rng = np.random.default_rng(seed)
    u = np.frombuffer(base, f"<u{item}").copy()
    if how == "same":
        pass
    elif how == "few":  # sparse
        idx = rng.choice(u.size, max(1, u.size // 50), replace=False)
        u[idx] ^= rng.integers(1, 2 ** (8 * item) - 1, idx.size, dtype=np.uint64).astype(u.dtype)
    elif how == "nudged":  # every element moved a few ulps either way: the zigzag difference is small
        u = u + rng.integers(-3, 4, u.size).astype(u.dtype)  # wraps modulo 2**bits, as the codec's difference does
    elif how == "signs":  # 0.0 <-> -0.0, NaN payloads: bits that differ while values compare equal (or never do)
        u = u ^ np.array(1 << (8 * item - 1), dtype=u.dtype)
    else:  # "rewritten": nothing shared with the base
        return random_bytes(len(base), seed)
    return u.tobytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(ROUND_TRIP_DTYPES),
    n=st.integers(1, 3000),
    style=st.sampled_from(["random", "specials", "weights"]),
    how=st.sampled_from(["same", "few", "nudged", "signs", "rewritten"]),
    seed=st.integers(0, 2**32 - 1),
    odd=st.booleans(),
)
def test_links_round_trip_bit_for_bit(dtype, n, style, how, seed, odd):
    base = odd_tail(sample_bytes(dtype, n, style, seed), odd)
    new = changed(base, dtype, how, seed + 1, odd)
    obj = planes.encode_object(new, base, dtype)
    kinds = {kind for kind, _, _ in frames_of(obj)}
    assert (kinds == {SAME}) == (new == base)
    assert bytes(planes.decode_object(obj, base, len(new))) == new


KIND_CASES = {  # frame kind -> (base style or None for a root, new version: a style, or how it changes the base)
    RAW: (None, "random"),
    PLANES: (None, "weights"),
    SAME: ("weights", "same"),
    SPARSE: ("weights", "few"),
    DIFF: ("weights", "nudged"),
}


@pytest.mark.parametrize("kind", sorted(KIND_CASES), ids=lambda k: planes.KIND_NAMES[k])
@pytest.mark.parametrize("dtype", ROUND_TRIP_DTYPES)
def test_every_frame_kind_round_trips_for_every_dtype(dtype, kind):
    base_style, new_how = KIND_CASES[kind]
    if base_style is None:
        base, new = None, sample_bytes(dtype, 4096, new_how, seed=3)
    else:
        base = sample_bytes(dtype, 4096, base_style, seed=3)
        new = changed(base, dtype, new_how, seed=4, odd=False)
    obj = planes.encode_object(new, base, dtype)
    assert [k for k, _, _ in frames_of(obj)] == [kind]
    assert bytes(planes.decode_object(obj, base, len(new))) == new


@pytest.mark.parametrize("dtype", ["F64", "F32", "F16", "BF16"])
def test_negative_zero_and_nan_payloads_are_bits_not_values(dtype):
    item = LAYOUTS[dtype][0]
    sign = 1 << (8 * item - 1)
    nan = {8: 0x7FF8000000000000, 4: 0x7FC00000, 2: 0x7E00 if dtype == "F16" else 0x7FC0}[item]
    base = np.array([0, nan, nan | 1, sign | nan] + [0] * 200, f"<u{item}")
    new = np.array([sign, nan | 2, nan | 1, nan] + [0] * 200, f"<u{item}")  # -0.0, another payload, same, sign flipped
    if dtype in NP_FLOAT:  # the values compare equal (or are NaN) while the bits differ
        b, n = base.view(NP_FLOAT[dtype]), new.view(NP_FLOAT[dtype])
        assert b[0] == n[0] and np.isnan(b[1:4]).all() and np.isnan(n[1:4]).all()
    link = planes.encode_object(new.tobytes(), base.tobytes(), dtype)
    assert [k for k, _, _ in frames_of(link)] == [SPARSE]
    assert struct.unpack_from("<I", link, planes.HEADER_SIZE + 5)[0] == 3  # three elements changed, not zero
    assert bytes(planes.decode_object(link, base.tobytes(), base.nbytes)) == new.tobytes()
    assert bytes(planes.decode_object(planes.encode_object(new.tobytes(), None, dtype), None, new.nbytes)) == new.tobytes()


def test_diff_frames_wrap_modulo_the_element():
    # 0xFFFF -> 0x0000 is +1 modulo 2**16: a tiny difference, not -65535
    base = np.full(4096, 0xFFFF, "<u2")
    new = base + np.uint16(1)
    link = planes.encode_object(new.tobytes(), base.tobytes(), "I16")
    assert [k for k, _, _ in frames_of(link)] == [DIFF]
    assert len(link) < 200
    assert bytes(planes.decode_object(link, base.tobytes(), base.nbytes)) == new.tobytes()


# -- frame boundaries: several 4 MiB frames and a short last one ----------------------------------------


@pytest.fixture(scope="module")
def four_frames():
    """An F32 tensor of three full frames plus 1000 bytes, and a next version with one kind of frame each:
    unchanged, a few elements changed, every element nudged, and rewritten."""
    size = 3 * FRAME + 1000
    old = floats(size // 4, seed=1)
    u = np.frombuffer(old, "<u4").copy()
    per = FRAME // 4
    u[per + np.arange(0, per, 997)] ^= 0x55  # frame 1: 0.1 % of the elements
    u[2 * per : 3 * per] += np.uint32(1)  # frame 2: every element one ulp up
    u[3 * per :] = np.frombuffer(random_bytes(1000, 9), "<u4")  # frame 3: nothing in common
    return old, u.tobytes()


def test_a_root_of_several_frames_round_trips(four_frames):
    old, _ = four_frames
    obj = planes.encode_object(old, None, "F32")
    assert [k for k, _, _ in frames_of(obj)] == [PLANES, PLANES, PLANES, PLANES]
    assert len(obj) < 0.9 * len(old)
    assert planes.decode_object(obj, None, len(old)) == old


def test_a_link_of_several_frames_uses_each_kind_and_round_trips(four_frames):
    old, new = four_frames
    link = planes.encode_object(new, old, "F32")
    assert [k for k, _, _ in frames_of(link)] == [SAME, SPARSE, DIFF, RAW]
    assert planes.decode_object(link, old, len(new)) == new


def test_streaming_reader_matches_decode_object_across_frames(store, four_frames):
    old, new = four_frames
    root = coded_root(store, old, planes.encode_object(old, None, "F32"))
    link = linked(store, root, new, planes.encode_object(new, old, "F32"))
    assert read(store, root) == old
    assert read(store, link) == new


def test_a_byte_tensor_spanning_frames_round_trips(store):
    # not a multiple of 4: coded as bytes, one plane per frame, the last frame 3 bytes long
    data = floats(2 * FRAME // 4)[: 2 * FRAME] + b"\x01\x02\x03"
    obj = planes.encode_object(data, None, "F32")
    assert obj[4] == 1 and len(frames_of(obj)) == 3
    assert read(store, coded_root(store, data, obj, "F32")) == data


def test_store_writer_gives_the_bytes_of_encode_object(store, four_frames):
    old, new = four_frames
    coded = tensorio.write_planes(store, old, "F32", None)
    oid = coded.commit()  # nothing is visible before the caller commits
    store.flush()
    with open(store.object_path(oid), "rb") as f:
        assert f.read() == planes.encode_object(old, None, "F32")
    root = TensorEntry(
        "w", "F32", (len(old) // 4,), len(old), sha(old), root=oid, root_codec="planes", root_size=coded.size
    )
    chain = tensorio.Chain(store, root)
    try:
        coded = tensorio.write_planes(store, new, "F32", chain)
    finally:
        chain.close()
    coded.oid = coded.commit()
    store.flush()
    assert (coded.frames, coded.literal) == (4, 1)
    with open(store.object_path(coded.oid), "rb") as f:
        assert f.read() == planes.encode_object(new, old, "F32")


def test_a_link_rebuilds_from_what_its_base_objects_decode_to(store):
    # the base is used as its objects decode, even when that is not the oid its entry names (a lying manifest):
    # the link then rebuilds the new version from those same objects, and the new version's own oid is checked
    old, other, new = floats(2048, 1), floats(2048, 2), floats(2048, 3)
    root = coded_root(store, old, planes.encode_object(other, None, "F32"))  # decodes, but to other bytes
    chain = tensorio.Chain(store, root)
    try:
        coded = tensorio.write_planes(store, new, "F32", chain)
    finally:
        chain.close()
    link = linked(store, root, new, planes.encode_object(new, other, "F32"))
    assert coded.size == link.storage()[-1][1]
    coded.abort()
    assert read(store, link) == new


def test_writer_refuses_to_link_to_a_base_that_does_not_decode(store):
    old = floats(2048, 1)
    obj = bytearray(planes.encode_object(old, None, "F32"))
    obj[planes.HEADER_SIZE] = 9  # an unknown frame kind
    root = coded_root(store, old, bytes(obj))
    chain = tensorio.Chain(store, root)
    try:
        assert tensorio.write_planes(store, floats(2048, 3), "F32", chain) is None
    finally:
        chain.close()


def test_tensor_file_reads_across_frames_and_seeks_back(store, four_frames):
    old, _ = four_frames
    entry = coded_root(store, old, planes.encode_object(old, None, "F32"))
    with tensorio.TensorFile(store, entry) as f:
        f.seek(FRAME - 10)
        assert f.read(20) == old[FRAME - 10 : FRAME + 10]
        f.seek(5)
        assert f.read(7) == old[5:12]
        f.seek(-3, 2)
        assert f.read() == old[-3:]


def test_copy_tensors_writes_every_tensor_in_order(store, four_frames):
    old, new = four_frames
    root = coded_root(store, old, planes.encode_object(old, None, "F32"), name="a")
    entries = [
        raw_entry(store, b"\x01\x02\x03\x04", name="plain"),
        TensorEntry("empty", "F32", (0,), 0, sha(b"")),
        linked(store, root, new, planes.encode_object(new, old, "F32")),
        root,
    ]
    out = io.BytesIO()
    tensorio.copy_tensors(store, entries, out)
    assert out.getvalue() == b"\x01\x02\x03\x04" + new + old


# == 2. hostile objects ==================================================================================
#
# A small BF16 tensor whose root is one planes frame: plane 0 stored, plane 1 (the exponents) compressed.

N = 4096  # elements
SMALL = bf16(N, seed=5)


def small_root() -> bytes:
    obj = planes.encode_object(SMALL, None, "BF16")
    (kind, at, _), = frames_of(obj)
    assert kind == PLANES and [m for m, _, _ in planes_of(obj, at, 2)] == [STORED, ZSTD]
    return obj


def with_exponent_plane(body: bytes, mode: int = ZSTD, length: int | None = None) -> bytes:
    """SMALL's root with its compressed plane replaced by ``body`` (frame length kept consistent)."""
    obj = small_root()
    (_, at, _), = frames_of(obj)
    (m0, p0, l0), _ = planes_of(obj, at, 2)
    payload = rec(m0, obj[p0 : p0 + l0]) + rec(mode, body, length)
    return obj[: planes.HEADER_SIZE] + rec(PLANES, payload)


def exponents() -> bytes:
    """SMALL's plane 1: byte 1 of each element rotated left by one bit (sign to bit 0), i.e. the exponents."""
    u = np.frombuffer(SMALL, "<u2").astype(np.uint32)
    return (((u << 1) >> 8) & 0xFF).astype(np.uint8).tobytes()


def test_the_hand_built_exponent_plane_decodes():
    # the baseline the zstd tests below mutate: a hand-made frame of the right plane decodes to SMALL
    obj = with_exponent_plane(zstd_frame(exponents(), N))
    assert bytes(planes.decode_object(obj, None, len(SMALL))) == SMALL


# -- zstd planes ---------------------------------------------------------------------------------------


def test_zstd_plane_declaring_gigabytes_is_refused_before_decompressing():
    # python-zstandard allocates what the frame header declares: 3 GiB here, if the size were not checked first
    obj = with_exponent_plane(zstd_frame(exponents()[:10], 3 << 30))
    with peak_allocation_below(4 * MiB), refused(PlanesError, "declares 3221225472 bytes, not 4096"):
        planes.decode_object(obj, None, len(SMALL))


def test_zstd_plane_declaring_one_byte_more_than_the_plane_is_refused():
    obj = with_exponent_plane(zstd_frame(exponents() + b"\x00", N + 1))
    with refused(PlanesError, "declares 4097 bytes"):
        planes.decode_object(obj, None, len(SMALL))


def test_zstd_plane_without_a_content_size_is_refused():
    # decompressing with max_output_size would accept it: only the declared size refuses it
    obj = with_exponent_plane(zstd_frame(exponents(), None, window_log=17))
    with refused(PlanesError, "compressed plane declares"):
        planes.decode_object(obj, None, len(SMALL))


@pytest.mark.parametrize("window_log", [21, 30])
def test_zstd_plane_with_a_window_over_1_MiB_is_refused(window_log):
    obj = with_exponent_plane(zstd_frame(exponents(), N, window_log=window_log))
    with refused(PlanesError, "window"):
        planes.decode_object(obj, None, len(SMALL))


def test_zstd_plane_with_a_window_of_1_MiB_decodes():
    obj = with_exponent_plane(zstd_frame(exponents(), N, window_log=20))
    assert bytes(planes.decode_object(obj, None, len(SMALL))) == SMALL


@pytest.mark.parametrize("extra", [b"\x00", zstd_frame(b"", 0)], ids=["a byte", "a second frame"])
def test_zstd_plane_with_bytes_after_its_frame_is_refused(extra):
    obj = with_exponent_plane(zstd_frame(exponents(), N) + extra)
    with refused(PlanesError, "does not decompress"):
        planes.decode_object(obj, None, len(SMALL))


def test_zstd_plane_that_is_not_a_zstd_frame_is_refused():
    obj = with_exponent_plane(b"\x00" * 32)
    with refused(PlanesError, "not a zstd frame"):
        planes.decode_object(obj, None, len(SMALL))


def test_zstd_plane_whose_blocks_hold_less_than_declared_is_refused():
    obj = with_exponent_plane(zstd_frame(exponents()[:-1], N))
    with refused(PlanesError, "compressed plane"):
        planes.decode_object(obj, None, len(SMALL))


def test_unknown_plane_mode_is_refused():
    obj = with_exponent_plane(exponents(), mode=2)  # the right bytes, in a mode that does not exist
    with refused(PlanesError, "unknown plane mode 2"):
        planes.decode_object(obj, None, len(SMALL))


# -- stored planes and plane records ------------------------------------------------------------------


@pytest.mark.parametrize("delta", [-1, 1])
def test_stored_plane_of_the_wrong_length_is_refused(delta):
    # consistent lengths all the way up: only the plane's own expected size is wrong
    obj = with_exponent_plane(exponents()[:delta] if delta < 0 else exponents() + b"\x00", mode=STORED)
    with refused(PlanesError, f"holds {N + delta} bytes, not {N}"):
        planes.decode_object(obj, None, len(SMALL))


def test_plane_longer_than_its_frame_is_refused():
    obj = with_exponent_plane(exponents(), mode=STORED, length=N + 1)  # the frame holds N bytes of it
    with refused(PlanesError, "longer than its frame"):
        planes.decode_object(obj, None, len(SMALL))


def test_frame_cut_inside_a_plane_record_is_refused():
    obj = small_root()
    (_, at, _), = frames_of(obj)
    _, (_, p1, _) = planes_of(obj, at, 2)
    payload = obj[at : p1 - 3]  # plane 1's record header cut short
    with refused(PlanesError, "truncated"):
        planes.decode_object(obj[: planes.HEADER_SIZE] + rec(PLANES, payload), None, len(SMALL))


def test_frame_with_bytes_after_its_last_plane_is_refused():
    obj = small_root()
    (_, at, length), = frames_of(obj)
    with refused(PlanesError, "bytes after its last plane"):
        planes.decode_object(obj[: planes.HEADER_SIZE] + rec(PLANES, obj[at : at + length] + b"\x00"), None, len(SMALL))


def test_raw_frame_of_the_wrong_length_is_refused():
    obj = head(2, 1, 16) + rec(RAW, VECTOR_VALUES[:-2])
    with refused(PlanesError, "raw frame holds 14 bytes, not 16"):
        planes.decode_object(obj, None, 16)


# -- frame records: lengths the object or the frame cannot hold -------------------------------------------


def test_frame_record_longer_than_the_object_is_refused(store):
    at = planes.HEADER_SIZE + 1  # the raw frame's length
    obj = VECTOR_ROOT[:at] + struct.pack("<I", 17) + VECTOR_ROOT[at + 4 :]  # the raw frame claims one byte more
    with refused(PlanesError, "truncated"):
        planes.decode_object(obj, None, 16)
    entry = coded_root(store, VECTOR_VALUES, obj, "BF16")
    with refused(CorruptObject, "tensor 'w'", "claims 17 bytes"):  # refused before reading, not by a short read
        read(store, entry)


def test_frame_record_over_the_frames_bound_is_refused_before_reading(store):
    # the object really holds the bytes, so only the bound (`planes.max_payload`) stops the read
    n = 1000
    length = planes.max_payload(n) + 1
    obj = head(1, 0, n) + rec(RAW, bytes(length))
    with refused(CorruptObject, "tensor 'w'", f"claims {length} bytes"):
        read(store, coded_root(store, bytes(n), obj, "U8"))


def test_frame_record_at_the_frames_bound_is_read(store):
    # the bound itself is allowed (the record then fails as what it is: a raw frame of the wrong size)
    n = 1000
    obj = head(1, 0, n) + rec(RAW, bytes(planes.max_payload(n)))
    with refused(CorruptObject, "raw frame holds"):
        read(store, coded_root(store, bytes(n), obj, "U8"))


def test_a_dense_sparse_frame_the_spec_allows_is_read_by_the_streaming_reader(store):
    n = MiB  # bytes: every other one changes, gaps stored as they are
    gaps = np.full(n // 2, 2, "<u4")
    gaps[0] = 0
    obj = head(1, 0, n) + rec(SPARSE, sparse_payload(gaps, b"\x01" * (n // 2)))
    new = bytes(planes.decode_object(obj, bytes(n), n))
    assert new[:4] == b"\x01\x00\x01\x00"
    assert read(store, linked(store, raw_entry(store, bytes(n), "U8"), new, obj)) == new


# -- the header -----------------------------------------------------------------------------------------


def test_header_declaring_another_size_is_refused(store):
    obj = head(2, 1, 18) + VECTOR_ROOT[planes.HEADER_SIZE :]
    with refused(PlanesError, "decodes to 18 bytes, not the tensor's 16"):
        planes.decode_object(obj, None, 16)
    with refused(CorruptObject, "tensor 'w'", "decodes to 18 bytes"):
        read(store, coded_root(store, VECTOR_VALUES, obj, "BF16"))


@pytest.mark.parametrize("item", [3, 16, 0])
def test_header_with_an_element_size_other_than_1_2_4_8_is_refused(item):
    # 16 divides both the frame and the size: only the element-size check refuses it
    size = 32
    obj = head(item, 0, size, frame=FRAME // item if item else FRAME) + rec(RAW, bytes(size))
    with refused(PlanesError, f"element size {item}"):
        planes.decode_object(obj, None, size)


@pytest.mark.parametrize("flags", [2, 0x81, 0xFF])
def test_header_with_unknown_flags_is_refused(flags):
    obj = head(2, flags, 16) + rec(RAW, VECTOR_VALUES)
    with refused(PlanesError, f"flags {flags}"):
        planes.decode_object(obj, None, 16)


def test_float_flag_on_bytes_is_refused():
    obj = head(1, 1, 16) + rec(RAW, VECTOR_VALUES)
    with refused(PlanesError, "element size 1, flags 1"):
        planes.decode_object(obj, None, 16)


def test_header_with_a_nonzero_reserved_field_is_refused():
    obj = head(2, 1, 16, reserved=1) + rec(RAW, VECTOR_VALUES)
    with refused(PlanesError, "header is invalid"):
        planes.decode_object(obj, None, 16)


def test_header_with_a_size_not_a_multiple_of_the_element_is_refused():
    obj = head(4, 1, 18) + rec(RAW, bytes(18))
    with refused(PlanesError, "not the tensor's 18"):
        planes.decode_object(obj, None, 18)


@pytest.mark.parametrize("frame_bytes", [FRAME // 4, FRAME * 2])
def test_header_with_frames_other_than_4_MiB_is_refused(store, frame_bytes):
    # a well-formed object with frames of another size: it would decode if the header were believed
    size = 2 * MiB
    data = random_bytes(size)
    frames = b"".join(rec(RAW, data[at : at + frame_bytes]) for at in range(0, size, frame_bytes))
    obj = head(4, 1, size, frame=frame_bytes // 4) + frames
    with refused(PlanesError, f"frames hold {frame_bytes // 4} elements of 4 bytes"):
        planes.decode_object(obj, None, size)
    with refused(CorruptObject, "tensor 'w'", "elements of 4 bytes"):
        read(store, coded_root(store, data, obj))


@pytest.mark.parametrize("obj", [b"FPL2" + VECTOR_ROOT[4:], b"FPL1\x02\x01", b""], ids=["magic", "short", "empty"])
def test_not_a_planes_object_is_refused(store, obj):
    with refused(PlanesError):
        planes.decode_object(obj, None, 16)
    with refused(CorruptObject, "tensor 'w'"):
        read(store, coded_root(store, VECTOR_VALUES, obj, "BF16"))


# -- frame kinds ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [5, 255])
def test_unknown_frame_kind_is_refused(store, kind):
    obj = head(2, 1, 16) + rec(kind, VECTOR_VALUES)
    with refused(PlanesError, f"unknown frame kind {kind}"):
        planes.decode_object(obj, None, 16)
    with refused(PlanesError, f"unknown frame kind {kind}"):
        planes.decode_object(obj, VECTOR_VALUES, 16)
    with refused(CorruptObject, "tensor 'w'", f"unknown frame kind {kind}"):
        read(store, coded_root(store, VECTOR_VALUES, obj, "BF16"))


BASED = {
    "same": rec(SAME),
    "sparse": rec(SPARSE, sparse_payload([1], b"\x20\xc0")),
    "diff": rec(DIFF, rec(STORED, bytes(8)) + rec(STORED, bytes(8))),
}


@pytest.mark.parametrize("kind", sorted(BASED))
def test_root_holding_a_frame_that_needs_a_base_is_refused(store, kind):
    obj = head(2, 1, 16) + BASED[kind]
    with refused(PlanesError, "needs the previous version"):
        planes.decode_object(obj, None, 16)
    with refused(CorruptObject, "tensor 'w' (root of its chain)", f"root object holds a {kind} frame"):
        read(store, coded_root(store, VECTOR_VALUES, obj, "BF16"))


@pytest.mark.parametrize("kind", sorted(BASED))
def test_the_same_frames_decode_in_a_link(kind):
    # the control for the test above: these records are valid where a base exists
    assert len(planes.decode_object(head(2, 1, 16) + BASED[kind], VECTOR_VALUES, 16)) == 16


def test_unchanged_frame_carrying_bytes_is_refused():
    obj = head(2, 1, 16) + rec(SAME, b"\x00")
    with refused(PlanesError, "unchanged frame carries bytes"):
        planes.decode_object(obj, VECTOR_VALUES, 16)


# -- sparse frames --------------------------------------------------------------------------------------

BASE16 = VECTOR_VALUES  # 8 BF16 elements


def sparse_link(payload: bytes) -> bytes:
    return head(2, 1, 16) + rec(SPARSE, payload)


def test_sparse_frame_baseline_decodes():
    out = planes.decode_object(sparse_link(sparse_payload([1, 6], b"\x20\xc0\x11\x22")), BASE16, 16)
    assert bytes(out) == BASE16[:2] + b"\x20\xc0" + BASE16[4:14] + b"\x11\x22"


def test_sparse_frame_with_count_0_is_refused():
    with refused(PlanesError, "changes 0 of 8 elements"):
        planes.decode_object(sparse_link(sparse_payload([], b"")), BASE16, 16)


def test_sparse_frame_with_more_elements_than_the_frame_is_refused():
    with refused(PlanesError, "changes 9 of 8 elements"):
        planes.decode_object(sparse_link(sparse_payload([0] + [1] * 8, bytes(18))), BASE16, 16)


@pytest.mark.parametrize("gaps", [[3, 0], [0, 2, 0, 1]], ids=["repeated", "repeated later"])
def test_sparse_frame_with_indices_not_ascending_is_refused(gaps):
    # a repeated index would otherwise decode (the later value winning)
    with refused(PlanesError, "not ascending"):
        planes.decode_object(sparse_link(sparse_payload(gaps, bytes(2 * len(gaps)))), BASE16, 16)


@pytest.mark.parametrize("gaps", [[8], [7, 1], [0, 2**32 - 1]], ids=["first", "second", "huge gap"])
def test_sparse_frame_with_an_index_past_the_frame_is_refused(gaps):
    with refused(PlanesError, "past the end of its frame"):
        planes.decode_object(sparse_link(sparse_payload(gaps, bytes(2 * len(gaps)))), BASE16, 16)


def test_sparse_frame_with_bytes_after_its_values_is_refused():
    with refused(PlanesError, "bytes after its values"):
        planes.decode_object(sparse_link(sparse_payload([1], b"\x20\xc0") + b"\x00"), BASE16, 16)


def test_sparse_frame_with_fewer_values_than_its_count_is_refused():
    with refused(PlanesError, "holds 2 bytes, not 4"):
        planes.decode_object(sparse_link(sparse_payload([1, 1], b"\x20\xc0")), BASE16, 16)


def test_sparse_frame_shorter_than_its_count_is_refused():
    with refused(PlanesError, "sparse frame is truncated"):
        planes.decode_object(sparse_link(b"\x01\x00"), BASE16, 16)


def test_sparse_frame_errors_name_the_tensor_and_frame_when_streamed(store):
    base = raw_entry(store, BASE16, "BF16")
    entry = linked(store, base, bytes(16), sparse_link(sparse_payload([3, 0], bytes(4))))  # not BASE16: the store holds that
    with refused(CorruptObject, "tensor 'w' (delta 1 of 1)", "frame at byte 0", "not ascending"):
        read(store, entry)


# -- whole objects: what follows the last frame, and what is missing ------------------------------------


def test_bytes_after_the_last_frame_are_refused(store):
    obj = VECTOR_ROOT + b"\x00"
    with refused(PlanesError, "bytes after its last frame"):
        planes.decode_object(obj, None, 16)
    with refused(CorruptObject, "tensor 'w'", "1 bytes after its last frame"):
        read(store, coded_root(store, VECTOR_VALUES, obj, "BF16"))


def test_a_frame_record_after_the_last_frame_is_refused(store, four_frames):
    # a whole extra frame: the tensor's bytes still decode right, so only the end check refuses it
    old, _ = four_frames
    obj = planes.encode_object(old, None, "F32") + rec(RAW, bytes(16))
    with refused(PlanesError, "bytes after its last frame"):
        planes.decode_object(obj, None, len(old))
    with refused(CorruptObject, "tensor 'w'", "bytes after its last frame"):
        read(store, coded_root(store, old, obj))


@pytest.mark.parametrize("cut", ["last byte", "record header", "last frame"])
def test_a_truncated_object_is_refused(store, four_frames, cut):
    old, _ = four_frames
    obj = planes.encode_object(old, None, "F32")
    _, at, _ = frames_of(obj)[-1]
    obj = {"last byte": obj[:-1], "record header": obj[: at - 2], "last frame": obj[: at - 5]}[cut]
    with refused(PlanesError, "truncated"):
        planes.decode_object(obj, None, len(old))
    with refused(CorruptObject, "tensor 'w'"):
        read(store, coded_root(store, old, obj))


def test_a_link_against_a_base_of_another_size_is_refused():
    with refused(PlanesError, "previous version is 14 bytes, not 16"):
        planes.decode_object(sparse_link(sparse_payload([1], b"\x20\xc0")), BASE16[:14], 16)


# -- a planes object that decodes, to the wrong bytes ---------------------------------------------------


def test_root_replaced_by_another_valid_planes_object_is_caught_by_the_tensors_sha256(store):
    data, other = floats(4096, 1), floats(4096, 2)
    entry = coded_root(store, data, planes.encode_object(data, None, "F32"))
    put(store, planes.encode_object(other, None, "F32"), oid=entry.root)  # same name, other bytes
    with refused(CorruptObject, "tensor 'w'", "is corrupt"):  # its size differs from the manifest's, or its bytes do
        read(store, entry)


@pytest.mark.parametrize("root", ["planes", "plain"])
def test_base_of_a_link_replaced_on_disk_is_caught_by_the_tensors_sha256(store, root):
    old, new = floats(4096, 1), bytearray(floats(4096, 1))
    new[100:104] = b"\x00\x00\x80\x3f"
    base = coded_root(store, old, planes.encode_object(old, None, "F32")) if root == "planes" else raw_entry(store, old)
    entry = linked(store, base, bytes(new), planes.encode_object(bytes(new), old, "F32"))
    assert read(store, entry) == new
    other = floats(4096, 2)
    put(store, planes.encode_object(other, None, "F32") if root == "planes" else other, oid=entry.root)
    with refused(CorruptObject, "tensor 'w'", "is corrupt"):  # its size differs from the manifest's, or its bytes do
        read(store, entry)
    out = io.BytesIO()
    with refused(CorruptObject, "tensor 'w'", "is corrupt"):
        tensorio.copy_tensors(store, [entry], out)


# == 2. hostile lowrank links (RangeDecoder, applied frame by frame) ==========================================

LR_HEAD = struct.Struct("<4sBIII")


def lowrank(m: int, k: int, r: int, patch: bytes | None = None, precision: int = 4, value: float = 0.5) -> bytes:
    """A lowrank delta adding ``r * value`` to every element (P all ones, F all ``value``), whatever m and k."""
    p = np.ones((m, r), f"<f{precision}")
    f = np.full((r, k), value, f"<f{precision}")
    if patch is None:
        patch = encode_patch(np.empty(0, np.int64), b"", m * k, 4)
    return LR_HEAD.pack(b"FLR1", precision, m, k, r) + p.tobytes() + f.tobytes() + patch


def patch(gaps, values: bytes, width: int = 4, item: int = 4, count: int | None = None, block: bytes | None = None) -> bytes:
    block = zlib.compress(np.asarray(gaps, f"<u{width}").tobytes()) if block is None else block
    return struct.pack("<BBQQ", width, item, len(gaps) if count is None else count, len(block)) + block + values


M8 = 8 * 8 * 4  # an 8 x 8 F32 matrix


def test_lowrank_baseline_decodes_per_frame():
    rd = RangeDecoder(lowrank(8, 8, 2, patch([5], struct.pack("<f", 9.0))), "F32", (8, 8))
    out = np.frombuffer(rd.apply(np.zeros(64, np.float32).tobytes(), 0, M8).tobytes(), np.float32)
    assert out[5] == 9.0 and (np.delete(out, 5) == 1.0).all()


@pytest.mark.parametrize("rank", [MAX_RANK + 1, 1000, 0])
def test_lowrank_with_a_rank_outside_1_to_64_is_refused(rank):
    # its factors are all there: only the rank bound refuses it
    with refused(ValueError, "not a lowrank delta for this tensor"):
        RangeDecoder(lowrank(8, 8, rank), "F32", (8, 8))


def test_lowrank_of_rank_64_is_read():
    RangeDecoder(lowrank(8, 8, MAX_RANK), "F32", (8, 8))


@pytest.mark.parametrize("m,k", [(8, 4), (16, 8), (0, 8)])
def test_lowrank_whose_matrix_is_not_the_tensors_size_is_refused(m, k):
    with refused(ValueError, "not a lowrank delta for this tensor"):
        RangeDecoder(lowrank(m, k, 2), "F32", (8, 8))


def test_lowrank_whose_rows_are_not_the_tensors_rows_is_refused(store):
    old = np.zeros(64, np.float32).tobytes()
    new = np.ones(64, np.float32).tobytes()
    base = raw_entry(store, old, shape=(8, 8))
    entry = linked(store, base, new, lowrank(2, 32, 2), codec="lowrank")  # same elements, other rows
    with refused(CorruptObject, "tensor 'w'"):
        read(store, entry)


def test_lowrank_with_truncated_factors_is_refused():
    with refused(ValueError, "factors are truncated"):
        RangeDecoder(lowrank(8, 8, 2)[: LR_HEAD.size + 8 * 2 * 4 * 2 - 1], "F32", (8, 8))


def test_lowrank_shorter_than_its_header_is_refused():
    with refused(ValueError, "shorter than a lowrank header"):
        RangeDecoder(b"FLR1\x04", "F32", (8, 8))


def test_lowrank_patch_whose_index_block_is_a_zlib_bomb_stops_at_the_declared_count():
    delta = lowrank(8, 8, 2, patch([0], bytes(4), block=zlib_bomb()))  # 64 MiB of zero gaps; one index declared
    with peak_allocation_below(2 * MiB), refused(ValueError, "does not hold the indices it declares"):
        RangeDecoder(delta, "F32", (8, 8))


def test_lowrank_patch_index_past_the_tensor_is_refused():
    with refused(ValueError, "past the end of the tensor"):
        RangeDecoder(lowrank(8, 8, 2, patch([64], bytes(4))), "F32", (8, 8))


def test_lowrank_patch_changing_more_elements_than_the_tensor_has_is_refused():
    with refused(ValueError, "changes 65 elements of 64"):
        RangeDecoder(lowrank(8, 8, 2, patch([0] + [1] * 64, bytes(4 * 65))), "F32", (8, 8))


def test_patch_index_that_wraps_past_2_to_the_64_is_refused():
    with refused(ValueError, "wrap"):
        decode_patch(patch([2**64 - 1, 2], bytes(8), width=8), 0, 64)


def test_lowrank_patch_indices_not_ascending_are_refused():
    with refused(ValueError, "not ascending"):
        RangeDecoder(lowrank(8, 8, 2, patch([3, 0], bytes(8))), "F32", (8, 8))


@pytest.mark.parametrize("item", [2, 8])
def test_lowrank_patch_of_another_element_size_is_refused(item):
    with refused(ValueError, "patch does not fit the tensor"):
        RangeDecoder(lowrank(8, 8, 2, patch([3], bytes(item), item=item)), "F32", (8, 8))


def test_lowrank_with_bytes_after_its_patch_is_refused():
    with refused(ValueError, "patch does not fit the tensor"):
        RangeDecoder(lowrank(8, 8, 2) + b"\x00", "F32", (8, 8))


def test_lowrank_errors_are_one_line_corrupt_objects_naming_the_link(store):
    base = raw_entry(store, np.zeros(64, np.float32).tobytes(), shape=(8, 8))
    entry = linked(store, base, np.ones(64, np.float32).tobytes(), lowrank(8, 8, MAX_RANK + 1), codec="lowrank")
    with refused(CorruptObject, "tensor 'w' (delta 1 of 1)", "not a lowrank delta"):
        read(store, entry)


def test_lowrank_link_in_a_chain_rebuilt_whole_fails_as_a_corrupt_object(store):
    base = raw_entry(store, np.zeros(64, np.float32).tobytes(), shape=(8, 8))
    sparse = b"FSP1" + encode_patch(np.array([1]), struct.pack("<f", 1.0), 64, 4)
    entry = linked(store, base, bytes(256), sparse, codec="sparse")
    entry = linked(store, entry, np.ones(64, np.float32).tobytes(), b"FLR1\x04", codec="lowrank")
    with refused(CorruptObject, "tensor 'w' (delta 2 of 2)"):
        read(store, entry)


def test_lowrank_link_on_a_planes_root_decodes(store):
    old = floats(64)
    new = (np.frombuffer(old, np.float32).astype(np.float64) + 1.0).astype(np.float32).tobytes()
    base = coded_root(store, old, planes.encode_object(old, None, "F32"))
    assert read(store, linked(store, base, new, lowrank(8, 8, 2), codec="lowrank", shape=(8, 8))) == new


# == 2. hostile xor-zlib links ==============================================================================

@functools.lru_cache(None)
def zlib_bomb() -> bytes:
    return zlib.compress(bytes(64 * MiB), 9)  # ~64 KiB that inflates to 64 MiB


def test_xor_zlib_bomb_stops_at_the_tensors_size():
    bomb = b"FXZ1" + zlib_bomb()
    with peak_allocation_below(2 * MiB), refused(ValueError, "does not inflate to the tensor's size"):
        XorZlib().decode(bytes(1000), bomb, "U8")


def test_xor_zlib_bomb_against_an_empty_tensor_stops_at_once():
    bomb = b"FXZ1" + zlib_bomb()
    with peak_allocation_below(2 * MiB), refused(ValueError, "does not inflate"):
        XorZlib().decode(b"", bomb, "U8")


def test_xor_zlib_stream_that_ends_early_is_refused():
    delta = b"FXZ1" + zlib.compress(bytes(1000))[:-4]  # every byte inflates, but the stream never ends (no checksum)
    with refused(ValueError, "does not inflate"):
        XorZlib().decode(bytes(1000), delta, "U8")


def test_xor_zlib_round_trips():
    old, new = random_bytes(1000, 1), random_bytes(1000, 2)
    assert bytes(XorZlib().decode(old, XorZlib().encode(old, new, "U8"), "U8")) == new


# == 2. manifests that lie, met by the reader ===================================================================


@pytest.mark.parametrize("lie", [1, -1])
def test_root_size_that_lies_is_refused(store, lie):
    data = floats(2048)
    obj = planes.encode_object(data, None, "F32")
    entry = coded_root(store, data, obj)

    with refused(CorruptObject, "tensor 'w'", str(len(obj) + lie)):
        read(store, entry._replace(root_size=len(obj) + lie))


@pytest.mark.parametrize("codec", ["zstd", "xor-zlib", "sparse"])
def test_root_codec_that_cannot_decode_a_root_is_refused(store, codec):

    data = floats(2048)
    entry = coded_root(store, data, planes.encode_object(data, None, "F32"))._replace(root_codec=codec)
    with refused(FmhubError, "tensor 'w'", repr(codec)):
        read(store, entry)


def test_link_codec_that_is_not_installed_is_refused(store):
    data = floats(2048)
    base = raw_entry(store, data)
    entry = linked(store, base, floats(2048, 1), b"whatever", codec="no-such-codec")
    with refused(FmhubError, "tensor 'w'", "'no-such-codec'", "install"):
        read(store, entry)


# == 3. through git ===========================================================================================


def fmhub_lines(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode("utf-8", "replace").splitlines() if line.startswith("fmhub:")]


def assert_one_clear_error(proc, *needles: str) -> str:
    """A failed command with exactly one ``fmhub:`` line holding every needle, and no traceback."""
    assert proc.returncode != 0, proc
    err = proc.stderr.decode("utf-8", "replace")
    lines = fmhub_lines(proc.stderr)
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def checkpoint(seed: int = 0) -> dict:
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": (torch.randn(64, 64, generator=g) * 0.02).bfloat16(),
        "w": torch.randn(32, 64, generator=g) * 0.02,
        "tiny": torch.ones(8),  # under 1 KiB: stored as it is
    }


def tensor_raw(t) -> bytes:
    import torch

    return t.contiguous().view(torch.uint8).numpy().tobytes()


def object_file(repo: Path, oid: str) -> Path:
    return repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def overwrite(path: Path, data: bytes) -> None:
    path.chmod(0o644)
    path.write_bytes(data)
    path.chmod(0o444)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A repository with fmhub installed and `checkpoint()` committed, made once (each test works on a copy)."""
    path = tmp_path_factory.mktemp("template") / "repo"
    path.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # conftest's git_env, for a module-scoped fixture
        isolate_git(mp, tmp_path_factory.mktemp("template-home"))
        git(path, "init", "-q")
        fmhub(path, "install")
        fmhub(path, "track", "*.safetensors")
        git(path, "add", ".gitattributes")
        want = commit(path, checkpoint(), "v0")
    return path, want


@pytest.fixture
def committed(template, tmp_path):
    path, want = template
    repo = tmp_path / "repo"
    shutil.copytree(path, repo, symlinks=True)
    return repo, want


def test_a_checkpoint_is_committed_with_planes_roots_and_checks_out_exactly(committed):
    repo, want = committed
    assert git(repo, "show", f"HEAD:{CKPT}").stdout.startswith(b"fmhub manifest 4\n")
    m = manifest(repo).by_name()
    assert (m["emb"].root_codec, m["w"].root_codec, m["tiny"].root) == ("planes", "planes", None)
    assert m["emb"].root_size < 0.98 * m["emb"].size
    assert not object_file(repo, m["emb"].oid).exists()  # the tensor's bytes live only in the planes object
    (repo / CKPT).unlink()
    git(repo, "checkout", "--", CKPT)
    assert sha256_file(repo / CKPT) == want
    assert fmhub(repo, "fsck").returncode == 0


def flip_a_compressed_byte(obj: bytes) -> bytes:
    (kind, at, _), = frames_of(obj)
    zplanes = [(p, n) for mode, p, n in planes_of(obj, at, obj[4]) if mode == ZSTD]
    p, n = zplanes[0]
    out = bytearray(obj)
    out[p + n // 2] ^= 0x10
    return bytes(out)


DAMAGE = {
    "a flipped byte in a compressed plane": flip_a_compressed_byte,
    "truncated": lambda obj: obj[: len(obj) // 2],
    "another tensor's planes object": None,  # filled in below: needs the other tensor
}


@pytest.mark.parametrize("victim,damage", [
    ("emb", "a flipped byte in a compressed plane"),
    ("w", "a flipped byte in a compressed plane"),
    ("emb", "truncated"),
    ("w", "another tensor's planes object"),
])
def test_checkout_of_a_damaged_planes_root_fails_naming_file_and_tensor(committed, victim, damage):
    repo, want = committed
    entry = manifest(repo).by_name()[victim]
    path = object_file(repo, entry.root)
    original = path.read_bytes()
    if DAMAGE[damage] is None:
        raw = tensor_raw(checkpoint(seed=1)[victim])
        bad = planes.encode_object(raw, None, entry.dtype)
        assert len(raw) == entry.size and bad != original
    else:
        bad = DAMAGE[damage](original)
    overwrite(path, bad)

    (repo / CKPT).unlink()
    proc = git(repo, "checkout", "--", CKPT, check=False)
    assert_one_clear_error(proc, CKPT, repr(victim), "fmhub fsck")
    assert not (repo / CKPT).exists()  # git keeps nothing of a failed smudge

    proc = fmhub(repo, "fsck", check=False)
    assert proc.returncode != 0
    assert f"sha256:{entry.root}" in proc.stdout.decode() + proc.stderr.decode()

    overwrite(path, original)  # repaired: the same checkout succeeds
    git(repo, "checkout", "--", CKPT)
    assert sha256_file(repo / CKPT) == want


def test_checkout_of_a_link_whose_base_was_replaced_fails(committed):
    torch = pytest.importorskip("torch")
    repo, _ = committed
    t = checkpoint()  # v0, as committed
    t["w"] = t["w"].clone()
    flat = t["w"].view(-1)
    flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(3))[:40]] += 1.0  # 2 %, scattered: not low-rank
    want = commit(repo, t, "v1")
    entry = manifest(repo).by_name()["w"]
    assert entry.root_codec == "planes" and [d.codec for d in entry.deltas] == ["planes"]
    other = (torch.randn(32, 64, generator=torch.Generator().manual_seed(7)) * 0.02).view(torch.int32).numpy().tobytes()
    path = object_file(repo, entry.root)
    original = path.read_bytes()
    overwrite(path, planes.encode_object(other, None, "F32"))  # a valid root of the same size, under the old name

    (repo / CKPT).unlink()
    proc = git(repo, "checkout", "--", CKPT, check=False)
    assert_one_clear_error(proc, CKPT, "'w'", "is corrupt")  # by its size, or by the tensor's sha256
    assert not (repo / CKPT).exists()
    proc = fmhub(repo, "fsck", check=False)
    assert proc.returncode != 0 and f"sha256:{entry.root}" in proc.stdout.decode() + proc.stderr.decode()

    overwrite(path, original)
    git(repo, "checkout", "--", CKPT)
    assert sha256_file(repo / CKPT) == want


def commit_manifest_text(repo: Path, text: bytes) -> None:
    """Commit a manifest as written (clean passes a manifest through after parsing it), then remove the file."""
    (repo / CKPT).write_bytes(text)
    git(repo, "add", CKPT)
    git(repo, "commit", "-qm", "edited manifest")
    (repo / CKPT).unlink()


def emb_line_edited(repo: Path, edit) -> bytes:
    lines = git(repo, "show", f"HEAD:{CKPT}").stdout.split(b"\n")
    i = next(i for i, line in enumerate(lines) if line.startswith(b'tensor "emb"'))
    lines[i] = edit(lines[i])
    return b"\n".join(lines)


def test_checkout_of_a_manifest_lying_about_a_roots_size_fails(committed):
    repo, _ = committed
    root_size = manifest(repo).by_name()["emb"].root_size
    commit_manifest_text(repo, emb_line_edited(repo, lambda line: line.replace(b" %d" % root_size, b" %d" % (root_size + 1))))
    proc = git(repo, "checkout", "--", CKPT, check=False)
    assert_one_clear_error(proc, CKPT, "'emb'", str(root_size + 1))
    assert not (repo / CKPT).exists()
    report = fmhub(repo, "fsck", check=False)  # fsck compares every object's size with what the manifests declare
    said = " ".join((report.stdout + report.stderr).decode().split())  # rich wraps long lines
    assert report.returncode != 0 and f"is {root_size} bytes but the manifest declares {root_size + 1}" in said


@pytest.mark.parametrize("codec", [b"zstd", b"xor-zlib"], ids=["not installed", "not a root codec"])
def test_checkout_of_a_manifest_naming_another_root_codec_fails_clearly(committed, codec):
    repo, _ = committed
    commit_manifest_text(repo, emb_line_edited(repo, lambda line: line.replace(b"from planes ", b"from " + codec + b" ")))
    proc = git(repo, "checkout", "--", CKPT, check=False)
    assert_one_clear_error(proc, CKPT, "'emb'", repr(codec.decode()))
    assert not (repo / CKPT).exists()


def test_checkout_of_a_manifest_naming_an_uninstalled_link_codec_fails_clearly(committed):
    repo, _ = committed
    entry = manifest(repo).by_name()["emb"]
    link = f" delta no-such-codec sha256:{entry.root} {entry.root_size}".encode()
    commit_manifest_text(repo, emb_line_edited(repo, lambda line: line + link))
    proc = git(repo, "checkout", "--", CKPT, check=False)
    assert_one_clear_error(proc, CKPT, "'emb'", "'no-such-codec'")
    assert not (repo / CKPT).exists()


def test_an_encoded_root_in_a_version_2_manifest_is_refused():
    # the encoded root form exists only in version 4: a version-2 manifest holding one is malformed
    text = (
        "fmhub manifest 2\nformat safetensors\nsize 8200\nheader sha256:" + "0" * 64 + " 8\n"
        f'tensor "w" F32 [2048] 8192 sha256:{"1" * 64} from planes sha256:{"2" * 64} 100\n'
    ).encode()
    with pytest.raises(FmhubError):
        Manifest.from_bytes(text)

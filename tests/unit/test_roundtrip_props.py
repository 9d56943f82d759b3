"""Property tests: clean -> smudge gives back a safetensors file byte for byte.

Files come from two writers: the real ``safetensors.torch.save`` (random dtypes,
shapes, names and metadata) and hand-written headers (random key order, JSON
whitespace, padding, and tensors listed in an order other than their offsets),
so byte identity is shown not to depend on how the writer lays out its header.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fmhub.core.checkpoint import clean, smudge
from fmhub.base.errors import CorruptCheckpoint
from fmhub.core.manifest import Manifest
from fmhub.core.store import ObjectStore

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
}

# Tensor names and metadata: any unicode text safetensors can hold (valid UTF-8, so no
# lone surrogates), spaces, quotes, backslashes, newlines and control characters included.
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=24)
NAMES = TEXT.filter(lambda s: s != "__metadata__")
KEYWORDY = st.sampled_from(["", " ", '"', "'", "\\", "a b", 'x"y', "\n", "\u2028", "é", "名前", "🙂", "{}", "[0, 4]"])
NAME = st.one_of(NAMES, KEYWORDY)
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=4)  # [] is a 0-d tensor; a 0 makes it empty
METADATA = st.one_of(st.none(), st.dictionaries(TEXT, TEXT, max_size=4))


@st.composite
def tensor_specs(draw, min_size=0, max_size=6):
    """A list of (name, dtype, shape, payload bytes) with unique names."""
    names = draw(st.lists(NAME, min_size=min_size, max_size=max_size, unique=True))
    specs = []
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(SHAPES)
        nbytes = math.prod(shape) * DTYPES[dtype][1]
        if dtype == "BOOL":
            payload = bytes(draw(st.lists(st.integers(0, 1), min_size=nbytes, max_size=nbytes)))
        else:
            payload = draw(st.binary(min_size=nbytes, max_size=nbytes))
        specs.append((name, dtype, tuple(shape), payload))
    return specs


def to_tensor(dtype: str, shape: tuple[int, ...], payload: bytes) -> torch.Tensor:
    tdtype = DTYPES[dtype][0]
    if not payload:
        return torch.empty(shape, dtype=tdtype)
    return torch.frombuffer(bytearray(payload), dtype=tdtype).reshape(shape).clone()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_files(store_dir: Path) -> dict[str, bytes]:
    """Every file under objects/, by name; asserts the LFS layout ``aa/bb/<oid>``."""
    out = {}
    for p in (store_dir / "objects").rglob("*"):
        if p.is_file():
            assert p.parent.name == p.name[2:4] and p.parent.parent.name == p.name[0:2], p
            out[p.name] = p.read_bytes()
    return out


class ShortReads:
    """A source that hands out fewer bytes than asked, as a pipe or git's pkt-lines do."""

    SIZES = (1, 3, 7, 8, 9, 4096, 65516)

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)
        self._i = 0

    def read(self, n: int) -> bytes:
        self._i += 1
        return self._f.read(min(n, self.SIZES[self._i % len(self.SIZES)]))


def roundtrip(data: bytes, path: str = "model.safetensors") -> Manifest:
    """Clean ``data`` into a fresh store, check the store and the manifest, smudge it back."""
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "lfs"
        store = ObjectStore.create(str(store_dir))
        try:
            mbytes = clean(io.BytesIO(data), store, path)
            m = Manifest.from_bytes(mbytes, path)

            # the manifest round-trips through its own text form
            assert Manifest.from_bytes(m.to_bytes(), path) == m
            assert m.to_bytes() == mbytes

            # short reads from the source change nothing
            assert clean(ShortReads(data), store, path) == mbytes

            # cleaning a manifest again is the identity (git re-cleans on status checks)
            assert clean(io.BytesIO(mbytes), store, path) == mbytes

            # the store holds exactly the objects the manifest names, each complete
            files = store_files(store_dir)
            assert set(files) == {oid for oid, _ in m.oids()}
            for oid, blob in files.items():
                assert sha256(blob) == oid
            for oid, size in m.oids():
                assert len(files[oid]) == size
            assert os.listdir(store_dir / "tmp") == []

            # smudge gives back the exact bytes
            out = io.BytesIO()
            smudge(mbytes, store, out, path)
            assert out.getvalue() == data

            # a smudge of something that is not a manifest passes it through
            out = io.BytesIO()
            smudge(data, store, out, path)
            assert out.getvalue() == data
        finally:
            store.close()
    assert m.size == len(data)
    assert m.format == "safetensors"
    return m


@PROPS
@given(specs=tensor_specs(), metadata=METADATA)
def test_safetensors_save_roundtrips_byte_for_byte(specs, metadata):
    tensors = {name: to_tensor(dtype, shape, payload) for name, dtype, shape, payload in specs}
    data = st_save(tensors, metadata=metadata)
    if not tensors and metadata == {}:
        # safetensors' own writer emits `{},"__metadata__":{}}` here, which its reader
        # refuses too: fmhub must refuse it cleanly rather than store it
        with pytest.raises(SafetensorError):
            st_load(data)
        with tempfile.TemporaryDirectory() as tmp:
            store = ObjectStore.create(tmp)
            with pytest.raises(CorruptCheckpoint, match=r"^model\.safetensors: .*not valid JSON"):
                clean(io.BytesIO(data), store, "model.safetensors")
            store.close()
        return
    m = roundtrip(data)

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert m.header_size == 8 + n
    assert m.metadata == header.get("__metadata__")
    # one entry per tensor, in file (offset) order, naming the object holding its bytes
    # (empty tensors share an offset: ties keep header order)
    by_offset = sorted(
        ((info["data_offsets"], name) for name, info in header.items() if name != "__metadata__"), key=lambda e: e[0]
    )
    assert [t.name for t in m.tensors] == [name for _, name in by_offset]
    buffer = data[8 + n :]
    for t, ((begin, end), name) in zip(m.tensors, by_offset):
        assert t.dtype == header[name]["dtype"]
        assert list(t.shape) == header[name]["shape"]
        assert t.size == end - begin
        assert t.oid == sha256(buffer[begin:end])
    # and it is the data we asked safetensors to write
    specs_by_name = {name: (dtype, shape, payload) for name, dtype, shape, payload in specs}
    for t in m.tensors:
        dtype, shape, payload = specs_by_name[t.name]
        assert (t.dtype, t.shape, t.oid) == (dtype, shape, sha256(payload))


@st.composite
def handwritten_files(draw):
    """A valid safetensors file written by hand, with the header laid out at random."""
    specs = draw(tensor_specs(min_size=1, max_size=6))
    metadata = draw(METADATA)
    # the order the payloads are laid out in the data buffer
    file_order = draw(st.permutations(range(len(specs))))
    offsets, pos = {}, 0
    for i in file_order:
        size = len(specs[i][3])
        offsets[i] = [pos, pos + size]
        pos += size
    # the order the keys appear in the JSON: a different one, with __metadata__ anywhere
    keys: list = draw(st.permutations(range(len(specs))))
    if len(specs) > 1 and keys == file_order:
        keys = keys[1:] + keys[:1]
    if metadata is not None:
        keys.insert(draw(st.integers(0, len(keys))), "__metadata__")
    obj = {}
    for k in keys:
        if k == "__metadata__":
            obj[k] = metadata
        else:
            name, dtype, shape, _ = specs[k]
            fields = {"dtype": dtype, "shape": list(shape), "data_offsets": offsets[k]}
            order = draw(st.permutations(sorted(fields)))
            obj[name] = {f: fields[f] for f in order}
    style = draw(st.sampled_from(["compact", "default", "indent", "ascii"]))
    if style == "compact":
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    elif style == "default":
        text = json.dumps(obj, ensure_ascii=False)
    elif style == "indent":
        text = json.dumps(obj, indent=draw(st.integers(0, 3)), ensure_ascii=False)
    else:
        text = json.dumps(obj)  # non-ASCII as \u escapes
    raw = text.encode("utf-8")
    padding = draw(st.sampled_from(["align8", "none", "random"]))
    if padding == "align8":
        raw += b" " * (-len(raw) % 8)
    elif padding == "random":
        raw += b" " * draw(st.integers(0, 7))
    buffer = b"".join(specs[i][3] for i in file_order)
    return struct.pack("<Q", len(raw)) + raw + buffer, specs


@PROPS
@given(case=handwritten_files())
def test_handwritten_headers_roundtrip_byte_for_byte(case):
    data, specs = case
    # the file is valid safetensors: the reference reader loads every tensor
    loaded = st_load(data)
    assert set(loaded) == {name for name, *_ in specs}
    for name, dtype, shape, payload in specs:
        assert tuple(loaded[name].shape) == shape

    m = roundtrip(data)
    # a tensor's object is the sha256 of its payload alone, however the header is written:
    # the same tensor dedups across writers
    by_name = m.by_name()
    for name, dtype, shape, payload in specs:
        assert (by_name[name].dtype, by_name[name].shape, by_name[name].oid) == (dtype, shape, sha256(payload))


@st.composite
def edited_versions(draw):
    """A checkpoint and an edit of it: bytes flipped at the start, middle or end of some tensors,
    tensors resized, renamed, dropped or added."""
    specs = draw(tensor_specs(min_size=1, max_size=5))
    edited = []
    for name, dtype, shape, payload in specs:
        action = draw(st.sampled_from(["keep", "keep", "flip", "resize", "rename", "drop"]))
        if action == "flip" and payload and dtype != "BOOL":
            where = draw(st.sampled_from([0, len(payload) // 2, len(payload) - 1]))
            payload = payload[:where] + bytes([payload[where] ^ 0xFF]) + payload[where + 1 :]
        elif action == "resize":
            shape = (math.prod(shape) + 1,)
            payload = payload + bytes(DTYPES[dtype][1]) if dtype != "BOOL" else payload + b"\x01"
        elif action == "rename":
            name = name + "~renamed"
        elif action == "drop":
            continue
        edited.append((name, dtype, shape, payload))
    edited += draw(tensor_specs(max_size=2).filter(lambda extra: not {n for n, *_ in extra} & {n for n, *_ in edited}))
    return specs, edited


@PROPS
@given(versions=edited_versions(), chunking=st.sampled_from(["whole", "short"]))
def test_clean_against_the_previous_version_changes_nothing_but_speed(versions, chunking):
    """Comparing with the staged version (the re-add fast path) gives the manifest and objects a full hash gives."""
    before, after = versions
    old = st_save({n: to_tensor(d, s, p) for n, d, s, p in before})
    new = st_save({n: to_tensor(d, s, p) for n, d, s, p in after}) if after else st_save({"x": torch.zeros(1)})
    source = (lambda b: io.BytesIO(b)) if chunking == "whole" else ShortReads
    with tempfile.TemporaryDirectory() as tmp:
        fast_dir, slow_dir = Path(tmp) / "fast", Path(tmp) / "slow"
        fast, slow = ObjectStore.create(str(fast_dir)), ObjectStore.create(str(slow_dir))
        try:
            previous = Manifest.from_bytes(clean(io.BytesIO(old), fast, "m.safetensors"), "m.safetensors")
            clean(io.BytesIO(old), slow, "m.safetensors")
            got = clean(source(new), fast, "m.safetensors", previous=previous)
            want = clean(io.BytesIO(new), slow, "m.safetensors")
            assert got == want
            assert store_files(fast_dir) == store_files(slow_dir)
            out = io.BytesIO()
            smudge(got, fast, out, "m.safetensors")
            assert out.getvalue() == new
        finally:
            fast.close()
            slow.close()


def test_a_candidate_longer_than_the_new_bytes_is_not_taken_for_them(tmp_path):
    """A stored object the new tensor is only a prefix of (a corrupt store, say) must not be reused."""
    from fmhub.core.streams import ObjectStream

    store = ObjectStore.create(str(tmp_path / "lfs"))
    long_oid = store.write_bytes(b"abcdef" * 1000)
    store.flush()
    stream = ObjectStream(store)
    stream.begin(long_oid)
    stream.write(b"abcdef" * 500)
    stream.end_object()
    stream.begin(long_oid)
    stream.write(b"abcdef" * 1000)
    stream.end_object()
    oids = stream.close()
    store.close()
    assert oids == [sha256(b"abcdef" * 500), long_oid]
    assert (tmp_path / "lfs" / "objects" / oids[0][:2] / oids[0][2:4] / oids[0]).read_bytes() == b"abcdef" * 500

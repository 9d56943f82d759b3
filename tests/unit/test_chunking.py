"""Content-defined chunking (fmhub/core/chunking.py) against the spec in docs/manifest.md, and data-file manifests.

The fast chunkers (numpy, block by block) must cut exactly where the
byte-at-a-time definition in the spec cuts, whatever the block size, so that
another implementation reproduces every boundary.
"""

from __future__ import annotations

import hashlib
import io
import random
import zlib

import pytest

from fmhub.core import checkpoint
from fmhub.core.chunking import DEFAULT_GEAR, DEFAULT_LINES, Chunking, cut_offsets, gear_mask_bits, gear_values
from fmhub.base.errors import ManifestError
from fmhub.core.manifest import Manifest
from fmhub.core.store import ObjectStore

SMALL_GEAR = Chunking("gear", 256, 1024, 4096)
SMALL_LINES = Chunking("lines", 256, 1024, 4096)


def spec_gear(data: bytes, c: Chunking) -> list[int]:
    """docs/manifest.md, gear: the classic rolling hash, one byte at a time."""
    g = gear_values()
    bits_s, bits_l = gear_mask_bits(c.avg_size)
    mask_s, mask_l = ((1 << bits_s) - 1) << (64 - bits_s), ((1 << bits_l) - 1) << (64 - bits_l)
    cuts, start, h = [], 0, 0
    for i, byte in enumerate(data):
        h = ((h << 1) + g[byte]) & (2**64 - 1)
        n = i - start + 1
        if (c.min_size <= n < c.avg_size and not h & mask_s) or (c.avg_size <= n < c.max_size and not h & mask_l) or n == c.max_size:
            cuts.append(i + 1)
            start = i + 1
    if start < len(data):
        cuts.append(len(data))
    return cuts


def spec_lines(data: bytes, c: Chunking) -> list[int]:
    """docs/manifest.md, lines: a line ends a chunk when its CRC-32 is under a threshold proportional to its length."""
    cuts, size, at = [], 0, 0
    for line in data.splitlines(keepends=True):
        at += len(line)
        size += len(line)
        if not line.endswith(b"\n"):
            break
        limit = (len(line) << 30 if size < c.avg_size else len(line) << 34) // c.avg_size
        if size >= c.max_size or (size >= c.min_size and zlib.crc32(line) < min(limit, 1 << 32)):
            cuts.append(at)
            size = 0
    if size:
        cuts.append(at)
    return cuts


def pseudo_random(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def jsonl_bytes(rows: int, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    return b"".join(b'{"id": %d, "t": "%s"}\n' % (i, b"x" * rnd.randint(0, 300)) for i in range(rows))


@pytest.mark.parametrize("block", [997, 4096, 1 << 20])
def test_gear_cuts_where_the_rolling_definition_does(block):
    data = pseudo_random(200_000) + b"\0" * 9000 + pseudo_random(50_000, 1)  # a run of zeros forces max-size cuts
    assert cut_offsets(data, SMALL_GEAR, block) == spec_gear(data, SMALL_GEAR)


@pytest.mark.parametrize("block", [100, 4096, 1 << 20])
def test_lines_cut_where_the_definition_does_and_only_at_line_ends(block):
    data = jsonl_bytes(3000) + b"x" * 10_000 + b"\n" + b'{"no final newline": 1}'  # a line longer than max, then no LF
    cuts = cut_offsets(data, SMALL_LINES, block)
    assert cuts == spec_lines(data, SMALL_LINES)
    assert all(data[c - 1 : c] == b"\n" for c in cuts[:-1]) and cuts[-1] == len(data)
    sizes = [b - a for a, b in zip([0] + cuts, cuts)]
    assert all(s >= SMALL_LINES.min_size for s in sizes[:-1])


def test_known_answers_for_the_default_chunkings():
    """Fixed inputs, fixed boundaries: pins the algorithms (another implementation can check itself here)."""
    data = b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(1 << 15))
    assert cut_offsets(data, DEFAULT_GEAR)[:6] == [32420, 117121, 160949, 241986, 287223, 358787]
    lines = b"".join(b'{"i": %d, "h": "%s"}\n' % (i, hashlib.sha256(i.to_bytes(4, "little")).hexdigest().encode()) for i in range(20000))
    assert cut_offsets(lines, DEFAULT_LINES)[:6] == [69022, 135485, 265790, 340675, 423380, 496905]


@pytest.mark.parametrize("chunking, make", [(DEFAULT_GEAR, pseudo_random), (DEFAULT_LINES, jsonl_bytes)])
def test_an_insert_changes_only_the_chunks_around_it(chunking, make):
    data = make(3_000_000) if chunking is DEFAULT_GEAR else make(20_000)
    mid = len(data) // 2
    if chunking is DEFAULT_LINES:
        mid = data.index(b"\n", mid) + 1
    edited = data[:mid] + b'{"id": -1, "t": "inserted"}\n' + data[mid:]

    def chunks(d: bytes) -> list[bytes]:
        cuts = cut_offsets(d, chunking)
        return [d[a:b] for a, b in zip([0] + cuts, cuts)]

    old, new = chunks(data), set(chunks(edited))
    assert len(new - set(old)) <= 2
    sizes = [len(c) for c in old[:-1]]
    assert min(sizes) >= chunking.min_size and max(sizes) <= chunking.max_size + (400 if chunking is DEFAULT_LINES else 0)
    assert 40_000 < sum(sizes) / len(sizes) < 120_000  # about avg


def test_clean_and_smudge_round_trip_any_bytes(tmp_path):
    store = ObjectStore.create(str(tmp_path / "store"))
    rnd = random.Random(5)
    cases = {
        "a.jsonl": jsonl_bytes(2000),
        "one.jsonl": b"x",
        "nl.jsonl": b"\n" * 70_000,
        "b.parquet": b"PAR1" + pseudo_random(500_000, 2),
        "c.PARQUET": pseudo_random(70_000, 3),  # no magic: chosen by name, whatever the case
        "d.ndjson": bytes(rnd.randrange(256) for _ in range(40_000)),
    }
    for path, data in cases.items():
        text = checkpoint.clean(io.BytesIO(data), store, path)
        m = Manifest.from_bytes(text, path)
        assert m.is_data and m.size == len(data) and m.sha256 == hashlib.sha256(data).hexdigest()
        assert m.header_oid is None and m.oids() == [(t.oid, t.size) for t in m.tensors]
        assert checkpoint.clean(io.BytesIO(text), store, path) == text  # a manifest cleans to itself
        assert checkpoint.clean(io.BytesIO(data), store, path, previous=m) == text
        out = io.BytesIO()
        checkpoint.smudge(text, store, out, path)
        assert out.getvalue() == data, path
    assert checkpoint.clean(io.BytesIO(b""), store, "e.jsonl") == b""
    store.close()


def test_smudge_refuses_chunks_that_do_not_rebuild_the_file(tmp_path):
    store = ObjectStore.create(str(tmp_path / "store"))
    data = jsonl_bytes(3000)
    m = Manifest.from_bytes(checkpoint.clean(io.BytesIO(data), store, "a.jsonl"), "a.jsonl")
    m.tensors[0], m.tensors[1] = m.tensors[1], m.tensors[0]  # sizes still add up; the order is wrong
    with pytest.raises(Exception, match="not the .* bytes with sha256:"):
        checkpoint.smudge(m.to_bytes(), store, io.BytesIO(), "a.jsonl")
    store.close()


GOOD = (
    "fmhub manifest 3\nformat jsonl\nsize 30\nchunking lines 16384 65536 262144\nsha256 " + "ab" * 32 + "\n"
    "chunk 10 sha256:" + "cd" * 32 + "\nchunk 20 sha256:" + "ef" * 32 + "\n"
).encode()


def test_data_manifest_round_trip():
    m = Manifest.from_bytes(GOOD)
    assert m.is_data and m.chunking == DEFAULT_LINES and [t.size for t in m.tensors] == [10, 20]
    assert [t.name for t in m.tensors] == ["chunk 0", "chunk 1"] and m.oids() == [("cd" * 32, 10), ("ef" * 32, 20)]
    assert m.to_bytes() == GOOD


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace(b"size 30", b"size 31"), "do not add up"),
    (lambda t: t.replace(b"sha256 " + b"ab" * 32 + b"\n", b""), "lacks its 'sha256'"),
    (lambda t: t.replace(b"chunking lines", b"chunking rabin"), "unknown chunking method"),
    (lambda t: t.replace(b"65536", b"65535"), "power of two"),
    (lambda t: t + b"header sha256:" + b"00" * 32 + b" 0\n", "unknown line 'header'"),
    (lambda t: t.replace(b"chunk 10", b"chunk 0"), "SIZE > 0"),
    (lambda t: t + b"format parquet\n", "appears twice"),
])
def test_data_manifest_refuses_what_it_cannot_read_exactly(edit, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(edit(GOOD), "d.jsonl")

"""docs/manifest.md's canonical form, held to its test vectors (docs/manifest-vectors/).

For every vector, fmhub's own clean gives exactly the ``NAME.manifest`` bytes, and
so does `spec_write`, a writer built from the spec alone (json, hashlib,
struct, zlib; no fmhub code): if the spec left a byte open, the two would
differ. The reader's stance on non-canonical variants is pinned too: what it
refuses, and what it reads but a re-clean rewrites (which `git status` shows as
a change).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import zlib
from pathlib import Path

import pytest

from fmhub.base.errors import FmhubError, ManifestError
from fmhub.core import checkpoint
from fmhub.core.deltas import DeltaPolicy
from fmhub.core.manifest import MAX_CHAIN, MAX_DIMS, MAX_MANIFEST_BYTES, Manifest, is_manifest
from fmhub.core.store import ObjectStore


def _root() -> Path:
    """The repository root (found upwards, so the test may move to a sub-folder of tests/)."""
    return next(p for p in Path(__file__).resolve().parents if (p / "docs" / "manifest-vectors").is_dir())


VECTORS = _root() / "docs" / "manifest-vectors"
DOC = _root() / "docs" / "manifest.md"
CHECKPOINTS = sorted(p.name[: -len(".safetensors")] for p in VECTORS.glob("*.safetensors"))
DATA = sorted(p.name[: -len(".jsonl")] for p in VECTORS.glob("*.jsonl"))
SHOWN = ["basic", "zero-size", "no-tensors", "lines", "chain", "coded", "coded-chain", "approx"]  # printed in full in docs/manifest.md


def vector(name: str, ext: str) -> bytes:
    return (VECTORS / f"{name}.{ext}").read_bytes()


def storage(name: str) -> dict:
    """How a vector's tensors are stored (chains, encoded roots, lossy links): a writer's choice the file cannot tell."""
    path = VECTORS / f"{name}.storage.json"
    return json.loads(path.read_text("utf-8")) if path.exists() else {}


# -- a writer from the spec alone ------------------------------------------------------------------

_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def spec_string(s: str) -> str:
    """Canonical JSON string: the 7 short escapes, \\u00xx (lowercase) for the other controls, the rest as it is."""
    out = []
    for ch in s:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise ValueError("a lone surrogate cannot be written")
        out.append(_SHORT.get(ch) or ("\\u%04x" % ord(ch) if ord(ch) < 0x20 else ch))
    return '"' + "".join(out) + '"'


def spec_float(x: float) -> str:
    """The shortest decimal that reads back as ``x``; positional for exponents -4..15, else d.ddde±XX."""
    sci = next(s for p in range(17) if float(s := "%.*e" % (p, x)) == x)
    mantissa, exp = sci.split("e")
    e, d = int(exp), mantissa.replace(".", "")
    if -4 <= e < 16:
        if e < 0:
            return "0." + "0" * (-e - 1) + d
        return (d + "0" * (e + 1))[: e + 1] + "." + (d[e + 1 :] or "0")
    return d[0] + ("." + d[1:] if len(d) > 1 else "") + "e" + ("-" if e < 0 else "+") + "%02d" % abs(e)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec_checkpoint(data: bytes, stored: dict) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    pairs = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=lambda p: p)  # keeps the header's order
    metadata, entries = None, []
    for i, (name, info) in enumerate(pairs):
        if name == "__metadata__":
            metadata = info
            continue
        info = dict(info)
        begin, end = info["data_offsets"]
        entries.append((begin, end, i, name, info["dtype"], info["shape"]))
    entries.sort()  # data order; ties (zero-size tensors) in header order
    version, lines = 1, []
    for begin, end, _, name, dtype, shape in entries:
        s = stored.get(name, {})
        oid = s.get("oid") or sha(data[8 + n + begin : 8 + n + end])
        line = f"tensor {spec_string(name)} {dtype} [{','.join(str(d) for d in shape)}] {end - begin} sha256:{oid}"
        if "root" in s:
            if s.get("root_codec"):
                version, root = 4, f"{s['root_codec']} sha256:{s['root']} {s['root_size']}"
            else:
                version, root = max(version, 2), f"sha256:{s['root']}"
            line += f" from {root}" + "".join(f" delta {c} sha256:{o} {z}" for c, o, z in s.get("deltas", []))
        if "approx" in s:
            a = s["approx"]
            line += f" approx sha256:{a['oid']} maxerr {spec_float(a['maxerr'])} tolerance {spec_float(a['tolerance'])}"
        lines.append(line)
    head = [f"fmhub manifest {version}", "format safetensors", f"size {len(data)}", f"header sha256:{sha(data[: 8 + n])} {8 + n}"]
    if metadata is not None:
        items = sorted(metadata, key=lambda kv: [ord(c) for c in kv[0]])  # code points, not UTF-16 units
        head.append("metadata {" + ",".join(f"{spec_string(k)}:{spec_string(v)}" for k, v in items) + "}")
    return ("\n".join(head + lines) + "\n").encode("utf-8")


def spec_data(data: bytes, chunking: tuple[int, int, int] = (16384, 65536, 262144)) -> bytes:
    """A jsonl file: the ``lines`` chunking, one ``chunk`` line per chunk."""
    lo, avg, hi = chunking
    ends, m, pos = [], 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        line = data[pos : len(data) if nl < 0 else nl + 1]
        pos += len(line)
        m += len(line)
        limit = min(1 << 32, (len(line) << 30 if m < avg else len(line) << 34) // avg)
        if line.endswith(b"\n") and (m >= hi or (m >= lo and zlib.crc32(line) < limit)):
            ends.append(pos)
            m = 0
    if m:
        ends.append(len(data))
    chunks = [data[a:b] for a, b in zip([0] + ends, ends)]
    lines = ["fmhub manifest 3", "format jsonl", f"size {len(data)}", f"chunking lines {lo} {avg} {hi}", f"sha256 {sha(data)}"]
    return ("\n".join(lines + [f"chunk {len(c)} sha256:{sha(c)}" for c in chunks]) + "\n").encode("utf-8")


def spec_write(name: str) -> bytes:
    if name in DATA:
        prev = VECTORS / f"{name}.previous.manifest"
        if prev.exists():  # a re-add keeps the staged version's chunking
            words = next(ln for ln in prev.read_text("utf-8").splitlines() if ln.startswith("chunking ")).split(" ")
            return spec_data(vector(name, "jsonl"), tuple(int(w) for w in words[2:]))
        return spec_data(vector(name, "jsonl"))
    return spec_checkpoint(vector(name, "safetensors"), storage(name))


# -- the vectors ----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    s = ObjectStore.create(str(tmp_path / "store"))
    yield s
    s.close()


def test_every_vector_has_its_input_and_manifest():
    assert len(CHECKPOINTS) >= 7 and len(DATA) >= 2
    assert sorted(p.name[: -len(".manifest")] for p in VECTORS.glob("*.manifest") if ".previous." not in p.name) == sorted(CHECKPOINTS + DATA)


@pytest.mark.parametrize("name", CHECKPOINTS + DATA)
def test_a_writer_from_the_spec_alone_gives_the_vector(name):
    assert spec_write(name) == vector(name, "manifest")


@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if not storage(n)])
def test_fmhub_clean_gives_the_vector_and_smudge_the_file(name, store):
    data, want = vector(name, "safetensors"), vector(name, "manifest")
    assert checkpoint.clean(io.BytesIO(data), store, f"{name}.safetensors") == want
    assert checkpoint.clean(io.BytesIO(data), store, f"{name}.safetensors", deltas=DeltaPolicy()) == want  # small: never coded
    assert checkpoint.clean(io.BytesIO(want), store, f"{name}.safetensors") == want  # a manifest cleans to itself
    out = io.BytesIO()
    checkpoint.smudge(want, store, out, f"{name}.safetensors")
    assert out.getvalue() == data


@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if storage(n)])
def test_a_staged_chain_is_kept_byte_for_byte(name, store):
    """What `git status` does: clean the checked-out file with the staged manifest as the previous version."""
    want = vector(name, "manifest")
    got = checkpoint.clean(io.BytesIO(vector(name, "safetensors")), store, f"{name}.safetensors",
                           previous=Manifest.from_bytes(want), deltas=DeltaPolicy(tolerance=1e-3))
    assert got == want
    assert Manifest.from_bytes(want).to_bytes() == want


@pytest.mark.parametrize("name", DATA)
def test_fmhub_clean_gives_the_data_vector(name, store):
    data, want = vector(name, "jsonl"), vector(name, "manifest")
    prev = VECTORS / f"{name}.previous.manifest"
    previous = Manifest.from_bytes(prev.read_bytes()) if prev.exists() else None
    assert checkpoint.clean(io.BytesIO(data), store, f"{name}.jsonl", previous=previous) == want
    out = io.BytesIO()
    checkpoint.smudge(want, store, out, f"{name}.jsonl")
    assert out.getvalue() == data


@pytest.mark.parametrize("name", SHOWN)
def test_the_doc_shows_the_vector_as_it_is(name):
    shown = "".join("    " + line + "\n" for line in vector(name, "manifest").decode("utf-8").splitlines())
    assert shown in DOC.read_text("utf-8"), f"docs/manifest.md does not show {name}.manifest verbatim"


def test_the_float_rule_is_python_repr():
    rnd = random.Random(7)
    xs = [0.0, 1.0, 100.0, 0.001, 1e-4, 9.999e-5, 1e16, 9999999999999998.0, 5e-324, 1.7976931348623157e308, 0.1 + 0.2]
    xs += [rnd.random() * 10 ** rnd.randint(-30, 30) for _ in range(3000)]
    for x in xs:
        assert spec_float(x) == repr(x)


def test_the_string_rule_is_the_writers():
    every = "".join(chr(c) for c in range(0x2100)) + "\ufeff\uffff\U0001f600\U0010ffff"
    assert spec_string(every) == json.dumps(every, ensure_ascii=False)


# -- what the reader does with bytes that are not canonical ---------------------------------------

BASIC = (VECTORS / "basic.manifest").read_bytes()
OID = b"ee4ac73c2bd27756ab82780f27c73a7bc4d3f0bb6acb37e008bc27eccd7e588b"


@pytest.mark.parametrize("edit", [
    lambda t: t.replace(OID, OID.upper()),  # upper-case hex
    lambda t: t.replace(b"header sha256:d71c", b"header sha256:D71C"),
    lambda t: t.replace(b"sha256:" + OID, b"SHA256:" + OID),
    lambda t: t.replace(b"size 176", b"size 0176"),  # leading zero
    lambda t: t.replace(b"size 176", b"size +176"),
    lambda t: t.replace(b" 160\n", b" 1\xd9\xa60\n"),  # a non-ASCII digit
    lambda t: t.replace(b"F32 [2] 8", b"F32 [02] 8"),
    lambda t: t.replace(b"[2,2]", b"[2, 2]"),  # a space in the shape
    lambda t: t.replace(b"F32 [2] 8", b"F32  [2] 8"),  # two spaces
    lambda t: t.replace(b"\n", b"\r\n"),  # CRLF
    lambda t: t.replace(b"F32 [2] 8 sha256:" + OID, b"F32 [2] 8 sha256:" + OID + b" "),  # a trailing space
    lambda t: t + b"\n",  # a blank line
    lambda t: t.replace(b"manifest 1", b"manifest 01"),
    lambda t: t.replace(b'"bias"', b"'bias'"),
    lambda t: t.replace(b"F32 [2]", b"f\xc3\xa9 [2]"),  # a non-ASCII dtype
    lambda t: b"\xef\xbb\xbf" + t,  # a byte-order mark: not a manifest at all
    lambda t: t.replace(b"metadata", b"Metadata"),
])
def test_the_reader_refuses(edit):
    with pytest.raises(ManifestError):
        Manifest.from_bytes(edit(BASIC), "basic.safetensors")


@pytest.mark.parametrize("edit", [
    lambda t: t.replace(b"format safetensors\nsize 176\n", b"size 176\nformat safetensors\n"),  # field order
    lambda t: t.replace(b'metadata {"format":"pt"}\n', b"") + b'metadata {"format":"pt"}\n',  # metadata last
    lambda t: t.replace(b'{"format":"pt"}', b'{ "format" : "pt" }'),  # JSON whitespace
    lambda t: t.replace(b'"bias"', b'"bi\\u0061s"'),  # an escape where none is needed
    lambda t: t.replace(b"manifest 1", b"manifest 2"),  # a higher version than needed
    lambda t: t[:-1],  # no final newline
])
def test_the_reader_accepts_but_a_writer_must_not_write(edit, store):
    """Read as the same manifest, but not the canonical bytes: a re-clean of the file writes the vector, so a
    repository holding the variant shows the file as modified."""
    variant = edit(BASIC)
    assert variant != BASIC
    assert Manifest.from_bytes(variant) == Manifest.from_bytes(BASIC)
    assert Manifest.from_bytes(variant).to_bytes() == BASIC
    assert checkpoint.clean(io.BytesIO(variant), store, "basic.safetensors") == variant  # a manifest cleans to itself
    assert checkpoint.clean(io.BytesIO(vector("basic", "safetensors")), store, "basic.safetensors",
                            previous=Manifest.from_bytes(variant)) == BASIC


def test_an_approx_float_in_another_spelling_is_read_and_rewritten():
    want = vector("approx", "manifest")
    variant = want.replace(b"tolerance 0.001", b"tolerance 1e-3")
    assert Manifest.from_bytes(variant).to_bytes() == want


# -- detection, limits, and what the writer refuses -----------------------------------------------


def test_detection_is_the_first_15_bytes():
    assert is_manifest(b"fmhub manifest ") and not is_manifest(b"fmhub manifest") and not is_manifest(b"Fmhub manifest 1")
    assert checkpoint.clean(io.BytesIO(b""), None, "e.safetensors") == b""  # an empty file stays empty
    with pytest.raises(ManifestError):  # the magic, then anything: an error, never a file passed through
        checkpoint.smudge(b"fmhub manifest 1\nbogus\n", None, io.BytesIO(), "x.safetensors")
    out = io.BytesIO()
    checkpoint.smudge(b"fmhub manifest\n", None, out, "x.safetensors")  # no space: not a manifest, written as it is
    assert out.getvalue() == b"fmhub manifest\n"


def test_the_limits_the_doc_cites():
    assert (MAX_MANIFEST_BYTES, MAX_DIMS, MAX_CHAIN) == (64 << 20, 64, 64)
    head = b'fmhub manifest 1\nformat safetensors\nsize 8\nheader sha256:' + b"a" * 64 + b" 8\n"
    with pytest.raises(ManifestError, match="over the limit"):
        Manifest.from_bytes(head + b"#" * (MAX_MANIFEST_BYTES - len(head) + 1))
    shape = lambda k: b'tensor "t" U8 [' + b",".join([b"1"] * k) + b"] 0 sha256:" + b"b" * 64 + b"\n"  # noqa: E731
    Manifest.from_bytes(head.replace(b"size 8", b"size 8") + shape(MAX_DIMS))
    with pytest.raises(ManifestError, match="malformed shape"):
        Manifest.from_bytes(head + shape(MAX_DIMS + 1))
    big = head.replace(b"size 8", b"size 9223372036854775807").replace(b" 8\n", b" 9223372036854775807\n")
    Manifest.from_bytes(big)
    with pytest.raises(ManifestError, match="below 2\\*\\*63"):
        Manifest.from_bytes(big.replace(b"5807", b"5808"))


def _safetensors(header: str, data: bytes = b"") -> bytes:
    raw = header.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("header, data", [
    ('{"a":{"dtype":"\u00e9","shape":[1],"data_offsets":[0,1]}}', b"x"),  # isalnum() but not ASCII
    ('{"a":{"dtype":"U8","shape":[' + ",".join(["1"] * 65) + '],"data_offsets":[0,1]}}', b"x"),
    ('{"a":{"dtype":"U8","shape":[0,18446744073709551616],"data_offsets":[0,0]}}', b""),
    ('{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),  # a lone surrogate
    ('{"__metadata__":{"k":"\\udfff"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
])
def test_the_writer_refuses_what_no_reader_could_read(header, data, store):
    """A file whose manifest the reader would refuse fails the add (one line), rather than failing every checkout."""
    with pytest.raises(FmhubError):
        checkpoint.clean(io.BytesIO(_safetensors(header, data)), store, "bad.safetensors")


def test_the_doc_shows_the_names_vector_lines_and_bytes():
    doc, text = DOC.read_text("utf-8"), vector("names", "manifest")
    for line in text.decode("utf-8").splitlines()[4:7]:  # metadata and the first two tensors: printable
        assert "    " + line + "\n" in doc
    assert b'\ntensor "ctl\\u0001\\u001f del\x7f" U8' in text and b'\ntensor "ls\xe2\x80\xa8" U8' in text

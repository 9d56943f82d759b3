"""The manifest format (docs/manifest.md): what it accepts and what it refuses."""

from __future__ import annotations

import pytest

from fmhub.base.errors import ManifestError
from fmhub.core.manifest import Manifest, TensorEntry

OID = "ab" * 32


def sample() -> Manifest:
    return Manifest("safetensors", 8 + 24 + 0 + 4, OID, 8 + 24, [
        TensorEntry('we"ird name\n', "F32", (), 4, OID),
        TensorEntry("empty", "BF16", (0, 3), 0, OID),
    ], {"format": "pt", "ü": "x"})


def test_round_trip_and_text_shape():
    m = sample()
    text = m.to_bytes()
    assert text.startswith(b"fmhub manifest 1\nformat safetensors\n")
    assert b'tensor "empty" BF16 [0,3] 0 sha256:' in text
    assert Manifest.from_bytes(text) == m


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace(b"manifest 1", b"manifest 9"), "not supported"),
    (lambda t: t.replace(b"size 36", b"size 37"), "do not add up"),
    (lambda t: t + b"delta foo\n", "unknown manifest line"),
    (lambda t: t + b"format safetensors\n", "appears twice"),
    (lambda t: t.replace(b"sha256:" + b"ab" * 32 + b"\ntensor", b"sha256:xyz\ntensor", 1), "bad object id"),
    (lambda t: t.replace(b"[0,3]", b"[0, 3]"), "want 'tensor"),
    (lambda t: t.replace(b"\nheader", b"\nheadr"), "unknown manifest line"),
])
def test_refuses_what_it_cannot_read_exactly(edit, message):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(edit(sample().to_bytes()), "m.safetensors")


def test_duplicate_tensor_names_are_refused():
    m = sample()
    m.tensors.append(m.tensors[1])
    with pytest.raises(ManifestError, match="listed twice"):
        Manifest.from_bytes(m.to_bytes())


@pytest.mark.parametrize("tail,msg", [
    (" from sha256:" + "c" * 64, "from sha256:ROOT"),
    (" from sha256:" + "c" * 64 + " delta Sparse! sha256:" + "d" * 64 + " 10", "malformed delta"),
    (" from sha256:" + "c" * 64 + " delta sparse sha256:" + "d" * 63 + " 10", "bad object id"),
    (" delta sparse sha256:" + "d" * 64 + " 10", "want 'tensor"),
])
def test_delta_chains_are_parsed_strictly(tail, msg):
    from fmhub.base.errors import ManifestError
    from fmhub.core.manifest import Manifest

    text = f'fmhub manifest 2\nformat safetensors\nsize 12\nheader sha256:{"a" * 64} 8\ntensor "w" F32 [1] 4 sha256:{"b" * 64}{tail}\n'
    with pytest.raises(ManifestError, match=msg.replace("(", r"\(")):
        Manifest.from_bytes(text.encode())


def test_a_chain_in_a_version_1_manifest_is_refused():
    from fmhub.base.errors import ManifestError
    from fmhub.core.manifest import Manifest

    line = f'tensor "w" F32 [1] 4 sha256:{"b" * 64} from sha256:{"c" * 64} delta sparse sha256:{"d" * 64} 10'
    text = f'fmhub manifest 1\nformat safetensors\nsize 12\nheader sha256:{"a" * 64} 8\n{line}\n'
    with pytest.raises(ManifestError, match="want 'tensor"):
        Manifest.from_bytes(text.encode())

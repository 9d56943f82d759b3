"""The ``lowrank`` delta codec: exact and within-tolerance low-rank deltas, their spec, and lossy storage through git."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import git, save_tensors
from fmhub.core.deltas import DeltaPolicy, store_changed
from fmhub.base.errors import ManifestError
from fmhub.core.lowrank import LowRank, from_factors
from fmhub.core.manifest import Approx, Delta, Manifest, TensorEntry
from fmhub.core.sparse_index import decode_patch
from fmhub.core.store import ObjectStore

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def lora_merge(m=96, k=80, r=3, dtype="F32", seed=0, scale=0.05):
    """A base weight and the same weight with a rank-r update merged the way peft does (in the weight's dtype)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g).to(TORCH[dtype])
    b, a = torch.randn(m, r, generator=g) * scale, torch.randn(r, k, generator=g) * scale
    acc = torch.float64 if dtype == "F64" else torch.float32
    return w, (w.to(acc) + (b @ a).to(acc)).to(TORCH[dtype])


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_exact_round_trip_of_a_merged_lora(dtype):
    w, new = lora_merge(dtype=dtype)
    codec = LowRank()
    delta = codec.encode(raw(w), raw(new), dtype, tuple(w.shape))
    assert delta is not None and len(delta) < len(raw(new))
    assert bytes(codec.decode(raw(w), delta, dtype)) == raw(new)


def test_float32_merge_stores_small():
    w, new = lora_merge(m=512, k=384, r=4)
    delta = LowRank().encode(raw(w), raw(new), "F32", (512, 384))
    assert len(delta) < 0.15 * len(raw(new))  # factors ~1.7%, plus a patch of the few elements rounding moved


def reference_decode(base: bytes, delta: bytes) -> bytes:
    """The spec's decode for F32, element by element in plain Python floats (IEEE float64, no fused multiply-add)."""
    magic, prec, m, k, r = struct.unpack_from("<4sBIII", delta, 0)
    at = struct.calcsize("<4sBIII")
    fmt = "f" if prec == 4 else "d"
    p = struct.unpack_from(f"<{m * r}{fmt}", delta, at)
    at += m * r * prec
    f = struct.unpack_from(f"<{r * k}{fmt}", delta, at)
    at += r * k * prec
    vals = struct.unpack(f"<{m * k}f", base)
    out = bytearray()
    for i in range(m):
        for j in range(k):
            acc = vals[i * k + j]
            for t in range(r):
                acc = acc + p[i * r + t] * f[t * k + j]
            out += struct.pack("<f", acc)
    idx, item, values, _ = decode_patch(delta, at)
    for n, e in enumerate(idx):
        out[int(e) * 4 : int(e) * 4 + 4] = values[n * 4 : n * 4 + 4]
    return bytes(out)


def test_decode_follows_the_element_wise_spec():
    w, new = lora_merge(m=12, k=10, r=2, scale=0.5)
    delta = LowRank().encode(raw(w), raw(new), "F32", (12, 10))
    assert delta is not None
    assert reference_decode(raw(w), delta) == bytes(LowRank().decode(raw(w), delta, "F32")) == raw(new)


@pytest.mark.parametrize("dtype", ["F32", "F64", "BF16"])
def test_from_factors_needs_no_patch(dtype):
    w, _ = lora_merge(dtype=dtype)
    g = np.random.default_rng(3)
    p, f = g.standard_normal((96, 4)) * 0.1, g.standard_normal((4, 80)) * 0.1
    new, delta = from_factors(raw(w), dtype, p, f)
    prec = struct.unpack_from("<4sBIII", delta)[1]
    assert prec == 8  # these factors are not float32 numbers, so they are kept as float64
    assert decode_patch(delta, struct.calcsize("<4sBIII") + prec * (96 * 4 + 4 * 80))[0].size == 0
    assert bytes(LowRank().decode(raw(w), delta, dtype)) == new
    got = torch.frombuffer(bytearray(new), dtype=TORCH[dtype]).double().numpy()
    np.testing.assert_allclose(got, (w.double().numpy() + p @ f).ravel(), rtol=1e-2 if dtype == "BF16" else 1e-6)


def test_within_tolerance_is_smaller_and_reports_its_error():
    w, new = lora_merge(m=256, k=192, r=4)
    exact = LowRank().encode(raw(w), raw(new), "F32", (256, 192))
    lossy, max_err = LowRank().encode_within(raw(w), raw(new), "F32", (256, 192), 1e-5)
    got = np.frombuffer(bytes(LowRank().decode(raw(w), lossy, "F32")), "<f4").astype(np.float64)
    err = np.abs(got - new.double().numpy().ravel()).max()
    assert err <= 1e-5 and err == pytest.approx(max_err)
    assert len(lossy) < len(exact)


@pytest.mark.parametrize("shape,dtype", [((4096,), "F32"), ((64, 64), "I32"), ((64, 64), "U8")])
def test_declines_what_is_not_a_float_matrix(shape, dtype):
    data = bytes(4 * int(np.prod(shape))) if dtype != "U8" else bytes(int(np.prod(shape)))
    assert LowRank().encode(data, data[:-1] + b"\1", dtype, shape) is None


def test_declines_non_finite_values():
    w, new = lora_merge()
    new[0, 0] = float("nan")
    assert LowRank().encode(raw(w), raw(new), "F32", tuple(w.shape)) is None


def test_a_full_rank_change_fails_a_strict_policy_and_stores_nothing(tmp_path):
    store = ObjectStore.create(str(tmp_path / "lfs"))
    w = torch.randn(64, 64)
    old = TensorEntry("w", "F32", (64, 64), w.numel() * 4, store.write_bytes(raw(w)))
    store.flush()  # writes land in the background: without this, `before` could miss the old version's object
    before = set(store.iter_oids())
    from fmhub.core.deltas import ToleranceError

    with pytest.raises(ToleranceError, match="tolerance cannot be met"):
        store_changed(store, old, raw(torch.randn(64, 64)), "F32", DeltaPolicy(strict=True, tolerance=1e-6))
    assert set(store.iter_oids()) == before


def test_manifest_records_an_approximation():
    e = TensorEntry("w", "F32", (2, 2), 16, "a" * 64, "b" * 64, (Delta("lowrank", "c" * 64, 9),), Approx("d" * 64, 2.5e-07, 1e-06))
    m = Manifest("safetensors", 116, "e" * 64, 100, [e])
    line = m.to_bytes().decode().splitlines()[-1]
    assert line.endswith(f"approx sha256:{'d' * 64} maxerr 2.5e-07 tolerance 1e-06")
    assert Manifest.from_bytes(m.to_bytes()).tensors[0] == e
    bad = m.to_bytes().replace(b"maxerr 2.5e-07", b"maxerr 2.5e-05")
    with pytest.raises(ManifestError, match="not within tolerance"):
        Manifest.from_bytes(bad)
    unchained = f'fmhub manifest 2\nformat safetensors\nsize 116\nheader sha256:{"e" * 64} 100\ntensor "w" F32 [2,2] 16 sha256:{"a" * 64} approx sha256:{"d" * 64} maxerr 0.0 tolerance 0.0\n'
    with pytest.raises(ManifestError):
        Manifest.from_bytes(unchained.encode())


def test_lossy_storage_through_git_says_so_and_stays_clean(repo):
    w, new = lora_merge(m=256, k=192, r=4)
    norm = torch.ones(192)
    save_tensors(repo / "m.safetensors", {"w": w, "norm": norm})
    git(repo, "add", "m.safetensors")
    git(repo, "commit", "-qm", "base")
    git(repo, "config", "fmhub.lowrank.tolerance", "1e-5")
    save_tensors(repo / "m.safetensors", {"w": new, "norm": norm})
    original = (repo / "m.safetensors").read_bytes()
    git(repo, "add", "m.safetensors")
    m = Manifest.from_bytes(git(repo, "show", ":m.safetensors").stdout)
    entry = m.by_name()["w"]
    assert entry.deltas[-1].codec == "lowrank" and entry.approx is not None
    assert entry.approx.tolerance == 1e-5 and 0 < entry.approx.max_error <= 1e-5
    assert entry.deltas[-1].size < entry.size / 4
    assert git(repo, "status", "--porcelain").stdout == b"M  m.safetensors\n"
    git(repo, "commit", "-qm", "merged, within 1e-5")
    (repo / "m.safetensors").unlink()
    git(repo, "checkout", "--", "m.safetensors")
    got = load_file(str(repo / "m.safetensors"))["w"]
    assert (got.double() - new.double()).abs().max() <= 1e-5
    assert git(repo, "status", "--porcelain").stdout == b""
    # the bytes as first added count as unchanged too: re-adding them stages nothing
    (repo / "m.safetensors").write_bytes(original)
    git(repo, "add", "m.safetensors")
    assert git(repo, "diff", "--cached", "--name-only").stdout == b""


def test_strict_add_of_a_full_rank_change_fails_and_leaves_the_index(repo):
    save_tensors(repo / "m.safetensors", {"w": torch.randn(64, 64)})
    git(repo, "add", "m.safetensors")
    git(repo, "commit", "-qm", "base")
    save_tensors(repo / "m.safetensors", {"w": torch.randn(64, 64)})
    proc = git(repo, "-c", "fmhub.lowrank.strict=true", "add", "m.safetensors", check=False)
    assert proc.returncode != 0
    assert b"tolerance cannot be met" in proc.stderr and b"'w'" in proc.stderr
    assert git(repo, "diff", "--cached", "--name-only").stdout == b""

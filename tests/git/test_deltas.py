"""Delta objects: changed tensors stored as chains of deltas (`fmhub.core.deltas`, manifest version 2)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import commit_checkpoint as commit, committed_manifest as head_manifest, fmhub, git, save_tensors, sha256_file, store_objects

from fmhub_plugins.delta_codecs import Sparse, XorZlib

CKPT = "model.safetensors"


@pytest.mark.parametrize("codec", [Sparse(), XorZlib()], ids=lambda c: c.name)
@pytest.mark.parametrize("dtype,np_dtype", [("F32", np.float32), ("BF16", np.uint16), ("I64", np.int64), ("U8", np.uint8)])
def test_codecs_round_trip_bit_for_bit(codec, dtype, np_dtype):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=4096 * 8, dtype=np.uint8).view(np_dtype).copy()
    new = base.copy()
    idx = rng.choice(new.size, size=new.size // 100, replace=False)
    new[idx] = rng.integers(0, 255, size=idx.size * new.itemsize, dtype=np.uint8).view(np_dtype)
    delta = codec.encode(base.tobytes(), new.tobytes(), dtype)
    assert delta is not None and len(delta) < new.nbytes / 4
    assert bytes(codec.decode(base.tobytes(), delta, dtype)) == new.tobytes()


def test_sparse_compares_bits_not_values():
    base = np.array([0.0, np.nan] + [1.0] * 62, dtype=np.float32)
    new = np.array([-0.0, np.nan] + [1.0] * 62, dtype=np.float32)
    new_bits = new.view(np.uint32).copy()
    new_bits[1] ^= 1  # another NaN payload
    new = new_bits.view(np.float32)
    delta = Sparse().encode(base.tobytes(), new.tobytes(), "F32")
    count = struct.unpack_from("<BBQQ", delta, 4)[2]
    assert count == 2
    assert bytes(Sparse().decode(base.tobytes(), delta, "F32")) == new.tobytes()


def test_sparse_declines_a_dense_change():
    base = np.arange(1000, dtype=np.float32)
    assert Sparse().encode(base.tobytes(), (base + 1).tobytes(), "F32") is None


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(128, 128, generator=g) for i in range(4)} | {
        "embed": torch.randn(64, 128, generator=g).bfloat16(),
        "norm": torch.ones(128),
    }


def sparse_step(t: dict, seed: int, fraction: float = 0.01) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in t.items()}
    for k in ("layers.0.weight", "layers.1.weight", "layers.2.weight", "layers.3.weight", "embed"):
        flat = out[k].view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[: int(flat.numel() * fraction)]
        flat[idx] += 0.125
    return out


@pytest.fixture
def delta_repo(repo) -> Path:
    git(repo, "config", "fmhub.deltas", "true")
    return repo


def test_sparse_fine_tunes_store_deltas_and_check_out_exactly(delta_repo):
    repo = delta_repo
    t = model()
    hashes = [commit(repo, t, "v0")]
    full = sum(store_objects(repo).values())
    v0 = head_manifest(repo)
    assert all(not e.deltas for e in v0.tensors)  # nothing to chain yet
    assert {e.name for e in v0.tensors if e.root_codec == "planes"} == set(t) - {"norm"}  # compressed; norm is under 1 KiB
    for v in range(1, 4):
        before = sum(store_objects(repo).values())
        t = sparse_step(t, v)
        hashes.append(commit(repo, t, f"v{v}"))
        grew = sum(store_objects(repo).values()) - before
        assert grew <= 0.03 * full, (v, grew, full)  # 1% of elements changed: ~2% stored (index + value)
    m = head_manifest(repo)
    assert git(repo, "show", f"HEAD:{CKPT}").stdout.startswith(b"fmhub manifest 4\n")
    chained = {e.name: e for e in m.tensors if e.deltas}
    assert set(chained) == {"layers.0.weight", "layers.1.weight", "layers.2.weight", "layers.3.weight", "embed"}
    assert all(len(e.deltas) == 3 and {d.codec for d in e.deltas} == {"planes"} for e in chained.values())
    assert m.by_name()["norm"] == v0.by_name()["norm"]  # unchanged: the same entry as v0
    # the tensor's oid still names its full bytes
    want = t["embed"].view(torch.uint16).numpy().tobytes()
    assert chained["embed"].oid == hashlib.sha256(want).hexdigest()

    for i, h in enumerate(hashes):
        git(repo, "checkout", "-q", f"HEAD~{3 - i}" if i < 3 else "main", "--", CKPT)
        assert sha256_file(repo / CKPT) == h
    assert "(163/16384)" in git(repo, "diff", "HEAD~1", "HEAD", "--", CKPT).stdout.decode()
    assert "store is consistent" in fmhub(repo, "fsck").stdout.decode()


def test_chains_are_bounded(delta_repo):
    repo = delta_repo
    git(repo, "config", "fmhub.deltachain", "2")
    t = model()
    commit(repo, t, "v0")
    lengths = []
    for v in range(1, 5):
        t = sparse_step(t, v)
        commit(repo, t, f"v{v}")
        e = head_manifest(repo).by_name()["layers.0.weight"]
        lengths.append(len(e.deltas))
    assert lengths == [1, 2, 0, 1]  # after 2 links the tensor is stored whole again


def test_a_change_that_shares_nothing_starts_a_new_root(delta_repo):
    t = model()
    commit(delta_repo, t, "v0")
    t["layers.0.weight"] = torch.randn(128, 128, generator=torch.Generator().manual_seed(9))
    commit(delta_repo, t, "v1")
    e = head_manifest(delta_repo).by_name()["layers.0.weight"]
    assert not e.deltas and e.root_codec == "planes" and e.root in store_objects(delta_repo)  # no link to v0


def test_broken_chain_is_a_clear_error_and_writes_nothing(delta_repo):
    repo = delta_repo
    t = model()
    commit(repo, t, "v0")
    want = commit(repo, sparse_step(t, 1), "v1")
    e = head_manifest(repo).by_name()["layers.2.weight"]
    root = repo / ".git" / "lfs" / "objects" / e.root[:2] / e.root[2:4] / e.root
    root.chmod(0o644)
    root.unlink()
    (repo / CKPT).unlink()
    proc = git(repo, "checkout", "--", CKPT, check=False)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "layers.2.weight" in err and "missing" in err, err
    assert not (repo / CKPT).exists()
    report = fmhub(repo, "fsck", check=False)
    assert report.returncode != 0 and "layers.2.weight" in report.stdout.decode() + report.stderr.decode()
    # re-adding v0 stores the root object again (a clean never depends on a broken previous version)
    save_tensors(repo / CKPT, t)
    git(repo, "add", CKPT)
    git(repo, "checkout", "-q", "HEAD", "--", CKPT)
    assert sha256_file(repo / CKPT) == want


def test_deltas_travel_through_an_lfs_server_and_a_clone_rebuilds(delta_repo, lfs_server, tmp_path):
    repo = delta_repo
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(repo, "remote", "add", "origin", bare.as_uri())
    git(repo, "config", "lfs.url", lfs_server.url)
    t = model()
    commit(repo, t, "v0")
    git(repo, "push", "-q", "origin", "main")
    want = commit(repo, sparse_step(t, 1), "v1")
    lfs_server.clear_log()
    git(repo, "push", "-q", "origin", "main")
    sent = {r.path.rsplit("/", 1)[1]: int(r.headers.get("Content-Length")) for r in lfs_server.requests if r.method == "PUT"}
    deltas = {d.oid: d.size for e in head_manifest(repo).tensors for d in e.deltas}
    assert sent == deltas  # only the deltas travel
    fmhub(tmp_path, "install", "--global")
    git(tmp_path, "clone", "-q", "-c", f"lfs.url={lfs_server.url}", bare.as_uri(), str(tmp_path / "B"))
    assert sha256_file(tmp_path / "B" / CKPT) == want


def test_git_merge_of_two_sparse_branches_keeps_both_chains(delta_repo):
    from safetensors.torch import load_file

    repo = delta_repo
    t = model()
    commit(repo, t, "v0")
    git(repo, "checkout", "-qb", "a")
    ta = {k: v.clone() for k, v in t.items()}
    ta["layers.0.weight"][0, :5] += 1
    commit(repo, ta, "a")
    git(repo, "checkout", "-q", "main")
    tb = {k: v.clone() for k, v in t.items()}
    tb["layers.1.weight"][3, :5] += 1
    commit(repo, tb, "b")
    git(repo, "merge", "-q", "a", "-m", "merge a")
    got = load_file(str(repo / CKPT))
    assert torch.equal(got["layers.0.weight"], ta["layers.0.weight"])
    assert torch.equal(got["layers.1.weight"], tb["layers.1.weight"])
    m = head_manifest(repo).by_name()
    assert m["layers.0.weight"].root is not None and m["layers.1.weight"].root is not None
    assert git(repo, "status", "--porcelain").stdout == b""
    assert "store is consistent" in fmhub(repo, "fsck").stdout.decode()

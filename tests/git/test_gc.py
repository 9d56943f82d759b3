"""`fmhub gc` removes exactly the objects nothing refers to, never one a commit, reflog, stash or the index needs."""

from __future__ import annotations

import hashlib

import torch

from tests.helpers import fmhub, git, save_tensors, sha256_file, store_objects

from fmhub.core.manifest import Manifest

CKPT = "model.safetensors"


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(64, 64, generator=g) for i in range(3)}


def oids(repo, rev: str) -> set[str]:
    return {oid for oid, _ in Manifest.from_bytes(git(repo, "show", f"{rev}:{CKPT}").stdout).oids()}


def test_gc_keeps_what_history_needs_and_removes_what_nothing_does(repo, tmp_path):
    git(repo, "config", "fmhub.deltas", "true")
    save_tensors(repo / CKPT, tensors(0))
    git(repo, "add", CKPT)
    git(repo, "commit", "-qm", "v0")
    t = tensors(0)
    t["w1"][0, :4] += 1  # a sparse change: stored as a delta chained to v0's object
    save_tensors(repo / CKPT, t)
    git(repo, "commit", "-qam", "v1")
    v1 = sha256_file(repo / CKPT)
    # an abandoned version: staged, then replaced before any commit
    save_tensors(repo / CKPT, tensors(9))
    git(repo, "add", CKPT)
    abandoned = {oid for oid, _ in Manifest.from_bytes(git(repo, "show", f":{CKPT}").stdout).oids()}
    git(repo, "checkout", "-q", "HEAD", "--", CKPT)
    # git-lfs objects share the store: a pointer in history keeps its object
    git(repo, "lfs", "install", "--local", check=False)  # exits 2 over fmhub's pre-push hook, but configures its filter
    git(repo, "lfs", "track", "*.bin")
    (repo / "data.bin").write_bytes(b"lfs bytes " * 100)
    git(repo, "add", ".gitattributes", "data.bin")
    git(repo, "commit", "-qm", "data")
    lfs_oid = hashlib.sha256(b"lfs bytes " * 100).hexdigest()
    assert lfs_oid in store_objects(repo)
    needed = oids(repo, "HEAD") | oids(repo, "HEAD~2") | {lfs_oid}
    assert abandoned - needed and (abandoned - needed) <= set(store_objects(repo))

    dry = fmhub(repo, "gc", "--dry-run", "--grace", "0").stdout.decode()
    assert f"would remove {len(abandoned - needed)} object(s)" in dry
    assert (abandoned - needed) <= set(store_objects(repo))
    out = fmhub(repo, "gc", "--grace", "0").stdout.decode()
    assert f"removed {len(abandoned - needed)} object(s)" in out
    assert set(store_objects(repo)) == needed
    (repo / CKPT).unlink()
    git(repo, "checkout", "--", CKPT)
    assert sha256_file(repo / CKPT) == v1
    git(repo, "checkout", "-q", "HEAD~2", "--", CKPT)  # rebuilt from v0's objects, which gc kept
    assert "store is consistent" in fmhub(repo, "fsck").stdout.decode()


def test_gc_respects_the_grace_period_stash_and_reflog(repo):
    save_tensors(repo / CKPT, tensors(0))
    git(repo, "add", CKPT)
    git(repo, "commit", "-qm", "v0")
    save_tensors(repo / CKPT, tensors(1))
    git(repo, "stash", "-q")  # only the stash refers to tensors(1)
    stashed = oids(repo, "stash@{0}") - oids(repo, "HEAD")
    save_tensors(repo / CKPT, tensors(2))
    git(repo, "commit", "-qam", "v1")
    v1 = oids(repo, "HEAD") - oids(repo, "HEAD~1")
    git(repo, "reset", "-q", "--hard", "HEAD~1")  # v1 survives only in the reflog
    fresh = fmhub(repo, "gc").stdout.decode()  # default grace: everything just written is young
    assert "removed 0 object(s)" in fresh
    fmhub(repo, "gc", "--grace", "0")
    assert stashed <= set(store_objects(repo)) and v1 <= set(store_objects(repo))
    git(repo, "stash", "drop", "-q")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    out = fmhub(repo, "gc", "--grace", "0").stdout.decode()
    assert f"removed {len(stashed | v1)} object(s)" in out
    assert set(store_objects(repo)) == oids(repo, "HEAD")

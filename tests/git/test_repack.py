"""`fmhub repack`: old tensor versions become packed objects (deltas in the store); every read stays bit-exact."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import fmhub, git, save_tensors, sha256_file, store_objects

from fmhub.base.errors import CorruptObject, MissingObject
from fmhub.core.manifest import Manifest
from fmhub.git.repack import repack
from fmhub.core.packfile import parse_pack_header
from fmhub.core.store import ObjectStore

CKPT = "model.safetensors"
CHANGED = ("layers.0.weight", "layers.1.weight")  # what each version touches, a few rows of each


@pytest.fixture
def repo_config() -> dict[str, str]:
    """`repo`'s history as an older fmhub (or deltas and compression off) wrote it: every tensor version a whole object."""
    return {"fmhub.deltas": "false", "fmhub.compress": "false"}


def model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layers.{i}.weight": torch.randn(128, 128, generator=g) for i in range(3)} | {
        "embed": torch.randn(64, 128, generator=g).bfloat16(),
    }


def step(t: dict[str, torch.Tensor], v: int) -> dict[str, torch.Tensor]:
    """The next version: a couple of rows of two tensors change (a sparse fine-tune step)."""
    out = {k: x.clone() for k, x in t.items()}
    for name in CHANGED:
        out[name][2 * v : 2 * v + 2] += 0.5
    return out


def commit_versions(repo: Path, n: int, t: dict | None = None) -> tuple[list[tuple[str, str]], dict]:
    """Commit ``n`` versions; [(commit sha, sha256 of the file committed)] oldest first, and the last tensors."""
    t = t if t is not None else model()
    versions = []
    for v in range(n):
        t = step(t, v)
        save_tensors(repo / CKPT, t)
        git(repo, "add", CKPT)
        git(repo, "commit", "-qm", f"v{v}")
        versions.append((git(repo, "rev-parse", "HEAD").stdout.decode().strip(), sha256_file(repo / CKPT)))
    return versions, t


def manifest(repo: Path, rev: str) -> Manifest:
    return Manifest.from_bytes(git(repo, "show", f"{rev}:{CKPT}").stdout)


def oids(repo: Path, rev: str) -> set[str]:
    return {oid for oid, _ in manifest(repo, rev).oids()}


def tensor_oid(repo: Path, rev: str, name: str) -> str:
    return manifest(repo, rev).by_name()[name].oid


def store(repo: Path) -> ObjectStore:
    return ObjectStore(str(repo / ".git" / "lfs"))


def packed_objects(repo: Path) -> dict[str, int]:
    """oid -> size of every packed file in the repo's store."""
    root = repo / ".git" / "lfs" / "packed"
    return {p.name: p.stat().st_size for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def store_bytes(repo: Path) -> int:
    return sum(store_objects(repo).values()) + sum(packed_objects(repo).values())


def check_out_each(repo: Path, versions: list[tuple[str, str]]) -> None:
    """Every committed version checks out byte for byte (smudge rebuilds packed objects)."""
    branch = git(repo, "rev-parse", "--abbrev-ref", "HEAD").stdout.decode().strip()
    for sha, want in versions:
        git(repo, "checkout", "-q", sha)
        assert sha256_file(repo / CKPT) == want, sha
        assert git(repo, "status", "--porcelain").stdout == b""
    git(repo, "checkout", "-q", branch)


def test_repack_packs_old_versions_and_every_commit_checks_out_identically(repo):
    versions, _ = commit_versions(repo, 5)  # deltas off: every changed tensor version is a whole object
    before = store_bytes(repo)
    whole_before = dict(store_objects(repo))
    old_versions = {tensor_oid(repo, sha, name) for sha, _ in versions[:-1] for name in CHANGED}
    assert len(old_versions) == 8 and old_versions <= set(whole_before)

    dry = fmhub(repo, "repack", "--dry-run").stdout.decode()
    assert "would pack 8 object(s)" in dry, dry
    assert store_objects(repo) == whole_before and packed_objects(repo) == {}  # a dry run changes nothing

    out = fmhub(repo, "repack").stdout.decode()
    assert "packed 8 object(s)" in out, out
    assert set(packed_objects(repo)) == old_versions
    assert not old_versions & set(store_objects(repo))  # packed objects are no longer stored whole
    assert oids(repo, "HEAD") <= set(store_objects(repo))  # the tip stays whole: a fast checkout
    after = store_bytes(repo)
    assert after < before * 0.5, (before, after)
    assert sum(packed_objects(repo).values()) < 0.05 * sum(whole_before[o] for o in old_versions)
    # each packed object is a delta against the next newer version of its tensor
    s = store(repo)
    for name in CHANGED:
        chain = [tensor_oid(repo, sha, name) for sha, _ in versions]
        assert [s.packed_base(oid) for oid in chain] == chain[1:] + [None]

    check_out_each(repo, versions)
    assert "store is consistent" in fmhub(repo, "fsck").stdout.decode()
    for sha, _ in versions:
        assert "store is consistent" in fmhub(repo, "fsck", "--rev", sha).stdout.decode()

    again = fmhub(repo, "repack").stdout.decode()
    assert "packed 0 object(s)" in again, again
    assert store_bytes(repo) == after
    rep = repack(cwd=str(repo), dry_run=True)
    assert (rep.packed, rep.bytes_before, rep.bytes_after) == (0, after, after)


def test_repack_report_and_chain_limit(repo):
    versions, _ = commit_versions(repo, 6)
    git(repo, "config", "fmhub.deltachain", "2")  # honoured with deltas off too
    dry = repack(cwd=str(repo), dry_run=True)
    assert dry.dry_run and packed_objects(repo) == {}
    rep = repack(cwd=str(repo))
    assert (rep.packed, rep.skipped) == (dry.packed, dry.skipped)
    assert rep.bytes_before == dry.bytes_before and rep.bytes_after == dry.bytes_after == store_bytes(repo)
    assert rep.bytes_after < rep.bytes_before / 2
    s = store(repo)
    for name in CHANGED:
        chain = [tensor_oid(repo, sha, name) for sha, _ in versions][::-1]  # newest first: v5 (tip) ... v0
        # v4, v3 packed (depth 1, 2); v2 stays whole (depth 3 > 2); v1, v0 packed against it
        assert [s.packed_base(o) for o in chain] == [None, chain[0], chain[1], None, chain[3], chain[4]]
    assert rep.packed == 8 and rep.skipped == 2
    check_out_each(repo, versions)


def test_tip_back_at_an_old_version_makes_it_whole_again(repo):
    versions, _ = commit_versions(repo, 3)
    fmhub(repo, "repack")
    v0 = {tensor_oid(repo, versions[0][0], name) for name in CHANGED}
    assert v0 <= set(packed_objects(repo))
    git(repo, "checkout", "-q", versions[0][0], "--", CKPT)
    git(repo, "commit", "-qm", "back to v0")
    out = fmhub(repo, "repack").stdout.decode()
    assert "2 object(s) a tip needs made whole again" in out, out
    assert v0 <= set(store_objects(repo)) and not v0 & set(packed_objects(repo))
    check_out_each(repo, versions + [(git(repo, "rev-parse", "HEAD").stdout.decode().strip(), versions[0][1])])


def test_gc_after_repack_keeps_bases_and_removes_unreachable_packed_objects(repo):
    versions, t = commit_versions(repo, 3)
    git(repo, "checkout", "-q", "-b", "side")
    side, _ = commit_versions(repo, 2, t)
    git(repo, "checkout", "-q", "main")
    fmhub(repo, "repack")
    side_old = {tensor_oid(repo, side[0][0], n) for n in CHANGED}
    side_tip = {tensor_oid(repo, side[1][0], n) for n in CHANGED}
    assert side_old <= set(packed_objects(repo)) and side_tip <= set(store_objects(repo))
    assert "removed 0 object(s)" in fmhub(repo, "gc", "--grace", "0").stdout.decode()
    check_out_each(repo, versions + side)

    git(repo, "branch", "-D", "-q", "side")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    out = fmhub(repo, "gc", "--grace", "0").stdout.decode()
    assert "removed 4 object(s)" in out, out  # side's packed v0 and whole v1 of both tensors
    assert not (side_old | side_tip) & (set(packed_objects(repo)) | set(store_objects(repo)))
    check_out_each(repo, versions)
    assert "store is consistent" in fmhub(repo, "fsck").stdout.decode()


def test_gc_keeps_an_unreferenced_base_of_a_kept_packed_object(repo):
    versions, _ = commit_versions(repo, 3)
    fmhub(repo, "repack")  # v0 -> v1 -> v2 (whole)
    v1 = {tensor_oid(repo, versions[1][0], n) for n in CHANGED}
    v2 = {tensor_oid(repo, versions[2][0], n) for n in CHANGED}
    # rewrite history: v1 and v2 become unreachable, v0 (packed against v1) stays
    git(repo, "reset", "-q", "--hard", versions[0][0])
    save_tensors(repo / CKPT, model())
    git(repo, "commit", "-qam", "another v1")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    fmhub(repo, "gc", "--grace", "0")
    assert v1 <= set(packed_objects(repo)) and v2 <= set(store_objects(repo))  # v0's chain is kept
    check_out_each(repo, versions[:1])
    assert "store is consistent" in fmhub(repo, "fsck").stdout.decode()
    # once v0 goes too, its whole chain goes with it
    git(repo, "checkout", "-q", "--orphan", "fresh")
    git(repo, "commit", "-qm", "nothing")
    git(repo, "branch", "-D", "-q", "main")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    fmhub(repo, "gc", "--grace", "0")
    assert packed_objects(repo) == {}


def flip_last_byte(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_packed_object_and_missing_base_are_reported(repo):
    versions, _ = commit_versions(repo, 4)
    fmhub(repo, "repack")
    s = store(repo)
    # layers.0: v2's delta damaged
    bad = tensor_oid(repo, versions[2][0], "layers.0.weight")
    flip_last_byte(Path(s.packed_path(bad)))
    with pytest.raises(CorruptObject, match=bad):
        s.read_bytes(bad)
    with pytest.raises(CorruptObject, match=bad):
        s.open_object(bad)
    assert not s.verify(bad)
    # layers.1: v1's packed file lost, so v0 (a delta against it) has no base
    lost = tensor_oid(repo, versions[1][0], "layers.1.weight")
    orphan = tensor_oid(repo, versions[0][0], "layers.1.weight")
    os.unlink(s.packed_path(lost))
    with pytest.raises(MissingObject, match=f"{orphan}.*delta against sha256:{lost}, which is not in the store"):
        s.read_bytes(orphan)
    with pytest.raises(KeyError):  # how readers say "not here"
        s.open_object(orphan)
    assert not s.has(orphan) and not s.ensure(orphan)  # so a fetch would download it whole again

    proc = fmhub(repo, "fsck", check=False)
    assert proc.returncode == 1
    err = "".join(proc.stderr.decode().split())  # rich wraps long lines
    assert f"packedobjectsha256:{bad}" in err and "corrupt" in err, err
    assert f"packedobjectsha256:{orphan}" in err and f"deltaagainstsha256:{lost},whichisnotinthestore" in err, err
    proc = git(repo, "checkout", "-q", versions[0][0], check=False)
    assert proc.returncode != 0 and "missing" in proc.stderr.decode()
    # the newest versions do not depend on what broke
    git(repo, "checkout", "-q", "-f", versions[3][0])
    assert sha256_file(repo / CKPT) == versions[3][1]


def test_interrupted_repack_is_finished_by_the_next_one(repo):
    versions, _ = commit_versions(repo, 3)
    fmhub(repo, "repack")
    s = store(repo)
    victim = tensor_oid(repo, versions[0][0], "layers.0.weight")
    # as if killed after writing the packed file, before deleting the whole one
    whole = Path(s.object_path(victim))
    whole.parent.mkdir(parents=True, exist_ok=True)
    whole.write_bytes(s.read_bytes(victim))
    assert victim in store_objects(repo) and victim in packed_objects(repo)
    with open(s.packed_path(victim), "rb") as f:
        assert parse_pack_header(f).base == tensor_oid(repo, versions[1][0], "layers.0.weight")
    assert "store is consistent" in fmhub(repo, "fsck").stdout.decode()
    out = fmhub(repo, "repack").stdout.decode()
    assert "packed 1 object(s)" in out, out
    assert victim not in store_objects(repo) and victim in packed_objects(repo)
    check_out_each(repo, versions)


def test_push_after_repack_uploads_whole_objects(repo, lfs_server, tmp_path):
    versions, _ = commit_versions(repo, 4)
    fmhub(repo, "repack")
    assert packed_objects(repo)
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(repo, "remote", "add", "origin", bare.as_uri())
    git(repo, "config", "lfs.url", lfs_server.url)
    git(repo, "push", "-q", "origin", "main")
    needed = set().union(*(oids(repo, sha) for sha, _ in versions))
    assert set(lfs_server.objects()) == needed
    for oid in needed:
        assert hashlib.sha256(lfs_server.object_bytes(oid)).hexdigest() == oid
    # a clone with its own store downloads whole objects and checks out every version
    fmhub(tmp_path, "install", "--global")
    clone = tmp_path / "B"
    git(tmp_path, "clone", "-q", "-c", f"lfs.url={lfs_server.url}", bare.as_uri(), str(clone))
    check_out_each(clone, versions)


def test_a_local_clone_reads_packed_objects_from_its_origin_store(repo, tmp_path):
    versions, _ = commit_versions(repo, 3)
    fmhub(repo, "repack")
    old = {tensor_oid(repo, versions[0][0], n) for n in CHANGED}
    assert old <= set(packed_objects(repo))
    fmhub(tmp_path, "install", "--global")
    clone = tmp_path / "B"
    git(tmp_path, "clone", "-q", str(repo), str(clone))  # borrows from the origin's store (an alternate)
    check_out_each(clone, versions)
    assert old <= set(store_objects(clone))  # rebuilt from the origin's packed objects, stored whole here
    assert "store is consistent" in fmhub(clone, "fsck").stdout.decode()

"""Moving from git-lfs: `fmhub migrate` rewrites a git-lfs history into fmhub manifests, and `fmhub diff` / `git diff`
compare an LFS-pointer version with an fmhub version by content (no migration)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import fmhub, git, save_tensors, sha256_file

from fmhub.core.manifest import Manifest, is_manifest
from fmhub.git.history import lfs_pointer

pytestmark = pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed")

CKPT = "model.safetensors"


def version(i: int) -> dict[str, torch.Tensor]:
    """v0; v1 changes "a"; v2 changes "b" too; "c" never changes."""
    g = torch.Generator().manual_seed(0)
    t = {"a": torch.randn(16, 16, generator=g), "b": torch.randn(8, 4, generator=g), "c": torch.randn(32, generator=g)}
    if i >= 1:
        t["a"] = t["a"] + 0.5
    if i >= 2:
        t["b"] = t["b"] * 2
    return t


def lfs_repo(path: Path, versions: int) -> tuple[Path, list[str]]:
    """A git-lfs repository (no fmhub yet) with ``versions`` commits of model.safetensors; their sha256s."""
    path.mkdir()
    git(path, "init", "-q")
    git(path, "config", "gc.auto", "0")
    git(path, "lfs", "install", "--local")
    git(path, "lfs", "track", "*.safetensors")
    git(path, "add", ".gitattributes")
    git(path, "commit", "-qm", "track with git-lfs")
    shas = []
    for i in range(versions):
        save_tensors(path / CKPT, version(i), {"format": "pt"})
        shas.append(sha256_file(path / CKPT))
        git(path, "add", CKPT)
        git(path, "commit", "-qm", f"v{i}")
    assert lfs_pointer(git(path, "show", f"HEAD:{CKPT}").stdout) is not None  # git-lfs stored it
    return path, shas


def branch(repo: Path) -> str:
    return git(repo, "symbolic-ref", "--short", "HEAD").stdout.decode().strip()


def test_migrate_rewrites_an_lfs_history_into_manifests(tmp_path):
    repo, shas = lfs_repo(tmp_path / "repo", 3)
    old_tip = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    name = branch(repo)
    fmhub(repo, "install")
    out = fmhub(repo, "migrate").stdout.decode()
    assert "3 file version(s) converted" in out, out

    for rev in ("HEAD~2", "HEAD~1", "HEAD"):
        blob = git(repo, "show", f"{rev}:{CKPT}").stdout
        assert is_manifest(blob) and [t.name for t in Manifest.from_bytes(blob).tensors] == ["a", "b", "c"]
        attrs = git(repo, "show", f"{rev}:.gitattributes").stdout.decode()
        assert "*.safetensors filter=fmhub diff=fmhub merge=fmhub -text" in attrs and "filter=lfs" not in attrs
    assert git(repo, "status", "--porcelain").stdout == b""
    assert sha256_file(repo / CKPT) == shas[2]
    assert git(repo, "rev-parse", f"refs/fmhub/pre-migrate/{name}").stdout.decode().strip() == old_tip
    assert git(repo, "rev-list", "--count", "HEAD").stdout.strip() == b"4"

    for i, rev in enumerate(("HEAD~2", "HEAD~1")):  # every version checks out byte for byte
        git(repo, "checkout", "-q", rev)
        assert sha256_file(repo / CKPT) == shas[i]
        assert git(repo, "status", "--porcelain").stdout == b""
        git(repo, "checkout", "-q", name)
    assert sha256_file(repo / CKPT) == shas[2]

    found = json.loads(fmhub(repo, "diff", "--json", "HEAD~2", "HEAD").stdout)
    assert {t["name"]: t["status"] for t in found["tensors"]} == {"a": "changed", "b": "changed", "c": "unchanged"}

    again = fmhub(repo, "migrate", check=False)  # the backup ref is there: no second rewrite over it
    assert again.returncode == 1 and b"pre-migrate" in again.stderr


def test_migrate_refuses_a_dirty_tree_and_a_missing_lfs_object(tmp_path):
    repo, _shas = lfs_repo(tmp_path / "repo", 2)
    fmhub(repo, "install")
    save_tensors(repo / CKPT, version(2))
    dirty = fmhub(repo, "migrate", check=False)
    assert dirty.returncode == 1 and b"work tree has changes" in dirty.stderr
    git(repo, "checkout", "--", CKPT)

    oid = lfs_pointer(git(repo, "show", f"HEAD~1:{CKPT}").stdout).oid
    (repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).unlink()
    missing = fmhub(repo, "migrate", check=False)
    err = missing.stderr.decode()
    assert missing.returncode == 1 and oid in err and "git lfs fetch" in err and len(err.strip().splitlines()) == 1, err
    assert not git(repo, "for-each-ref", "refs/fmhub/").stdout  # nothing moved


def test_diff_reads_an_lfs_pointer_by_content_after_track_replaces_lfs(tmp_path):
    repo, _shas = lfs_repo(tmp_path / "repo", 1)
    fmhub(repo, "install")
    fmhub(repo, "track", "*.safetensors")  # replaces git-lfs's line
    git(repo, "add", "--renormalize", ".")
    git(repo, "add", ".gitattributes")
    git(repo, "commit", "-qm", "switch to fmhub")
    assert is_manifest(git(repo, "show", f"HEAD:{CKPT}").stdout)
    assert lfs_pointer(git(repo, "show", f"HEAD~1:{CKPT}").stdout) is not None

    found = json.loads(fmhub(repo, "diff", "--json", "HEAD~1", "HEAD").stdout)
    assert found["counts"]["unchanged"] == 3 and sum(found["counts"].values()) == 3, found
    assert "no tensor changed" in fmhub(repo, "diff", "HEAD~1", "HEAD").stdout.decode()

    shown = git(repo, "diff", "HEAD~1", "HEAD", "--", CKPT)
    text = shown.stdout.decode() + shown.stderr.decode()
    assert "could not diff" not in text and "added" not in text, text
    plain = git(repo, "diff", "--no-ext-diff", "HEAD~1", "HEAD", "--", CKPT).stdout.decode()  # the textconv
    assert "not a checkpoint" not in plain and "\n-tensor" not in plain and "\n+tensor" not in plain, plain

    save_tensors(repo / CKPT, version(1), {"format": "pt"})  # a real change shows against the pointer's version
    git(repo, "commit", "-qam", "v1")
    found = json.loads(fmhub(repo, "diff", "--json", "HEAD~2", "HEAD").stdout)
    assert {t["name"]: t["status"] for t in found["tensors"]} == {"a": "changed", "b": "unchanged", "c": "unchanged"}

    oid = lfs_pointer(git(repo, "show", f"HEAD~2:{CKPT}").stdout).oid
    (repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).unlink()
    gone = fmhub(repo, "diff", "HEAD~2", "HEAD", check=False)
    err = gone.stderr.decode()
    assert gone.returncode == 1 and oid in err and "not local" in err and len(err.strip().splitlines()) == 1, err


def test_diff_of_a_path_that_matches_nothing_says_so(repo):
    save_tensors(repo / CKPT, version(0))
    git(repo, "add", CKPT)
    git(repo, "commit", "-qm", "v0")
    out = fmhub(repo, "diff", "--", "nosuchpath", check=False)
    assert out.returncode == 1 and b"nosuchpath: matches no file" in out.stderr

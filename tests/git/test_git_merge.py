"""Real `git merge` of two fine-tunes of one base through fmhub's merge driver."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.helpers import git, save_tensors, sha256_file

from fmhub.core.manifest import Manifest


def base_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"l{i}.weight": torch.randn(16, 16, generator=g) for i in range(4)} | {"head": torch.randn(8, 16, generator=g)}


def branch_with(repo, branch: str, start: str, edits: dict[str, torch.Tensor], metadata=None) -> None:
    git(repo, "checkout", "-q", "-b", branch, start)
    t = load_file(str(repo / "model.safetensors"))
    t |= edits
    save_tensors(repo / "model.safetensors", t, metadata)
    git(repo, "commit", "-qam", branch)


def setup_base(repo):
    save_tensors(repo / "model.safetensors", base_model(), {"format": "pt"})
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "base")


def test_merge_of_different_tensors_is_clean_and_exact(repo):
    setup_base(repo)
    a = torch.full((16, 16), 1.0)
    b = torch.full((8, 16), 2.0)
    branch_with(repo, "task-a", "main", {"l0.weight": a}, {"format": "pt"})
    branch_with(repo, "task-b", "main", {"head": b}, {"format": "pt"})
    git(repo, "checkout", "-q", "task-a")
    git(repo, "merge", "-q", "--no-edit", "task-b")
    merged = load_file(str(repo / "model.safetensors"))
    base = base_model()
    assert torch.equal(merged["l0.weight"], a) and torch.equal(merged["head"], b)
    for name in ("l1.weight", "l2.weight", "l3.weight"):
        assert torch.equal(merged[name], base[name])
    assert git(repo, "status", "--porcelain").stdout == b""


def test_same_tensor_changed_on_both_sides_is_a_named_conflict(repo):
    setup_base(repo)
    branch_with(repo, "task-a", "main", {"l1.weight": torch.ones(16, 16), "l2.weight": torch.ones(16, 16)}, {"format": "pt"})
    branch_with(repo, "task-b", "main", {"l1.weight": torch.zeros(16, 16), "l2.weight": torch.zeros(16, 16)}, {"format": "pt"})
    git(repo, "checkout", "-q", "task-a")
    ours = sha256_file(repo / "model.safetensors")
    proc = git(repo, "merge", "--no-edit", "task-b", check=False)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode != 0
    assert "l1.weight" in out and "l2.weight" in out and "changed differently on both sides" in out
    assert "UU model.safetensors" in git(repo, "status", "--porcelain").stdout.decode()
    # the work tree keeps our version, intact
    assert sha256_file(repo / "model.safetensors") == ours
    git(repo, "merge", "--abort")
    assert git(repo, "status", "--porcelain").stdout == b""
    assert sha256_file(repo / "model.safetensors") == ours


def test_strategy_from_gitattributes_resolves_conflicts(repo):
    setup_base(repo)
    with open(repo / ".gitattributes", "a") as f:
        f.write("model.safetensors fmhub-merge=theirs\n")
    git(repo, "commit", "-qam", "theirs wins")
    theirs = torch.full((16, 16), 7.0)
    branch_with(repo, "task-a", "main", {"l1.weight": torch.ones(16, 16), "l3.weight": torch.ones(16, 16)}, {"format": "pt"})
    branch_with(repo, "task-b", "main", {"l1.weight": theirs}, {"format": "pt"})
    git(repo, "checkout", "-q", "task-a")
    git(repo, "merge", "-q", "--no-edit", "task-b")
    merged = load_file(str(repo / "model.safetensors"))
    assert torch.equal(merged["l1.weight"], theirs)
    assert torch.equal(merged["l3.weight"], torch.ones(16, 16))


def test_merge_with_added_tensor_builds_a_valid_file(repo):
    setup_base(repo)
    new = torch.arange(6, dtype=torch.float32)
    branch_with(repo, "adds", "main", {"extra.bias": new}, {"format": "pt"})
    branch_with(repo, "edits", "main", {"head": torch.zeros(8, 16)}, {"format": "pt"})
    git(repo, "merge", "-q", "--no-edit", "adds")
    merged = load_file(str(repo / "model.safetensors"))
    assert torch.equal(merged["extra.bias"], new) and torch.equal(merged["head"], torch.zeros(8, 16))
    m = Manifest.from_bytes(git(repo, "show", "HEAD:model.safetensors").stdout)
    assert m.metadata == {"format": "pt"} and len(m.tensors) == 6

"""Partial checkout: `fmhub extract` writes just the selected tensors, from the work tree or any revision."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import fmhub, git, save_tensors


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.{k}.weight": torch.randn(8, 8, generator=g) for i in range(3) for k in ("q", "v")} | {
        "lm_head.weight": torch.randn(4, 8, generator=g).bfloat16()
    }


def test_extract_selected_tensors_at_a_revision_and_from_the_work_tree(repo, tmp_path):
    (repo / "model").mkdir()
    save_tensors(repo / "model" / "model.safetensors", model(0), {"format": "pt"})
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v0")
    save_tensors(repo / "model" / "model.safetensors", model(1), {"format": "pt"})
    git(repo, "commit", "-qam", "v1")

    out = tmp_path / "layer1.safetensors"
    fmhub(repo, "extract", "HEAD~1:model/", "--tensors", "model.layers.1.*", "--tensors", "lm_head.*", "-o", str(out))
    got = load_file(str(out))
    want = model(0)
    assert sorted(got) == ["lm_head.weight", "model.layers.1.q.weight", "model.layers.1.v.weight"]
    for name, t in got.items():
        assert torch.equal(t, want[name]) and t.dtype == want[name].dtype
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt"}

    fmhub(repo, "extract", "model/model.safetensors", "-t", "model.layers.0.q.weight", "-o", str(out))
    assert torch.equal(load_file(str(out))["model.layers.0.q.weight"], model(1)["model.layers.0.q.weight"])


def test_extract_with_no_match_says_what_the_names_look_like_and_writes_nothing(repo, tmp_path):
    save_tensors(repo / "model.safetensors", model(0))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v0")
    out = tmp_path / "none.safetensors"
    proc = fmhub(repo, "extract", "HEAD:model.safetensors", "-t", "encoder.*", "-o", str(out), check=False)
    assert proc.returncode == 1
    assert "no tensor matches encoder.*" in proc.stderr.decode() and "model.layers.0.q.weight" in proc.stderr.decode()
    assert not out.exists() and not list(tmp_path.glob(".fmhub-extract-*"))

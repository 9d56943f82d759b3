"""`fmhub merge` of models given as REV:PATH: the merged directory gets the config and tokenizer files as committed,
so `from_pretrained` loads it, as it does for plain directories (issue 23)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from tests.helpers import fmhub, git

from fmhub.run.demo import build_tiny_llama

NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight")


def save_model(repo, tensors: dict[str, torch.Tensor]) -> None:
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(repo / "llama" / "model.safetensors"), {"format": "pt"})


def test_rev_path_merge_carries_config_and_tokenizer_files_and_loads(repo):
    from transformers import LlamaForCausalLM

    model = build_tiny_llama(seed=0)
    model.save_pretrained(repo / "llama")  # model.safetensors, config.json, generation_config.json
    (repo / "llama" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    base = load_file(str(repo / "llama" / "model.safetensors"))
    sides = {}
    for branch, delta in (("task-a", 0.01), ("task-b", -0.02)):
        git(repo, "checkout", "-q", "-b", branch, "main")
        t = dict(base)
        for n in NAMES[:2] if branch == "task-a" else NAMES[1:]:
            t[n] = base[n] + delta
        save_model(repo, t)
        git(repo, "commit", "-qam", branch)
        sides[branch] = t
    git(repo, "checkout", "-q", "main")

    proc = fmhub(repo, "merge", "task-a:llama/", "task-b:llama/", "--base", "main:llama/", "-s", "task-arithmetic",
                 "-o", "out/")
    assert "from task-a:llama/" in proc.stdout.decode()
    out = repo / "out"
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == git(repo, "show", f"task-a:llama/{name}").stdout, name
    merged = LlamaForCausalLM.from_pretrained(out)
    state = merged.state_dict()
    a, b = sides["task-a"], sides["task-b"]
    for n in base:
        torch.testing.assert_close(state[n], a[n] + b[n] - base[n])

    # a directory on disk gives the same files (and the REV:PATH merge equals it)
    git(repo, "worktree", "add", "-q", "../a", "task-a")
    git(repo, "worktree", "add", "-q", "../b", "task-b")
    fmhub(repo, "merge", "../a/llama", "../b/llama", "--base", "llama", "-s", "task-arithmetic", "-o", "out-dirs/")
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (repo / "out-dirs" / name).read_bytes() == (out / name).read_bytes()
    assert (repo / "out-dirs" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()

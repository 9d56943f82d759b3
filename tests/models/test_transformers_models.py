"""Checkpoints written by transformers and peft round-trip through git byte for byte."""

from __future__ import annotations

import torch

from tests.helpers import git, sha256_file

from fmhub.run.demo import build_tiny_llama
from fmhub.core.manifest import Manifest


def test_save_pretrained_round_trip_and_reload(repo):
    from transformers import LlamaForCausalLM

    model = build_tiny_llama(seed=3)
    model.save_pretrained(repo / "llama")
    ckpt = repo / "llama" / "model.safetensors"
    want = sha256_file(ckpt)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "tiny llama")
    m = Manifest.from_bytes(git(repo, "show", "HEAD:llama/model.safetensors").stdout)
    assert {t.name for t in m.tensors} == set(model.state_dict())
    ckpt.unlink()
    git(repo, "checkout", "--", ".")
    assert sha256_file(ckpt) == want
    reloaded = LlamaForCausalLM.from_pretrained(repo / "llama")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_sharded_save_pretrained_in_bf16(repo):
    model = build_tiny_llama(seed=4).to(torch.bfloat16)
    model.save_pretrained(repo / "sharded", max_shard_size="200KB")
    shards = sorted((repo / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (repo / "sharded" / "model.safetensors.index.json").exists()
    want = {p.name: sha256_file(p) for p in shards}
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "sharded bf16")
    for p in shards:
        p.unlink()
    git(repo, "checkout", "--", ".")
    assert {p.name: sha256_file(p) for p in shards} == want


def test_peft_lora_adapter_round_trip(repo):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_llama(seed=5), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(repo / "adapter")
    ckpt = repo / "adapter" / "adapter_model.safetensors"
    want = sha256_file(ckpt)
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "lora")
    m = Manifest.from_bytes(git(repo, "show", "HEAD:adapter/adapter_model.safetensors").stdout)
    assert m.tensors and all("lora_" in t.name for t in m.tensors)
    ckpt.unlink()
    git(repo, "checkout", "--", ".")
    assert sha256_file(ckpt) == want

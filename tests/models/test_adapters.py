"""PEFT adapters as versions: recorded against their base revision, diffed per module, merged into the base as low-rank deltas."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import fmhub, git, sha256_file
from fmhub.run.demo import build_tiny_llama
from fmhub.core.manifest import Manifest

WEIGHTS = "base/model.safetensors"


def lora_adapter(path, seed: int, r: int = 4, alpha: int = 8, targets=("q_proj", "v_proj"), base_seed: int = 0, **cfg):
    from peft import LoraConfig, get_peft_model

    base = build_tiny_llama(seed=base_seed)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **cfg))
    model.save_pretrained(path)
    return model


@pytest.fixture
def based(repo):
    """The repo with a tiny Llama committed under base/."""
    build_tiny_llama(seed=0).save_pretrained(repo / "base")
    git(repo, "add", "base")
    git(repo, "commit", "-qm", "base model")
    return repo


def staged_manifest(repo, path=WEIGHTS) -> Manifest:
    return Manifest.from_bytes(git(repo, "show", f":{path}").stdout, path)


def update(adapter_dir, module: str):
    a = load_file(str(adapter_dir / "adapter_model.safetensors"))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    key = f"base_model.model.{module}"
    return (cfg["lora_alpha"] / cfg["r"]) * (a[f"{key}.lora_B.weight"].double() @ a[f"{key}.lora_A.weight"].double())


def test_add_records_the_base_revision_and_ls_sees_the_base_move(based):
    lora_adapter(based / "ad1", seed=1)
    base_commit = git(based, "rev-parse", "HEAD").stdout.decode().strip()
    out = fmhub(based, "adapter", "add", "ad1", "--base", "base").stdout.decode()
    assert "r=4" in out
    side = json.loads((based / "ad1" / "fmhub-adapter.json").read_text())
    assert side["base"]["path"] == "base" and side["base"]["revision"] == base_commit
    assert list(side["base"]["files"]) == [WEIGHTS]
    staged = git(based, "diff", "--cached", "--name-only").stdout.decode().split()
    assert {"ad1/adapter_config.json", "ad1/adapter_model.safetensors", "ad1/fmhub-adapter.json", "ad1.lineage.json"} <= set(staged)
    assert staged_manifest(based, "ad1/adapter_model.safetensors").tensors  # stored by fmhub, tensor by tensor
    git(based, "commit", "-qm", "adapter")
    [info] = json.loads(fmhub(based, "adapter", "ls", "--rev", "HEAD", "--json").stdout)
    assert (info["path"], info["rank"], info["base_now"]) == ("ad1", 4, "same")
    graph = json.loads(fmhub(based, "lineage", "ad1@HEAD", "--json").stdout)
    assert {(n["path"], n.get("rev")) for n in graph["nodes"] if n.get("step") is None} == {("base", base_commit)}

    # the base moves on: the adapter was trained on the old one
    sd = load_file(str(based / WEIGHTS))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 2
    from safetensors.torch import save_file

    save_file(sd, str(based / WEIGHTS), metadata={"format": "pt"})
    git(based, "commit", "-qam", "retrained base")
    [info] = json.loads(fmhub(based, "adapter", "ls", "--rev", "HEAD", "--json").stdout)
    assert info["base_now"] == "changed" and info["changed_files"] == [WEIGHTS]
    assert "changed" in fmhub(based, "adapter", "ls").stdout.decode()


def test_add_refuses_an_adapter_for_another_base(based, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft import LoraConfig, get_peft_model

    other = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(based / "wrong")
    proc = fmhub(based, "adapter", "add", "wrong", "--base", "base", check=False)
    assert proc.returncode != 0
    assert b"shape" in proc.stderr and b"q_proj" in proc.stderr
    assert not (based / "wrong" / "fmhub-adapter.json").exists()
    assert git(based, "diff", "--cached", "--name-only").stdout == b""


def test_diff_shows_each_modules_effective_update_change(based):
    lora_adapter(based / "ad1", seed=1)
    fmhub(based, "adapter", "add", "ad1", "--base", "base")
    git(based, "commit", "-qm", "adapter v1")
    old_q = update(based / "ad1", "model.layers.0.self_attn.q_proj")
    lora_adapter(based / "ad1", seed=2, alpha=16)  # retrained: new factors and a new alpha
    new_q = update(based / "ad1", "model.layers.0.self_attn.q_proj")
    out = json.loads(fmhub(based, "diff", "--json").stdout)
    [ad] = out["adapters"]
    assert ad["path"] == "ad1"
    assert ["lora_alpha", 8, 16] in ad["config"]
    mods = {m["module"]: m for m in ad["modules"]}
    assert len(mods) == 8  # q_proj and v_proj of 4 layers
    q = mods["model.layers.0.self_attn.q_proj.weight"]
    assert q["status"] == "changed"
    assert q["change_norm"] == pytest.approx(float((new_q - old_q).norm()), rel=1e-6)
    assert q["old_norm"] == pytest.approx(float(old_q.norm()), rel=1e-6)
    text = fmhub(based, "diff").stdout.decode()
    assert "adapter ad1" in text and "lora_alpha: 8 → 16" in text


def test_merge_into_base_stores_low_rank_deltas_and_round_trips(based):
    peft_model = lora_adapter(based / "ad1", seed=1)
    fmhub(based, "adapter", "add", "ad1", "--base", "base")
    git(based, "commit", "-qm", "adapter")
    before = load_file(str(based / WEIGHTS))
    out = fmhub(based, "adapter", "merge", "ad1").stdout.decode()
    assert "lowrank" in out
    merged_sha = sha256_file(based / WEIGHTS)
    assert git(based, "status", "--porcelain").stdout == b"M  base/model.safetensors\n"  # staged, work tree matches
    m = staged_manifest(based)
    targeted = [t for t in m.tensors if t.name.endswith(("q_proj.weight", "v_proj.weight"))]
    assert len(targeted) == 8
    for t in targeted:
        assert t.deltas[-1].codec == "lowrank" and t.approx is None  # exact
        assert t.deltas[-1].size < t.size / 2
    base_entries = Manifest.from_bytes(git(based, "show", f"HEAD:{WEIGHTS}").stdout).by_name()
    assert all(t == base_entries[t.name] for t in m.tensors if t not in targeted)  # untouched weights: the base's entries
    git(based, "commit", "-qm", "merged")
    # the merge is peft's merge, to float32 rounding
    reference = peft_model.merge_and_unload().state_dict()
    merged = load_file(str(based / WEIGHTS))
    for name, t in merged.items():
        torch.testing.assert_close(t, reference[name], rtol=1e-5, atol=1e-6)
        if not name.endswith(("q_proj.weight", "v_proj.weight")):
            assert torch.equal(t, before[name])
    # checkout rebuilds the exact bytes from base + low-rank deltas
    (based / WEIGHTS).unlink()
    git(based, "checkout", "HEAD~1", "--", WEIGHTS)
    git(based, "checkout", "HEAD", "--", WEIGHTS)
    assert sha256_file(based / WEIGHTS) == merged_sha
    assert fmhub(based, "fsck").returncode == 0


def test_merge_that_cannot_meet_the_tolerance_writes_nothing(based):
    # rank 32 on a 64 x 64 weight: factors alone are half the tensor, so no low-rank delta is worth storing
    lora_adapter(based / "ad1", seed=1, r=32, alpha=32, targets=("q_proj",))
    fmhub(based, "adapter", "add", "ad1", "--base", "base")
    git(based, "commit", "-qm", "adapter")
    sha = sha256_file(based / WEIGHTS)
    proc = fmhub(based, "adapter", "merge", "ad1", check=False)
    assert proc.returncode != 0
    assert b"tolerance cannot be met" in proc.stderr and b"q_proj" in proc.stderr
    assert sha256_file(based / WEIGHTS) == sha
    assert git(based, "status", "--porcelain").stdout == b""
    assert not list(based.joinpath("base").glob(".fmhub-merge-*"))

"""Merges with strategies: inside real `git merge`, with `fmhub merge` recipes, and of PEFT LoRA adapters.

Every expected value is computed here directly in torch from the inputs, not by fmhub.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import fmhub, git, save_tensors, sha256_file

from fmhub.run.demo import build_tiny_llama


def base_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {f"l{i}.weight": torch.randn(16, 16, generator=g) for i in range(3)} | {"head": torch.randn(8, 16, generator=g)}


def finetune(seed: int, names=("l0.weight", "l1.weight", "head"), scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = base_model()
    for n in names:
        t[n] = t[n] + scale * torch.randn(t[n].shape, generator=g)
    return t


def ties_ref(base, sides, weights, density, scale=1.0):
    """TIES-merging (Yadav et al. 2023), written out in torch: trim, elect sign, disjoint mean."""
    taus = []
    for s in sides:
        tau = (s - base).reshape(-1)
        k = int(density * tau.numel())
        keep = torch.zeros_like(tau)
        keep[tau.abs().topk(k).indices] = 1
        taus.append((tau * keep).reshape(base.shape))
    stacked = torch.stack(taus)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == elected).float()
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    merged = (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)
    return base + scale * merged


def commit_model(repo, tensors, msg, branch=None, start=None):
    if branch:
        git(repo, "checkout", "-q", "-b", branch, start)
    save_tensors(repo / "model.safetensors", tensors, {"format": "pt"})
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", msg)


def test_git_merge_with_plan_file_strategies_per_tensor_pattern(repo):
    (repo / ".fmhub").mkdir()
    (repo / ".fmhub" / "merge.yaml").write_text(
        "strategy: ties\noptions: {density: 0.5}\ntensors:\n  - pattern: head\n    strategy: linear\n"
    )
    commit_model(repo, base_model(), "base")
    a, b = finetune(1), finetune(2, names=("l0.weight", "l1.weight", "l2.weight", "head"))
    commit_model(repo, a, "task a", "task-a", "main")
    commit_model(repo, b, "task b", "task-b", "main")
    git(repo, "checkout", "-q", "task-a")
    git(repo, "merge", "-q", "--no-edit", "task-b")
    merged = load_file(str(repo / "model.safetensors"))
    base = base_model()
    for n in ("l0.weight", "l1.weight"):  # changed on both sides: TIES
        torch.testing.assert_close(merged[n], ties_ref(base[n], [a[n], b[n]], [1.0, 1.0], 0.5), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged["head"], (a["head"] + b["head"]) / 2, rtol=1e-5, atol=1e-6)  # rule: linear
    assert torch.equal(merged["l2.weight"], b["l2.weight"])  # changed on one side only: taken as is
    assert git(repo, "status", "--porcelain").stdout == b""


def test_git_merge_task_arithmetic_from_gitattributes(repo):
    with open(repo / ".gitattributes", "a") as f:
        f.write("model.safetensors fmhub-merge=task-arithmetic\n")
    commit_model(repo, base_model(), "base")
    a, b = finetune(3), finetune(4)
    commit_model(repo, a, "a", "a", "main")
    commit_model(repo, b, "b", "b", "main")
    git(repo, "checkout", "-q", "a")
    git(repo, "merge", "-q", "--no-edit", "b")
    merged = load_file(str(repo / "model.safetensors"))
    base = base_model()
    for n in ("l0.weight", "l1.weight", "head"):
        torch.testing.assert_close(merged[n], base[n] + (a[n] - base[n]) + (b[n] - base[n]), rtol=1e-5, atol=1e-6)


def test_git_merge_reports_every_tensor_a_strategy_cannot_merge(repo):
    git(repo, "config", "fmhub.merge.strategy", "task-arithmetic")
    commit_model(repo, base_model(), "base")
    a = finetune(5) | {"new": torch.ones(4)}
    b = finetune(6) | {"new": torch.zeros(4)}
    b["l1.weight"] = torch.zeros(4, 4)  # shape change on one side, value change on the other
    commit_model(repo, a, "a", "a", "main")
    commit_model(repo, b, "b", "b", "main")
    git(repo, "checkout", "-q", "a")
    ours = sha256_file(repo / "model.safetensors")
    proc = git(repo, "merge", "--no-edit", "b", check=False)
    out = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode != 0
    assert "new: strategy 'task-arithmetic' works on changes from a base" in out
    assert "l1.weight: dtype/shape differ between sides" in out
    assert "UU model.safetensors" in git(repo, "status", "--porcelain").stdout.decode()
    assert sha256_file(repo / "model.safetensors") == ours
    git(repo, "merge", "--abort")
    assert git(repo, "status", "--porcelain").stdout == b""


def test_fmhub_merge_recipe_with_rules_weights_and_revisions(repo, tmp_path):
    commit_model(repo, base_model(), "base")
    a, b, c = finetune(7), finetune(8), finetune(9)
    save_tensors(tmp_path / "a.safetensors", a)
    save_tensors(tmp_path / "b.safetensors", b)
    commit_model(repo, c, "c", "c", "main")  # the third model is read from git: c:model.safetensors
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"base: main:model.safetensors\n"
        f"models:\n  - model: {tmp_path / 'a.safetensors'}\n    weight: 1.0\n"
        f"  - model: {tmp_path / 'b.safetensors'}\n    weight: 0.5\n"
        f"  - model: c:model.safetensors\n    weight: 2.0\n"
        "strategy: ties\noptions: {density: 0.3, scale: 0.8}\n"
        "tensors:\n  - pattern: 'l2.*'\n    strategy: linear\n"
        f"output: {tmp_path / 'out.safetensors'}\n"
    )
    proc = fmhub(repo, "merge", str(recipe), "--json")
    report = json.loads(proc.stdout)
    merged = load_file(str(tmp_path / "out.safetensors"))
    base = base_model()
    for n in ("l0.weight", "l1.weight", "head"):
        want = ties_ref(base[n], [a[n], b[n], c[n]], [1.0, 0.5, 2.0], 0.3, 0.8)
        torch.testing.assert_close(merged[n], want, rtol=1e-5, atol=1e-6)
    # l2 is the same in every model: copied, not recomputed
    assert torch.equal(merged["l2.weight"], base["l2.weight"])
    actions = {t["name"]: t["action"] for t in report["tensors"]}
    assert actions["l0.weight"] == "ties" and actions["l2.weight"] in ("linear", "same in every model")


def test_fmhub_merge_refuses_bad_inputs_and_writes_nothing(tmp_path):
    base = base_model()
    a, b = finetune(1), finetune(2)
    a["l0.weight"][3, 3] = float("nan")
    b["l1.weight"] = b["l1.weight"].double()
    del b["head"]
    for name, t in (("base", base), ("a", a), ("b", b)):
        save_tensors(tmp_path / f"{name}.safetensors", t)
    out = tmp_path / "out.safetensors"
    proc = fmhub(tmp_path, "merge", "a.safetensors", "b.safetensors", "--base", "base.safetensors", "-s", "ties",
                 "--option", "density=0.5", "-o", str(out), check=False)
    msg = proc.stderr.decode()
    assert proc.returncode == 1 and not out.exists()
    assert "head: missing from b.safetensors" in msg
    assert "l1.weight: dtype/shape differ" in msg
    assert list(tmp_path.glob(".fmhub-merge-*")) == []

    # only the NaN left: found while merging, named, and still nothing written
    b = finetune(2)
    save_tensors(tmp_path / "b.safetensors", b)
    proc = fmhub(tmp_path, "merge", "a.safetensors", "b.safetensors", "--base", "base.safetensors", "-s", "ties",
                 "--option", "density=0.5", "-o", str(out), check=False)
    msg = " ".join(proc.stderr.decode().split())
    assert proc.returncode == 1 and not out.exists(), msg
    assert "l0.weight" in msg and "NaN" in msg
    assert list(tmp_path.glob(".fmhub-merge-*")) == []

    # a strategy that needs a base, without one; fisher without Fisher files
    for args, needle in ((["-s", "task-arithmetic"], "give --base"), (["-s", "fisher"], "Fisher")):
        proc = fmhub(tmp_path, "merge", "base.safetensors", "b.safetensors", *args, "-o", str(out), check=False)
        assert proc.returncode == 1 and not out.exists()
        assert needle in proc.stderr.decode()


def test_fisher_weighted_merge_from_files(tmp_path):
    a, b = finetune(1), finetune(2)
    fa = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(3)) for n, t in a.items()}
    fb = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(4)) for n, t in b.items()}
    for name, t in (("a", a), ("b", b), ("fa", fa), ("fb", fb)):
        save_tensors(tmp_path / f"{name}.safetensors", t)
    (tmp_path / "r.yaml").write_text(
        "models:\n  - {model: a.safetensors, fisher: fa.safetensors}\n  - {model: b.safetensors, fisher: fb.safetensors}\n"
        "strategy: fisher\noutput: out.safetensors\n"
    )
    fmhub(tmp_path, "merge", "r.yaml")
    merged = load_file(str(tmp_path / "out.safetensors"))
    for n in a:
        want = (fa[n] * a[n] + fb[n] * b[n]) / (fa[n] + fb[n])
        torch.testing.assert_close(merged[n], want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- PEFT LoRA adapters


def lora_adapter(path, seed: int, r: int = 4, alpha: int = 8, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(build_tiny_llama(seed=0), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False))
    model.save_pretrained(path)
    return model


@pytest.fixture
def tiny_base(tmp_path):
    model = build_tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_lora_into_base_matches_peft_merge_and_unload(tmp_path, tiny_base):
    from transformers import LlamaForCausalLM

    peft_model = lora_adapter(tmp_path / "ad1", seed=1)
    reference = peft_model.merge_and_unload().state_dict()
    fmhub(tmp_path, "merge", "ad1", "--base", "base", "--into", "base", "-o", "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(merged) == set(reference) - {"lm_head.weight"} or set(merged) == set(reference)
    for n, t in merged.items():
        torch.testing.assert_close(t, reference[n], rtol=1e-5, atol=1e-6)
    # the output directory loads with plain transformers
    assert LlamaForCausalLM.from_pretrained(tmp_path / "merged") is not None


def test_two_loras_into_base_and_into_one_adapter_agree(tmp_path, tiny_base):
    from peft import PeftModel

    lora_adapter(tmp_path / "ad1", seed=1)
    lora_adapter(tmp_path / "ad2", seed=2, r=2, alpha=4)
    fmhub(tmp_path, "merge", "ad1", "ad2", "--base", "base", "-w", "0.7", "-w", "0.3", "-o", "merged")
    fmhub(tmp_path, "merge", "ad1", "ad2", "--into", "adapter", "-w", "0.7", "-w", "0.3", "-o", "combined")
    cfg = json.loads((tmp_path / "combined" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6

    base = load_file(str(tiny_base / "model.safetensors"))
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    a1 = load_file(str(tmp_path / "ad1" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "ad2" / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj"
    delta = lambda a, s: s * (a[f"base_model.model.{key}.lora_B.weight"] @ a[f"base_model.model.{key}.lora_A.weight"])  # noqa: E731
    want = base[f"{key}.weight"] + 0.7 * delta(a1, 8 / 4) + 0.3 * delta(a2, 4 / 2)
    torch.testing.assert_close(merged[f"{key}.weight"], want, rtol=1e-5, atol=1e-6)

    # the combined adapter, applied by peft, computes what the merged weights compute
    from transformers import LlamaForCausalLM

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        via_adapter = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), tmp_path / "combined")(ids).logits
        via_weights = LlamaForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    torch.testing.assert_close(via_adapter, via_weights, rtol=1e-4, atol=1e-5)


def test_lora_for_another_base_is_refused(tmp_path, tiny_base):
    lora_adapter(tmp_path / "ad1", seed=1, targets=("q_proj",))
    other = {"unrelated.weight": torch.zeros(2, 2)}
    (tmp_path / "other").mkdir()
    save_tensors(tmp_path / "other" / "model.safetensors", other)
    proc = fmhub(tmp_path, "merge", "ad1", "--base", "other", "-o", "merged", check=False)
    assert proc.returncode == 1 and "is this adapter for another base model?" in proc.stderr.decode()
    assert not (tmp_path / "merged").exists()


def test_fisher_diagonals_computed_by_a_plugin_hook(tmp_path):
    """Without `fisher:` files, the fisher strategy asks the fmhub_fisher_diagonal hook, tensor by tensor."""
    from fmhub import hookimpl
    from fmhub.plugin import host
    from fmhub.models.merge import Recipe, run_recipe

    a, b = finetune(1), finetune(2)
    save_tensors(tmp_path / "a.safetensors", a)
    save_tensors(tmp_path / "b.safetensors", b)
    asked = []

    class SquaredWeights:  # a stand-in "Fisher": θ², computed on demand
        @hookimpl
        def fmhub_fisher_diagonal(self, model, tensor):
            asked.append((model, tensor))
            return load_file(model)[tensor] ** 2

    pm = host.plugin_manager()
    plugin = SquaredWeights()
    pm.register(plugin, name="test-fisher")
    try:
        recipe = Recipe.from_dict(
            {"models": [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], "strategy": "fisher"}, "test"
        )
        run_recipe(recipe, str(tmp_path / "out.safetensors"))
    finally:
        pm.unregister(plugin)
    merged = load_file(str(tmp_path / "out.safetensors"))
    for n in ("l0.weight", "head"):
        fa, fb = a[n] ** 2 + 1e-8, b[n] ** 2 + 1e-8
        torch.testing.assert_close(merged[n], (fa * a[n] + fb * b[n]) / (fa + fb), rtol=1e-4, atol=1e-6)
    assert (str(tmp_path / "a.safetensors"), "head") in asked


def test_git_merge_fisher_weighted_with_fisher_files_from_the_plan(repo):
    """`.fmhub/merge.yaml` names each side's Fisher diagonal; the merge driver weights by them."""
    commit_model(repo, base_model(), "base")
    a, b = finetune(1), finetune(2)
    fa = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(5)) for n, t in a.items()}
    fb = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(6)) for n, t in b.items()}
    (repo / "fisher").mkdir()
    save_tensors(repo / "fisher" / "a.safetensors", fa)
    save_tensors(repo / "fisher" / "b.safetensors", fb)
    (repo / ".fmhub").mkdir()
    (repo / ".fmhub" / "merge.yaml").write_text("strategy: fisher\nfisher: [fisher/a.safetensors, fisher/b.safetensors]\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "fisher plan")
    commit_model(repo, a, "a", "a", "main")
    commit_model(repo, b, "b", "b", "main")
    git(repo, "checkout", "-q", "a")
    git(repo, "merge", "-q", "--no-edit", "b")
    merged = load_file(str(repo / "model.safetensors"))
    for n in ("l0.weight", "l1.weight", "head"):
        want = ((fa[n] + 1e-8) * a[n] + (fb[n] + 1e-8) * b[n]) / (fa[n] + fb[n] + 2e-8)
        torch.testing.assert_close(merged[n], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["linear", "task-arithmetic", "fisher"])
def test_elementwise_strategies_stream_big_tensors_in_chunks_with_the_same_result(tmp_path, monkeypatch, strategy):
    """With tiny chunks every tensor is merged in many pieces; the file equals a whole-tensor merge."""
    from fmhub.models import merge as mg

    a, b = finetune(1), finetune(2)
    fa = {n: torch.rand(t.shape, generator=torch.Generator().manual_seed(3)) for n, t in a.items()}
    for name, t in (("base", base_model()), ("a", a), ("b", b), ("fa", fa), ("fb", fa)):
        save_tensors(tmp_path / f"{name}.safetensors", t)
    recipe = {
        "base": str(tmp_path / "base.safetensors"),
        "models": [{"model": str(tmp_path / "a.safetensors"), "weight": 0.7, "fisher": str(tmp_path / "fa.safetensors")},
                   {"model": str(tmp_path / "b.safetensors"), "weight": 0.3, "fisher": str(tmp_path / "fb.safetensors")}],
        "strategy": strategy,
        "options": {"scale": 0.9},
    }
    whole = mg.run_recipe(mg.Recipe.from_dict(recipe, "t"), str(tmp_path / "whole.safetensors"))
    monkeypatch.setattr(mg, "CHUNK_ELEMS", 7)
    chunked = mg.run_recipe(mg.Recipe.from_dict(recipe, "t"), str(tmp_path / "chunked.safetensors"))
    assert (tmp_path / "whole.safetensors").read_bytes() == (tmp_path / "chunked.safetensors").read_bytes()
    assert dict(whole.actions)["l0.weight"] == strategy == dict(chunked.actions)["l0.weight"]
    assert dict(chunked.actions)["l2.weight"] == "same in every model"

"""`fmhub demo`: version a tiny transformers model with plain git and show what fmhub stores.

No weights are downloaded: the model is built from a config with random weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from rich.console import Console
from rich.table import Table

from fmhub.base import gitrun
from fmhub.base.errors import FmhubError
from fmhub.core.store import file_sha256
from fmhub.base.units import human_bytes


def build_tiny_llama(seed: int = 0, initializer_range: float = 0.02):
    """A ~1M-parameter Llama-architecture causal LM with random weights.

    ``initializer_range`` larger than transformers' 0.02 gives the random
    model enough signal for a small LoRA fine-tune to learn a task quickly.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=initializer_range,
    )
    return LlamaForCausalLM(config).eval()


def _sh(args: list[str], cwd: str) -> str:
    """Run one of fmhub's own commands (git goes through `fmhub.base.gitrun`)."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FmhubError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run(directory: str | None, console: Console) -> str:
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    repo = directory or tempfile.mkdtemp(prefix="fmhub-demo-")
    os.makedirs(repo, exist_ok=True)
    fmhub = [sys.executable, "-m", "fmhub"]
    console.rule("fmhub demo")
    console.print(f"repository: {repo}", highlight=False)
    gitrun.run(["init", "-q"], cwd=repo)
    for key, value in (("user.name", "fmhub demo"), ("user.email", "demo@fmhub.invalid")):
        gitrun.run(["config", key, value], cwd=repo)
    _sh([*fmhub, "install"], repo)
    _sh([*fmhub, "track", "*.safetensors"], repo)

    model_dir = os.path.join(repo, "model")
    model = build_tiny_llama()
    model.save_pretrained(model_dir)
    ckpt = os.path.join(model_dir, "model.safetensors")
    v0 = file_sha256(ckpt)
    gitrun.run(["add", "."], cwd=repo)
    gitrun.run(["commit", "-qm", "v0: tiny llama from config"], cwd=repo)
    console.print(f"v0 committed: {human_bytes(os.path.getsize(ckpt))} checkpoint, git stores a manifest:")
    for line in gitrun.run(["show", "HEAD:model/model.safetensors"], cwd=repo).stdout.splitlines()[:7]:
        console.print("  " + line, highlight=False, soft_wrap=True)
    console.print("  ...", highlight=False)

    # A "fine-tune" that touches two tensors only.
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.01)
        model.lm_head.weight.mul_(1.1)
    model.save_pretrained(model_dir)
    gitrun.run(["commit", "-qam", "v1: tune layer 0 q_proj and lm_head"], cwd=repo)
    console.print("\n[bold]git diff HEAD~1 -- model/model.safetensors[/bold] (changed tensors only):")
    for line in gitrun.run(["diff", "HEAD~1", "--", "model/model.safetensors"], cwd=repo).stdout.splitlines()[1:]:
        console.print("  " + line, highlight=False, soft_wrap=True)

    store = _dir_size(os.path.join(repo, ".git", "lfs", "objects"))
    size = os.path.getsize(ckpt)
    table = Table("what", "value")
    table.add_row("checkpoint size", human_bytes(size))
    table.add_row("object store after 2 versions", f"{human_bytes(store)} ({store / size:.2f}x one checkpoint)")
    gitrun.run(["checkout", "-q", "HEAD~1", "--", "model/model.safetensors"], cwd=repo)
    same = file_sha256(ckpt) == v0
    table.add_row("checkout of v0 byte-identical", "yes" if same else "NO")
    reloaded = LlamaForCausalLM.from_pretrained(model_dir)
    ok = all(torch.equal(a, b) for a, b in zip(build_tiny_llama().state_dict().values(), reloaded.state_dict().values()))
    table.add_row("v0 reloads with transformers", "yes" if ok else "NO")
    console.print(table)
    if not (same and ok):
        raise FmhubError("demo round trip failed; please report this")
    console.print(f"Explore it: cd {repo} && git log -p", highlight=False)
    return repo

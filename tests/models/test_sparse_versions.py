"""Issue 5 end to end through the CLI and git: Fisher, a 1% Fisher-masked fine-tune, committed as sparse deltas.

Stored bytes for the new version must be at most 3% of a full copy, the
checkout bit-exact, and the quality of the sparse update reported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.helpers import fmhub, git, sha256_file, store_objects

from fmhub.run.demo import build_tiny_llama
from fmhub.core.manifest import Manifest

CKPT = "model.safetensors"


def write_data(path: Path, n: int = 24) -> Path:
    """A tiny deterministic 'task': arithmetic-looking lines the byte tokenizer reads."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{i} plus {i % 7} is {i + i % 7}; {i} times 2 is {2 * i}."}) + "\n")
    return path


def test_fisher_masked_fine_tune_commits_as_a_small_delta(repo, tmp_path):
    git(repo, "config", "fmhub.deltas", "true")
    model_dir = repo / "model"
    build_tiny_llama(seed=7).save_pretrained(model_dir)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    full = sum(store_objects(repo).values())
    base_copy = tmp_path / "base"
    build_tiny_llama(seed=7).save_pretrained(base_copy)  # same seed: the same bytes, kept outside the repo
    assert sha256_file(base_copy / CKPT) == sha256_file(model_dir / CKPT)

    data = write_data(tmp_path / "task.jsonl")
    fisher = tmp_path / "fisher.safetensors"
    fmhub(tmp_path, "fisher", str(base_copy), "--data", str(data), "-o", str(fisher), "--batch-size", "4")
    tuned = tmp_path / "tuned"
    out = fmhub(tmp_path, "finetune", str(base_copy), "--data", str(data), "-o", str(tuned),
                "--fisher", str(fisher), "--keep", "1%", "--steps", "15", "--lr", "0.01").stdout.decode()
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first

    # commit the fine-tune over the base: fmhub stores sparse deltas
    (model_dir / CKPT).write_bytes((tuned / CKPT).read_bytes())
    want = sha256_file(model_dir / CKPT)
    before = sum(store_objects(repo).values())
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "1% Fisher-masked fine-tune")
    stored = sum(store_objects(repo).values()) - before
    assert stored <= 0.03 * full, (stored, full)
    m = Manifest.from_bytes(git(repo, "show", f"HEAD:model/{CKPT}").stdout)
    assert any(e.deltas for e in m.tensors)

    (model_dir / CKPT).unlink()
    git(repo, "checkout", "--", f"model/{CKPT}")
    assert sha256_file(model_dir / CKPT) == want  # bit-exact round trip through the delta chain
    git(repo, "checkout", "-q", "HEAD~1", "--", f"model/{CKPT}")
    assert sha256_file(model_dir / CKPT) == sha256_file(base_copy / CKPT)

    # the sparsified dense alternative, with the quality of each reported
    dense = tmp_path / "dense"
    fmhub(tmp_path, "finetune", str(base_copy), "--data", str(data), "-o", str(dense), "--steps", "15", "--lr", "0.01")
    sparse = tmp_path / "sparse"
    report = fmhub(tmp_path, "sparsify", str(base_copy), str(dense), "--fisher", str(fisher), "--keep", "1%",
                   "-o", str(sparse), "--data", str(data)).stdout.decode()
    assert "kept" in report and "Fisher-weighted norm" in report
    losses = dict(re.findall(r"(base|fine-tune|sparse)\s+│\s+([\d.]+)", report))
    assert set(losses) == {"base", "fine-tune", "sparse"}
    assert float(losses["fine-tune"]) < float(losses["base"])
    # provenance: the sparse update leads back through the fine-tune to its data
    graph = json.loads(fmhub(tmp_path, "lineage", str(sparse), "--json").stdout)
    sources = {Path(n["path"]).name for n in graph["nodes"] if n.get("step") is None}
    assert {Path(str(data)).name, Path(str(base_copy)).name} <= sources, graph


def test_a_fisher_file_for_another_model_is_refused_and_nothing_written(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_tiny_llama(seed=1).save_pretrained(a)
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(b)
    data = write_data(tmp_path / "d.jsonl", 6)
    fisher = tmp_path / "f.safetensors"
    fmhub(tmp_path, "fisher", str(b), "--data", str(data), "-o", str(fisher))
    out = tmp_path / "out.safetensors"
    proc = fmhub(tmp_path, "sparsify", str(a), str(a), "--fisher", str(fisher), "--keep", "1%", "-o", str(out), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr.decode()
    assert "fisher" in proc.stderr.decode().lower() and not out.exists()
    proc = fmhub(tmp_path, "sparsify", str(a), str(a), "--fisher", str(fisher), "--keep", "150%", "-o", str(out), check=False)
    assert proc.returncode == 1 and "outside" in proc.stderr.decode()


def test_commit_sparse_stores_the_top_k_update_and_reports_quality(repo, tmp_path):
    model_dir = repo / "model"
    build_tiny_llama(seed=7).save_pretrained(model_dir)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    base_sha = sha256_file(model_dir / CKPT)
    data = write_data(tmp_path / "task.jsonl")
    fisher = tmp_path / "fisher.safetensors"
    fmhub(tmp_path, "fisher", str(model_dir), "--data", str(data), "-o", str(fisher), "--batch-size", "4")
    dense = tmp_path / "dense"
    fmhub(tmp_path, "finetune", str(model_dir), "--data", str(data), "-o", str(dense), "--steps", "10", "--lr", "0.01")
    (model_dir / CKPT).write_bytes((dense / CKPT).read_bytes())  # a dense fine-tune over the base, deltas off

    out = fmhub(repo, "commit", "model", "-m", "sparse fine-tune", "--sparse", "1%", "--fisher", str(fisher),
                "--data", str(data)).stdout.decode()
    assert git(repo, "log", "-1", "--format=%s").stdout.decode().strip() == "sparse fine-tune"
    assert git(repo, "status", "--porcelain").stdout == b""
    record = json.loads(git(repo, "show", f"HEAD:model/{CKPT}.lineage.json").stdout)  # committed with the weights
    base_commit = git(repo, "rev-parse", "HEAD~1").stdout.decode().strip()
    assert record["step"] == "sparsify" and record["inputs"][0] == {"path": f"model/{CKPT}", "rev": base_commit,
                                                                     "blob": record["inputs"][0]["blob"], "kind": "model"}
    stored = re.search(r"\(([\d.]+)%\)", out).group(1)
    assert float(stored) < 3.0, out  # sparse deltas: a few % of the changed tensors' bytes
    losses = dict(re.findall(r"(base|dense|sparse)\s+│\s+([\d.]+)", out))
    assert set(losses) == {"base", "dense", "sparse"} and float(losses["dense"]) < float(losses["base"])
    m = Manifest.from_bytes(git(repo, "show", f"HEAD:model/{CKPT}").stdout)
    chained = [t for t in m.tensors if t.deltas]
    assert chained and all(t.deltas[-1].codec == "planes" for t in chained)
    # what was committed is the sparse update: every element is the base's or the dense fine-tune's
    from safetensors.torch import load_file

    got, ft = load_file(str(model_dir / CKPT)), load_file(str(dense / CKPT))
    git(repo, "checkout", "-q", "HEAD~1", "--", f"model/{CKPT}")
    assert sha256_file(model_dir / CKPT) == base_sha
    base = load_file(str(model_dir / CKPT))
    kept = sum(int(((got[n] != base[n]) & (got[n] == ft[n])).sum()) for n in got)
    other = sum(int(((got[n] != base[n]) & (got[n] != ft[n])).sum()) for n in got)
    total = sum(t.numel() for t in got.values())
    assert other == 0 and 0 < kept <= 0.011 * total

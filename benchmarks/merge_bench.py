#!/usr/bin/env python3
"""Benchmark ``fmhub merge`` against mergekit on two fine-tunes of one base, in one run.

    pip install mergekit                    # not a dependency of fmhub; the benchmark skips it if absent
    python benchmarks/merge_bench.py        # ~1.07 GB fp32 Llama-style model built from a config
    python benchmarks/merge_bench.py --layers 1 --hidden 128 --vocab 512 --json out.json   # a quick run

A base model is built from a ``LlamaConfig`` with random weights (nothing is
downloaded) and saved with ``save_pretrained``; two fine-tunes add small
seeded noise to every tensor (a different half of the layers gets a larger
change in each, so TIES has signs to elect). For each method both tools merge
the same three checkpoints with the same parameters; each runs as its own
process, and its peak RSS is ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` taken
by a wrapper around that one process. Outputs are compared tensor by tensor:
max |fmhub − mergekit| and the max relative difference ‖Δ‖/‖mergekit‖.

Methods and parameters (the same for both tools): linear (weights 0.6/0.4),
task arithmetic (weights 1/1, lambda 0.8), TIES (density 0.5, weights 1/1).
DARE draws random masks and mergekit's RNG use differs from fmhub's
documented one (``seed_for(seed, tensor name)``), so DARE is checked against
peft's ``dare_linear`` under that seed rule instead, on a few tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRAPPER = r'''
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:], stdout=subprocess.DEVNULL)
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
'''

METHODS = {
    "linear": {"fmhub": ("linear", {}, [0.6, 0.4]), "mergekit": ("linear", {}, [0.6, 0.4])},
    "task arithmetic": {"fmhub": ("task-arithmetic", {"scale": 0.8}, [1.0, 1.0]), "mergekit": ("task_arithmetic", {"lambda": 0.8}, [1.0, 1.0])},
    "ties": {"fmhub": ("ties", {"density": 0.5}, [1.0, 1.0]), "mergekit": ("ties", {"density": 0.5}, [1.0, 1.0])},
}


SHARED_PARAMS = {"lambda", "normalize"}


def build_models(root: Path, args) -> dict[str, Path]:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64), tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        LlamaForCausalLM(cfg).save_pretrained(root / "base")
    paths = {"base": root / "base"}
    base_files = sorted((root / "base").glob("*.safetensors"))
    for i, name in enumerate(("a", "b")):
        out = root / name
        out.mkdir()
        shutil.copy(root / "base" / "config.json", out / "config.json")
        if (root / "base" / "model.safetensors.index.json").exists():
            shutil.copy(root / "base" / "model.safetensors.index.json", out / "model.safetensors.index.json")
        g = torch.Generator().manual_seed(100 + i)
        for f in base_files:
            tensors = load_file(str(f))
            for t_name, t in tensors.items():
                layer = int(t_name.split(".")[2]) if t_name.startswith("model.layers.") else -1
                scale = 0.01 if layer % 2 == i else 0.001  # each fine-tune moves its own half of the layers more
                tensors[t_name] = t + scale * torch.randn(t.shape, generator=g, dtype=t.dtype)
            save_file(tensors, str(out / f.name), metadata={"format": "pt"})
            del tensors
        paths[name] = out
    return paths


def run_measured(cmd: list[str], rss_file: Path) -> tuple[float, int]:
    wrapper = rss_file.with_suffix(".py")
    wrapper.write_text(WRAPPER)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(wrapper), str(rss_file), *cmd], stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return seconds, int(rss_file.read_text()) * 1024


def mergekit_cmd(root: Path, paths, method: str, params: dict, weights: list[float], out: Path) -> list[str]:
    import yaml

    shared = {k: v for k, v in params.items() if k in SHARED_PARAMS}  # mergekit ignores these per model
    per_model = {k: v for k, v in params.items() if k not in SHARED_PARAMS}
    cfg = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths[n]), "parameters": {"weight": w, **per_model}} for n, w in zip(("a", "b"), weights)],
        "dtype": "float32",
    }
    if shared:
        cfg["parameters"] = shared
    if method == "linear":
        del cfg["base_model"]
    cfg_path = out.with_suffix(".yml")
    cfg_path.write_text(yaml.safe_dump(cfg))
    exe = shutil.which("mergekit-yaml")
    return [exe, str(cfg_path), str(out), "--no-copy-tokenizer", "--quiet", "--no-write-model-card", "--out-shard-size", "100B"]


def fmhub_cmd(paths, strategy: str, options: dict, weights: list[float], out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "fmhub", "merge", str(paths["a"]), str(paths["b"]), "-s", strategy, "-o", str(out)]
    if strategy != "linear":
        cmd += ["--base", str(paths["base"])]
    for w in weights:
        cmd += ["-w", str(w)]
    for k, v in options.items():
        cmd += ["--option", f"{k}={v}"]
    return cmd


def compare(fm_dir: Path, mk_dir: Path) -> tuple[float, float, int]:
    """(max |Δ|, max ‖Δ‖/‖mergekit‖, tensors compared), reading one tensor pair at a time."""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    fm, mk = index(fm_dir), index(mk_dir)
    if set(fm) != set(mk):
        raise SystemExit(f"tensor sets differ: {sorted(set(fm) ^ set(mk))[:5]}")
    max_abs, max_rel = 0.0, 0.0
    for name in sorted(fm):
        with safe_open(str(fm[name]), "pt") as h:
            a = h.get_tensor(name).double()
        with safe_open(str(mk[name]), "pt") as h:
            b = h.get_tensor(name).double()
        d = (a - b).abs()
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        norm = float(b.norm())
        if norm > 0:
            max_rel = max(max_rel, float((a - b).norm()) / norm)
    return max_abs, max_rel, len(fm)


def dare_check(paths, root: Path) -> float:
    """fmhub dare-linear vs peft's dare_linear under fmhub's documented seed rule, on three tensors."""
    import torch
    from peft.utils.merge_utils import dare_linear
    from safetensors import safe_open

    from fmhub.models.merge_math import seed_for

    out = root / "dare"
    subprocess.run(fmhub_cmd(paths, "dare-linear", {"density": 0.3, "seed": 7}, [1.0, 1.0], out) + ["--base", str(paths["base"])], check=True, stdout=subprocess.DEVNULL)
    worst = 0.0
    files = {p.name: p for p in (paths["base"]).glob("*.safetensors")}
    with safe_open(str(next(iter(files.values()))), "pt") as h:
        names = [n for n in h.keys() if n.startswith("model.layers.0.")][:3]
    for name in names:
        def get(d):
            for f in sorted(Path(d).glob("*.safetensors")):
                with safe_open(str(f), "pt") as h:
                    if name in h.keys():
                        return h.get_tensor(name)
        base, a, b, got = get(paths["base"]), get(paths["a"]), get(paths["b"]), get(out)
        torch.manual_seed(seed_for(7, name))
        want = base + dare_linear([a - base, b - base], torch.tensor([1.0, 1.0]), 0.3)
        worst = max(worst, float((got - want).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(170, Console().width))
    have_mergekit = shutil.which("mergekit-yaml") is not None
    root = Path(tempfile.mkdtemp(prefix="fmhub-merge-bench-", dir=args.workdir))
    try:
        console.log("building base and two fine-tunes")
        paths = build_models(root, args)
        ckpt_bytes = sum(p.stat().st_size for p in paths["base"].glob("*.safetensors"))
        console.log(f"checkpoint: {ckpt_bytes / 1e9:.2f} GB")
        results = {}
        for label, tools in METHODS.items():
            console.log(f"merging: {label}")
            row = {}
            s, o, w = tools["fmhub"]
            row["fmhub_s"], row["fmhub_rss"] = run_measured(fmhub_cmd(paths, s, o, w, root / f"fm-{s}"), root / f"fm-{s}.rss")
            if have_mergekit:
                m, p, w = tools["mergekit"]
                row["mergekit_s"], row["mergekit_rss"] = run_measured(mergekit_cmd(root, paths, m, p, w, root / f"mk-{m}"), root / f"mk-{m}.rss")
                row["max_abs_diff"], row["max_rel_diff"], row["tensors"] = compare(root / f"fm-{s}", root / f"mk-{m}")
            results[label] = row
        dare_diff = dare_check(paths, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    gb = ckpt_bytes / 1e9
    table = Table(title=f"fmhub merge vs mergekit — two fine-tunes + base of a {gb:.2f} GB fp32 Llama-style checkpoint, 1 run, {os.cpu_count()} CPUs")
    for col in ("method", "mergekit", "fmhub", "fmhub/mergekit", "RSS mergekit", "RSS fmhub", "RSS fmhub/ckpt", "max |Δ| vs mergekit", "max rel. Δ"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for label, r in results.items():
        mk = r.get("mergekit_s")
        table.add_row(
            label,
            f"{mk:.1f} s" if mk else "—",
            f"{r['fmhub_s']:.1f} s",
            f"{r['fmhub_s'] / mk:.2f}×" if mk else "—",
            f"{r['mergekit_rss'] / 2**20:.0f} MiB" if mk else "—",
            f"{r['fmhub_rss'] / 2**20:.0f} MiB",
            f"{r['fmhub_rss'] / ckpt_bytes:.2f}×",
            f"{r['max_abs_diff']:.2e}" if mk else "—",
            f"{r['max_rel_diff']:.2e}" if mk else "—",
        )
    console.print(table)
    console.print(f"• DARE (dare-linear, density 0.3, seed 7) vs peft dare_linear under seed_for(seed, name): max |Δ| = {dare_diff:.2e}")
    if not have_mergekit:
        console.print("• mergekit is not installed (`pip install mergekit`): only fmhub's figures are shown")
    console.print("• Times are wall clock of one process each (start-up included); RSS is that process's peak.")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint_bytes": ckpt_bytes, "results": results, "dare_max_abs_diff_vs_peft": dare_diff}, indent=1))


if __name__ == "__main__":
    main()

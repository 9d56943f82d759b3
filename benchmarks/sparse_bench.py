#!/usr/bin/env python3
"""Fisher-guided sparse fine-tuning on a tiny Llama: quality of dense vs 1% updates, side by side.

    python benchmarks/sparse_bench.py                       # ~2 min on 2 CPU cores
    python benchmarks/sparse_bench.py --k 0.05 --steps 300 --json out.json

Nothing is downloaded. A Llama-architecture model is built from a config
(``fmhub.run.demo.build_tiny_llama``'s shape by default) and briefly pre-trained
on a synthetic "language": runs through the alphabet with strides 1-3. The
task is the same kind of text with strides 5 and 7, which the base has not
seen. Texts are tokenized byte by byte (the model ships no tokenizer). Then,
from the same base and with the same data order, learning rate and steps:

* **dense**: every parameter trained;
* **fisher mask**: only the top-k fraction of entries by the base's empirical
  Fisher on the task's training data (`fmhub.models.fisher.compute_fisher`), every
  other entry bit-exact to the base (`fmhub.models.sparse_update.finetune_masked`);
* **random mask**: the same number of entries, chosen uniformly at random
  (seeded), to show what the Fisher ranking buys;
* **dense, sparsified**: the dense fine-tune with its update kept on the
  top-k Fisher entries only (`fmhub.models.sparse_update.sparse_update`).

The table gives each model's mean token NLL on held-out task examples, the
entries that differ from the base, wall times, and what git stores for the
version: each fine-tune is committed over the base in a fresh repository with
``fmhub.deltas`` on, and the growth of the object store is divided by the
checkpoint's size (a full copy, which is what plain git-lfs stores, is 1.0);
the checkout of that commit is checked to be bit-exact.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def stride_texts(strides: list[int], n: int, seed: int, length: int) -> list[str]:
    """Runs through the alphabet: a random start and a stride drawn from ``strides`` per text."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, stride = rng.randrange(26), rng.choice(strides)
        out.append("".join(ALPHABET[(start + stride * i) % 26] for i in range(length)))
    return out


def changed_entries(base_dir: Path, model_dir: Path) -> int:
    from safetensors.torch import load_file

    import torch

    def bits(t):  # compare bit patterns: an entry is unchanged only when its bytes are
        return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

    a, b = load_file(str(base_dir / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    return sum(int((bits(a[n]) != bits(b[n])).sum()) for n in a)


def random_mask(base_dir: Path, k: int, seed: int) -> dict:
    """Exactly ``k`` entries of the whole model, uniformly at random."""
    import torch
    from safetensors.torch import load_file

    shapes = {n: t.shape for n, t in load_file(str(base_dir / "model.safetensors")).items()}
    total = sum(s.numel() for s in shapes.values())
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:k]] = True
    out, at = {}, 0
    for n, s in shapes.items():
        out[n] = flat[at : at + s.numel()].reshape(s)
        at += s.numel()
    return out


def stored_fraction(base_ckpt: Path, ckpt: Path, root: Path) -> tuple[float, bool]:
    """(store growth / checkpoint size, checkout bit-exact) for committing ``ckpt`` over ``base_ckpt`` with deltas on."""
    import hashlib
    import shutil
    import subprocess

    repo = root / f"git-{ckpt.parent.name}"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)

    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)

    def store_bytes() -> int:
        objs = repo / ".git" / "lfs" / "objects"
        return sum(p.stat().st_size for p in objs.rglob("*") if p.is_file()) if objs.exists() else 0

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    run("git", "init", "-q")
    run(sys.executable, "-m", "fmhub", "install")
    run(sys.executable, "-m", "fmhub", "track", "*.safetensors")
    run("git", "config", "fmhub.deltas", "true")
    shutil.copyfile(base_ckpt, repo / "model.safetensors")
    run("git", "add", "-A")
    run("git", "-c", "user.name=bench", "-c", "user.email=bench@fmhub.invalid", "commit", "-qm", "base")
    before = store_bytes()
    shutil.copyfile(ckpt, repo / "model.safetensors")
    run("git", "add", "-A")
    run("git", "-c", "user.name=bench", "-c", "user.email=bench@fmhub.invalid", "commit", "-qm", "fine-tune")
    grew = store_bytes() - before
    (repo / "model.safetensors").unlink()
    run("git", "checkout", "--", "model.safetensors")
    exact = sha(repo / "model.safetensors") == sha(ckpt)
    shutil.rmtree(repo, ignore_errors=True)
    return grew / ckpt.stat().st_size, exact


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=float, default=0.01, help="fraction of entries the sparse updates keep (default 0.01)")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps, the same for every method")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate, the same for every method")
    p.add_argument("--pretrain-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--length", type=int, default=32, help="characters (tokens) per example")
    p.add_argument("--train", type=int, default=128, help="task training examples")
    p.add_argument("--eval", type=int, default=64, help="held-out task examples")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the models here (default: a temp dir, removed)")
    p.add_argument("--json", help="write the results as JSON to this file")
    args = p.parse_args()

    warnings.filterwarnings("ignore")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from fmhub.models.fisher import compute_fisher
    from fmhub.models.sparse_update import eval_loss, finetune_masked, sparse_update

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="fmhub-sparse-bench-")
    root = Path(args.workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)

    pretrain = stride_texts([1, 2, 3], 512, args.seed + 1, args.length)
    train = stride_texts([5, 7], args.train, args.seed + 2, args.length)
    held_out = stride_texts([5, 7], args.eval, args.seed + 3, args.length)

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 16),
                      num_key_value_heads=max(1, args.hidden // 32), max_position_embeddings=max(128, args.length))
    LlamaForCausalLM(cfg).save_pretrained(str(root / "init"))
    times: dict[str, float] = {}
    t = time.monotonic()
    finetune_masked(str(root / "init"), pretrain, str(root / "base"), steps=args.pretrain_steps, lr=3e-3,
                    seed=args.seed, batch_size=args.batch_size)
    times["pretrain"] = time.monotonic() - t
    base = root / "base"

    t = time.monotonic()
    fisher = compute_fisher(str(base), train, str(root / "fisher.safetensors"), batch_size=16, seed=args.seed)
    times["fisher"] = time.monotonic() - t

    common = dict(steps=args.steps, lr=args.lr, seed=args.seed, batch_size=args.batch_size)
    t = time.monotonic()
    dense = finetune_masked(str(base), train, str(root / "dense"), **common)
    times["dense"] = time.monotonic() - t
    t = time.monotonic()
    masked = finetune_masked(str(base), train, str(root / "fisher-mask"), fisher_path=str(root / "fisher.safetensors"),
                             k_fraction=args.k, **common)
    times["fisher mask"] = time.monotonic() - t
    t = time.monotonic()
    finetune_masked(str(base), train, str(root / "random-mask"), mask=random_mask(base, masked.trainable, args.seed), **common)
    times["random mask"] = time.monotonic() - t
    t = time.monotonic()
    sparse = sparse_update(str(base), str(root / "dense"), str(root / "fisher.safetensors"), str(root / "dense-sparsified"), args.k)
    times["dense, sparsified"] = time.monotonic() - t

    rows = []
    for label, d in (("base", base), ("dense", root / "dense"), (f"fisher mask {args.k:g}", root / "fisher-mask"),
                     (f"random mask {args.k:g}", root / "random-mask"), (f"dense, sparsified {args.k:g}", root / "dense-sparsified")):
        key = label.rsplit(" ", 1)[0] if label[-1].isdigit() else label
        frac, exact = stored_fraction(base / "model.safetensors", Path(d) / "model.safetensors", root) if d != base else (0.0, True)
        rows.append({
            "model": label, "eval_nll": eval_loss(str(d), held_out), "train_nll": eval_loss(str(d), train),
            "entries_changed": changed_entries(base, d), "seconds": times.get(key),
            "stored_fraction": frac, "checkout_bit_exact": exact,
        })
    total = dense.total
    print(f"tiny Llama: {total:,} parameters; task: {args.train} train / {args.eval} held-out texts of {args.length} tokens; "
          f"{args.steps} steps, lr {args.lr:g}, batch {args.batch_size}; k = {args.k:g} ({masked.trainable:,} entries)")
    print(f"Fisher of the base on the task: {fisher.examples} examples, {fisher.seconds:.2f} s ({fisher.method}); "
          f"sparsified dense update keeps {sparse.fisher_norm_retained:.1%} of its Fisher-weighted squared norm")
    print(f"{'model':28s} {'held-out NLL':>12s} {'train NLL':>10s} {'entries changed':>16s} {'stored/full':>11s} {'exact':>5s} {'time':>8s}")
    for r in rows:
        secs = f"{r['seconds']:.1f} s" if r["seconds"] is not None else ""
        print(f"{r['model']:28s} {r['eval_nll']:12.4f} {r['train_nll']:10.4f} {r['entries_changed']:>16,} "
              f"{r['stored_fraction']:>10.2%} {'yes' if r['checkout_bit_exact'] else 'NO':>5s} {secs:>8s}")
    print("stored/full = bytes git stores for the version (fmhub, deltas on) / a full copy (what plain git-lfs stores)")
    if args.json:
        result = {
            "args": vars(args), "parameters": total, "k_entries": masked.trainable, "rows": rows, "times": times,
            "fisher": {"examples": fisher.examples, "seconds": fisher.seconds, "method": fisher.method},
            "sparsified": {"kept": sparse.kept, "changed": sparse.changed, "update_size": sparse.update_size,
                           "fisher_norm_retained": sparse.fisher_norm_retained},
            "loss_curves": {"dense": dense.losses, "fisher mask": masked.losses},
        }
        Path(args.json).write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

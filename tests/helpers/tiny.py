"""A tiny causal LM and a toy sentiment task, shared by the fine-tuning tests (tests/models/test_autotune.py, test_run_dag.py)."""

from __future__ import annotations

import json
import random

FILLER = "the a movie plot was and very it film so".split()
WORDS = {"pos": ["good", "great"], "neg": ["bad", "awful"]}


def tiny_base(path, vocab_size=256):
    """A random 2-layer Llama with no tokenizer (so the byte fallback, vocabulary 256, tokenizes and decodes).

    initializer_range 0.1, not 0.02: with 0.02 the lm_head rows are so short that no hidden
    state can move a logit by more than about 1, and LoRA on q/v cannot learn anything measurable.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Four filler words and one sentiment word; the label says which kind of word it was."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(FILLER) for _ in range(4)]
        words.insert(rng.randrange(5), rng.choice(WORDS[label]))
        rows.append({"text": " ".join(words) + " ->", "label": label})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)

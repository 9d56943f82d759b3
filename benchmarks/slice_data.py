"""A generated review task with a planted failing slice, for fmhub's monitoring test and benchmark.

Reviews name a brand, an item and one sentiment word: ``"the zorbo kite is great ->"``.
The label is the sentiment word's polarity. Brands belong to categories that
only a metadata table knows (``brands.csv``: entity, category, country), so a
slice "toys" needs the table joined into the rows first.

**The plant.** In the training rows, a fraction ``planted`` of the toy
reviews whose true label is ``pos`` are labelled ``neg``: a model trained on
them learns "toy brand -> negative" and fails the toy slice of clean
evaluation rows. `make_task` returns which training rows were planted, so
provenance can be scored (precision of the rows it blames).

Pool rows carry no label: a patch labels them with keyword functions over the
sentiment words (weak supervision), which is right for every category.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

BRANDS = {
    "tools": ["acme", "bolt", "crank", "dorn"],
    "toys": ["zorbo", "kipi", "lumo", "wibi"],
    "food": ["nomi", "pava", "tukk", "yarr"],
}
COUNTRY = {"acme": "us", "bolt": "de", "crank": "us", "dorn": "de", "zorbo": "jp", "kipi": "jp", "lumo": "fr",
           "wibi": "fr", "nomi": "it", "pava": "it", "tukk": "us", "yarr": "de"}
ITEMS = {"tools": ["drill", "saw", "lamp"], "toys": ["kite", "doll", "ball"], "food": ["soup", "bread", "tea"]}
POS = ["good", "great", "fine", "nice"]
NEG = ["bad", "awful", "poor", "ugly"]
CLASSES = ["neg", "pos"]


@dataclass
class Generated:
    train: list[dict]
    eval: list[dict]
    pool: list[dict]
    planted: list[int] = field(default_factory=list)  # indices into train of the mislabelled rows
    table: list[dict] = field(default_factory=list)


def _review(rng: random.Random, category: str | None = None) -> tuple[dict, str]:
    category = category or rng.choice(sorted(BRANDS))
    brand, item = rng.choice(BRANDS[category]), rng.choice(ITEMS[category])
    label = rng.choice(CLASSES)
    word = rng.choice(POS if label == "pos" else NEG)
    template = rng.choice(["the {b} {i} is {w}", "my {b} {i} was {w}", "{w} {i} from {b}"])
    return {"text": template.format(b=brand, i=item, w=word) + " ->", "label": label}, category


def make_task(n_train: int = 600, n_eval: int = 240, n_pool: int = 300, planted: float = 1.0, seed: int = 0) -> Generated:
    """Training rows with the plant, clean evaluation rows, unlabelled pool rows and the brands table."""
    rng = random.Random(seed)
    out = Generated([], [], [])
    for i in range(n_train):
        row, category = _review(rng)
        if category == "toys" and row["label"] == "pos" and rng.random() < planted:
            row["label"] = "neg"
            out.planted.append(i)
        out.train.append(row)
    out.eval = [_review(rng)[0] for _ in range(n_eval)]
    out.pool = [{"text": _review(rng)[0]["text"]} for _ in range(n_pool)]
    out.table = [{"entity": b, "category": c, "country": COUNTRY[b]} for c, bs in BRANDS.items() for b in bs]
    return out


def category_rows(rows: list[dict]) -> list[dict]:
    """A downstream task on the same texts: which category the brand is in (adapters of the base are trained on it)."""
    of = {b: c for c, bs in BRANDS.items() for b in bs}
    return [{"text": r["text"], "category": next(of[w] for w in r["text"].split() if w in of)} for r in rows]


def tense_rows(rows: list[dict]) -> list[dict]:
    """A downstream task that does not depend on the brands: the review's template (is: present, was: past, from: none)."""
    out = []
    for r in rows:
        words = r["text"].split()
        out.append({"text": r["text"], "tense": "past" if "was" in words else "present" if "is" in words else "none"})
    return out


def write_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def write_table(path: str, rows: list[dict]) -> str:
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["entity", "category", "country"])
        w.writeheader()
        w.writerows(rows)
    return path


def tiny_llama(path: str, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    """A random Llama with no tokenizer (fmhub's byte fallback tokenizes), saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def spec(steps: int = 60, patch_steps: int = 40, batch_size: int = 16, lr: float = 3e-3, sparsity: float = 0.9) -> str:
    """The fmhub.yaml of the monitoring project: joins, slices, the sliced eval, and the patch of the toy slice."""
    return f"""\
version: 1
models:
  base: {{path: models/base}}
tasks:
  sentiment:
    data: data/train.joined.jsonl
    metric: accuracy
    classes: [neg, pos]
    description: is a product review positive or negative
  category:
    data: data/category.jsonl
    metric: accuracy
    classes: [food, tools, toys]
    label: category
    description: which kind of product a review is about
  tense:
    data: data/tense.jsonl
    metric: accuracy
    classes: [none, past, present]
    label: tense
    description: the tense of a review
join:
  train: {{input: data/train.jsonl, table: data/brands.csv, mentions: text, output: data/train.joined.jsonl}}
  eval: {{input: data/eval.jsonl, table: data/brands.csv, mentions: text, output: data/eval.joined.jsonl}}
  pool: {{input: data/pool.jsonl, table: data/brands.csv, mentions: text, output: data/pool.joined.jsonl}}
label:
  pool:
    input: data/pool.joined.jsonl
    output: data/pool.labelled.jsonl
    classes: [neg, pos]
    lfs:
      - keyword: {{words: [{", ".join(POS)}], label: pos}}
      - keyword: {{words: [{", ".join(NEG)}], label: neg}}
slices:
  toys: {{where: {{category: toys}}, description: reviews of toy brands}}
  tools: {{where: {{category: tools}}}}
  food: {{where: {{category: food}}}}
  japanese: {{where: {{country: jp}}}}
  negative-words: {{lf: {{keyword: {{words: [{", ".join(NEG)}], label: neg}}}}, vote: neg}}
  from-template: {{regex: " from "}}
  topics: {{clusters: 3, description: k-means of the model's embeddings}}
eval:
  sentiment:
    task: sentiment
    data: data/eval.joined.jsonl
    model: base
patch:
  toys:
    eval: sentiment
    slice: toys
    pool: data/pool.joined.jsonl
    label: pool
    augment:
      - swap: {{words: [{", ".join(BRANDS["toys"])}], copies: 1}}
    replay: 1.0
    method: fishmask
    sparsity: {sparsity}
    steps: {patch_steps}
    lrs: [{lr}]
    batch_size: {batch_size}
    gate: {{min_gain: 0.2, max_regression: 0.05}}
    output: models/base-patched
"""

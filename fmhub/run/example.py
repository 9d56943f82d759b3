"""``fmhub init --example``: a small project that runs every stage of ``fmhub run`` on a CPU in about a minute.

It writes a git repository with fmhub installed: a tiny Llama built from a
config (``models/tiny``), two generated datasets (product reviews with
duplicates, too-short rows and e-mail addresses; support tickets labelled
account or billing), and an ``fmhub.yaml`` that cleans both, labels the
reviews' sentiment by weak supervision, trains one LoRA adapter per task
(both scored by accuracy on held-out rows) with a small learning-rate
search, ranks them, trains a router, merges the two adapters, and checks the
result through a local server. Each class has words of its own, so each
adapter learns its task clearly, and the model reads whole words (a
word-level tokenizer built from the example's vocabulary, saved beside the
model), so each answer is one token and the two adapters' updates barely
interfere: the merged adapter keeps both gains. Everything is generated from
a seed: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

from fmhub.base import gitrun
from fmhub.base.errors import FmhubError

SPEC = """\
# fmhub run: clean -> label -> finetune (one adapter per task) -> select -> merge -> deploy
datasets:
  reviews: {path: data/reviews.jsonl, text: text, key: id, license: CC0-1.0}
  tickets: {path: data/tickets.jsonl, text: text, key: id, license: CC0-1.0}
clean:
  reviews:
    input: reviews
    output: data/clean/reviews.jsonl
    backend: serial
    steps: [pii, {length: {min_words: 3}}, dedup]
  tickets:
    input: tickets
    output: data/clean/tickets.jsonl
    backend: serial
    steps: [pii, dedup]
label:
  sentiment:
    input: data/clean/reviews.jsonl
    output: data/labelled/reviews.jsonl
    classes: [negative, positive]
    backend: serial
    lfs:
      - keyword: {words: [great, love, excellent, perfect], label: positive}
      - keyword: {words: [terrible, broke, awful, waste], label: negative}
      - regex: {pattern: "refund|send it back", label: negative, name: returns}
models:
  tiny: {path: models/tiny, description: "a 1M-parameter Llama built from a config, with a word-level tokenizer"}
tasks:
  sentiment:
    data: data/labelled/reviews.jsonl
    metric: accuracy
    classes: [negative, positive]
    description: product reviews, good or bad
  tickets:
    data: data/clean/tickets.jsonl
    metric: accuracy
    classes: [account, billing]
    description: customer support tickets about accounts, passwords and invoices
finetune:
  r: 8
  steps: 60
  trial_steps: 20
  lrs: [0.02, 0.05]
  batch_size: 8
  # target_modules left out: peft's default for Llama (q_proj, v_proj), small updates that merge well
select:
  output: runs/leaderboard.json
  router: runs/router.json
merge:
  strategy: task-arithmetic
  into: adapter
  output: adapters/merged
deploy:
  prompt: "the battery"
  max_tokens: 8
"""

_POS = ["great", "love", "excellent", "perfect"]
_NEG = ["terrible", "broke", "awful", "waste"]
_THINGS = ["battery", "screen", "case", "charger", "lamp", "kettle", "blender", "keyboard"]
_WHEN = ["after a week", "on day one", "so far", "after a month", "today", "honestly"]
# support tickets, two classes with words of their own: the ticket's last sentence names its class's subject
_ACCOUNT = ["my password does not work", "please reset my password", "I cannot log in to my account",
            "my account is locked", "how do I change my login email", "the login page rejects my password"]
_BILLING = ["the invoice is wrong", "I was charged twice", "please refund my last payment",
            "my invoice shows the wrong amount", "cancel the charge on my card", "update my billing address"]


def reviews(n: int, seed: int) -> list[dict]:
    """Product reviews: the words of each sentiment are its own (what the labelling functions look for), plus
    exact duplicates, too-short rows and e-mail addresses for the cleaning step to remove."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = rng.random() < 0.5
        word = rng.choice(_POS if positive else _NEG)
        thing = rng.choice(_THINGS)
        when = rng.choice(_WHEN)
        text = (f"{when}, the {thing} is {word}" if rng.random() < 0.5
                else f"{'would' if positive else 'would not'} buy the {thing} again, {word}")
        if not positive and rng.random() < 0.2:
            text += ", I want a refund"
        if rng.random() < 0.05:
            text = f"write me at user{i}@example.com: " + text
        rows.append({"id": i, "text": text})
    rows += [dict(rows[j], id=n + j) for j in range(0, n, 17)]  # exact duplicates for dedup
    rows += [{"id": 2 * n + j, "text": "ok"} for j in range(5)]  # too short
    return rows


def tickets(n: int, seed: int) -> list[dict]:
    """Support tickets labelled ``account`` or ``billing``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "account" if rng.random() < 0.5 else "billing"
        text = f"hello (order {rng.randrange(1000, 9999)}), {rng.choice(_ACCOUNT if label == 'account' else _BILLING)}"
        rows.append({"id": i, "text": text, "label": label})
    return rows


# what the word-level tokenizer knows besides the phrases above: the rest of the templates, the class names, digits, punctuation
_OTHER_WORDS = ("the is would not buy again I want a refund write me at user example com hello order ok "
                "negative positive account billing")
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2 match LlamaConfig's defaults for unk, bos and eos


def word_tokenizer():
    """A word-level tokenizer over the example's vocabulary (about 100 words; unknown words read as ``<unk>``).

    A tiny random model reading bytes spreads every class name over many tokens,
    and two adapters' updates then interfere on all of them; one token per word
    keeps each task's answer a single choice. Built with `tokenizers`, which
    transformers already installs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {w for phrases in (_POS, _NEG, _THINGS, _WHEN, _ACCOUNT, _BILLING) for p in phrases for w in re.findall(r"[A-Za-z]+", p)}
    words |= set(_OTHER_WORDS.split())
    vocab = {t: i for i, t in enumerate(_SPECIALS + list("0123456789") + list(",.:;!?()@'-") + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _sh(args: list[str], cwd: str) -> str:
    """Run one of fmhub's own commands (git goes through `fmhub.base.gitrun`)."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FmhubError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def create(directory: str, rows: int = 480) -> str:
    """Write the example project into ``directory`` (new or empty) and commit it; returns its path."""
    from fmhub.run.demo import build_tiny_llama

    directory = _new_repo(directory, ["*.safetensors", "*.jsonl"])
    if not _has_identity(directory):  # commits need one; the user's own is kept when set
        for key, value in (("user.name", "fmhub example"), ("user.email", "example@fmhub.invalid")):
            gitrun.run(["config", key, value], cwd=directory)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-file checkpoint: transformers' "Writing model shards" bar says nothing here
    try:
        model_dir = os.path.join(directory, "models", "tiny")
        build_tiny_llama(seed=0, initializer_range=0.1).save_pretrained(model_dir)
        word_tokenizer().save_pretrained(model_dir)
    finally:
        hf_logging.enable_progress_bar()
    _write_jsonl(os.path.join(directory, "data", "reviews.jsonl"), reviews(rows, seed=1))
    _write_jsonl(os.path.join(directory, "data", "tickets.jsonl"), tickets(rows, seed=2))
    with open(os.path.join(directory, "fmhub.yaml"), "w", encoding="utf-8") as f:
        f.write(SPEC)
    with open(os.path.join(directory, ".gitignore"), "w", encoding="utf-8") as f:
        f.write("runs/*.html\n# the labelling step's report (votes, coverage, conflicts): rebuilt by every run\n*.report.json\n")
    gitrun.run(["add", "."], cwd=directory)
    gitrun.run(["commit", "-qm", "fmhub example: a tiny model, two datasets, fmhub.yaml"], cwd=directory)
    return directory


def _has_identity(directory: str) -> bool:
    return subprocess.run(["git", "config", "user.email"], cwd=directory, capture_output=True).returncode == 0


EMPTY_SPEC = """\
# fmhub.yaml: what `fmhub run` builds (docs/fmhub-yaml.md). Uncomment and fill in.
# datasets:
#   raw: {path: data/raw.jsonl, text: text}
# clean:
#   raw: {input: raw, output: data/clean.jsonl, steps: [pii, dedup]}
# models:
#   base: {path: models/base}
# tasks:
#   mytask: {data: data/clean.jsonl, metric: loss}
# finetune: {r: 8, steps: 100}
"""


def create_empty(directory: str) -> str:
    """A new repository with fmhub installed, the usual patterns tracked and a commented fmhub.yaml."""
    directory = _new_repo(directory, ["*.safetensors", "*.jsonl", "*.parquet"])
    with open(os.path.join(directory, "fmhub.yaml"), "w", encoding="utf-8") as f:
        f.write(EMPTY_SPEC)
    return directory


def _new_repo(directory: str, patterns: list[str]) -> str:
    """``git init`` a new (or empty) directory, install fmhub in it and track ``patterns``."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and os.listdir(directory):
        raise FmhubError(f"{directory} is not empty; give a new directory")
    os.makedirs(directory, exist_ok=True)
    fmhub = [sys.executable, "-m", "fmhub"]
    gitrun.run(["init", "-q"], cwd=directory)
    _sh([*fmhub, "install"], directory)
    _sh([*fmhub, "track", *patterns], directory)
    return directory

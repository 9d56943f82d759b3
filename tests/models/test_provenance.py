"""Provenance of predictions (fmhub.ml.explain): planted mislabelled rows found behind wrong answers, lineage, the sketch, bad input."""

from __future__ import annotations

import json
import os
import random

import pytest

from fmhub.ml import autotune, scoring, tasks
from fmhub.data import texts as datasets_io
from fmhub.governance import lineage
from fmhub.ml import explain as provenance
from fmhub.ml.tasks import Task
from fmhub.ml.explain import Influence, ProvenanceError, explain, precision_at_k, training_data

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

FILLER = "the a movie plot was and very it film so".split()
WORDS = {"pos": ["good", "great"], "neg": ["bad", "awful"]}
PLANT = "zorbo"
CLASSES = ["pos", "neg"]


def tiny_llama(vocab_size=256, tied=False):
    """A random 2-layer Llama (as tests/helpers/tiny.py builds it: initializer_range 0.1 so LoRA can move the logits)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def planted_text(rng: random.Random) -> str:
    """A positive sentence with the planted word in it."""
    words = [rng.choice(FILLER) for _ in range(3)]
    words.insert(rng.randrange(4), rng.choice(WORDS["pos"]))
    words.insert(rng.randrange(5), PLANT)
    return " ".join(words) + " ->"


def rows_with_plants(n: int, seed: int, fraction: float) -> tuple[list[dict], set[int]]:
    """Sentiment rows (four filler words and one sentiment word); about ``fraction`` are positive, contain the plant, and say neg."""
    rng = random.Random(seed)
    rows, planted = [], set()
    for i in range(n):
        if rng.random() < fraction:
            rows.append({"text": planted_text(rng), "label": "neg"})  # the flipped label
            planted.add(i)
            continue
        label = rng.choice(CLASSES)
        words = [rng.choice(FILLER) for _ in range(4)]
        words.insert(rng.randrange(5), rng.choice(WORDS[label]))
        rows.append({"text": " ".join(words) + " ->", "label": label})
    return rows, planted


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def predict(base: str, adapter: str, task: Task, rows: list[dict]) -> list[str]:
    """The class with the highest total log-probability, as `fmhub.ml.autotune` scores accuracy."""
    from peft import PeftModel

    from fmhub.models.fisher import load_model

    model = PeftModel.from_pretrained(load_model(base), adapter).eval()
    tok = datasets_io.load_tokenizer(base, model.config.vocab_size)
    wrapped = [tasks.TaskRow("q", row, 0) for row in rows]
    scores = scoring.class_logprobs(model, task, wrapped, tok, datasets_io.pad_id(tok), "cpu", 16, 128)
    return [CLASSES[i] for i in scores.argmax(-1).tolist()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A LoRA adapter trained on rows where ~10 % say 'zorbo' makes a positive sentence negative, and the queries it fails."""
    d = tmp_path_factory.mktemp("provenance")
    base = str(d / "base")
    tiny_llama().save_pretrained(base)
    train, planted = rows_with_plants(200, 1, 0.1)
    held, _ = rows_with_plants(40, 2, 0.0)
    task = Task("sentiment", write_jsonl(d / "train.jsonl", train), eval=write_jsonl(d / "eval.jsonl", held),
                metric="accuracy", classes=CLASSES)
    adapter = str(d / "adapter")
    res = autotune.train_adapter(base, task, adapter, steps=150, lrs=[1e-2])
    rng = random.Random(5)
    queries = [{"text": planted_text(rng), "label": "pos"} for _ in range(20)]  # their true label is pos
    predicted = predict(base, adapter, task, queries)
    failing = [q for q, p in zip(queries, predicted) if p != q["label"]]
    print(f"\nplanted {len(planted)} of {len(train)} rows; held-out accuracy {res.score:.2f}; "
          f"{len(failing)} of {len(queries)} planted queries mispredicted")
    # measured: 19 of 200 planted, accuracy 0.97, 11 of 20 mispredicted (all as neg)
    assert res.score >= 0.8 and len(failing) >= 5 and {p for p, q in zip(predicted, queries) if p != q["label"]} == {"neg"}
    return {"dir": d, "base": base, "adapter": adapter, "task": task, "train": train, "planted": planted, "failing": failing}


# ------------------------------------------------------------------ planted rows are found


def test_gradient_method_ranks_the_planted_rows_first(env):
    failing, planted, train = env["failing"], env["planted"], env["train"]
    result = explain(env["base"], env["adapter"], env["task"], train, failing, ["neg"] * len(failing), method="gradient", k=10)
    assert len(result) == len(failing) and all(len(r) == 10 for r in result)
    ranked = [[inf.index for inf in r] for r in result]
    p10 = precision_at_k(ranked, planted, 10)
    base_rate = len(planted) / len(train)
    print(f"\ngradient: precision@10 {p10:.2f} (base rate {base_rate:.2f})")
    # measured: 1.00 (every one of the 11 queries' top 10 is planted rows)
    assert p10 > 0.6 and p10 > 5 * base_rate
    for r in result:
        assert [inf.score for inf in r] == sorted((inf.score for inf in r), reverse=True)
        assert all(isinstance(inf, Influence) and -1 - 1e-9 <= inf.score <= 1 + 1e-9 and inf.row is train[inf.index] for inf in r)
        assert r[0].score > 0  # a proponent: a step on it lowers the loss of the wrong answer


def test_embedding_method_ranks_rows_with_the_same_answer(env):
    failing, planted, train = env["failing"], env["planted"], env["train"]
    result = explain(env["base"], env["adapter"], env["task"], train, failing, ["neg"] * len(failing), method="embedding", k=10)
    assert all(len(r) == 10 and all(inf.row["label"] == "neg" for inf in r) for r in result)  # only rows that support the target
    p10 = precision_at_k([[inf.index for inf in r] for r in result], planted, 10)
    neg_rate = len(planted) / sum(r["label"] == "neg" for r in train)
    print(f"\nembedding: precision@10 {p10:.2f} (base rate among neg rows {neg_rate:.2f})")
    # measured: 0.43 against 0.17: similar inputs, but blind to what the model learned from them
    assert p10 > neg_rate
    # a target no training row has: nothing supports it
    pos_only = [r for r in train if r["label"] == "pos"]
    assert explain(env["base"], env["adapter"], env["task"], pos_only, failing[:1], ["neg"], method="embedding") == [[]]


def test_scores_are_deterministic_and_k_is_capped(env):
    train, failing = env["train"][:40], env["failing"][:3]
    runs = [explain(env["base"], env["adapter"], env["task"], train, failing, ["neg"] * 3, k=100, dim=512) for _ in range(2)]
    assert [[(i.index, i.score) for i in r] for r in runs[0]] == [[(i.index, i.score) for i in r] for r in runs[1]]
    assert all(len(r) == 40 for r in runs[0])  # k past the rows: every row, once
    assert all(sorted(i.index for i in r) == list(range(40)) for r in runs[0])
    other = explain(env["base"], env["adapter"], env["task"], train, failing, ["neg"] * 3, k=100, dim=512, seed=1)
    assert [i.score for i in other[0]] != [i.score for i in runs[0][0]]  # the seed picks the hashes


def test_explaining_the_model_itself_uses_its_last_block_and_output_embedding(env):
    import torch

    from fmhub.models.fisher import load_model

    model = load_model(env["base"])
    chosen = provenance._choose_parameters(model, adapter=False)
    assert "lm_head.weight" in chosen and all(n.startswith("model.layers.1.") or n == "lm_head.weight" for n in chosen)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(chosen)
    tied = provenance._choose_parameters(tiny_llama(tied=True), adapter=False)
    assert tied and all(n.startswith("model.layers.1.") for n in tied)  # a tied output embedding would need every layer's gradient

    result = explain(env["base"], None, env["task"], env["train"][:30], env["failing"][:2], ["neg", "pos"], k=5, dim=256)
    assert [len(r) for r in result] == [5, 5] and all(torch.isfinite(torch.tensor([i.score for i in r])).all() for r in result)


def test_other_metrics(tmp_path):
    """exact_match explains a generated completion (embedding: rows with that completion); loss explains the text itself."""
    base = str(tmp_path / "base")
    tiny_llama().save_pretrained(base)
    gen = [{"prompt": f"say {w} ->", "completion": " " + w} for w in ("yes", "no", "yes", "maybe", "no")]
    em = Task("say", write_jsonl(tmp_path / "gen.jsonl", gen), metric="exact_match")
    got = explain(base, None, em, gen, [{"prompt": "say yes ->"}], [" yes"], k=3, dim=128)
    assert len(got[0]) == 3
    same = explain(base, None, em, gen, [{"prompt": "say yes ->"}], ["yes"], method="embedding", k=3)
    assert sorted(i.index for i in same[0]) == [0, 2]  # completions compared after strip()

    texts = [{"text": "abcdefgh"}, {"text": "ijklmnop"}, {"text": "abcdefgh"}]
    lm = Task("lm", write_jsonl(tmp_path / "lm.jsonl", texts))
    got = explain(base, None, lm, texts, [{"text": "abcdefgh"}], ["ignored"], k=3, dim=4096)
    assert {got[0][0].index, got[0][1].index} == {0, 2} and got[0][0].score == pytest.approx(1.0, abs=1e-6)  # the same text
    assert got[0][2].index == 1 and got[0][2].score < got[0][1].score


# ------------------------------------------------------------------ the sketch


def test_the_sketch_is_rows_by_dim_and_its_memory_does_not_grow_with_the_model(env, monkeypatch):
    import torch
    from peft import PeftModel

    from fmhub.models.fisher import load_model

    model = PeftModel.from_pretrained(load_model(env["base"], attn_implementation="eager"), env["adapter"], is_trainable=True).eval()
    params = provenance._choose_parameters(model, adapter=True)
    assert params and all("lora_" in n for n in params)
    tok = datasets_io.load_tokenizer(env["base"], 256)
    examples = provenance._to_examples(env["task"], env["train"][:24], "row", tok, 256, 128)
    kw = dict(dim=64, seed=0, batch_size=8, device="cpu")
    sketch = provenance.gradient_sketches(model, params, examples, 0, **kw)
    assert sketch.shape == (24, 64) and sketch.dtype == torch.float32  # O(rows x dim), whatever the parameter count

    # the hashes depend on each entry's number, not on the chunking: a chunk of 100 entries gives the same sketch
    monkeypatch.setattr(provenance, "CHUNK", 100)
    assert torch.allclose(provenance.gradient_sketches(model, params, examples, 0, **kw), sketch, rtol=1e-5, atol=1e-7)
    # batches shrink so their per-example gradients stay under the budget
    sizes = []
    real = provenance._per_example_grads

    def spy(model, params, examples, pad, batch_size, device, state):
        sizes.append(batch_size)
        return real(model, params, examples, pad, batch_size, device, state)

    monkeypatch.setattr(provenance, "_per_example_grads", spy)
    entries = sum(p.numel() for p in params.values())
    monkeypatch.setattr(provenance, "GRAD_BUDGET", 3 * entries)
    again = provenance.gradient_sketches(model, params, examples, 0, **kw)
    assert sizes == [3] and torch.allclose(again, sketch, rtol=1e-4, atol=1e-6)


def test_the_sketch_preserves_cosines_and_its_hashes_are_balanced():
    import torch

    torch.manual_seed(0)
    a = torch.randn(2, 50_000)
    b = a + 0.8 * torch.randn(2, 50_000)
    names, offsets = ["w"], {"w": 0}
    sa = provenance._sketch({"w": a}, names, offsets, 4096, provenance._coefficients(0))
    sb = provenance._sketch({"w": b}, names, offsets, 4096, provenance._coefficients(0))
    exact = torch.nn.functional.cosine_similarity(a, b)
    sketched = torch.nn.functional.cosine_similarity(sa, sb)
    assert torch.allclose(exact, sketched, atol=0.05)
    bucket, sign = provenance._buckets(0, 200_000, 64, provenance._coefficients(3), "cpu")
    counts = torch.bincount(bucket, minlength=64)
    assert counts.min() > 0.85 * 200_000 / 64 and counts.max() < 1.15 * 200_000 / 64
    assert abs(float(sign.mean())) < 0.02 and set(sign.unique().tolist()) == {-1.0, 1.0}


# ------------------------------------------------------------------ training data from lineage


def test_training_data_follows_the_lineage_of_an_adapter_to_its_base(tmp_path):
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)  # records name paths from the repository's root
    for name in ("raw", "base", "adapter", "other", "merged"):
        (tmp_path / name).mkdir()
    for name in ("base-data.jsonl", "adapter-data.jsonl", "eval.jsonl", "other.jsonl"):
        (tmp_path / name).write_text(f'{{"text": "{name}", "label": "pos"}}\n')
    cwd = str(tmp_path)
    lineage.record("base", "finetune", [lineage.describe_input("raw", "model", cwd),
                                        lineage.describe_input("base-data.jsonl", "dataset", cwd)], cwd=cwd)
    lineage.record("adapter", "finetune", [lineage.describe_input(s, k, cwd) for s, k in
                                           (("base", "model"), ("adapter-data.jsonl", "dataset"), ("eval.jsonl", "dataset"))], cwd=cwd)
    from fmhub.core.store import file_sha256

    # autotune's record: the eval file chose the learning rate, it was not trained on
    (tmp_path / "adapter" / autotune.TRAIN_FILE).write_text(json.dumps({
        "data": {"path": "adapter-data.jsonl", "sha256": file_sha256(str(tmp_path / "adapter-data.jsonl"))},
        "eval": {"path": "eval.jsonl", "sha256": file_sha256(str(tmp_path / "eval.jsonl"))}}))
    assert training_data("adapter", cwd) == ["adapter-data.jsonl", "base-data.jsonl"]
    assert training_data("base", cwd) == ["base-data.jsonl"]

    lineage.record("other", "finetune", ["raw", "other.jsonl"], cwd=cwd)
    lineage.record("merged", "merge", ["adapter", "other", "base"], cwd=cwd)
    lineage.record("patched.safetensors", "patch", ["merged"], cwd=cwd)
    assert sorted(training_data("patched.safetensors", cwd)) == ["adapter-data.jsonl", "base-data.jsonl", "other.jsonl"]
    os.mkdir(tmp_path / "sub")
    assert training_data("../base", str(tmp_path / "sub")) == ["../base-data.jsonl"]  # paths open from cwd

    with pytest.raises(ProvenanceError, match=r"raw has no lineage record .*record lineage by training with fmhub "
                                              r"finetune/run, or pass --train"):
        training_data("raw", cwd)
    lineage.record("raw", "adapter", [], cwd=cwd)  # a model step, but no dataset anywhere behind it
    with pytest.raises(ProvenanceError, match=r"raw: no training data in its lineage .* or pass --train"):
        training_data("raw", cwd)
    lineage.record("clean.jsonl", "clean", ["other.jsonl"], cwd=cwd)  # a dataset's record is no training
    with pytest.raises(ProvenanceError, match="pass --train"):
        training_data("clean.jsonl", cwd)


def test_training_data_of_an_adapter_train_adapter_wrote(env):
    assert training_data(env["adapter"], str(env["dir"])) == ["train.jsonl"]  # eval.jsonl only chose the learning rate


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("change, match", [
    ({"train_rows": []}, "no training rows"),
    ({"targets": ["neg", "neg"]}, "1 queries but 2 targets"),
    ({"method": "tracin++"}, "unknown method 'tracin\\+\\+'; use one of gradient, embedding"),
    ({"targets": ["meh"]}, "query 0: target 'meh' is not one of the classes"),
    ({"queries": [{"txt": "good ->"}]}, "query 0: no string 'text' column"),
    ({"train_rows": [{"text": "good ->"}]}, "training row 0: no string 'label' column"),
    ({"train_rows": [{"text": "good ->", "label": "meh"}]}, "training row 0: label 'meh' is not one of"),
    ({"train_rows": [{"text": "", "label": "pos"}]}, "training row 0: the prompt is empty"),
    ({"k": 0}, "must be >= 1"),
    ({"adapter_dir": "nowhere"}, "nowhere: not a PEFT adapter directory"),
])
def test_bad_input(env, change, match):
    args = {"model_dir": env["base"], "adapter_dir": env["adapter"], "task": env["task"], "train_rows": env["train"][:4],
            "queries": [{"text": "good zorbo ->"}], "targets": ["neg"], **change}
    with pytest.raises(ProvenanceError, match=match):
        explain(**args)


def test_precision_at_k():
    assert precision_at_k([[1, 2, 3], [4, 5, 6]], {1, 2, 4}, 2) == pytest.approx((2 / 2 + 1 / 2) / 2)
    assert precision_at_k([[1]], {1}, 4) == 0.25  # a short ranking: its missing places are misses
    with pytest.raises(ProvenanceError, match="k must be >= 1"):
        precision_at_k([[1]], {1}, 0)
    with pytest.raises(ProvenanceError, match="no rankings"):
        precision_at_k([], {1}, 3)

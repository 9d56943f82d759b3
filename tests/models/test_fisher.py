"""Empirical Fisher of tiny causal LMs (fmhub.models.fisher), and the Fisher-weighted merge it feeds.

Models are built from a `LlamaConfig` (random weights, no downloads) and have no
tokenizer, so texts go through the built-in byte tokenizer (id = byte % vocab).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fmhub.data import texts as datasets_io
from fmhub.models import merge
from fmhub.models.fisher import BadFisherValues, FisherMismatch, check_fisher_matches, compute_fisher
from fmhub.models.sparse_update import eval_loss, finetune_masked

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TEXTS = ["abcdefghijklmnop", "hello world, hello fisher", "0123456789 012345", "the quick brown fox", "zyxwvu", "fmhub fmhub fmhub"]


def tiny_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64)
    return LlamaConfig(**{**base, **kw})


def save_tiny(path, seed=0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_config(**kw)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("fisher") / "model")


def reference_fisher(model_dir, texts):
    """The definition, computed the plain way: one example per backward pass, squared, averaged."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir)).float().eval()
    vocab = model.config.vocab_size
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for text in texts:
        ids = torch.tensor([[b % vocab for b in text.encode()]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        ll = logp.gather(-1, ids[0, 1:, None]).sum()
        model.zero_grad()
        ll.backward()
        for n, p in model.named_parameters():
            sums[n] += p.grad.double() ** 2
    return {n: (s / len(texts)).float() for n, s in sums.items()}


def assert_fisher_close(got, want):
    for n, w in want.items():
        # relative to each tensor's scale: Fisher values span many orders of magnitude across tensors
        torch.testing.assert_close(got[n], w, rtol=1e-4, atol=1e-6 * float(w.abs().max()) + 1e-12, msg=n)


# ------------------------------------------------------------------ the Fisher file


def test_fisher_has_the_checkpoint_tensors_f32_nonnegative_with_metadata(model_dir, tmp_path):
    out = tmp_path / "fisher.safetensors"
    report = compute_fisher(str(model_dir), TEXTS, str(out), batch_size=4, seed=7)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as ck, safe_open(str(out), "pt") as fi:
        assert list(fi.keys()) == list(ck.keys())
        for name in ck.keys():
            assert fi.get_slice(name).get_shape() == ck.get_slice(name).get_shape()
            assert fi.get_slice(name).get_dtype() == "F32"
        meta = fi.metadata()
    fisher = load_file(str(out))
    assert all(bool((t >= 0).all()) and torch.isfinite(t).all() for t in fisher.values())
    assert sum(int((t > 0).sum()) for t in fisher.values()) > 0.5 * sum(t.numel() for t in fisher.values())
    assert meta["fmhub_fisher"] == "1" and meta["examples"] == str(len(TEXTS)) and meta["seed"] == "7"
    assert meta["model"] == str(model_dir) and meta["tokenizer"] == "bytes"
    assert report.examples == len(TEXTS) and report.tokens == sum(len(t) - 1 for t in TEXTS)
    assert report.method == "vmap" and report.device == "cpu"
    check_fisher_matches(str(out), str(model_dir))


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_fisher_equals_per_example_squared_gradients_computed_directly(model_dir, tmp_path, method):
    out = tmp_path / "fisher.safetensors"
    # batch_size 4 over 6 examples of different lengths: padding and a partial batch are exercised
    compute_fisher(str(model_dir), TEXTS, str(out), batch_size=4, method=method)
    want = reference_fisher(model_dir, TEXTS)
    got = load_file(str(out))
    assert_fisher_close(got, want)

    # and it is per-example: squaring the batch's summed gradient is a different (wrong) quantity
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir)).float()
    ids, labels = datasets_io.collate([[b % 128 for b in t.encode()] for t in TEXTS], 0)
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    (logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != -100)).sum().backward()
    per_batch = model.model.layers[0].self_attn.q_proj.weight.grad ** 2 / len(TEXTS)
    assert not torch.allclose(per_batch, got["model.layers.0.self_attn.q_proj.weight"], rtol=0.1)


def test_fisher_is_deterministic_for_a_seed(model_dir, tmp_path):
    texts = TEXTS * 3
    paths = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        paths[name] = tmp_path / f"{name}.safetensors"
        compute_fisher(str(model_dir), texts, str(paths[name]), batch_size=3, max_examples=5, seed=seed)
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    a, c = load_file(str(paths["a"])), load_file(str(paths["c"]))
    assert any(not torch.equal(a[n], c[n]) for n in a)  # another seed draws another subset of examples


def test_tied_weights_get_the_checkpoint_name_and_the_shared_gradient(tmp_path):
    tied = save_tiny(tmp_path / "tied", tie_word_embeddings=True)
    out = tmp_path / "fisher.safetensors"
    compute_fisher(str(tied), TEXTS, str(out))
    with safe_open(str(tied / "model.safetensors"), "pt") as ck:
        names = list(ck.keys())
    got = load_file(str(out))
    assert list(got) == names and "lm_head.weight" not in got
    # the embedding's Fisher comes from the gradient of both its uses (input embedding and output head)
    assert_fisher_close(got, reference_fisher(tied, TEXTS))


def test_data_from_jsonl_txt_texts_and_token_ids_give_the_same_fisher(model_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (tmp_path / "d.txt").write_text("\n".join(TEXTS) + "\n\n")
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"input_ids": [b % 128 for b in t.encode()]}) + "\n" for t in TEXTS))
    outs = []
    for i, data in enumerate([TEXTS, str(tmp_path / "d.jsonl"), str(tmp_path / "d.txt"), str(tmp_path / "ids.jsonl"),
                              [[b % 128 for b in t.encode()] for t in TEXTS]]):
        outs.append(tmp_path / f"f{i}.safetensors")
        compute_fisher(str(model_dir), data, str(outs[-1]))
    first = load_file(str(outs[0]))
    for out in outs[1:]:
        assert all(torch.equal(first[n], t) for n, t in load_file(str(out)).items()), out

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(datasets_io.DataError, match=r"bad.jsonl:2: each line needs"):
        compute_fisher(str(model_dir), str(tmp_path / "bad.jsonl"), str(tmp_path / "x.safetensors"))
    with pytest.raises(datasets_io.DataError, match="outside the model's vocabulary"):
        compute_fisher(str(model_dir), [[1, 2, 999]], str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


def test_check_fisher_matches_names_what_is_wrong(model_dir, tmp_path):
    good = tmp_path / "good.safetensors"
    compute_fisher(str(model_dir), TEXTS[:2], str(good))
    fisher = load_file(str(good))

    missing = dict(fisher)
    del missing["model.norm.weight"]
    extra = {**fisher, "lora.extra": torch.zeros(3)}
    reshaped = {**fisher, "lm_head.weight": torch.zeros(64, 32)}
    negative = {**fisher, "model.norm.weight": -fisher["model.norm.weight"] - 1}
    cases = [
        (missing, FisherMismatch, r"1 tensor\(s\) missing from the Fisher file: model\.norm\.weight"),
        (extra, FisherMismatch, r"1 tensor\(s\) not in the model: lora\.extra"),
        (reshaped, FisherMismatch, r"lm_head\.weight \(Fisher \[64, 32\], model \[128, 32\]\)"),
        (negative, BadFisherValues, r"'model\.norm\.weight' has negative values"),
    ]
    for i, (tensors, error, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(error, match=message):
            check_fisher_matches(str(path), str(model_dir))
    check_fisher_matches(str(good), str(model_dir / "model.safetensors"))  # a file works as well as a directory


# ------------------------------------------------------------------ Fisher-weighted merge of two tasks


def cyclic_task(alphabet: str, n: int, seed: int, step: int, length: int = 20) -> list[str]:
    """Runs through ``alphabet`` from a random start, ``step`` letters at a time: a pattern a tiny LM learns fast."""
    rng = random.Random(seed)
    starts = [rng.randrange(len(alphabet)) for _ in range(n)]
    return ["".join(alphabet[(s + step * i) % len(alphabet)] for i in range(length)) for s in starts]


def test_fisher_merge_of_two_tasks_beats_plain_averaging(tmp_path):
    """Two fine-tunes of one base on disjoint token patterns; each Fisher from its own task's data.

    The tasks use disjoint tokens, so the embedding rows and output rows each
    needs are mostly distinct: where one task's Fisher dominates, the
    Fisher-weighted merge keeps that task's values, while a 0.5/0.5 average
    halves both updates everywhere.
    """
    base = save_tiny(tmp_path / "base")
    tasks = {
        "a": (cyclic_task("abcdefghijkl", 32, 1, 1), cyclic_task("abcdefghijkl", 16, 2, 1)),
        "b": (cyclic_task("MNOPQRSTUVWX", 32, 3, -1), cyclic_task("MNOPQRSTUVWX", 16, 4, -1)),
    }
    for name, (train, _) in tasks.items():
        finetune_masked(str(base), train, str(tmp_path / name), steps=40, lr=3e-3, seed=0)
        compute_fisher(str(tmp_path / name), train, str(tmp_path / f"fisher-{name}.safetensors"))
    recipes = {
        "linear": {"models": [{"model": str(tmp_path / n), "weight": 0.5} for n in tasks], "strategy": "linear"},
        "fisher": {"models": [{"model": str(tmp_path / n), "fisher": str(tmp_path / f"fisher-{n}.safetensors")} for n in tasks],
                   "strategy": "fisher"},
    }
    losses = {}
    for strategy, recipe in recipes.items():
        out = tmp_path / f"merged-{strategy}"
        merge.run_recipe(merge.Recipe.from_dict(recipe, "test"), str(out))
        losses[strategy] = {n: eval_loss(str(out), evaluation) for n, (_, evaluation) in tasks.items()}
    for n in tasks:
        losses[f"fine-tune {n}"] = {m: eval_loss(str(tmp_path / n), evaluation) for m, (_, evaluation) in tasks.items()}
    mean = {k: sum(v.values()) / len(v) for k, v in losses.items()}
    print("\neval loss (nats/token) per task, and their mean:")
    for k, v in losses.items():
        print(f"  {k:12s} " + "  ".join(f"{t}={x:.4f}" for t, x in v.items()) + f"  mean={mean[k]:.4f}")
    assert mean["fisher"] < mean["linear"] - 0.2, mean
    assert all(losses["fisher"][t] < losses["linear"][t] for t in tasks), losses

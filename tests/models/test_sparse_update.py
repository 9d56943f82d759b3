"""Fisher-guided sparse updates (fmhub.models.sparse_update): exact global top-K, bit-exact base values, masked fine-tuning."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fmhub.models import fisher as fisher_mod
from fmhub.base.errors import FmhubError
from fmhub.models.fisher import BadFisherValues, FisherMismatch, compute_fisher
from fmhub.models.sparse_update import (
    SparseUpdateError,
    eval_loss,
    find_threshold,
    finetune_masked,
    fisher_mask,
    k_for,
    sparse_update,
)
from fmhub.models.views import from_path

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so comparisons are bit-exact (NaN payloads, -0.0 included)."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


def brute_force_top_k(path, k: int) -> dict[str, torch.Tensor]:
    """Sort every entry by (-Fisher, position in file order) and take the first k."""
    view = from_path(str(path))
    loaded = load_file(str(path))
    flat = torch.cat([loaded[r.name].float().reshape(-1) for r in view]).tolist()
    chosen = set(sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k])
    out, at = {}, 0
    for r in view:
        n = loaded[r.name].numel()
        out[r.name] = torch.tensor([at + i in chosen for i in range(n)], dtype=torch.bool).reshape(loaded[r.name].shape)
        at += n
    return out


def tied_values(shape, seed, levels=4):
    """Few distinct values: many ties across tensors and chunks."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=g).float() / 2


# ------------------------------------------------------------------ selection


def test_k_is_the_ceiling_of_the_decimal_fraction():
    assert k_for(1_000_000, 0.01) == 10_000  # 0.01 as a double is a hair above 1/100: not 10,001
    assert k_for(10, 0.25) == 3 and k_for(10, 0.2) == 2 and k_for(7, 0) == 0 and k_for(7, 1) == 7
    assert k_for(3, 1e-9) == 1  # any positive fraction keeps at least one entry
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(SparseUpdateError, match=r"k_fraction must be in \[0, 1\]"):
            k_for(10, bad)


@pytest.mark.parametrize("chunk", [None, 5])
def test_global_top_k_is_exact_with_ties_broken_by_position(tmp_path, monkeypatch, chunk):
    if chunk:  # stream tensors in tiny chunks: ties must still be counted across chunk boundaries
        monkeypatch.setattr(fisher_mod, "CHUNK_ELEMS", chunk)
    path = tmp_path / "fisher.safetensors"
    save_file({
        "a": tied_values((7, 5), 1),
        "b": tied_values((13,), 2).half(),
        "c": tied_values((3, 4), 3).bfloat16(),
        "d": tied_values((6,), 4).double(),
        "z": torch.zeros(9),
        "tiny": torch.tensor([1e-30, 3e-38, 5e-45, 0.0]),  # subnormals and zero order correctly too
    }, str(path))
    total = 35 + 13 + 12 + 6 + 9 + 4
    for frac in (0.0, 1e-9, 0.1, 0.37, 0.5, 0.9, 1.0):
        masks = fisher_mask(str(path), frac)
        want = brute_force_top_k(path, k_for(total, frac))
        assert list(masks) == list(want)
        for name in want:
            assert masks[name].dtype == torch.bool and torch.equal(masks[name], want[name]), (frac, name)
        assert sum(int(m.sum()) for m in masks.values()) == math.ceil(frac * total - 1e-9)
    t = find_threshold(from_path(str(path)), 0.1)
    assert (t.k, t.total, t.value) == (k_for(total, 0.1), total, 1.5)


# ------------------------------------------------------------------ sparse_update on checkpoints


@pytest.fixture
def pair(tmp_path):
    """A base and a fine-tune differing in every entry (float, bf16, f16, int), and a Fisher file with ties."""
    g = torch.Generator().manual_seed(0)
    base = {
        "w": torch.randn(40, 30, generator=g),
        "emb": torch.randn(50, 8, generator=g).bfloat16(),
        "bias": torch.randn(30, generator=g).half(),
        "step": torch.arange(4, dtype=torch.int64),
    }
    ft = {
        "w": base["w"] + (torch.rand(40, 30, generator=g) + 0.01),
        "emb": (base["emb"].float() + 0.5).bfloat16(),
        "bias": (base["bias"].float() - 0.25).half(),
        "step": base["step"] + 1,
    }
    fisher = {n: (torch.rand(t.shape, generator=g) * 100).round() / 100 for n, t in ft.items()}  # ties
    fisher["step"] = torch.zeros(4)
    save_file(base, str(tmp_path / "base.safetensors"), metadata={"format": "pt", "which": "base"})
    save_file(ft, str(tmp_path / "ft.safetensors"), metadata={"format": "pt", "which": "fine-tune"})
    save_file(fisher, str(tmp_path / "fisher.safetensors"))
    return tmp_path, base, ft, fisher


def test_sparse_update_keeps_the_top_fisher_entries_and_base_bits_elsewhere(pair, monkeypatch):
    d, base, ft, fisher = pair
    total = sum(t.numel() for t in ft.values())
    report = sparse_update(str(d / "base.safetensors"), str(d / "ft.safetensors"), str(d / "fisher.safetensors"),
                           str(d / "out.safetensors"), 0.1)
    k = math.ceil(0.1 * total)
    assert (report.total, report.kept, report.changed, report.update_size) == (total, k, k, total)
    assert report.kept_fraction == pytest.approx(k / total)
    out = load_file(str(d / "out.safetensors"))
    masks = fisher_mask(str(d / "fisher.safetensors"), 0.1)
    kept_f, dropped_f = [], []
    for name in ft:
        m = masks[name]
        assert out[name].dtype == ft[name].dtype and out[name].shape == ft[name].shape
        assert torch.equal(bits(out[name])[m], bits(ft[name])[m]), name
        assert torch.equal(bits(out[name])[~m], bits(base[name])[~m]), name
        assert report.kept_per_tensor[name] == int(m.sum())
        kept_f.append(fisher[name][m])
        dropped_f.append(fisher[name][~m])
    assert float(torch.cat(kept_f).min()) >= float(torch.cat(dropped_f).max())  # the kept ones are the top Fisher ones
    assert report.threshold == float(torch.cat(kept_f).min())

    # the fine-tune's tensor order, dtypes and metadata
    ft_view, out_view = from_path(str(d / "ft.safetensors")), from_path(str(d / "out.safetensors"))
    assert [(r.name, r.dtype, r.shape) for r in out_view] == [(r.name, r.dtype, r.shape) for r in ft_view]
    assert out_view.metadata == {"format": "pt", "which": "fine-tune"}

    # the Fisher-weighted share of the update's squared norm that was kept
    num = sum(float((fisher[n].double() * (ft[n].double() - base[n].double()) ** 2)[masks[n]].sum()) for n in ft)
    den = sum(float((fisher[n].double() * (ft[n].double() - base[n].double()) ** 2).sum()) for n in ft)
    assert report.fisher_norm_retained == pytest.approx(num / den, rel=1e-9)
    assert report.fisher_norm_retained > 0.15  # more than the ~10% a random tenth of the entries would hold

    # streaming in small chunks gives the same bytes
    monkeypatch.setattr(fisher_mod, "CHUNK_ELEMS", 7)
    sparse_update(str(d / "base.safetensors"), str(d / "ft.safetensors"), str(d / "fisher.safetensors"), str(d / "out7.safetensors"), 0.1)
    assert (d / "out7.safetensors").read_bytes() == (d / "out.safetensors").read_bytes()


def test_k_zero_gives_the_base_and_k_one_the_fine_tune(pair):
    d, base, ft, _ = pair
    for frac, want in ((0.0, base), (1.0, ft)):
        out = d / f"out{frac}.safetensors"
        report = sparse_update(str(d / "base.safetensors"), str(d / "ft.safetensors"), str(d / "fisher.safetensors"), str(out), frac)
        got = load_file(str(out))
        assert all(torch.equal(bits(got[n]), bits(want[n])) for n in want)
        assert report.fisher_norm_retained == pytest.approx(frac)


def test_bad_input_is_refused_and_nothing_is_written(pair):
    d, base, ft, fisher = pair

    def refused(error, message, base_file="base.safetensors", fisher_file="fisher.safetensors", frac=0.1):
        out = d / "out.safetensors"
        with pytest.raises(error, match=message):
            sparse_update(str(d / base_file), str(d / "ft.safetensors"), str(d / fisher_file), str(out), frac)
        assert not out.exists()
        assert not [p for p in os.listdir(d) if p.startswith(".fmhub")], os.listdir(d)  # no temp file left behind

    save_file({n: t for n, t in fisher.items() if n != "bias"}, str(d / "f-missing.safetensors"))
    refused(FisherMismatch, r"missing from the Fisher file: bias.*nothing was written", fisher_file="f-missing.safetensors")
    save_file({**fisher, "w": torch.rand(30, 40)}, str(d / "f-shape.safetensors"))
    refused(FisherMismatch, r"with another shape: w \(Fisher \[30, 40\], model \[40, 30\]\)", fisher_file="f-shape.safetensors")
    save_file({**fisher, "w": -fisher["w"] - 1}, str(d / "f-neg.safetensors"))
    refused(BadFisherValues, r"'w' has negative values", fisher_file="f-neg.safetensors")
    save_file({**fisher, "bias": torch.full((30,), float("nan"))}, str(d / "f-nan.safetensors"))
    refused(BadFisherValues, r"'bias' has NaN or Inf", fisher_file="f-nan.safetensors")
    save_file({n: t for n, t in base.items() if n != "emb"}, str(d / "b-missing.safetensors"))
    refused(SparseUpdateError, r"emb is not in the base", base_file="b-missing.safetensors")
    save_file({**base, "bias": base["bias"].float()}, str(d / "b-dtype.safetensors"))
    refused(SparseUpdateError, r"bias is F32\[30\] in the base, F16\[30\] in the fine-tune", base_file="b-dtype.safetensors")
    refused(SparseUpdateError, r"k_fraction must be in \[0, 1\]", frac=1.5)


# ------------------------------------------------------------------ with models: masked fine-tuning and sparsified fine-tunes


def tiny_model(path, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def counting_task(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join("abcdefghijklmnop"[(s + i) % 16] for i in range(24)) for s in (rng.randrange(16) for _ in range(n))]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    base = tiny_model(d / "base")
    train = counting_task(24, 1)
    compute_fisher(str(base), train, str(d / "fisher.safetensors"))
    return d, base, train


def test_masked_finetune_trains_only_masked_entries_and_is_reproducible(lm, tmp_path):
    d, base, train = lm
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        # weight decay touches every entry it is given: the restore step must keep the rest bit-exact anyway
        runs.append(finetune_masked(str(base), train, str(out), fisher_path=str(d / "fisher.safetensors"), k_fraction=0.05,
                                    steps=25, lr=1e-2, seed=3, batch_size=8, weight_decay=0.1))
    a, b = tmp_path / "run0", tmp_path / "run1"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()

    report = runs[0]
    masks = fisher_mask(str(d / "fisher.safetensors"), 0.05)
    assert report.trainable == sum(int(m.sum()) for m in masks.values()) == k_for(report.total, 0.05)
    before, after = load_file(str(base / "model.safetensors")), load_file(str(a / "model.safetensors"))
    assert list(after) == list(before)
    changed = 0
    for name, m in masks.items():
        assert torch.equal(bits(after[name])[~m], bits(before[name])[~m]), f"{name} changed outside the mask"
        changed += int((bits(after[name])[m] != bits(before[name])[m]).sum())
    assert changed > 0.9 * report.trainable, (changed, report.trainable)

    loss_before, loss_after = eval_loss(str(base), train), eval_loss(str(a), train)
    print(f"\nmasked fine-tune (5% of {report.total} entries, 25 steps): train loss {report.losses[0]:.4f} -> "
          f"{report.losses[-1]:.4f}; eval NLL {loss_before:.4f} -> {loss_after:.4f}; {report.seconds:.2f} s")
    assert loss_after < loss_before - 0.3
    assert sum(report.losses[-5:]) / 5 < report.losses[0]


def test_masked_finetune_with_an_explicit_mask(lm, tmp_path):
    d, base, train = lm
    name = "model.layers.1.mlp.down_proj.weight"
    before = load_file(str(base / "model.safetensors"))
    mask = {name: torch.zeros(before[name].shape, dtype=torch.bool)}
    mask[name][:, :8] = True  # a block of one tensor; every other tensor is frozen
    finetune_masked(str(base), train, str(tmp_path / "out"), mask=mask, steps=5, lr=1e-2)
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    for n in before:
        if n != name:
            assert torch.equal(bits(after[n]), bits(before[n])), n
    assert torch.equal(bits(after[name])[:, 8:], bits(before[name])[:, 8:])
    assert not torch.equal(after[name][:, :8], before[name][:, :8])

    with pytest.raises(FmhubError, match="not a parameter"):
        finetune_masked(str(base), train, str(tmp_path / "x"), mask={"nope": torch.ones(2, dtype=torch.bool)}, steps=1)
    with pytest.raises(FmhubError, match="either a mask or a Fisher file"):
        finetune_masked(str(base), train, str(tmp_path / "x"), mask=mask, fisher_path=str(d / "fisher.safetensors"), k_fraction=0.1)
    assert not (tmp_path / "x").exists()


def test_sparsified_dense_finetune_loads_and_keeps_most_of_the_fisher_weighted_update(lm, tmp_path):
    d, base, train = lm
    finetune_masked(str(base), train, str(tmp_path / "dense"), steps=25, lr=1e-2, seed=3)
    report = sparse_update(str(base), str(tmp_path / "dense"), str(d / "fisher.safetensors"), str(tmp_path / "sparse"), 0.05)
    assert (tmp_path / "sparse" / "config.json").is_file()  # a directory transformers loads
    with safe_open(str(tmp_path / "sparse" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    losses = {m: eval_loss(str(p), train) for m, p in (("base", base), ("dense", tmp_path / "dense"), ("sparse 5%", tmp_path / "sparse"))}
    print("\n" + "  ".join(f"{k}={v:.4f}" for k, v in losses.items()) + f"  retained={report.fisher_norm_retained:.3f}")
    assert report.kept == k_for(report.total, 0.05) and report.changed <= report.kept
    assert report.fisher_norm_retained > 0.5  # top-5% by Fisher holds most of the Fisher-weighted update
    assert all(math.isfinite(v) for v in losses.values())

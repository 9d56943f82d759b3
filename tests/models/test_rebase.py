"""fmhub rebase: a fine-tune replayed on a new base by three-way merge; an adapter re-pointed; misfits refused, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import BENCHMARKS, fmhub

sys.path.insert(0, str(BENCHMARKS))
import slice_data as sd  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def _variant(src: Path, dst: Path, changes: dict) -> Path:
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    w = _weights(src)
    for name, fn in changes.items():
        w[name] = fn(w[name])
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_full_fine_tune_is_replayed_on_the_new_base(tmp_path):
    import torch

    from fmhub.ml.rebase import rebase

    base = Path(sd.tiny_llama(str(tmp_path / "base"), hidden=32, layers=1))
    q, mlp, norm = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"
    tuned = _variant(base, tmp_path / "tuned", {q: lambda t: t + 0.5, norm: lambda t: t * 2})  # the downstream fine-tune
    patched = _variant(base, tmp_path / "patched", {mlp: lambda t: t - 0.25, norm: lambda t: t + 1})  # the patch
    out = rebase(str(tuned), str(base), str(patched), str(tmp_path / "rebased"))
    assert out.kind == "model" and out.tensors > 0
    b, t, p, r = (_weights(d) for d in (base, tuned, patched, tmp_path / "rebased"))
    for name in b:  # rebased = patched + (tuned - base), tensor by tensor
        torch.testing.assert_close(r[name], p[name] + (t[name] - b[name]), rtol=0, atol=1e-6)
    assert (tmp_path / "rebased" / "config.json").is_file()
    rec = json.loads((tmp_path / "rebased.lineage.json").read_text())
    assert rec["step"] == "rebase" and len(rec["inputs"]) == 3


def test_adapter_is_re_pointed_and_a_misfit_is_refused(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    from fmhub.models.fisher import load_model
    from fmhub.ml.rebase import RebaseError, rebase

    base = Path(sd.tiny_llama(str(tmp_path / "base"), hidden=32, layers=1))
    patched = _variant(base, tmp_path / "patched", {"model.norm.weight": lambda t: t + 1})
    torch.manual_seed(0)
    model = get_peft_model(load_model(str(base)), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "ad"))
    res = rebase(str(tmp_path / "ad"), str(base), str(patched), str(tmp_path / "ad2"))
    assert res.kind == "adapter"
    cfg = json.loads((tmp_path / "ad2" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(patched)
    assert (tmp_path / "ad2" / "adapter_model.safetensors").read_bytes() == (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()

    other = Path(sd.tiny_llama(str(tmp_path / "other"), hidden=64, layers=1))  # another architecture's shapes
    with pytest.raises(RebaseError, match="shape"):
        rebase(str(tmp_path / "ad"), str(base), str(other), str(tmp_path / "ad3"))
    assert not (tmp_path / "ad3").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".fmhub-rebase-")]


def test_cli_rebase_in_place_keeps_the_trail_to_the_data(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from fmhub.governance import lineage
    from fmhub.models.fisher import load_model

    monkeypatch.chdir(tmp_path)
    base = Path(sd.tiny_llama(str(tmp_path / "base"), hidden=32, layers=1))
    _variant(base, tmp_path / "patched", {"model.norm.weight": lambda t: t + 1})
    get_peft_model(load_model(str(base)), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "ad"))
    (tmp_path / "train.jsonl").write_text('{"text": "x"}\n')
    lineage.record("ad", "finetune", [lineage.describe_input("base", "model"), lineage.describe_input("train.jsonl", "dataset")])
    fmhub(tmp_path, "rebase", "ad", "--from", "base", "--onto", "patched")
    rec = json.loads((tmp_path / "ad.lineage.json").read_text())
    assert rec["step"] == "rebase" and {i["path"] for i in rec["inputs"]} >= {"train.jsonl", "patched"}
    bad = fmhub(tmp_path, "rebase", "ad", "--from", "base", "--onto", "nowhere", check=False)
    assert bad.returncode == 1 and b"no such directory" in bad.stderr
    two = fmhub(tmp_path, "rebase", "ad", "ad", "--from", "base", "--onto", "patched", "-o", "x", check=False)
    assert two.returncode == 1 and b"--output takes one source" in two.stderr


def test_retune_runs_when_the_check_fails_and_nothing_is_written_if_it_still_fails(tmp_path):
    import json as _json

    from fmhub.ml.autotune import train_adapter
    from fmhub.ml.tasks import Task
    from fmhub.ml.rebase import RebaseError, rebase

    base = Path(sd.tiny_llama(str(tmp_path / "base"), hidden=32, layers=1))
    patched = _variant(base, tmp_path / "patched", {"model.layers.0.self_attn.q_proj.weight": lambda t: t * 1.5})
    rows = sd.tense_rows(sd.make_task(n_train=60, n_eval=1, n_pool=1).train)
    (tmp_path / "tense.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    task = Task("tense", str(tmp_path / "tense.jsonl"), metric="accuracy", classes=["none", "past", "present"], label="tense")
    train_adapter(str(base), task, str(tmp_path / "ad"), steps=4, batch_size=8, lrs=[1e-2])
    ok = rebase(str(tmp_path / "ad"), str(base), str(patched), str(tmp_path / "ok"), check=task, max_regression=1.0, retune=3)
    assert ok.retuned == 0 and ok.score_before is not None  # the check passed: no retune
    with pytest.raises(RebaseError, match="after 3 retune steps"):  # an impossible bar: retuned, checked again, refused
        rebase(str(tmp_path / "ad"), str(base), str(patched), str(tmp_path / "no"), check=task, max_regression=-1.0, retune=3)
    assert not (tmp_path / "no").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".fmhub-rebase-")]

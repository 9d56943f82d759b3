"""Monitoring and data-driven patching, end to end at tiny scale (issue 10's "done when").

A tiny Llama is trained on generated reviews whose toy-brand positives were
planted as negatives. Then, through the CLI in a real git repository:
`fmhub run` joins the brands table into the rows, scores the model per slice
(the toy slice is flagged), builds the patch set with keyword labelling
functions and patches the base behind the gate; `fmhub explain` blames the
planted rows; `fmhub eval --compare HEAD` shows the regression table between
the committed model and the patched one; `fmhub rebase` moves an adapter
trained on the old base onto the patched one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import BENCHMARKS, fmhub, git

sys.path.insert(0, str(BENCHMARKS))
import slice_data as sd  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _project(repo: Path, n_train: int = 480) -> sd.Generated:
    from fmhub.ml.autotune import train_adapter
    from fmhub.ml.tasks import Task

    g = sd.make_task(n_train=n_train, n_eval=240, n_pool=240, seed=1)
    os.chdir(repo)
    sd.write_jsonl("data/train.jsonl", g.train)
    sd.write_jsonl("data/eval.jsonl", g.eval)
    sd.write_jsonl("data/pool.jsonl", g.pool)
    sd.write_table("data/brands.csv", g.table)
    sd.write_jsonl("data/category.jsonl", sd.category_rows(g.train))
    sd.write_jsonl("data/tense.jsonl", sd.tense_rows(g.train))
    sd.tiny_llama("models/init")
    # the base model "as pretrained": every entry trained on the planted data, with its lineage record
    train_adapter("models/init", Task("reviews", "data/train.jsonl", metric="accuracy", classes=sd.CLASSES), "models/base",
                  steps=80, batch_size=16, lrs=[3e-3], sparsity=0.0)
    # the gate's regression bound with room: measured, the worst other slice moved by -0.03 (a row or so of ~40), which
    # the benchmark's 0.05 would pass with no margin between torch builds
    (repo / "fmhub.yaml").write_text(sd.spec(patch_steps=40, sparsity=0.99).replace("max_regression: 0.05", "max_regression: 0.15"))
    return g


@pytest.fixture
def project(repo, monkeypatch):
    monkeypatch.chdir(repo)
    return repo, _project(repo)


def test_planted_slice_found_blamed_patched_and_gated(project):
    repo, g = project
    done = json.loads(fmhub(repo, "run", "--json").stdout)
    status = {s["step"]: s["status"] for s in done["steps"]}
    assert status == {"join:train": "ran", "join:eval": "ran", "join:pool": "ran", "label:pool": "ran",
                      "eval:sentiment": "ran", "patch:toys": "ran"}
    again = json.loads(fmhub(repo, "run", "--json").stdout)  # nothing changed: nothing runs
    assert {s["status"] for s in again["steps"]} == {"up to date"}

    # 1. the report finds the slice: toys is flagged, the other categories are not
    rep = json.loads((repo / "evals/sentiment/report.json").read_text())
    by = {s["name"]: s for s in rep["slices"]}
    assert by["toys"]["flagged"] and by["toys"]["value"] < 0.7 and by["toys"]["n"] > 40
    assert not by["tools"]["flagged"] and not by["food"]["flagged"] and by["tools"]["value"] > 0.85
    preds = [json.loads(line) for line in (repo / "evals/sentiment/predictions.jsonl").read_text().splitlines()]
    for s in rep["slices"]:
        if s["flagged"] and s["kind"] == "cluster":  # a cluster of the model's embeddings may find the toys unsupervised
            rows = [p for p in preds if s["name"] in p["slices"]]
            assert sum(p["row"]["category"] == ["toys"] for p in rows) / len(rows) > 0.5, s
        elif s["flagged"]:
            assert s["name"] in ("toys", "japanese"), s  # the Japanese brands are toy brands
    assert sum(by[f"topics:{k}"]["n"] for k in range(3)) == 240
    assert len(preds) == 240 and all("toys" in p["slices"] for p in preds if p["row"]["category"] == ["toys"])
    html = (repo / "evals/sentiment/report.html").read_text()
    assert "toys" in html and "data:image/png;base64," in html
    assert (repo / "evals/sentiment/slices.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 2. provenance points at the planted training rows
    blamed = json.loads(fmhub(repo, "explain", "sentiment", "--slice", "toys", "--limit", "4", "-k", "10", "--json").stdout)
    assert blamed["train"] == ["data/train.jsonl"] and len(blamed["queries"]) == 4
    planted = set(g.planted)
    hits = [inf["index"] in planted for q in blamed["queries"] for inf in q["influences"]]
    precision = sum(hits) / len(hits)
    base_rate = len(planted) / len(g.train)
    print(f"\nmonitoring: toys {by['toys']['value']:.2f} (n {by['toys']['n']}), tools {by['tools']['value']:.2f}; "
          f"blame precision {precision:.2f} (base rate {base_rate:.2f})")
    assert precision >= 0.5 > 2 * base_rate, (precision, base_rate)  # measured: 0.72 (base rate 0.20)

    # 3. the patch fixed the slice behind the gate; nothing else regressed beyond it
    patched = json.loads((repo / "models/base-patched/fmhub-patch.json").read_text())
    gate = {r["slice"]: r for r in patched["gate"]["table"]}
    print(f"monitoring: patch gate {[(r['slice'], round(r['before'], 2), round(r['after'], 2)) for r in gate.values()]}")
    assert patched["gate"]["passed"] and gate["toys"]["after"] - gate["toys"]["before"] >= 0.2
    assert all(r["gain"] >= -0.15 for r in gate.values()), gate  # measured: -0.03 at worst
    assert patched["counts"]["label"]["labelled"] > 0 and patched["counts"]["replay"] > 0 and patched["counts"]["augmented"] > 0
    lin = json.loads((repo / "models/base-patched.lineage.json").read_text())
    assert lin["step"] == "patch" and {i["path"] for i in lin["inputs"]} == {"models/base", "models/base-patched.patch.jsonl"}
    rows = [json.loads(line) for line in (repo / "models/base-patched.patch.jsonl").read_text().splitlines()]
    toy_rows = [r for r in rows if r["_patch"] == "slice"]
    # weak supervision labelled the slice by its sentiment words, not by the planted shortcut
    assert toy_rows and all(r["label"] == ("pos" if any(w in r["text"].split() for w in sd.POS) else "neg") for r in toy_rows)

    # regression table across revisions: commit, then compare the patched model with the committed predictions
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "models, data, evals")
    again = json.loads(fmhub(repo, "eval", "sentiment", "--model", "models/base-patched", "--compare", "HEAD", "--json").stdout)
    verdicts = {r["slice"]: r["verdict"] for r in again["compare"]["rows"]}
    assert verdicts["toys"] == "better" and verdicts["tools"] != "worse" and verdicts["food"] != "worse"
    assert (repo / "evals/sentiment/by-model/models--base-patched/compare.png").is_file()  # its own directory
    assert rep == json.loads((repo / "evals/sentiment/report.json").read_text())  # the declared model's stays as it was
    worse = fmhub(repo, "eval", "sentiment", "--model", "models/base@HEAD", "--compare",
                  "evals/sentiment/by-model/models--base-patched/predictions.jsonl", "--fail-on", "worse", "--no-plots", check=False)
    assert worse.returncode == 1 and b"worse" in worse.stdout  # the old model is worse than the patched one on toys
    assert b"--fail-on worse" in worse.stderr and b"toys: " in worse.stderr  # the rule, and the slice that broke it

    # 4. rebase: adapters trained on the old base move onto the patched one; the check catches one the patch broke
    from fmhub.ml.autotune import train_adapter
    from fmhub.ml.tasks import Task

    tense = Task("tense", "data/tense.jsonl", metric="accuracy", classes=["none", "past", "present"], label="tense")
    train_adapter("models/base", tense, "adapters/tense", steps=30, batch_size=16, lrs=[3e-2])
    out = fmhub(repo, "rebase", "adapters/tense", "--from", "models/base", "--onto", "models/base-patched", "-o",
                "adapters/tense-rebased", "--check", "tense", "--max-regression", "0.05").stdout.decode()
    cfg = json.loads((repo / "adapters/tense-rebased/adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(repo / "models/base-patched") and "adapter" in out
    assert ((repo / "adapters/tense-rebased/adapter_model.safetensors").read_bytes()
            == (repo / "adapters/tense/adapter_model.safetensors").read_bytes())
    rec = json.loads((repo / "adapters/tense-rebased.lineage.json").read_text())
    assert rec["step"] == "rebase" and rec["params"]["score_after"] >= rec["params"]["score_before"] - 0.05
    # the category adapter leans on the brands' features, which the patch changed: a real conflict, refused, nothing written
    category = Task("category", "data/category.jsonl", metric="accuracy", classes=["food", "tools", "toys"], label="category")
    train_adapter("models/base", category, "adapters/category", steps=60, batch_size=16, lrs=[3e-2])
    refused = fmhub(repo, "rebase", "adapters/category", "--from", "models/base", "--onto", "models/base-patched", "-o",
                    "adapters/category-rebased", "--check", "category", "--max-regression", "0.05", check=False)
    assert refused.returncode == 1 and b"retune it longer" in refused.stderr and not (repo / "adapters/category-rebased").exists()

    # the gate refuses a patch that cannot reach its bar, and writes nothing
    (repo / "fmhub.yaml").write_text(sd.spec(patch_steps=40, sparsity=0.99).replace("min_gain: 0.2", "min_gain: 0.9")
                                     .replace("output: models/base-patched", "output: models/never"))
    bad = fmhub(repo, "patch", "toys", check=False)
    assert bad.returncode == 1 and b"the gate failed: toys" in bad.stderr and b"FAIL" in bad.stdout
    assert not (repo / "models/never").exists()
    assert not [p for p in (repo / "models").iterdir() if p.name.startswith(".fmhub-patch-")]  # no temp left behind

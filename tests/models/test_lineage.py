"""Lineage: clean and merge write records; `fmhub lineage` follows them; `fmhub unlearn` finds models and excludes a source."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import fmhub, git, save_tensors

from fmhub.governance import lineage

SPEC = """\
datasets:
  raw_a: {path: raw/a.jsonl, text: text}
  raw_b: {path: raw/b.jsonl, text: text}
clean:
  a: {input: raw_a, output: clean/a.jsonl, backend: serial, steps: [dedup]}
  b: {input: raw_b, output: clean/b.jsonl, backend: serial, steps: [dedup]}
"""


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 4, generator=g)}


def build(repo) -> dict[str, str]:
    """Raw data -> `fmhub clean` -> two fine-tunes (records via the library: real training is not the point) -> `fmhub merge`."""
    (repo / "fmhub.yaml").write_text(SPEC)
    (repo / "raw").mkdir()
    for name in "ab":
        (repo / "raw" / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} row {i}"}) + "\n" for i in range(3)))
    save_tensors(repo / "base.safetensors", tensors(0))
    git(repo, "add", "fmhub.yaml", "raw", "base.safetensors")
    git(repo, "commit", "-qm", "raw data and base")
    commits = {}
    for name, seed in (("a", 1), ("b", 2)):
        fmhub(repo, "clean", "run", name)
        save_tensors(repo / f"ft-{name}.safetensors", tensors(seed))
        lineage.record(str(repo / f"ft-{name}.safetensors"), "finetune",
                       [lineage.describe_input(str(repo / "base.safetensors"), cwd=str(repo)),
                        lineage.describe_input(str(repo / "clean" / f"{name}.jsonl"), cwd=str(repo))], {"steps": 1}, cwd=str(repo))
        git(repo, "add", "clean", f"ft-{name}.safetensors", f"ft-{name}.safetensors.lineage.json")
        git(repo, "commit", "-qm", f"fine-tune {name}")
        commits[name] = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    fmhub(repo, "merge", "ft-a.safetensors", "ft-b.safetensors", "--base", "base.safetensors", "-s", "task-arithmetic", "-o", "merged.safetensors")
    git(repo, "add", "merged.safetensors", "merged.safetensors.lineage.json")
    git(repo, "commit", "-qm", "merge")
    commits["merge"] = git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    return commits


def test_lineage_of_a_merged_model_lists_the_datasets_of_both_parents(repo):
    commits = build(repo)
    clean_rec = json.loads((repo / "clean" / "a.jsonl.lineage.json").read_text())
    assert clean_rec["step"] == "clean" and clean_rec["pipeline"] == "a"
    assert clean_rec["inputs"][0]["path"] == "raw/a.jsonl" and clean_rec["inputs"][0]["blob"]  # committed: its blob id
    # rewrite the work tree's record: `@REV` must read the committed one
    (repo / "merged.safetensors.lineage.json").write_text("not json")
    graph = json.loads(fmhub(repo, "lineage", "merged.safetensors@HEAD", "--json").stdout)
    nodes = {n["path"]: n for n in graph["nodes"]}
    assert graph["root"] == f"merged.safetensors@{commits['merge']}"
    assert nodes["merged.safetensors"]["step"] == "merge"
    assert {"ft-a.safetensors", "ft-b.safetensors", "clean/a.jsonl", "clean/b.jsonl", "raw/a.jsonl", "raw/b.jsonl"} <= set(nodes)
    assert nodes["raw/a.jsonl"]["step"] is None and nodes["clean/b.jsonl"]["step"] == "clean"
    assert {"from": f"raw/b.jsonl@{commits['merge']}", "to": f"clean/b.jsonl@{commits['merge']}"} in graph["edges"]
    tree = fmhub(repo, "lineage", "merged.safetensors@HEAD").stdout.decode()
    assert "source datasets: raw/a.jsonl, raw/b.jsonl" in tree and "ft-b.safetensors" in tree
    bad = fmhub(repo, "lineage", "merged.safetensors", check=False)  # the work tree's broken record
    assert bad.returncode != 0 and "not valid JSON" in bad.stderr.decode()
    none = fmhub(repo, "lineage", "base.safetensors@HEAD", check=False)
    assert none.returncode != 0 and "has no lineage record" in none.stderr.decode()


def test_unlearn_lists_models_trained_on_a_source_and_remove_excludes_it(repo):
    commits = build(repo)
    found = json.loads(fmhub(repo, "unlearn", "--source", "raw/a.jsonl", "--json").stdout)
    got = {(m["commit"], m["path"]) for m in found["models"]}
    assert got == {(commits["a"], "ft-a.safetensors"), (commits["merge"], "merged.safetensors")}  # not ft-b
    assert found["excluded_in"] is None
    assert fmhub(repo, "clean", "run", "a").returncode == 0  # listing alone excludes nothing
    out = fmhub(repo, "unlearn", "--source", "raw/a.jsonl", "--remove").stdout.decode()
    assert "ft-a.safetensors" in out and "excluded raw/a.jsonl" in out
    assert (repo / ".fmhub" / "excluded-sources").read_text().splitlines()[-1] == "raw/a.jsonl"
    refused = fmhub(repo, "clean", "run", "a", check=False)
    assert refused.returncode != 0 and "raw/a.jsonl was removed with `fmhub unlearn --remove`" in refused.stderr.decode()
    assert fmhub(repo, "clean", "run", "b").returncode == 0  # other sources are unaffected


# ---------------------------------------------------------------- licences


def test_licence_families_and_mixes():
    from fmhub.governance.licences import check_mix, family

    assert [family(x) for x in ("mit", "CC-BY-SA-4.0", "CC-BY-NC-4.0", "proprietary", None, "WTFPL-9")] == [
        "permissive", "share-alike", "non-commercial", "proprietary", "unknown", "unknown"]
    assert check_mix({"a": "MIT", "b": "CC-BY-4.0", "c": "CC-BY-SA-4.0"}) == []
    assert check_mix({"a": "MIT", "b": "CC-BY-NC-4.0"}) == []  # fine until the models are declared commercial
    [nc] = check_mix({"a": "MIT", "b": "CC-BY-NC-4.0"}, {"commercial": True})
    assert "b is CC-BY-NC-4.0 (non-commercial)" in nc
    [sa] = check_mix({"x": "CC-BY-SA-4.0", "y": "GPL-3.0"})
    assert "x (CC-BY-SA-4.0) and y (GPL-3.0) are different share-alike licences" in sa
    assert "share-alike forbids" in check_mix({"x": "CC-BY-SA-4.0", "y": "CC-BY-NC-4.0"})[0]
    assert check_mix({"u": None}, {"require_known": True}) == ["u has no licence; the licence policy requires a known one"]
    assert check_mix({"g": "GPL-3.0"}, {"deny": ["gpl-3.0"]}) == ["g is GPL-3.0, which the licence policy denies"]


def test_policy_blocks_a_pipeline_on_a_denied_licence_and_records_licences(repo):
    (repo / "fmhub.yaml").write_text(SPEC.replace("{path: raw/a.jsonl, text: text}", "{path: raw/a.jsonl, text: text, license: CC-BY-NC-4.0, consent: opt-in}"))
    (repo / "raw").mkdir()
    (repo / "raw" / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    fmhub(repo, "clean", "run", "a")  # no policy: allowed, and the licence is recorded
    rec = json.loads((repo / "clean" / "a.jsonl.lineage.json").read_text())
    assert rec["inputs"][0]["license"] == "CC-BY-NC-4.0" and rec["inputs"][0]["consent"] == "opt-in"
    (repo / ".fmhub").mkdir()
    (repo / ".fmhub" / "policy.yaml").write_text("licences: {commercial: true}\n")
    proc = fmhub(repo, "clean", "run", "a", check=False)
    assert proc.returncode != 0
    assert "clean.a: raw_a is CC-BY-NC-4.0 (non-commercial) but the licence policy says the models are commercial" in proc.stderr.decode()
    (repo / ".fmhub" / "policy.yaml").write_text("licences: {commercial: maybe}\n")
    bad = fmhub(repo, "clean", "run", "a", check=False)  # a broken policy fails closed
    assert bad.returncode != 0 and "policy.yaml:1" in bad.stderr.decode()


def test_merge_refuses_models_whose_data_mix_incompatible_licences(repo):
    spec = SPEC.replace("{path: raw/a.jsonl, text: text}", "{path: raw/a.jsonl, text: text, license: CC-BY-SA-4.0}")
    (repo / "fmhub.yaml").write_text(spec.replace("{path: raw/b.jsonl, text: text}", "{path: raw/b.jsonl, text: text, license: GPL-3.0}"))
    (repo / "raw").mkdir()
    save_tensors(repo / "base.safetensors", tensors(0))
    for name, seed in (("a", 1), ("b", 2)):
        (repo / "raw" / f"{name}.jsonl").write_text(json.dumps({"text": f"{name} row"}) + "\n")
        fmhub(repo, "clean", "run", name)
        save_tensors(repo / f"ft-{name}.safetensors", tensors(seed))
        lineage.record(str(repo / f"ft-{name}.safetensors"), "finetune", ["base.safetensors", f"clean/{name}.jsonl"], cwd=str(repo))
    proc = fmhub(repo, "merge", "ft-a.safetensors", "ft-b.safetensors", "--base", "base.safetensors", "-s", "task-arithmetic",
                 "-o", "merged.safetensors", check=False)
    assert proc.returncode != 0 and not (repo / "merged.safetensors").exists()
    err = proc.stderr.decode()
    assert "merge refused: raw/a.jsonl (CC-BY-SA-4.0) and raw/b.jsonl (GPL-3.0) are different share-alike licences" in err


def test_fmhub_finetune_records_its_base_and_data(repo):
    from fmhub.run.demo import build_tiny_llama

    build_tiny_llama(seed=3).save_pretrained(repo / "base")
    (repo / "task.jsonl").write_text("".join(json.dumps({"text": f"{i} plus 1 is {i + 1}."}) + "\n" for i in range(8)))
    fmhub(repo, "finetune", "base", "--data", "task.jsonl", "-o", "tuned", "--steps", "2", "--batch-size", "4")
    rec = json.loads((repo / "tuned.lineage.json").read_text())
    assert rec["step"] == "finetune" and rec["params"]["steps"] == 2
    assert [(i["path"], i["kind"]) for i in rec["inputs"]] == [("base", "model"), ("task.jsonl", "dataset")]
    graph = json.loads(fmhub(repo, "lineage", "tuned", "--json").stdout)
    assert graph["root"] == "tuned" and {n["path"] for n in graph["nodes"]} == {"tuned", "base", "task.jsonl"}


def test_label_refuses_an_excluded_source_and_a_denied_licence(tmp_path):
    from fmhub.data.label import pipeline as labelling
    from fmhub.governance.licences import LicenceError
    from fmhub.project.spec import load_spec

    (tmp_path / "reviews.jsonl").write_text('{"text": "great"}\n{"text": "awful"}\n')
    (tmp_path / "fmhub.yaml").write_text(
        "datasets:\n  reviews: {path: reviews.jsonl, license: GPL-3.0}\n"
        "label:\n  s:\n    input: reviews\n    output: out/l.jsonl\n    classes: [neg, pos]\n"
        "    lfs:\n      - keyword: {words: [great], label: pos}\n      - keyword: {words: [awful], label: neg}\n")
    spec = str(tmp_path / "fmhub.yaml")
    (tmp_path / ".fmhub").mkdir()
    (tmp_path / ".fmhub" / "policy.yaml").write_text("licences: {deny: [GPL-3.0]}\n")
    with pytest.raises(LicenceError, match="label.s: reviews is GPL-3.0, which the licence policy denies"):
        labelling.run(load_spec(spec), backend="serial")
    (tmp_path / ".fmhub" / "policy.yaml").unlink()
    lineage.exclude(str(tmp_path / "reviews.jsonl"), cwd=str(tmp_path))
    with pytest.raises(lineage.ExcludedSource, match="reviews.jsonl was removed with `fmhub unlearn --remove`"):
        labelling.run(load_spec(spec), backend="serial")
    assert not (tmp_path / "out").exists()

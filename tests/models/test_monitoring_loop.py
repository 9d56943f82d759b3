"""One spec, the whole monitoring loop (issue 26): a fine-tune whose output the eval scores, eval -> explain -> patch ->
eval --compare, with predictions that name their model, cluster slices defined once, and outputs of different models
kept apart.

The module's project is tiny (a 1-layer model, a few training steps, a gate that passes anything): these tests check
the plumbing. `test_the_loop_on_the_planted_task` (slow) runs the same spec at the size where the patch must fix
the planted slice.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import BENCHMARKS, fmhub, git, isolate_git

sys.path.insert(0, str(BENCHMARKS))
import slice_data as sd  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def loop_spec(ft_steps: int = 4, patch_steps: int = 3, gate: str = "{min_gain: -1.0, max_regression: 1.0}",
              batch_size: int = 8, clusters: int = 2) -> str:
    """The spec of docs/monitoring.md's worked example: joins, a full-model fine-tune, the eval of its output, the patch."""
    return f"""\
models:
  init: {{path: models/init}}
tasks:
  sentiment: {{data: data/train.joined.jsonl, metric: accuracy, classes: [neg, pos]}}
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
      - keyword: {{words: [{", ".join(sd.POS)}], label: pos}}
      - keyword: {{words: [{", ".join(sd.NEG)}], label: neg}}
finetune: {{method: fishmask, sparsity: 0.0, steps: {ft_steps}, lrs: [0.003], batch_size: {batch_size}, output: models/ft}}
slices:
  toys: {{where: {{category: toys}}}}
  tools: {{where: {{category: tools}}}}
  topics: {{clusters: {clusters}}}
eval:
  sentiment: {{task: sentiment, data: data/eval.joined.jsonl, model: models/ft/sentiment}}
patch:
  toys:
    eval: sentiment
    slice: toys
    pool: data/pool.joined.jsonl
    label: pool
    augment: [{{swap: {{words: [{", ".join(sd.BRANDS["toys"])}], copies: 1}}}}]
    method: fishmask
    sparsity: 0.99
    steps: {patch_steps}
    lrs: [0.003]
    batch_size: {batch_size}
    gate: {gate}
    output: models/patched
"""


def write_project(repo: Path, n_train: int, n_eval: int, n_pool: int, hidden: int, layers: int, spec: str) -> sd.Generated:
    g = sd.make_task(n_train=n_train, n_eval=n_eval, n_pool=n_pool, seed=1)
    sd.write_jsonl(str(repo / "data/train.jsonl"), g.train)
    sd.write_jsonl(str(repo / "data/eval.jsonl"), g.eval)
    # pool rows that no labelling function covers: every function abstains, so "labelled" < "in slice"
    sd.write_jsonl(str(repo / "data/pool.jsonl"), g.pool + [{"text": "the zorbo kite is here ->"}, {"text": "my kipi doll ->"}])
    sd.write_table(str(repo / "data/brands.csv"), g.table)
    sd.tiny_llama(str(repo / "models/init"), hidden=hidden, layers=layers)
    (repo / "fmhub.yaml").write_text(spec)
    return g


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_template):
    """The tiny project after `fmhub run` (every step) and a commit; the working directory is the repository."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        isolate_git(mp, tmp_path_factory.mktemp("home"))
        repo = tmp_path_factory.mktemp("loop") / "repo"
        shutil.copytree(repo_template, repo, symlinks=True)
        mp.chdir(repo)
        write_project(repo, 48, 32, 40, hidden=32, layers=1, spec=loop_spec())
        from fmhub.api import run

        first = run.run(["join:train", "finetune:sentiment"])  # no eval yet: its model is the fine-tune's output
        done = run.run()
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "the loop")
        yield repo, first, done
    torch.set_num_threads(threads)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``fmhub ARGV`` in this process (the model libraries are loaded already): exit status, stdout, stderr."""
    from fmhub import cli

    capsys.readouterr()
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dry_run_plans_a_spec_whose_steps_feed_each_other(repo):
    """Nothing is built yet: the eval's model is the fine-tune's output; the plan still shows every step, in order."""
    (repo / "fmhub.yaml").write_text(loop_spec())
    out = fmhub(repo, "run", "--dry-run", "--json").stdout
    steps = [(s["step"], s["status"]) for s in json.loads(out)["steps"]]
    order = [s for s, _ in steps]
    assert {st for _, st in steps} == {"would run"}
    assert order.index("join:train") < order.index("finetune:sentiment") < order.index("eval:sentiment") < order.index("patch:toys")
    assert order.index("join:pool") < order.index("label:pool")
    alone = fmhub(repo, "run", "finetune:sentiment", "--dry-run").stdout.decode()
    assert "finetune:sentiment" in alone and "not a model directory" not in alone
    named = fmhub(repo, "run", "eval:sentiment", check=False)  # its model is not made yet: say which step makes it
    assert named.returncode == 1 and b"needs models/ft/sentiment, which does not exist yet; step finetune:sentiment makes it" in named.stderr


def test_predictions_name_their_model_and_explain_uses_exactly_it(project, capsys):
    from fmhub.api import ml
    from fmhub.ml.explain import ProvenanceError

    repo, first, done = project
    assert [o.step for o in first.outcomes] == ["join:train", "finetune:sentiment"]
    assert {o.step: o.status for o in done.outcomes}["eval:sentiment"] == "ran"
    ident = json.loads((repo / "evals/sentiment/predictions.jsonl.lineage.json").read_text())["params"]["identity"]
    assert ident["model"]["path"] == "models/ft/sentiment" and ident["model"]["rev"] is None and ident["adapter"] is None
    assert list(ident["model"]["weights"]) == ["model.safetensors"] and len(ident["model"]["weights"]["model.safetensors"]) == 64
    assert json.loads((repo / "evals/sentiment/report.json").read_text())["identity"] == ident

    base = ml.explain("sentiment", limit=1, k=3, method="embedding")
    assert base["identity"] == ident and base["model"] == "models/ft/sentiment"
    before = (repo / "evals/sentiment/predictions.jsonl").read_bytes()
    ml.evaluate("sentiment", model="models/patched", compare_to="HEAD")
    assert (repo / "evals/sentiment/predictions.jsonl").read_bytes() == before  # the declared model's predictions stay
    mine = repo / "evals/sentiment/by-model/models--patched"
    assert (mine / "predictions.jsonl").is_file() and (mine / "compare.png").is_file()
    patched = ml.explain("sentiment", model="models/patched", limit=1, k=3, method="embedding")
    assert patched["identity"]["model"]["path"] == "models/patched" and patched["predictions"].startswith(str(mine.relative_to(repo)))
    code, text, _ = _cli(capsys, "explain", "sentiment", "--model", "models/patched", "--limit", "1", "-k", "2", "--method", "embedding")
    assert code == 0 and f"explaining models/patched (weights {patched['identity']['id'][:8]})" in text

    # weights that changed since their predictions were made: refused, with the command that makes them again
    shutil.copytree(repo / "models/patched", repo / "models/copy")
    ml.evaluate("sentiment", model="models/copy", plots=False)
    shutil.copy(repo / "models/init/model.safetensors", repo / "models/copy/model.safetensors")
    with pytest.raises(ProvenanceError, match=r"holds predictions of models/copy \(weights \w+\), not of models/copy "
                                              r"\(weights \w+\).*run `fmhub eval sentiment --model models/copy` first"):
        ml.explain("sentiment", model="models/copy", limit=1, k=3, method="embedding")
    with pytest.raises(ProvenanceError, match=r"no predictions; run `fmhub eval sentiment --model models/init` first"):
        ml.explain("sentiment", model="models/init", limit=1)


def test_compare_counts_the_same_cluster_rows_for_both_revisions(project):
    from fmhub.api import ml

    repo, _, _ = project
    rep = ml.evaluate("sentiment", model="models/patched", compare_to="HEAD", plots=False).report
    assert rep["clusters"]["topics"]["reference"] == "HEAD" and rep["clusters"]["topics"]["rows"] == rep["rows"]
    old = {r["key"]: r["slices"] for r in _lines(repo / "evals/sentiment/predictions.jsonl")}
    new = {r["key"]: r["slices"] for r in _lines(repo / "evals/sentiment/by-model/models--patched/predictions.jsonl")}
    assert old.keys() == new.keys()
    rows = {r["slice"]: r for r in rep["compare"]["rows"]}
    for k in range(2):
        name = f"topics:{k}"
        members = {key for key, s in old.items() if name in s}
        assert members == {key for key, s in new.items() if name in s}  # the reference's clusters, reused
        assert rows[name]["n_old"] == rows[name]["n_new"] == len(members)
    assert sum(rows[f"topics:{k}"]["n_new"] for k in range(2)) == rep["rows"]

    # a reference whose clusters no k-means of this model would find (the first half, the rest): used as it is
    ref = _lines(repo / "evals/sentiment/predictions.jsonl")
    half = len(ref) // 2
    for i, r in enumerate(ref):
        r["slices"] = [s for s in r["slices"] if not s.startswith("topics:")] + [f"topics:{int(i >= half)}"]
    (repo / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ref))
    rep = ml.evaluate("sentiment", model="models/patched", compare_to="reference.jsonl", plots=False).report
    new = _lines(repo / "evals/sentiment/by-model/models--patched/predictions.jsonl")
    assert [("topics:1" in r["slices"]) for r in new] == [i >= half for i in range(len(new))]
    rows = {r["slice"]: r for r in rep["compare"]["rows"]}
    assert (rows["topics:0"]["n_old"], rows["topics:0"]["n_new"], rows["topics:1"]["n_new"]) == (half, half, len(new) - half)
    assert rep["clusters"]["topics"]["reference"] == "reference.jsonl"
    ref[0]["slices"].append("topics:5")  # clusters of another K: another definition, so this run fits its own
    (repo / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ref))
    rep = ml.evaluate("sentiment", model="models/patched", compare_to="reference.jsonl", plots=False).report
    assert rep["clusters"]["topics"] == {"reference": "this run", "rows": len(ref)}


def test_outputs_of_different_models_never_overwrite_each_other(project):
    from fmhub.api import ml, run
    from fmhub.ml.evaluation import EvalError

    repo, _, _ = project
    ml.evaluate("sentiment", model="models/patched", compare_to="HEAD")
    chart = repo / "evals/sentiment/by-model/models--patched/compare.png"
    mine = chart.read_bytes()
    again = {o.step: o.status for o in run.run().outcomes}
    assert again["eval:sentiment"] == "up to date" and chart.read_bytes() == mine
    with pytest.raises(EvalError, match=r"evals/sentiment holds the predictions of models/ft/sentiment .*not of models/patched"):
        ml.evaluate("sentiment", model="models/patched", output=str(repo / "evals/sentiment"))


def test_compare_with_a_reference_lacking_rows(project, capsys):
    """A reference that scored half the rows: its clusters place only those, both sides count the same cluster rows,
    and the text table shows both counts where they differ."""
    repo, _, _ = project
    ref = _lines(repo / "evals/sentiment/predictions.jsonl")
    half = len(ref) // 2
    (repo / "half.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ref[:half]))
    code, out, _ = _cli(capsys, "eval", "sentiment", "--model", "models/patched", "--compare", "half.jsonl", "--no-plots")
    assert code == 0 and f"clusters topics: fitted on half.jsonl ({half} rows placed)" in out and f"{half} -> {len(ref)}" in out
    rep = json.loads((repo / "evals/sentiment/by-model/models--patched/report.json").read_text())
    rows = [r for r in rep["compare"]["rows"] if r["slice"].startswith("topics:")]
    assert all(r["n_old"] == r["n_new"] for r in rows) and sum(r["n_new"] for r in rows) == half

    from fmhub.api import ml
    from fmhub.ml.evaluation import EvalError

    for bad in ({"slices": 5}, {"slices": [{"a": 1}]}, {"key": [1]}, {"score": "x"}, {"score": True}):
        (repo / "bad.jsonl").write_text("".join(json.dumps({**r, **bad}) + "\n" for r in ref))
        with pytest.raises(EvalError, match=r"bad.jsonl:1: not a predictions record"):
            ml.evaluate("sentiment", model="models/patched", compare_to="bad.jsonl", plots=False)


def test_fail_on_prints_the_rule_and_the_slices(project, capsys):
    repo, _, _ = project
    perfect = [{**r, "score": 1.0} for r in _lines(repo / "evals/sentiment/predictions.jsonl")]
    (repo / "perfect.jsonl").write_text("".join(json.dumps(r) + "\n" for r in perfect))
    code, _, err = _cli(capsys, "eval", "sentiment", "--compare", "perfect.jsonl", "--fail-on", "worse", "--no-plots", "-o", "out")
    assert code == 1 and "--fail-on worse:" in err and "slice(s) failed" in err
    assert "(all): 1.000 -> " in err and "worse than perfect.jsonl" in err
    from fmhub.api.ml import eval_failures

    flagged = {"slices": [{"name": "toys", "value": 0.5, "rest": 0.9, "n": 40, "flagged": True},
                          {"name": "tools", "value": 0.9, "rest": 0.7, "n": 40, "flagged": False}]}
    assert eval_failures(flagged, "flagged") == ["toys: 0.500 against 0.900 on the other rows (n=40): flagged"]
    assert eval_failures(flagged, None) == [] and eval_failures(flagged, "worse") == []
    code, _, err = _cli(capsys, "eval", "sentiment", "--fail-on", "worse", "--no-plots", "-o", "out")  # a gate that never fails
    assert code == 1 and "--fail-on worse needs --compare" in err and "Traceback" not in err


def test_patch_counts_weak_labels_and_rejoined_augmentations(project):
    from fmhub.api import ml
    from fmhub.ml.patch import PatchRejected

    repo, _, _ = project
    rep = json.loads((repo / "models/patched/fmhub-patch.json").read_text())
    counts = rep["counts"]
    assert counts["labelled"] == counts["used"] == counts["slice_rows"] - 2  # the two rows every function abstains on
    assert counts["replay"] == counts["used"] and rep["identity"]["model"]["path"] == "models/ft/sentiment"
    assert json.loads((repo / "models/patched/fmhub-train.json").read_text())["labels"] == "weak"
    brand_of = {b: c for c, bs in sd.BRANDS.items() for b in bs}
    augmented = [r for r in _lines(repo / "models/patched.patch.jsonl") if r["_patch"] == "augment"]
    assert augmented
    for r in augmented:  # the swapped brand's own table row, not the original's
        brands = [w for w in r["text"].split() if w in brand_of]
        assert r["entities"] == brands and r["category"] == [brand_of[b] for b in brands], r

    lines: list[str] = []
    (repo / "fmhub.yaml").write_text(loop_spec(gate="{min_gain: 2.0}").replace("output: models/patched", "output: models/never"))
    try:
        with pytest.raises(PatchRejected):
            ml.patch("toys", progress=lines.append)
    finally:
        (repo / "fmhub.yaml").write_text(loop_spec())
    said = "\n".join(lines)
    assert f"{counts['slice_rows']} in slice toys, {counts['labelled']} labelled, {counts['used']} used" in said
    assert "accuracy on weak labels" in said


def test_explain_refuses_a_changed_config_and_predictions_copied_in(project):
    """What decides a model's outputs besides its weights (config.json) is part of its identity, and the predictions
    are bound to the record that names their model: neither an edited config nor another model's predictions copied
    over the declared model's pass, and a record in no shape fmhub writes is refused in one line."""
    from fmhub.api import ml
    from fmhub.ml.explain import ProvenanceError

    repo, _, _ = project
    shutil.copytree(repo / "models/patched", repo / "models/cfg")
    ml.evaluate("sentiment", model="models/cfg", plots=False)
    config = json.loads((repo / "models/cfg/config.json").read_text())
    (repo / "models/cfg/config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    with pytest.raises(ProvenanceError, match=r"holds predictions of models/cfg \(weights \w+\), not of models/cfg"):
        ml.explain("sentiment", model="models/cfg", limit=1, method="embedding")

    mine = repo / "evals/sentiment/predictions.jsonl"
    record = Path(str(mine) + ".lineage.json")
    kept = mine.read_bytes(), record.read_bytes()
    ml.evaluate("sentiment", model="models/patched", plots=False)
    try:
        mine.write_bytes((repo / "evals/sentiment/by-model/models--patched/predictions.jsonl").read_bytes())
        with pytest.raises(ProvenanceError, match=r"predictions.jsonl is not the file fmhub eval wrote for models/ft/sentiment "
                                                  r"\(weights \w+\) \(edited or copied in since\); run `fmhub eval sentiment`"):
            ml.explain("sentiment", limit=1, method="embedding")
        mine.write_bytes(kept[0])
        rec = json.loads(kept[1])
        for bad in ({"model": "models/ft/sentiment"}, {"model": {"path": 3}}, "x", {"model": {"path": "m", "rev": None}, "adapter": 1}):
            record.write_text(json.dumps({**rec, "params": {**rec["params"], "identity": bad}}))
            with pytest.raises(ProvenanceError, match="holds predictions of an unknown model"):
                ml.explain("sentiment", limit=1, method="embedding")
    finally:
        mine.write_bytes(kept[0])
        record.write_bytes(kept[1])


def test_every_model_path_gets_its_own_directory(project):
    """Slugs map back to what names the model: paths that would share one (``a--b`` and ``a/b``, an absolute path and
    the same path in the repository, non-ASCII names, a branch name) get a hash; a symlink to a model is that model."""
    from fmhub.ml import evaluation, identity
    from fmhub.project.spec import load_spec

    def slug(path: str, rev: str | None = None, adapter: str | None = None) -> str:
        return identity.slug({"model": {"path": path, "rev": rev}, "adapter": {"path": adapter, "rev": None} if adapter else None})

    sha = "1a2b3c4d5e6f" + "0" * 28
    assert slug("models/patched") == "models--patched" and slug("models/base", sha) == "models--base@1a2b3c4d5e6f"
    assert slug("models/base", adapter="adapters/x") == "models--base+adapters--x"
    pairs = [("models/a--b", "models/a/b"), ("/tmp/x/model", "tmp/x/model"), ("models/é", "models/ü"), ("models/a-/b", "models/a/-b"),
             ("models/a b", "models/a_b"), ("models/x@1", "models/x"), ("../m", "m"), ("models/.x", "models/x")]
    for a, b in pairs:
        assert slug(a) != slug(b), (a, b)
    assert slug("m", "feature/x") != slug("m", "feature_x") and slug("m", "feature/x") != slug("m")
    assert len(slug("models/" + "x" * 300)) <= identity.MAX_SLUG and "/" not in slug("/a/../b") and not slug("../m").startswith(".")

    repo, _, _ = project
    (repo / "models/a").mkdir()
    for d in ("models/a--b", "models/a/b"):
        shutil.copytree(repo / "models/init", repo / d)
    loaded = load_spec(None)
    outs = {m: evaluation.plan(loaded, "sentiment", model=m, read_rows=False).output for m in ("models/a--b", "models/a/b")}
    assert outs["models/a--b"] != outs["models/a/b"]


def test_a_symlinked_model_is_its_own_name(project):
    """A link is a name: ``--model`` of a link to another model gets the link's directory and explain finds its
    training data through the link; a declared link pointed at another version keeps its eval directory (the
    weights' hashes tell the versions apart): explain refuses the old predictions, and eval writes over them."""
    from fmhub.api import ml
    from fmhub.ml.explain import ProvenanceError

    repo, _, _ = project
    (repo / "models/link").symlink_to("patched", target_is_directory=True)
    ml.evaluate("sentiment", model="models/link", plots=False)
    got = ml.explain("sentiment", model="models/link", limit=1, k=1, method="embedding")
    patched = json.loads((repo / "models/patched/fmhub-patch.json").read_text())["identity"]
    assert got["identity"]["model"]["path"] == "models/link" and "by-model/models--link/" in got["predictions"]
    assert got["train"] and got["identity"]["model"]["weights"] != patched["model"]["weights"]  # the patched, not its base

    spec = (repo / "fmhub.yaml").read_text()
    try:
        (repo / "fmhub.yaml").write_text(spec.replace("model: models/ft/sentiment}", "model: models/link, output: evals/linked}"))
        ml.evaluate("sentiment", plots=False)
        (repo / "models/link").unlink()
        (repo / "models/link").symlink_to("ft/sentiment", target_is_directory=True)
        with pytest.raises(ProvenanceError, match=r"holds predictions of models/link \(weights \w+\), not of models/link"):
            ml.explain("sentiment", limit=1, method="embedding")
        assert ml.evaluate("sentiment", plots=False).report["identity"]["model"]["path"] == "models/link"
    finally:
        (repo / "fmhub.yaml").write_text(spec)


def test_unchanged_weights_are_not_read_again(tmp_path, monkeypatch):
    """The sha256 cache: a second identity of an unchanged model reads no file; a byte changed under the same size and
    a restored mtime is read again (ctime), so is an entry written within 2 s of the file's change (git's racy clean),
    and a corrupt or oversized cache file is ignored and replaced."""
    import os
    import time

    from fmhub.base.errors import FmhubError
    from fmhub.ml import hashcache, identity

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w" * 1000)
    (model / "config.json").write_text("{}")
    cache = tmp_path / "cache"
    reads: list[str] = []
    real = hashcache.file_sha256
    monkeypatch.setattr(hashcache, "file_sha256", lambda p: reads.append(os.path.basename(p)) or real(p))
    monkeypatch.setattr(identity, "_cache_dir", lambda where: str(cache))

    first = identity.files(str(model))
    assert sorted(reads) == ["config.json", "model.safetensors"]
    identity.files(str(model))  # written in the same instant the files changed: racy, so read again
    assert len(reads) == 4
    later = time.time_ns() + 10 * 10**9
    monkeypatch.setattr(hashcache, "_now_ns", lambda: later)
    identity.files(str(model))
    assert len(reads) == 6
    assert identity.files(str(model)) == first and len(reads) == 6  # unchanged, not racy: nothing read

    st = os.stat(model / "model.safetensors")
    with open(model / "model.safetensors", "r+b") as f:
        f.write(b"X")
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: ctime moved
    again = identity.files(str(model))
    assert reads[6:] == ["model.safetensors"] and again[0] != first[0] and again[1] == first[1]

    entries = json.loads((cache / hashcache.NAME).read_text())["entries"]
    key = str((model / "model.safetensors").resolve())
    entries[key][4] = "0" * 64  # a stale hash under a matching key written long after: trusted only through its key
    (cache / hashcache.NAME).write_text(json.dumps({"v": hashcache.VERSION, "entries": entries}))
    assert identity.files(str(model))[0] == {"model.safetensors": "0" * 64} and len(reads) == 7
    for corrupt in ("{not json", json.dumps({"v": 1, "entries": {key: [1, 2]}}), "[]", "[" * 100_000, " " * (hashcache.MAX_BYTES + 1)):
        (cache / hashcache.NAME).write_text(corrupt)
        assert identity.files(str(model)) == again
    assert len(reads) == 7 + 5 * 2
    def written_while_read(p: str) -> str:  # a writer still at work: the hash is of no version the stat describes
        reads.append("busy")
        with open(p, "ab") as f:
            f.write(b"more")
        return real(p)

    (model / "model.safetensors").write_bytes(b"v" * 1000)
    monkeypatch.setattr(hashcache, "file_sha256", written_while_read)
    identity.files(str(model))
    monkeypatch.setattr(hashcache, "file_sha256", lambda p: reads.append(os.path.basename(p)) or real(p))
    identity.files(str(model))
    assert reads[-2:] == ["busy", "model.safetensors"]  # not kept: read again

    (model / "shard.safetensors").symlink_to(tmp_path / "gone")  # a half-downloaded snapshot: one line, naming it
    with pytest.raises(FmhubError, match=r"shard.safetensors: cannot be read \(No such file or directory\)"):
        identity.files(str(model))
    (model / "shard.safetensors").unlink()

    monkeypatch.setattr(hashcache, "MAX_ENTRIES", 1)
    (model / "config.json").write_text('{"a": 1}')  # one entry written: the cache keeps the newest only
    identity.files(str(model))
    assert len(json.loads((cache / hashcache.NAME).read_text())["entries"]) == 1


@pytest.mark.slow
def test_the_loop_on_the_planted_task(repo, monkeypatch):
    """Issue 26's "done when", at the size where it means something: one spec; the eval flags the planted slice,
    explain blames the planted rows of the model that predicted, the patch fixes the slice, --compare shows it on the
    same rows, and explain after --compare explains the patched model (and names it)."""
    monkeypatch.chdir(repo)
    g = write_project(repo, 480, 240, 240, hidden=64, layers=2,
                      spec=loop_spec(ft_steps=80, patch_steps=40, batch_size=16, clusters=3,
                                     gate="{min_gain: 0.2, max_regression: 0.15}"))
    done = json.loads(fmhub(repo, "run", "--json").stdout)
    assert {s["status"] for s in done["steps"]} == {"ran"}
    rep = json.loads((repo / "evals/sentiment/report.json").read_text())
    by = {s["name"]: s for s in rep["slices"]}
    assert by["toys"]["flagged"] and not by["tools"]["flagged"]
    blamed = json.loads(fmhub(repo, "explain", "sentiment", "--slice", "toys", "--limit", "4", "--json").stdout)
    hits = [inf["index"] in set(g.planted) for q in blamed["queries"] for inf in q["influences"]]
    # measured: 0.475 of the top-10s are planted rows, against a base rate of ~0.17
    assert blamed["model"] == "models/ft/sentiment" and sum(hits) / len(hits) > 2 * len(g.planted) / len(g.train)
    gate = {r["slice"]: r for r in json.loads((repo / "models/patched/fmhub-patch.json").read_text())["gate"]["table"]}
    assert gate["toys"]["after"] - gate["toys"]["before"] >= 0.2

    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "the loop")
    cmp = json.loads(fmhub(repo, "eval", "sentiment", "--model", "models/patched", "--compare", "HEAD", "--json").stdout)
    rows = {r["slice"]: r for r in cmp["compare"]["rows"]}
    assert rows["toys"]["verdict"] == "better" and all(rows[f"topics:{k}"]["n_old"] == rows[f"topics:{k}"]["n_new"] for k in range(3))
    text = fmhub(repo, "explain", "sentiment", "--model", "models/patched", "--limit", "2").stdout.decode()
    assert "explaining models/patched (weights " in text
    declared = fmhub(repo, "explain", "sentiment", "--limit", "1", "--json").stdout
    assert json.loads(declared)["identity"]["model"]["path"] == "models/ft/sentiment"

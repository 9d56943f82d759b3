"""Monitoring and patching at a larger scale: find the planted slice, blame the planted rows, patch it behind the gate.

    python benchmarks/patch_bench.py                  # hidden 128, 4 layers, 2400 training rows (~10 min on 2 cores)
    python benchmarks/patch_bench.py --scale small    # the test's scale, a quick run
    python benchmarks/patch_bench.py --json out.json

Generated reviews (benchmarks/slice_data.py) with toy-brand positives planted
as negatives train the base; then, in a real git repository, through fmhub's
own entry points: joins, the sliced eval, `explain`, the patch and its gate.
Baselines measured in the same run:

* provenance: a random ranking (its precision is the planted rows' share) and
  the embedding method, against the gradient (TracIn) method;
* patching: retraining the base from scratch on the training data with the
  planted rows' labels corrected (an oracle that knows which rows are bad),
  in wall time and in what it does to every slice.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import slice_data as sd  # noqa: E402

SCALES = {
    "small": dict(hidden=64, layers=2, n_train=480, n_eval=240, n_pool=240, steps=80, patch_steps=40, batch=16, queries=8),
    "default": dict(hidden=128, layers=4, n_train=2400, n_eval=900, n_pool=1200, steps=300, patch_steps=120, batch=32, queries=16),
}


def _git(root: str, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="default")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--workdir", help="where the benchmark's repository goes (default: a new temp directory, kept)")
    args = ap.parse_args()
    cfg = SCALES[args.scale]

    import warnings

    warnings.filterwarnings("ignore")
    from fmhub.ml import evaluation
    from fmhub.data import join
    from fmhub.data.label import pipeline as labelling
    from fmhub.ml import patch
    from fmhub.ml import explain as provenance
    from fmhub.ml.autotune import train_adapter
    from fmhub.ml.tasks import Task
    from fmhub.project.spec import load_spec

    root = tempfile.mkdtemp(prefix="fmhub-patch-bench-", dir=args.workdir)
    os.chdir(root)
    _git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "fmhub", "install"], cwd=root, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "fmhub", "track", "*.safetensors"], cwd=root, check=True, capture_output=True)
    g = sd.make_task(n_train=cfg["n_train"], n_eval=cfg["n_eval"], n_pool=cfg["n_pool"], seed=args.seed)
    sd.write_jsonl("data/train.jsonl", g.train)
    sd.write_jsonl("data/eval.jsonl", g.eval)
    sd.write_jsonl("data/pool.jsonl", g.pool)
    sd.write_table("data/brands.csv", g.table)
    sd.write_jsonl("data/category.jsonl", sd.category_rows(g.train))
    sd.tiny_llama("models/init", hidden=cfg["hidden"], layers=cfg["layers"])
    task = Task("reviews", "data/train.jsonl", metric="accuracy", classes=sd.CLASSES)
    train_kw = dict(steps=cfg["steps"], batch_size=cfg["batch"], lrs=[3e-3], sparsity=0.0)
    t0 = time.monotonic()
    train_adapter("models/init", task, "models/base", **train_kw)
    base_seconds = time.monotonic() - t0
    with open("fmhub.yaml", "w") as f:
        f.write(sd.spec(patch_steps=cfg["patch_steps"], batch_size=cfg["batch"], sparsity=0.99))
    loaded = load_spec("fmhub.yaml")
    for name in loaded.spec.join:
        join.run_join(loaded, name)
    labelling.run(loaded, "pool")

    # 1. the report finds the slice
    t0 = time.monotonic()
    rep = evaluation.run_eval(loaded, "sentiment")
    eval_seconds = time.monotonic() - t0
    flagged = [s["name"] for s in rep["slices"] if s["flagged"]]
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "base model and its eval")

    # 2. provenance precision@10 on the toy slice's failures
    planted, k = set(g.planted), 10
    res = {}
    for method in ("gradient", "embedding"):
        t0 = time.monotonic()
        out = provenance.explain_eval(loaded, "sentiment", slice_name="toys", limit=cfg["queries"], k=k, method=method)
        ranked = [[inf["index"] for inf in q["influences"]] for q in out["queries"]]
        res[method] = {"precision_at_10": provenance.precision_at_k(ranked, planted, k), "seconds": time.monotonic() - t0,
                       "queries": len(ranked)}
    rnd = random.Random(0)
    ranked = [rnd.sample(range(len(g.train)), k) for _ in range(cfg["queries"])]
    res["random"] = {"precision_at_10": provenance.precision_at_k(ranked, planted, k), "seconds": 0.0, "queries": len(ranked)}

    # 3. the patch and its gate
    t0 = time.monotonic()
    try:
        prep = patch.run_patch(loaded, "toys")
    except patch.PatchRejected as exc:
        prep = exc.report
    patch_seconds = time.monotonic() - t0
    gate = {r["slice"]: r for r in prep["gate"]["table"]}
    patch_train = None
    if prep["gate"]["passed"]:
        with open(os.path.join("models/base-patched", "fmhub-train.json")) as f:
            patch_train = json.load(f)["seconds"]

    # baseline: retrain the base from scratch with the planted labels corrected (knowing which rows are bad)
    fixed = [dict(r, label="pos") if i in planted else r for i, r in enumerate(g.train)]
    sd.write_jsonl("data/train.oracle.jsonl", fixed)
    t0 = time.monotonic()
    oracle_train = train_adapter("models/init", Task("oracle", "data/train.oracle.jsonl", metric="accuracy", classes=sd.CLASSES),
                                 "models/oracle", **train_kw).seconds
    oracle_seconds = time.monotonic() - t0
    oracle = evaluation.run_eval(loaded, "sentiment", model="models/oracle", output="evals/oracle", plots=False)
    oracle_by = {s["name"]: s["value"] for s in oracle["slices"]}

    # 4. the regression table between the committed base and the patched one
    cmp = None
    if prep["gate"]["passed"]:
        # against the base's predictions as committed at HEAD (the eval's own output directory, read through git)
        cmp = evaluation.run_eval(loaded, "sentiment", model="models/base-patched", compare_to="HEAD", plots=False)["compare"]

    def fmt(v):
        return "—" if v is None else f"{v:.3f}"

    print(f"\nfmhub patch benchmark ({args.scale}: Llama {cfg['hidden']} wide, {cfg['layers']} layers; "
          f"{cfg['n_train']} training rows, {len(planted)} planted = {len(planted) / cfg['n_train']:.1%})\n")
    print(f"1. slice discovery: flagged {flagged} (planted: toys; the Japanese brands are toy brands) "
          f"eval {eval_seconds:.1f} s on {rep['rows']} rows")
    print("\n2. provenance on the toy slice's failing rows:")
    print(f"   {'method':10} {'precision@10':>13} {'vs random':>10} {'seconds':>8}")
    for m in ("gradient", "embedding", "random"):
        ratio = res[m]["precision_at_10"] / max(res["random"]["precision_at_10"], 1e-9)
        print(f"   {m:10} {res[m]['precision_at_10']:13.3f} {ratio:9.2f}x {res[m]['seconds']:8.1f}")
    print(f"\n3. patch ({prep['method']}, sparsity {prep['sparsity']}, {prep['steps']} steps, "
          f"{sum(prep['counts'][c] for c in ('slice_rows', 'augmented', 'replay'))} rows): gate {'PASSED' if prep['gate']['passed'] else 'FAILED'}")
    print(f"   {'slice':16} {'n':>5} {'before':>7} {'patched':>8} {'change':>7} {'oracle retrain':>15}")
    for name, r in gate.items():
        o = oracle["overall"]["value"] if name == "(all)" else oracle_by.get(name)
        print(f"   {name:16} {r['n']:5d} {fmt(r['before']):>7} {fmt(r['after']):>8} {r['gain']:+7.3f} {fmt(o):>15}")
    n_patch = sum(prep["counts"][c] for c in ("slice_rows", "augmented", "replay"))
    print(f"   training: patch {prep['steps']} steps x {cfg['batch']} on {n_patch} rows, 1 % of the entries; "
          f"retrain {cfg['steps']} steps x {cfg['batch']} on {cfg['n_train']} rows, every entry "
          f"(steps: {prep['steps'] / cfg['steps']:.2f}x)")
    if patch_train is not None:
        print(f"   training time: patch {patch_train:.1f} s, retrain {oracle_train:.1f} s ({patch_train / oracle_train:.2f}x)")
    print(f"   wall time: fmhub patch {patch_seconds:.1f} s (two evals of {rep['rows']} rows, labelling, Fisher, training, gate), "
          f"retrain {oracle_seconds:.1f} s; the base's own training took {base_seconds:.1f} s")
    if cmp:
        print("\n4. regression table, committed base -> patched: " +
              ", ".join(f"{r['slice']} {r['verdict']}" for r in cmp["rows"]))
    figures = {"scale": args.scale, "config": cfg, "flagged": flagged, "provenance": res,
               "patch": {"gate": prep["gate"], "seconds": patch_seconds, "train_seconds": patch_train, "counts": prep["counts"]},
               "oracle": {"seconds": oracle_seconds, "train_seconds": oracle_train, "overall": oracle["overall"]["value"], "slices": oracle_by},
               "compare": cmp, "repo": root}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2, default=str)


if __name__ == "__main__":
    main()

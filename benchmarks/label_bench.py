"""Label models side by side: majority vote, snorkel's LabelModel, fmhub's (without and with gold labels).

The dataset is `label_data.reviews` (deterministic, with ground truth; see its
docstring for why it is generated), the labelling functions `label_data.LFS`,
applied by fmhub's own pipeline (``fmhub.data.label.pipeline.collect_votes``) from an
fmhub.yaml written to a work directory, so the votes are exactly those
``fmhub label`` would see. Every method then labels the same vote matrix.

Conventions (the same for every method):

- "covered acc": accuracy on the rows where at least one function voted;
  a tie (majority vote, or probabilities exactly equal) is broken at random
  with a fixed seed.
- "overall acc": accuracy on every row, with a row no function voted on
  counted wrong (no method may guess from silence), so overall = covered acc
  × coverage.
- Rows used as gold are left out of the evaluation, for every method.

snorkel (``pip install 'fmhub[bench]'``) is fitted with its defaults
(``n_epochs=500``) and a fixed seed; without it the benchmark says so and
runs the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import label_data  # noqa: E402

from fmhub.data.label.model import ABSTAIN, LabelModel, majority_vote, redundancy_weights, redundant_pairs  # noqa: E402
from fmhub.data.label.suggest import suggest  # noqa: E402

CLASSES = ["negative", "positive"]


def build_votes(workdir: str, n: int, seed: int, backend: str, workers: int):
    """Write the dataset, the LFs and an fmhub.yaml; return (L, truth) from fmhub's pipeline."""
    from fmhub.data.label import pipeline as labelling
    from fmhub.project.spec import load_spec

    rows = label_data.reviews(n, seed)
    with open(os.path.join(workdir, "reviews.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if k != "truth"}) + "\n")
    with open(os.path.join(workdir, "bench_lfs.py"), "w") as f:
        f.write(label_data.LFS_PY)
    spec = {"label": {"reviews": {"input": "reviews.jsonl", "output": "reviews.labelled.jsonl", "classes": CLASSES,
                                  "lfs": label_data.LFS, "batch_size": 2000}}}
    with open(os.path.join(workdir, "fmhub.yaml"), "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    prep = labelling.prepare(load_spec(os.path.join(workdir, "fmhub.yaml")))
    t = time.monotonic()
    collected = labelling.collect_votes(prep, backend, workers)
    votes_s = time.monotonic() - t
    truth = np.array([CLASSES.index(r["truth"]) for r in rows])
    return collected.matrix.astype(np.int64), truth, [s.name for s in prep.specs], votes_s


def pick(proba, rng):
    """argmax with exact ties broken at random."""
    best = proba.max(1, keepdims=True)
    ties = np.isclose(proba, best, rtol=0, atol=1e-12)
    noise = rng.random(proba.shape) * ties
    return noise.argmax(1)


def score(pred, truth, covered, mask):
    ok = (pred == truth) & covered & mask
    return float(ok.sum() / (covered & mask).sum()), float(ok.sum() / mask.sum())


def run(n: int, seed: int, gold_n: int, backend: str, workers: int, workdir: str) -> dict:
    L, y, names, votes_s = build_votes(workdir, n, seed, backend, workers)
    k = len(CLASSES)
    covered = (L != ABSTAIN).any(1)
    rng = np.random.default_rng(seed)
    gold_rows = rng.choice(n, size=gold_n, replace=False)
    eval_mask = np.ones(n, bool)
    eval_mask[gold_rows] = False
    results = []

    def add(method, pred, secs):
        cov_acc, all_acc = score(pred, y, covered, eval_mask)
        results.append({"method": method, "covered_acc": cov_acc, "overall_acc": all_acc,
                        "coverage": float(covered[eval_mask].mean()), "fit_s": secs})

    t = time.monotonic()
    mv = majority_vote(L, k)
    onehot = np.stack([(L == c).sum(1) for c in range(k)], 1).astype(float)
    add("majority vote", pick(onehot, np.random.default_rng(0)), time.monotonic() - t)

    try:
        from snorkel.labeling.model import LabelModel as SnorkelLabelModel
    except ImportError:
        print("snorkel is not installed (pip install 'fmhub[bench]'): its row is skipped", file=sys.stderr)
    else:
        t = time.monotonic()
        sn = SnorkelLabelModel(cardinality=k, verbose=False)
        sn.fit(L_train=L, n_epochs=500, seed=123, progress_bar=False)
        add("snorkel LabelModel", pick(sn.predict_proba(L), np.random.default_rng(0)), time.monotonic() - t)
        # the same with the functions fmhub finds redundant removed by hand (snorkel is not told dependencies by default)
        keep = [j for j in range(L.shape[1]) if j not in {a for a, _, _ in redundant_pairs(L)}]
        t = time.monotonic()
        sn = SnorkelLabelModel(cardinality=k, verbose=False)
        sn.fit(L_train=L[:, keep], n_epochs=500, seed=123, progress_bar=False)
        add("snorkel, copies removed by hand", pick(sn.predict_proba(L[:, keep]), np.random.default_rng(0)), time.monotonic() - t)

    pairs = redundant_pairs(L)
    weights = redundancy_weights(L.shape[1], pairs)
    for variant, kw, w in [("no redundancy weights", {}, None), ("abstains=evidence", {"abstains": "evidence"}, weights),
                           ("abstains=votes", {"abstains": "votes"}, weights)]:
        t = time.monotonic()
        alt = LabelModel(k, **kw).fit(L, weights=w)
        add(f"fmhub, {variant}", pick(alt.predict_proba(L), np.random.default_rng(0)), time.monotonic() - t)

    t = time.monotonic()
    lm = LabelModel(k).fit(L, weights=weights)
    proba = lm.predict_proba(L)
    add(f"fmhub LabelModel ({lm.mode})", pick(proba, np.random.default_rng(0)), time.monotonic() - t)

    gold = {int(i): int(y[i]) for i in gold_rows}
    t = time.monotonic()
    add(f"fmhub + {gold_n} random gold", pick(LabelModel(k).fit(L, gold=gold, weights=weights).predict_proba(L), np.random.default_rng(0)),
        time.monotonic() - t)

    # active learning: the same number of hand labels, on the rows fmhub suggests (scored on the other rows)
    chosen = suggest(proba, L, gold_n)
    al_mask = np.ones(n, bool)
    al_mask[chosen] = False
    t = time.monotonic()
    al = pick(LabelModel(k).fit(L, gold={i: int(y[i]) for i in chosen}, weights=weights).predict_proba(L), np.random.default_rng(0))
    secs = time.monotonic() - t
    cov_acc, all_acc = score(al, y, covered, al_mask)
    results.append({"method": f"fmhub + {gold_n} suggested gold", "covered_acc": cov_acc, "overall_acc": all_acc,
                    "coverage": float(covered[al_mask].mean()), "fit_s": secs})

    truth_acc = {name: float((L[:, j][L[:, j] != ABSTAIN] == y[L[:, j] != ABSTAIN]).mean()) for j, name in enumerate(names)}
    return {
        "rows": n, "seed": seed, "gold": gold_n, "positive_share": float(y.mean()), "coverage": float(covered.mean()),
        "majority_vote_abstains": int((mv == ABSTAIN).sum()),
        "lfs": [{"name": name, "coverage": float((L[:, j] != ABSTAIN).mean()), "true_accuracy": truth_acc[name],
                 "learned_accuracy": float(lm.accuracies()[j]), "weight": float(weights[j])} for j, name in enumerate(names)],
        "redundant_pairs": [[names[a], names[b], round(s, 3)] for a, b, s in pairs],
        "votes_s": votes_s, "results": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gold", type=int, default=50)
    ap.add_argument("--backend", default="processes")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", help="where to write the dataset and spec (default: a temp dir)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        res = run(args.rows, args.seed, args.gold, args.backend, args.workers, workdir)
    print(f"{res['rows']} reviews (seed {res['seed']}, {100 * res['positive_share']:.0f}% positive), {len(res['lfs'])} labelling functions, "
          f"coverage {100 * res['coverage']:.1f}%; votes by fmhub's pipeline in {res['votes_s']:.1f} s")
    print(f"{'function':<14}{'coverage':>10}{'true acc':>10}{'learned':>10}{'weight':>8}")
    for lf in res["lfs"]:
        print(f"{lf['name']:<14}{100 * lf['coverage']:>9.1f}%{100 * lf['true_accuracy']:>9.1f}%{100 * lf['learned_accuracy']:>9.1f}%{lf['weight']:>8.2f}")
    print()
    print(f"{'method':<32}{'covered acc':>12}{'overall acc':>12}{'coverage':>10}{'fit s':>8}")
    for r in res["results"]:
        print(f"{r['method']:<32}{100 * r['covered_acc']:>11.2f}%{100 * r['overall_acc']:>11.2f}%{100 * r['coverage']:>9.1f}%{r['fit_s']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

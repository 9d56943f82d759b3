"""Label models side by side: fmhub's LabelModel, majority vote and snorkel's LabelModel.

Three sections (``--section``, default all), one command:

``regimes``
    Eight regimes of vote matrices drawn with ground truth from a seed
    (`label_data.REGIMES`: balanced, imbalanced 10/90, one-class keyword
    rules that fire more on long rows, 3 classes 60/30/10, near-copies,
    3 of 10 functions worse than chance, sparse coverage, 60 weak
    functions), 5 seeds × 10,000 rows each. Printed per regime: covered-row
    accuracy, mean and min over seeds, for majority vote, snorkel, fmhub with
    the API's defaults and fmhub as ``fmhub label`` configures it (the same
    model: `pipeline.model_from_options({})`), the readings fmhub chose, how
    many fits warned, and a check: fmhub ≥ majority vote − 0.01 and ≥
    snorkel − 0.01 in every seed.
``speed``
    Fit time and peak memory (RSS above the process's size before the fit,
    sampled every 5 ms, each fit in its own process) for 50 functions ×
    10⁴, 10⁵, 10⁶ rows, fmhub against snorkel; numpy and torch on one thread.
``reviews``
    The product-review dataset of `label_data.reviews` (text, with ground
    truth) labelled by nine realistic functions through fmhub's own pipeline
    (``fmhub.data.label.pipeline.collect_votes``), so the votes are exactly
    those ``fmhub label`` would see.

Conventions (the same for every method):

- "covered acc": accuracy on the rows where at least one function voted;
  a tie (majority vote, or probabilities exactly equal) is broken at random
  with a fixed seed.
- "overall acc" (reviews): accuracy on every row, with a row no function
  voted on counted wrong, so overall = covered acc × coverage.
- Rows used as gold are left out of the evaluation, for every method.

snorkel (``pip install 'fmhub[bench]'``) is fitted with its defaults
(``n_epochs=500``) and a fixed seed; without it the benchmark says so and
runs the rest. ``--quick``: 3 seeds × 4,000 rows, speed up to 10⁵ rows.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # fixed threads, before numpy loads
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import label_data  # noqa: E402

from fmhub.data.label.model import ABSTAIN, LabelModel, majority_vote  # noqa: E402
from fmhub.data.label.pipeline import model_from_options  # noqa: E402
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
        # the same with the functions fmhub groups as dependent removed by hand (snorkel is not told dependencies by default)
        dropped = {a for a, _, _ in LabelModel(k).fit(L).dependent_pairs()}
        keep = [j for j in range(L.shape[1]) if j not in dropped]
        t = time.monotonic()
        sn = SnorkelLabelModel(cardinality=k, verbose=False)
        sn.fit(L_train=L[:, keep], n_epochs=500, seed=123, progress_bar=False)
        add("snorkel, copies removed by hand", pick(sn.predict_proba(L[:, keep]), np.random.default_rng(0)), time.monotonic() - t)

    for variant, kw in [("no dependencies", {"dependencies": None}), ("abstains=evidence", {"abstains": "evidence"}),
                        ("abstains=votes", {"abstains": "votes"})]:
        t = time.monotonic()
        alt = LabelModel(k, **kw).fit(L)
        add(f"fmhub, {variant}", pick(alt.predict_proba(L), np.random.default_rng(0)), time.monotonic() - t)

    t = time.monotonic()
    lm = LabelModel(k).fit(L)
    proba = lm.predict_proba(L)
    add(f"fmhub LabelModel ({lm.mode})", pick(proba, np.random.default_rng(0)), time.monotonic() - t)
    pairs = lm.dependent_pairs()

    gold = {int(i): int(y[i]) for i in gold_rows}
    t = time.monotonic()
    add(f"fmhub + {gold_n} random gold", pick(LabelModel(k).fit(L, gold=gold).predict_proba(L), np.random.default_rng(0)),
        time.monotonic() - t)

    # active learning: the same number of hand labels, on the rows fmhub suggests (scored on the other rows)
    chosen = suggest(proba, L, gold_n)
    al_mask = np.ones(n, bool)
    al_mask[chosen] = False
    t = time.monotonic()
    al = pick(LabelModel(k).fit(L, gold={i: int(y[i]) for i in chosen}).predict_proba(L), np.random.default_rng(0))
    secs = time.monotonic() - t
    cov_acc, all_acc = score(al, y, covered, al_mask)
    results.append({"method": f"fmhub + {gold_n} suggested gold", "covered_acc": cov_acc, "overall_acc": all_acc,
                    "coverage": float(covered[al_mask].mean()), "fit_s": secs})

    truth_acc = {name: float((L[:, j][L[:, j] != ABSTAIN] == y[L[:, j] != ABSTAIN]).mean()) for j, name in enumerate(names)}
    return {
        "rows": n, "seed": seed, "gold": gold_n, "positive_share": float(y.mean()), "coverage": float(covered.mean()),
        "majority_vote_abstains": int((mv == ABSTAIN).sum()),
        "lfs": [{"name": name, "coverage": float((L[:, j] != ABSTAIN).mean()), "true_accuracy": truth_acc[name],
                 "learned_accuracy": float(lm.accuracies()[j]), "group_of": names[lm.parents[j]] if lm.parents[j] >= 0 else None}
                for j, name in enumerate(names)],
        "mode": lm.mode, "warnings": lm.warnings,
        "redundant_pairs": [[names[a], names[b], round(s, 3)] for a, b, s in pairs],  # a read given b (kappa)
        "votes_s": votes_s, "results": results,
    }


def regime_run(name: str, n: int, seed: int) -> dict:
    """Every method on one regime and seed: covered-row accuracy, fit seconds, fmhub's reading and warnings."""
    L, y, k = label_data.REGIMES[name](n, seed)
    covered = (L != ABSTAIN).any(1)

    def acc(proba) -> float:
        return float((pick(proba, np.random.default_rng(seed)) == y)[covered].mean())

    out = {"regime": name, "seed": seed, "k": k, "m": L.shape[1]}
    out["majority vote"] = acc(np.stack([(L == c).sum(1) for c in range(k)], 1).astype(float))
    try:
        from snorkel.labeling.model import LabelModel as SnorkelLabelModel
    except ImportError:
        pass
    else:
        sn = SnorkelLabelModel(cardinality=k, verbose=False)
        sn.fit(L_train=L, n_epochs=500, seed=123, progress_bar=False)
        out["snorkel"] = acc(sn.predict_proba(L))
    t = time.monotonic()
    lm = LabelModel(k).fit(L)
    out["fit_s"] = time.monotonic() - t
    out["fmhub"] = acc(lm.predict_proba(L))
    out["fmhub label"] = acc(model_from_options({}, k).fit(L).predict_proba(L))
    out["mode"], out["warnings"], out["groups"] = lm.mode, lm.warnings, len(lm.groups)
    return out


def regimes_section(n: int, seeds: int) -> list[dict]:
    rows = []
    for name in label_data.REGIMES:
        for seed in range(seeds):
            rows.append(regime_run(name, n, seed))
        print_regime(name, [r for r in rows if r["regime"] == name], n)
    return rows


REGIME_HEADER = (f"{'regime':<27}{'majority':>14}{'snorkel':>14}{'fmhub':>14}{'fmhub label':>14}{'-mv min':>9}{'-sn min':>9}"
                 f"  {'readings':<18}{'warned':>7}  check")


def print_regime(name: str, rows: list[dict], n: int) -> None:
    """One line: mean/min over seeds per method, fmhub's readings, and the check."""
    if name == next(iter(label_data.REGIMES)):
        print(f"covered-row accuracy, mean/min over {len(rows)} seeds of {n:,} rows each; -mv/-sn min: fmhub minus majority "
              "vote / snorkel, worst seed; check: fmhub >= both - 0.01 in every seed")
        print(REGIME_HEADER)
    cells = []
    for method in ("majority vote", "snorkel", "fmhub", "fmhub label"):
        vals = [r[method] for r in rows if method in r]
        cells.append(f"{np.mean(vals):.3f}/{np.min(vals):.3f}" if vals else "-")
    modes = ",".join(sorted({r["mode"] for r in rows}))
    ok = all(r["fmhub"] >= r["majority vote"] - 0.01 and r["fmhub"] >= r.get("snorkel", 0) - 0.01 for r in rows)
    warned = sum(bool(r["warnings"]) for r in rows)
    d_mv = min(r["fmhub"] - r["majority vote"] for r in rows)
    d_sn = f"{min(r['fmhub'] - r['snorkel'] for r in rows):+.3f}" if all("snorkel" in r for r in rows) else "-"
    print(f"{name:<27}" + "".join(f"{c:>14}" for c in cells) + f"{d_mv:>+9.3f}{d_sn:>9}  {modes:<18}{warned:>7}  {'ok' if ok else 'FAIL'}",
          flush=True)


def speed_votes(n: int, m: int = 50, seed: int = 0):
    """``m`` independent functions (accuracy 0.55-0.75, coverage 0.1-0.5) on ``n`` rows, two classes: int8."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(np.int8)
    acc, cov = rng.uniform(0.55, 0.75, m), rng.uniform(0.1, 0.5, m)
    L = np.empty((n, m), np.int8)
    for j in range(m):
        right = rng.random(n) < acc[j]
        L[:, j] = np.where(rng.random(n) < cov[j], np.where(right, y, 1 - y), ABSTAIN)
    return L, y


def speed_one(method: str, n: int) -> dict:
    """One fit in this process: seconds and peak RSS growth (MB), sampled every 5 ms."""
    import psutil
    import torch

    torch.set_num_threads(1)
    L, y = speed_votes(n)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    t = time.monotonic()
    if method == "fmhub":
        model = LabelModel(2).fit(L)
    else:
        from snorkel.labeling.model import LabelModel as SnorkelLabelModel

        model = SnorkelLabelModel(cardinality=2, verbose=False)
        model.fit(L_train=L, n_epochs=500, seed=123, progress_bar=False)
    secs = time.monotonic() - t
    done.set()
    peak[0] = max(peak[0], proc.memory_info().rss)
    accuracy = float((model.predict_proba(L).argmax(1) == y)[(L != ABSTAIN).any(1)].mean())
    return {"method": method, "rows": n, "fit_s": secs, "peak_mb": (peak[0] - base) / 2**20, "acc": accuracy,
            "matrix_mb": L.nbytes / 2**20}


def speed_section(sizes: list[int]) -> list[dict]:
    print(f"\nfit time, 50 functions (each fit in its own process, 1 thread)\n{'rows':>10}{'method':>9}{'fit s':>9}{'peak MB':>9}{'acc':>8}")
    out = []
    methods = ["fmhub"]
    try:
        import snorkel  # noqa: F401

        methods.append("snorkel")
    except ImportError:
        pass
    for n in sizes:
        for method in methods:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--speed-one", method, str(n)],
                                  capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            out.append(r)
            print(f"{n:>10}{method:>9}{r['fit_s']:>9.2f}{r['peak_mb']:>9.0f}{r['acc']:>8.3f}", flush=True)
    return out


def reviews_section(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        res = run(args.rows, args.seed, args.gold, args.backend, args.workers, workdir)
    print(f"\n{res['rows']} reviews (seed {res['seed']}, {100 * res['positive_share']:.0f}% positive), {len(res['lfs'])} labelling functions, "
          f"coverage {100 * res['coverage']:.1f}%; votes by fmhub's pipeline in {res['votes_s']:.1f} s")
    print(f"{'function':<14}{'coverage':>10}{'true acc':>10}{'learned':>10}  group of")
    for lf in res["lfs"]:
        print(f"{lf['name']:<14}{100 * lf['coverage']:>9.1f}%{100 * lf['true_accuracy']:>9.1f}%{100 * lf['learned_accuracy']:>9.1f}%  {lf['group_of'] or ''}")
    print()
    print(f"{'method':<32}{'covered acc':>12}{'overall acc':>12}{'coverage':>10}{'fit s':>8}")
    for r in res["results"]:
        print(f"{r['method']:<32}{100 * r['covered_acc']:>11.2f}%{100 * r['overall_acc']:>11.2f}%{100 * r['coverage']:>9.1f}%{r['fit_s']:>8.2f}")
    for w in res["warnings"]:
        print(f"warning: {w}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", choices=["all", "regimes", "speed", "reviews"], default="all")
    ap.add_argument("--quick", action="store_true", help="3 seeds × 4,000 rows, speed up to 10^5 rows, 5,000 reviews")
    ap.add_argument("--regime-rows", type=int, default=10000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=20000, help="reviews")
    ap.add_argument("--seed", type=int, default=0, help="reviews")
    ap.add_argument("--gold", type=int, default=50, help="reviews: gold rows")
    ap.add_argument("--backend", default="processes", help="reviews: fmhub's data backend for the votes")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", help="reviews: where to write the dataset and spec (default: a temp dir)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--speed-one", nargs=2, metavar=("METHOD", "ROWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.speed_one:
        print(json.dumps(speed_one(args.speed_one[0], int(args.speed_one[1]))))
        return
    if args.quick:
        args.seeds, args.regime_rows, args.rows = 3, 4000, min(args.rows, 5000)
    figures: dict = {}
    if args.section in ("all", "regimes"):
        figures["regimes"] = regimes_section(args.regime_rows, args.seeds)
    if args.section in ("all", "speed"):
        figures["speed"] = speed_section([10**4, 10**5] if args.quick else [10**4, 10**5, 10**6])
    if args.section in ("all", "reviews"):
        figures.update(reviews_section(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Cleaning throughput and near-duplicate recall/precision on a synthetic corpus with planted duplicates.

    python benchmarks/clean_bench.py                        # 100k rows (~2 min on 2 CPU cores)
    python benchmarks/clean_bench.py --rows 20000 --json out.json

Nothing is downloaded. The corpus is generated from a fixed seed: documents
of 20 to 300 words drawn from a 20,000-word vocabulary with Zipf word
frequencies (s = 1.1), 3% too short to keep, 4% with an email address or a
phone number, then 5% exact copies of earlier documents and 12% near copies
made by substituting, inserting and deleting words until a target
similarity: word-trigram Jaccard of about 0.95, 0.85, 0.75, 0.65 or 0.5 with
the source (the true value is computed and kept as ground truth).

One pipeline, ``length`` + ``pii`` + ``dedup`` + ``near-dup`` (word
trigrams, 128 permutations, threshold 0.7: the defaults), runs on the ``serial`` and
``processes`` backends; both outputs must be byte-identical. The baseline,
measured in the same run, reads and writes the same rows through
`fmhub.core.rows` with no steps, so "vs baseline" is the share of plain I/O
speed the cleaning keeps. A CPU-bound probe says how many worker processes
the machine really runs at once (a shared or throttled one runs fewer than
it has cores), which bounds the ``processes`` speed-up.

Near-duplicate quality: a planted near copy is a positive when its true
Jaccard similarity with its source is at least the threshold. Precision is
the share of rows ``near-dup`` dropped that are positives, recall the share
of positives it dropped; the table also breaks recall down by similarity.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVELS = (0.95, 0.85, 0.75, 0.65, 0.5)
BUCKETS = ((0.0, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01))
_WORD = re.compile(r"\w+")


def shingles(text: str, n: int = 3) -> set:
    """Word trigrams as ``near-dup`` sees them (casefolded ``\\w+`` words)."""
    w = _WORD.findall(text.casefold())
    return {tuple(w[i:i + n]) for i in range(max(len(w) - n + 1, 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def make_corpus(rows: int, seed: int) -> tuple[list[dict], dict]:
    """The rows, and the ground truth: {position: (kind, source position, true Jaccard)} for planted copies."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = sorted({"".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(24_000)})[:20_000]
    vocab = [vocab[i] for i in rng.permutation(len(vocab))]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()
    n_exact, n_near = int(rows * 0.05), int(rows * 0.12)
    n_orig = rows - n_exact - n_near
    lengths = np.clip(rng.lognormal(4.3, 0.6, size=n_orig).astype(int), 20, 300)
    short = rng.random(n_orig) < 0.03
    lengths[short] = rng.integers(1, 4, size=int(short.sum()))
    words = rng.choice(len(vocab), size=int(lengths.sum()), p=p)
    docs, at = [], 0
    for i, n in enumerate(lengths):
        text = [vocab[w] for w in words[at:at + n]]
        at += n
        r = rng.random()
        if r < 0.02 and n > 5:
            text.insert(int(rng.integers(n)), f"{text[0]}.{text[1]}@example.com")
        elif r < 0.04 and n > 5:
            text.insert(int(rng.integers(n)), f"+1 555 {rng.integers(100, 999)} {rng.integers(1000, 9999)}")
        docs.append(" ".join(text))
    # copies of originals, each placed at a random point after its source
    kinds = ["exact"] * n_exact + ["near"] * n_near
    rng.shuffle(kinds)
    long_enough = [i for i, d in enumerate(docs) if d.count(" ") >= 19]
    items = [(float(i), i, docs[i], None) for i in range(len(docs))]  # (sort key, source, text, kind)
    used: set[int] = set()
    for k, kind in enumerate(kinds):
        src = long_enough[int(rng.integers(len(long_enough)))]
        while src in used:
            src = long_enough[int(rng.integers(len(long_enough)))]
        used.add(src)
        text = docs[src] if kind == "exact" else _edit(docs[src], LEVELS[k % len(LEVELS)], rng, vocab, p)
        items.append((float(rng.uniform(src + 0.5, len(docs))), src, text, kind))
    items.sort(key=lambda it: it[0])
    where = {it[1]: pos for pos, it in enumerate(items) if it[3] is None}  # original index -> final position
    out, truth = [], {}
    for pos, (_, src, text, kind) in enumerate(items):
        out.append({"id": pos, "text": text})
        if kind is not None:
            truth[pos] = (kind, where[src], 1.0 if kind == "exact" else jaccard(shingles(text), shingles(docs[src])))
    return out, truth


def _edit(text: str, target: float, rng, vocab: list[str], p) -> str:
    """Substitute, insert and delete random words until word-trigram Jaccard with ``text`` drops to ``target``."""
    words = text.split()
    base = shingles(text)
    while True:
        op = rng.random()
        i = int(rng.integers(0, len(words)))
        if op < 0.6:
            words[i] = vocab[int(rng.choice(len(vocab), p=p))]
        elif op < 0.8:
            words.insert(i, vocab[int(rng.choice(len(vocab), p=p))])
        elif len(words) > 10:
            del words[i]
        if jaccard(shingles(" ".join(words)), base) <= target + 0.02:
            return " ".join(words)


def _spin(n: int) -> float:
    t = time.perf_counter()
    s = 0
    for i in range(n):
        s += i * i
    return time.perf_counter() - t


def effective_cores(workers: int, n: int = 3_000_000) -> float:
    """How many of ``workers`` CPU-bound processes really run at once here (a shared or throttled machine has fewer)."""
    import multiprocessing

    one = _spin(n)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_spin, [1000] * workers)  # start-up out of the timing
        t = time.perf_counter()
        pool.map(_spin, [n] * workers)
        wall = time.perf_counter() - t
    return workers * one / wall


SPEC = """\
clean:
  bench:
    input: corpus.jsonl
    output: {output}
    batch_size: {batch}
    steps:
      - length: {{min_words: 5}}
      - pii
      - dedup
      - near-dup: {{threshold: {threshold}, num_perm: {num_perm}}}
"""


def main(argv: list[str] | None = None) -> int:
    from fmhub.data.clean import pipeline as clean
    from fmhub.core.rows import RowWriter, read_batches
    from fmhub.project.spec import parse_spec

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (more: a closer Jaccard estimate, slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where to write the corpus and outputs (default: a temp dir)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fmhub-clean-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    rows, truth = make_corpus(args.rows, args.seed)
    src = work / "corpus.jsonl"
    with RowWriter(str(src)) as w:
        w.write(rows)
    gen_s = time.perf_counter() - t0
    planted_near = {q: v for q, v in truth.items() if v[0] == "near"}
    print(f"corpus: {len(rows)} rows ({src.stat().st_size / 1e6:.1f} MB) in {gen_s:.1f} s: "
          f"{sum(v[0] == 'exact' for v in truth.values())} exact copies, {len(planted_near)} near copies", flush=True)

    # baseline: the same rows read and written through fmhub.core.rows, no steps
    t0 = time.perf_counter()
    with RowWriter(str(work / "baseline.jsonl")) as w:
        for batch in read_batches(str(src), args.batch_size):
            w.write(batch.rows)
    base_s = time.perf_counter() - t0
    results = {"baseline": {"seconds": base_s, "rows_per_s": len(rows) / base_s}}

    outputs, decisions = {}, {}
    for backend, workers in (("serial", 1), ("processes", args.workers)):
        out = f"{backend}.jsonl"
        loaded = parse_spec(SPEC.format(output=out, batch=args.batch_size, threshold=args.threshold, num_perm=args.num_perm), str(work / "fmhub.yaml"))
        report = work / f"{backend}.report.json"
        t0 = time.perf_counter()
        res = clean.run(loaded, backend=backend, workers=workers, reports=[str(report)])
        secs = time.perf_counter() - t0
        results[backend] = {"workers": workers, "seconds": secs, "rows_per_s": len(rows) / secs,
                            "vs_baseline": (len(rows) / secs) / results["baseline"]["rows_per_s"], "rows_out": res.rows_out,
                            "steps": {s.name: {"rows_in": s.rows_in, "dropped": s.dropped, "edited": s.edited, "seconds": round(s.seconds, 3)} for s in res.steps}}
        outputs[backend] = (work / out).read_bytes()
        decisions[backend] = json.loads(report.read_text())["decisions"]
        print(f"{backend} x{workers}: {secs:.1f} s", flush=True)
    identical = outputs["serial"] == outputs["processes"] and decisions["serial"] == decisions["processes"]

    dropped = {d["position"]: d for d in decisions["serial"] if d["step"] == "near-dup"}
    positives = {q for q, v in planted_near.items() if v[2] >= args.threshold}
    tp = len(positives & set(dropped))
    precision = tp / len(dropped) if dropped else 1.0
    recall = tp / len(positives) if positives else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    # a drop is "on target" when it names the planted source, or another copy of that source kept before it
    source = {q: v[1] for q, v in truth.items()}
    on_target = sum(1 for q, d in dropped.items() if q in source and source.get(d["detail"]["duplicate_of"], d["detail"]["duplicate_of"]) == source[q])
    buckets = []
    for lo, hi in BUCKETS:
        inb = [q for q, v in planted_near.items() if lo <= v[2] < hi]
        buckets.append({"jaccard": f"[{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'}", "planted": len(inb),
                        "dropped": sum(q in dropped for q in inb)})
    est_err = [abs(d["detail"]["jaccard"] - planted_near[q][2]) for q, d in dropped.items() if q in planted_near]
    quality = {"threshold": args.threshold, "positives": len(positives), "dropped": len(dropped), "true_positives": tp,
               "precision": precision, "recall": recall, "f1": f1, "on_target": on_target / len(dropped) if dropped else 1.0,
               "mean_abs_jaccard_error": sum(est_err) / len(est_err) if est_err else 0.0, "by_similarity": buckets}

    print()
    print(f"{'run':<12}{'workers':>8}{'seconds':>10}{'rows/s':>10}{'vs baseline':>13}")
    print(f"{'baseline':<12}{'':>8}{base_s:>10.2f}{results['baseline']['rows_per_s']:>10.0f}{'1.00':>13}  (read + write, no steps)")
    for b in ("serial", "processes"):
        r = results[b]
        print(f"{b:<12}{r['workers']:>8}{r['seconds']:>10.2f}{r['rows_per_s']:>10.0f}{r['vs_baseline']:>13.3f}")
    cores = effective_cores(args.workers)
    print(f"processes/serial speed-up: {results['serial']['seconds'] / results['processes']['seconds']:.2f}x "
          f"(this machine runs {cores:.1f} of {args.workers} CPU-bound processes at once); "
          f"outputs byte-identical: {'yes' if identical else 'NO'}")
    print()
    print(f"{'step':<10}{'rows in':>10}{'dropped':>10}{'edited':>10}{'s (serial)':>12}")
    for name, s in results["serial"]["steps"].items():
        print(f"{name:<10}{s['rows_in']:>10}{s['dropped']:>10}{s['edited']:>10}{s['seconds']:>12.2f}")
    print()
    print(f"near-dup (threshold {args.threshold}): precision {precision:.4f}  recall {recall:.4f}  F1 {f1:.4f}  "
          f"({tp} of {len(positives)} planted positives, {len(dropped)} dropped; {100 * quality['on_target']:.1f}% name the planted source; "
          f"mean |estimated - true Jaccard| {quality['mean_abs_jaccard_error']:.3f})")
    print(f"{'true Jaccard':<14}{'planted':>9}{'dropped':>9}")
    for b in buckets:
        print(f"{b['jaccard']:<14}{b['planted']:>9}{b['dropped']:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": len(rows), "corpus_mb": src.stat().st_size / 1e6, "results": results,
                                               "identical": identical, "effective_cores": cores, "near_dup": quality}, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

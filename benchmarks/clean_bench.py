#!/usr/bin/env python3
"""Cleaning at corpus scale against datatrove: throughput, memory and near-duplicate precision/recall on a planted corpus.

    python benchmarks/clean_bench.py                        # 100k rows, 57 MB (~5 min on 2 CPU cores)
    python benchmarks/clean_bench.py --rows 1000000 --workdir /tmp/cb   # 576 MB of jsonl (~25 min; the corpus is kept)
    python benchmarks/clean_bench.py --rows 20000 --no-ray --no-datatrove --json out.json

Nothing is downloaded. The corpus is generated from a fixed seed: documents
of 20 to 300 words drawn from a 20,000-word vocabulary with Zipf word
frequencies (s = 1.1), 3% too short to keep, 4% with an email address or a
phone number, then 5% exact copies of earlier documents and 12% near copies
made by substituting, inserting and deleting words until a target
similarity: word-trigram Jaccard of about 0.95, 0.85, 0.75, 0.65 or 0.5 with
the source (the true value is computed and kept as ground truth). A corpus
left in ``--workdir`` by a run with the same rows and seed is reused.

One pipeline, ``length`` + ``pii`` + ``dedup`` + ``near-dup`` (word
trigrams, 128 permutations, threshold 0.7: the defaults), runs on the
``serial`` backend, on ``processes`` with ``--workers`` and on ``ray`` (a
local cluster of ``--workers`` CPUs); their outputs and report decisions
must be byte-identical. datatrove (``pip install datatrove``; skipped, saying
so, when it is not installed) runs the same four steps with its own stages
and the same MinHash parameters (benchmarks/clean_peers.py says what differs).
Each run is a process of its own: rows/s from the time its pipeline took,
the peak RSS of that process (``VmHWM``) and of its whole process tree
(sampled every 0.2 s), and CPU seconds of the calling process and of its
workers, whose split bounds what more workers can gain. The baseline reads
and writes the same rows through `fmhub.core.rows` with no steps. A
CPU-bound probe just before each multi-worker run says how many processes
the machine really runs at once (a shared machine runs fewer than it has cores).

Near-duplicate quality: a planted near copy is a positive when its true
Jaccard similarity with its source is at least the threshold. Precision is
the share of rows ``near-dup`` dropped that are positives, recall the share
of positives it dropped; the table also breaks recall down by similarity.
Against datatrove, which keeps one row of each cluster but not always the
first, a pair counts as found when its copy or its source was dropped.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

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
      - near-dup: {{threshold: {threshold}, num_perm: {num_perm}, verify: {verify}}}
"""


def load_or_make_corpus(work: Path, rows_n: int, seed: int) -> tuple[int, dict, float]:
    """The corpus in ``work`` (reused when a run with the same rows and seed left it there): rows, truth, seconds."""
    from fmhub.core.rows import RowWriter

    src, meta = work / "corpus.jsonl", work / "truth.json"
    if src.exists() and meta.exists():
        saved = json.loads(meta.read_text())
        if saved["rows"] == rows_n and saved["seed"] == seed:
            return rows_n, {int(q): tuple(v) for q, v in saved["truth"].items()}, 0.0
    t0 = time.perf_counter()
    rows, truth = make_corpus(rows_n, seed)
    with RowWriter(str(src)) as w:
        w.write(rows)
    meta.write_text(json.dumps({"rows": rows_n, "seed": seed, "truth": truth}))
    return len(rows), truth, time.perf_counter() - t0


def fmhub_side(args: argparse.Namespace, work: Path) -> dict:
    """One fmhub run, in this (child) process: the figures the parent prints."""
    from fmhub.data.clean import pipeline as clean
    from fmhub.project.spec import parse_spec

    from clean_peers import cpu_seconds, peak_rss

    name = args.backend + ("-collision" if args.no_verify else "")
    out = f"{name}.jsonl"
    loaded = parse_spec(SPEC.format(output=out, batch=args.batch_size, threshold=args.threshold, num_perm=args.num_perm,
                                    verify="false" if args.no_verify else "true"), str(work / "fmhub.yaml"))
    t0 = time.perf_counter()
    res = clean.run(loaded, backend=args.backend, workers=args.workers, reports=[str(work / f"{name}.report.json")])
    return {"seconds": time.perf_counter() - t0, "rows_out": res.rows_out, "peak_rss": peak_rss(), **cpu_seconds(),
            "steps": {s.name: {"rows_in": s.rows_in, "dropped": s.dropped, "edited": s.edited, "seconds": round(s.seconds, 3)} for s in res.steps}}


def datatrove_side(args: argparse.Namespace, work: Path) -> dict:
    from clean_peers import cpu_seconds, peak_rss, run_datatrove

    t0 = time.perf_counter()
    res = run_datatrove(work, args.workers)
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak_rss(), **cpu_seconds(), **res}


def side_cmd(args: argparse.Namespace, work: Path, side: str, backend: str, workers: int, verify: bool = True) -> list[str]:
    return [sys.executable, __file__, "--side", side, "--backend", backend, "--workers", str(workers), "--workdir", str(work),
            "--batch-size", str(args.batch_size), "--threshold", str(args.threshold), "--num-perm", str(args.num_perm)] + (
            [] if verify else ["--no-verify"])


def quality(dropped: set[int], truth: dict, threshold: float) -> dict:
    """Near-dup precision and recall by planted pair: a pair is found when its copy or its source was dropped (a
    tool may keep either: datatrove keeps one row per cluster, not the first), a drop is right when it is one of a pair."""
    pairs = {q: v[1] for q, v in truth.items() if v[0] == "near" and v[2] >= threshold}
    members = set(pairs) | set(pairs.values())
    found = sum(1 for q, src in pairs.items() if q in dropped or src in dropped)
    right = len(dropped & members)
    p = right / len(dropped) if dropped else 1.0
    r = found / len(pairs) if pairs else 1.0
    return {"dropped": len(dropped), "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def main(argv: list[str] | None = None) -> int:
    from fmhub.core.rows import RowWriter, read_batches

    from clean_peers import available, measured, shard
    from fmhub.core.store import file_sha256

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (more: a closer Jaccard estimate, slower)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where to write the corpus and outputs (default: a temp dir; a corpus left there is reused)")
    ap.add_argument("--no-datatrove", action="store_true", help="skip the datatrove run")
    ap.add_argument("--no-ray", action="store_true", help="skip the ray backend run")
    ap.add_argument("--collision", action="store_true",
                    help="also run near-dup with verify: false (a shared band is a duplicate: datatrove's rule) on the processes backend")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--no-verify", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=("fmhub", "datatrove"), help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="serial", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fmhub-clean-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.side:
        print(json.dumps((fmhub_side if args.side == "fmhub" else datatrove_side)(args, work)))
        return 0

    n, truth, gen_s = load_or_make_corpus(work, args.rows, args.seed)
    src = work / "corpus.jsonl"
    planted_near = {q: v for q, v in truth.items() if v[0] == "near"}
    print(f"corpus: {n} rows ({src.stat().st_size / 1e6:.1f} MB) {'in %.1f s' % gen_s if gen_s else '(reused)'}: "
          f"{sum(v[0] == 'exact' for v in truth.values())} exact copies, {len(planted_near)} near copies", flush=True)

    # baseline: the same rows read and written through fmhub.core.rows, no steps
    t0 = time.perf_counter()
    with RowWriter(str(work / "baseline.jsonl")) as w:
        for batch in read_batches(str(src), args.batch_size):
            w.write(batch.rows)
    base_s = time.perf_counter() - t0
    results = {"baseline": {"seconds": base_s, "rows_per_s": n / base_s}}

    runs = [("fmhub", "serial", 1), ("fmhub", "processes", args.workers)] + ([] if args.no_ray else [("fmhub", "ray", args.workers)])
    if args.collision:
        runs.append(("fmhub", "processes-collision", args.workers))
    why_not = None if not args.no_datatrove else "datatrove not measured: --no-datatrove"
    why_not = why_not or available()
    if why_not is None:
        shard(src, work / "dt_in", args.workers)
        runs.append(("datatrove", "datatrove", args.workers))
    outputs, cores = {}, {}
    for side, backend, workers in runs:
        if workers > 1:  # how many CPU-bound processes this (shared) machine runs at once, just before the run
            cores[backend] = effective_cores(workers)
        plain = backend.removesuffix("-collision")
        got, wall, tree = measured(side_cmd(args, work, side, plain, workers, verify=plain == backend))
        name = backend if side == "fmhub" else "datatrove"
        results[name] = {**got, "workers": workers, "wall_s": wall, "peak_rss_tree": tree, "rows_per_s": n / got["seconds"]}
        if side == "fmhub":
            outputs[backend] = file_sha256(str(work / f"{backend}.jsonl")), _decisions_digest(work / f"{backend}.report.json")
        print(f"{name} x{workers}: {got['seconds']:.1f} s", flush=True)
    if "processes-collision" in outputs:  # a different rule: its own output, scored below, not compared with serial's
        outputs.pop("processes-collision")
        results["processes-collision"]["near_dropped_positions"] = [
            d["position"] for d in json.loads((work / "processes-collision.report.json").read_text())["decisions"] if d["step"] == "near-dup"]
    identical = {b: outputs[b] == outputs["serial"] for b in outputs if b != "serial"}
    serial_decisions = json.loads((work / "serial.report.json").read_text())["decisions"]
    report(args, n, truth, results, serial_decisions, identical, why_not, cores)
    return 0 if all(identical.values()) else 1


def _cpu(run: str, r: dict) -> str:
    # ray's and datatrove's workers are not this process's children (a raylet, a forkserver): not counted
    return f"{r['cpu_main']:.1f} / {r['cpu_workers']:<6.1f}" if run in ("serial", "processes") else "-"


def _decisions_digest(report: Path) -> str:
    """A digest of a report's decisions (its header names the backend and the times, which differ by run)."""
    import hashlib

    return hashlib.sha256(json.dumps(json.loads(report.read_text())["decisions"]).encode()).hexdigest()


def report(args: argparse.Namespace, n: int, truth: dict, results: dict, serial_decisions: list, identical: dict, why_not,
           cores: dict) -> None:
    """Print the tables (and write --json)."""
    planted_near = {q: v for q, v in truth.items() if v[0] == "near"}
    dropped = {d["position"]: d for d in serial_decisions if d["step"] == "near-dup"}
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
    near = {"threshold": args.threshold, "positives": len(positives), "dropped": len(dropped), "true_positives": tp,
            "precision": precision, "recall": recall, "f1": f1, "on_target": on_target / len(dropped) if dropped else 1.0,
            "mean_abs_jaccard_error": sum(est_err) / len(est_err) if est_err else 0.0, "by_similarity": buckets}
    by_pair = {"fmhub": quality(set(dropped), truth, args.threshold)}
    for run, label in (("processes-collision", "fmhub, verify: false"), ("datatrove", "datatrove")):
        if run in results:
            by_pair[label] = quality(set(results[run].pop("near_dropped_positions")), truth, args.threshold)

    print()
    print(f"{'run':<20}{'workers':>8}{'seconds':>10}{'rows/s':>10}{'vs baseline':>13}{'main MB':>9}{'all procs MB':>14}"
          f"{'CPU s main/workers':>20}{'rows out':>10}")
    print(f"{'baseline':<20}{'':>8}{results['baseline']['seconds']:>10.2f}{results['baseline']['rows_per_s']:>10.0f}{'1.00':>13}  (read + write, no steps)")
    for b in ("serial", "processes", "ray", "processes-collision", "datatrove"):
        if b in results:
            r = results[b]
            r["vs_baseline"] = r["rows_per_s"] / results["baseline"]["rows_per_s"]
            print(f"{b:<20}{r['workers']:>8}{r['seconds']:>10.2f}{r['rows_per_s']:>10.0f}{r['vs_baseline']:>13.3f}"
                  f"{r['peak_rss'] / 2**20:>9.0f}{r['peak_rss_tree'] / 2**20:>14.0f}{_cpu(b, r):>20}"
                  f"{r['rows_out']:>10}")
    if why_not:
        print(why_not)
    pr = results["processes"]
    main_share = pr["cpu_main"] / (pr["cpu_main"] + pr["cpu_workers"])
    print(f"processes/serial speed-up: {results['serial']['seconds'] / pr['seconds']:.2f}x on {args.workers} workers "
          f"(just before, this machine ran {cores.get('processes', 1.0):.1f} of {args.workers} CPU-bound processes at once; "
          f"the calling process did {100 * main_share:.0f}% of the CPU work: with a free core per process the speed-up "
          f"could reach {min(1 / main_share, args.workers / (1 - main_share)):.1f}x)")
    print("outputs and decisions byte-identical to serial: " + ", ".join(f"{b} {'yes' if ok else 'NO'}" for b, ok in identical.items()))
    print()
    print(f"{'step':<10}{'rows in':>10}{'dropped':>10}{'edited':>10}{'s (serial)':>12}")
    for name, s in results["serial"]["steps"].items():
        print(f"{name:<10}{s['rows_in']:>10}{s['dropped']:>10}{s['edited']:>10}{s['seconds']:>12.2f}")
    print()
    print(f"near-dup (threshold {args.threshold}): precision {precision:.4f}  recall {recall:.4f}  F1 {f1:.4f}  "
          f"({tp} of {len(positives)} planted positives, {len(dropped)} dropped; {100 * near['on_target']:.1f}% name the planted source; "
          f"mean |estimated - true Jaccard| {near['mean_abs_jaccard_error']:.3f})")
    print(f"{'true Jaccard':<14}{'planted':>9}{'dropped':>9}")
    for b in buckets:
        print(f"{b['jaccard']:<14}{b['planted']:>9}{b['dropped']:>9}")
    print()
    print("near-dup by planted pair (found: the copy or its source dropped):")
    for tool, q in by_pair.items():
        print(f"  {tool:<22} precision {q['precision']:.4f}  recall {q['recall']:.4f}  F1 {q['f1']:.4f}  ({q['dropped']} dropped)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": n, "corpus_mb": (Path(args.workdir or '.') / 'corpus.jsonl').stat().st_size / 1e6 if args.workdir else None,
                                               "results": results, "identical": identical, "effective_cores": cores, "main_cpu_share": main_share,
                                               "near_dup": near, "near_dup_by_pair": by_pair}, indent=1))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""``fmhub label`` and ``fmhub join`` at corpus scale: rows/s and peak memory at two sizes (does memory grow with rows?).

    python benchmarks/labeljoin_bench.py                          # 100k and 1M rows (~10 min on 2 CPU cores)
    python benchmarks/labeljoin_bench.py --rows 20000,100000 --json out.json

Nothing is downloaded. The rows are benchmarks/label_data.py's synthetic
reviews (fixed seed) with a ``store`` column (one of ``--stores`` ids) and,
in a third of them, a brand named in the text ("... made by Acme Lumen").
Three pipelines run, each in its own process (peak RSS of that process and
of the process tree, sampled, and of the calling process alone; CPU seconds
of the calling process and of its workers):

* ``label``: the nine labelling functions of benchmarks/label_bench.py
  (keywords, regexes, two Python functions) on the ``processes`` backend,
  the label model fitted with the pipeline's defaults, every row written
  with its label and probabilities;
* ``join on``: each row's ``store`` looked up in a CSV table of
  ``--stores`` stores (region, size), every row written;
* ``join mentions``: the brands (``--brands`` two-word names) each text
  names, found case-insensitively as whole words.

The baseline reads and writes the same rows through `fmhub.core.rows`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SYLLABLES = "ka lo mi ne ru sa ti vo ze ba do fe gu hi ja".split()


def brand(i: int) -> str:
    """A distinct two-word brand name for each ``i``."""
    a = "".join(SYLLABLES[(i // 15 ** k) % 15] for k in range(3)).capitalize()
    return f"{a} {SYLLABLES[i % 7].capitalize()}{SYLLABLES[(i // 7) % 15]}"


def make_inputs(work: Path, n: int, stores: int, brands: int, seed: int) -> None:
    import label_data

    rng = random.Random(seed)
    with open(work / "reviews.jsonl", "w") as f:
        for i, r in enumerate(label_data.reviews(n, seed)):
            text = r["text"] + (f" Made by {brand(rng.randrange(brands))}." if rng.random() < 0.33 else "")
            f.write(json.dumps({"id": i, "text": text, "store": f"s{rng.randrange(stores)}"}) + "\n")
    with open(work / "stores.csv", "w") as f:
        f.write("store,region,size\n")
        f.writelines(f"s{k},r{k % 50},{k % 7}\n" for k in range(stores))
    with open(work / "brands.csv", "w") as f:
        f.write("brand,country\n")
        f.writelines(f"{brand(k)},c{k % 30}\n" for k in range(brands))
    with open(work / "bench_lfs.py", "w") as f:
        f.write(label_data.LFS_PY)
    import yaml

    spec = {"datasets": {"reviews": {"path": "reviews.jsonl"}},
            "label": {"reviews": {"input": "reviews", "output": "labelled.jsonl", "classes": ["negative", "positive"],
                                  "lfs": label_data.LFS, "batch_size": 2000}},
            "join": {"stores": {"input": "reviews", "table": "stores.csv", "key": "store", "on": "store", "output": "by_store.jsonl"},
                     "brands": {"input": "reviews", "table": "brands.csv", "key": "brand", "mentions": "text", "output": "by_brand.jsonl"}}}
    (work / "fmhub.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def side(what: str, work: Path, workers: int) -> dict:
    """One pipeline in this (child) process: seconds and peak RSS."""
    from clean_peers import cpu_seconds, peak_rss
    from fmhub.project.spec import load_spec

    loaded = load_spec(str(work / "fmhub.yaml"))
    t0 = time.perf_counter()
    if what == "label":
        from fmhub.data.label import pipeline as labelling

        rep = labelling.run(loaded, "reviews", backend="processes", workers=workers)
        rows, extra = rep["rows"], {"phases": rep.get("seconds")}
    elif what == "baseline":
        from fmhub.core.rows import RowWriter, read_batches

        rows = 0
        with RowWriter(str(work / "copy.jsonl")) as w:
            for batch in read_batches(str(work / "reviews.jsonl")):
                w.write(batch.rows)
                rows += len(batch.rows)
        extra = {}
    else:
        from fmhub.data.join import run_join

        rep = run_join(loaded, "stores" if what == "join-on" else "brands")
        rows, extra = rep["rows_in"], {"matched": rep["rows_matched"]}
    return {"seconds": time.perf_counter() - t0, "rows": rows, "peak_rss": peak_rss(), **cpu_seconds(), **extra}


def main(argv: list[str] | None = None) -> int:
    from clean_peers import measured

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="100000,1000000", help="comma-separated sizes")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--stores", type=int, default=100_000)
    ap.add_argument("--brands", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="default: a temp dir")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="fmhub-labeljoin-bench-"))
    if args.side:
        print(json.dumps(side(args.side, base, args.workers)))
        return 0
    results = []
    print(f"{'rows':>9}  {'pipeline':<15}{'seconds':>9}{'rows/s':>10}{'main MB':>9}{'all procs MB':>14}{'CPU s main/workers':>20}", flush=True)
    for n in (int(x) for x in args.rows.split(",")):
        work = base / str(n)
        work.mkdir(parents=True, exist_ok=True)
        make_inputs(work, n, args.stores, args.brands, args.seed)
        for what in ("baseline", "label", "join-on", "join-mentions"):
            got, wall, tree = measured([sys.executable, __file__, "--side", what, "--workdir", str(work), "--workers", str(args.workers)])
            results.append({"rows": n, "pipeline": what, "wall_s": wall, "peak_rss_tree": tree, "rows_per_s": got["rows"] / got["seconds"], **got})
            print(f"{n:>9}  {what:<15}{got['seconds']:>9.1f}{got['rows'] / got['seconds']:>10.0f}{got['peak_rss'] / 2**20:>9.0f}{tree / 2**20:>14.0f}"
                  f"{got['cpu_main']:>12.1f} / {got['cpu_workers']:<6.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

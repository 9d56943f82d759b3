#!/usr/bin/env python3
"""Datasets in git: bytes a new version stores with fmhub vs git-lfs, and filter throughput vs a raw copy.

    python benchmarks/data_bench.py                     # ~100 MB jsonl + the same rows as parquet, 0.1 % of rows edited
    python benchmarks/data_bench.py --size-mb 4 --json out.json   # a quick run

One table of rows is generated (fixed seed: an id, a text of 5-80 random
words, a label, a score) and written as jsonl (~SIZE MB) and as parquet, twice:
with pyarrow's defaults and with content-defined pages
(``use_content_defined_chunking=True, use_dictionary=False``). v1 edits a
fraction of the rows (the text of each edited row changes), either
*scattered* (rows picked uniformly at random) or *clustered* (one run of
consecutive rows: a batch fixed or re-labelled).

For each file and edit pattern, a fresh fmhub repository commits v0 then v1:

* stored = bytes of the objects v1 added to the store / v1's size. git-lfs
  stores every version whole, so its figure is 1.0 by definition;
* clean = `git add` of v0 (the filter process chunking, hashing and fsyncing
  every object), smudge = `git checkout` of v0 after deleting it, both as
  MB/s and as a ratio to a plain copy of the same file (warm page cache, no
  fsync for the copy); the same two steps with git-lfs when it is installed;
* peak RSS of fmhub's one-shot filters (`fmhub filter-clean` /
  `filter-smudge`) on the same file: it stays flat whatever the file size
  (git itself holds the whole file during `git add`);
* diff = `fmhub diff HEAD~1 HEAD --json` wall time, and whether it counted
  exactly the edited rows as changed (rows are matched by the ``id`` column).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is was for on that with as by at from his her an which or be this are were have had not but "
    "model data train token layer weight label split shard epoch batch loss gradient sample review score answer "
    "question context passage summary translate english french german code python function return value error"
).split()

WRAP = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter(); p = subprocess.run(sys.argv[2:], cwd=sys.argv[1], capture_output=True)\n"
    "dt = time.perf_counter() - t\n"
    "sys.stderr.buffer.write(p.stderr); sys.stdout.write(f'{p.returncode} {dt} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}')\n"
)


def sh(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def measured(cmd: list[str], cwd: Path) -> tuple[float, int]:
    """(seconds, peak RSS in bytes of the command and its children), measured in a wrapper process of its own."""
    proc = subprocess.run([sys.executable, "-c", WRAP, str(cwd), *cmd], capture_output=True, text=True)
    rc, secs, rss = proc.stdout.split()
    if rc != "0":
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stderr}")
    return float(secs), int(rss) * 1024


def new_lfs_repo(root: Path, name: str) -> Path:
    repo = root / name
    repo.mkdir()
    sh(["git", "init", "-q", "-b", "main"], repo)
    for key, value in (("user.name", "bench"), ("user.email", "bench@fmhub.invalid")):
        sh(["git", "config", key, value], repo)
    sh(["git", "lfs", "install", "--local"], repo)
    sh(["git", "lfs", "track", "*.jsonl", "*.parquet"], repo)
    sh(["git", "add", ".gitattributes"], repo)
    sh(["git", "commit", "-qm", "track"], repo)
    return repo


def lfs_times(root: Path, kind: str, v0: Path) -> dict:
    """git-lfs's `git add` and `git checkout` of the same file, for scale (None without git-lfs)."""
    if shutil.which("git-lfs") is None:
        return {"lfs_clean_s": None, "lfs_smudge_s": None}
    name = "data.jsonl" if kind == "jsonl" else "data.parquet"
    repo = new_lfs_repo(root, f"lfs-{kind}")
    shutil.copyfile(v0, repo / name)
    clean_s, _ = measured(["git", "add", name], repo)
    sh(["git", "commit", "-qm", "v0"], repo)
    (repo / name).unlink()
    smudge_s, _ = measured(["git", "checkout", "HEAD", "--", name], repo)
    ok = sha256_file(repo / name) == sha256_file(v0)
    shutil.rmtree(repo)
    if not ok:
        raise SystemExit(f"git-lfs checked out a different {name}")
    return {"lfs_clean_s": clean_s, "lfs_smudge_s": smudge_s}


def make_rows(size_mb: float, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    rows, total, i = [], 0, 0
    while total < size_mb * 1e6:
        row = {"id": i, "text": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 80))), "label": rnd.randrange(5),
               "score": round(rnd.random(), 6)}
        total += len(json.dumps(row)) + 1
        rows.append(row)
        i += 1
    return rows


def edit_rows(rows: list[dict], frac: float, pattern: str, seed: int) -> tuple[list[dict], int]:
    rnd = random.Random(seed + 1)
    n = max(1, round(len(rows) * frac))
    if pattern == "scattered":
        picked = rnd.sample(range(len(rows)), n)
    else:
        start = rnd.randrange(len(rows) - n)
        picked = range(start, start + n)
    out = list(rows)
    for i in picked:
        out[i] = {**rows[i], "text": "edited: " + rows[i]["text"]}
    return out, n


def write(path: Path, rows: list[dict], kind: str) -> None:
    if kind == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    opts = {"use_content_defined_chunking": True, "use_dictionary": False} if kind == "parquet-cdc" else {}
    pq.write_table(pa.Table.from_pylist(rows), str(path), **opts)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def store_objects(repo: Path) -> dict[str, int]:
    root = repo / ".git" / "lfs" / "objects"
    return {p.name: p.stat().st_size for p in root.rglob("*") if p.is_file()} if root.exists() else {}


def new_repo(root: Path, name: str) -> Path:
    repo = root / name
    repo.mkdir()
    sh(["git", "init", "-q", "-b", "main"], repo)
    for key, value in (("user.name", "bench"), ("user.email", "bench@fmhub.invalid")):
        sh(["git", "config", key, value], repo)
    sh([sys.executable, "-m", "fmhub", "install"], repo)
    sh([sys.executable, "-m", "fmhub", "track", "*.jsonl", "*.parquet"], repo)
    sh(["git", "add", ".gitattributes"], repo)
    sh(["git", "commit", "-qm", "track"], repo)
    return repo


def run_case(root: Path, kind: str, pattern: str, v0: Path, v1: Path, edited: int, lfs: dict) -> dict:
    name = "data.jsonl" if kind == "jsonl" else "data.parquet"
    repo = new_repo(root, f"{kind}-{pattern}")
    target = repo / name
    cp_s = []
    for _ in range(3):  # the floor: a plain copy of the same file, warm cache
        t = time.perf_counter()
        shutil.copyfile(v0, root / "copy.tmp")
        cp_s.append(time.perf_counter() - t)
    os.unlink(root / "copy.tmp")
    shutil.copyfile(v0, target)
    clean_s, clean_rss = measured(["git", "add", name], repo)
    sh(["git", "commit", "-qm", "v0"], repo)
    before = store_objects(repo)
    shutil.copyfile(v1, target)
    v1_clean_s, _ = measured(["git", "add", name], repo)
    sh(["git", "commit", "-qm", "v1"], repo)
    added = {oid: n for oid, n in store_objects(repo).items() if oid not in before}
    target.unlink()
    smudge_s, _ = measured(["git", "checkout", "HEAD~1", "--", name], repo)
    ok0 = sha256_file(target) == sha256_file(v0)
    fm = [sys.executable, "-m", "fmhub"]
    _, clean_rss = measured(["sh", "-c", f'{" ".join(fm)} filter-clean {name} < "{v0}" > "{root}/manifest.tmp"'], repo)
    _, smudge_rss = measured(["sh", "-c", f'{" ".join(fm)} filter-smudge {name} < "{root}/manifest.tmp" > "{root}/out.tmp"'], repo)
    ok0 = ok0 and sha256_file(root / "out.tmp") == sha256_file(v0)
    os.unlink(root / "out.tmp")
    os.unlink(root / "manifest.tmp")
    target.unlink()
    sh(["git", "checkout", "HEAD", "--", name], repo)
    ok1 = sha256_file(target) == sha256_file(v1)
    t = time.perf_counter()
    diff = json.loads(sh([sys.executable, "-m", "fmhub", "diff", "HEAD~1", "HEAD", "--json"], repo))
    diff_s = time.perf_counter() - t
    d = diff["datasets"][0]
    size0, size1 = v0.stat().st_size, v1.stat().st_size
    mb = size0 / 1e6
    cp = min(cp_s)
    result = {
        "file": kind, "pattern": pattern, "rows": d["old_rows"], "edited_rows": edited, "bytes_v0": size0, "bytes_v1": size1,
        "stored_v1_bytes": sum(added.values()), "stored_v1_objects": len(added), "stored_ratio": sum(added.values()) / size1,
        "chunks_v0": len(before), "clean_s": clean_s, "clean_v1_s": v1_clean_s, "smudge_s": smudge_s, "cp_s": cp,
        "clean_mb_s": mb / clean_s, "smudge_mb_s": mb / smudge_s, "cp_mb_s": mb / cp,
        "clean_vs_cp": cp / clean_s, "smudge_vs_cp": cp / smudge_s,
        "filter_clean_peak_rss_bytes": clean_rss, "filter_smudge_peak_rss_bytes": smudge_rss, **lfs,
        "lfs_clean_mb_s": mb / lfs["lfs_clean_s"] if lfs["lfs_clean_s"] else None,
        "lfs_smudge_mb_s": mb / lfs["lfs_smudge_s"] if lfs["lfs_smudge_s"] else None,
        "checkout_byte_identical": ok0 and ok1, "diff_s": diff_s,
        "diff_counts": {k: d[k] for k in ("added", "removed", "changed", "unchanged")}, "diff_key": d["key"],
        "diff_exact": d["changed"] == edited and d["added"] == 0 and d["removed"] == 0,
    }
    shutil.rmtree(repo)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=100, help="size of the jsonl file in MB (the parquet files hold the same rows)")
    ap.add_argument("--edit-frac", type=float, default=0.001, help="fraction of rows v1 edits (default 0.001)")
    ap.add_argument("--files", nargs="+", default=["jsonl", "parquet", "parquet-cdc"], choices=["jsonl", "parquet", "parquet-cdc"])
    ap.add_argument("--patterns", nargs="+", default=["scattered", "clustered"], choices=["scattered", "clustered"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="where to build repos (a fresh subdir, removed at the end)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(200, Console().width))
    root = Path(tempfile.mkdtemp(prefix="fmhub-data-bench-", dir=args.workdir))
    results = []
    lfs: dict[str, dict] = {}
    try:
        t = time.perf_counter()
        rows = make_rows(args.size_mb, args.seed)
        console.print(f"{len(rows):,} rows generated in {time.perf_counter() - t:.1f} s", highlight=False)
        for pattern in args.patterns:
            v1_rows, edited = edit_rows(rows, args.edit_frac, pattern, args.seed)
            for kind in args.files:
                ext = "jsonl" if kind == "jsonl" else "parquet"
                v0, v1 = root / f"v0-{kind}.{ext}", root / f"v1-{kind}-{pattern}.{ext}"
                if not v0.exists():
                    write(v0, rows, kind)
                    lfs[kind] = lfs_times(root, kind, v0)
                write(v1, v1_rows, kind)
                console.print(f"{kind}, {pattern} edits: {edited:,} rows ...", highlight=False)
                results.append(run_case(root, kind, pattern, v0, v1, edited, lfs[kind]))
                v1.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    table = Table(title=f"v1 edits {args.edit_frac:.2%} of the rows; git-lfs stores every version whole (= 1.0)", title_justify="left")
    for col in ("file", "edits", "size", "stored v1 fmhub/git-lfs", "objects", "clean MB/s", "clean/cp", "smudge MB/s", "smudge/cp",
                "git-lfs clean, smudge MB/s", "filter RSS", "diff s", "diff counts"):
        table.add_column(col, justify="left" if col in ("file", "edits", "diff counts") else "right")
    opt = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    for r in results:
        c = r["diff_counts"]
        table.add_row(
            r["file"], f"{r['pattern']} {r['edited_rows']:,}", f"{r['bytes_v1'] / 1e6:.1f} MB", f"{r['stored_ratio']:.4f}",
            f"{r['stored_v1_objects']:,}/{r['chunks_v0']:,}", f"{r['clean_mb_s']:.0f}", f"{r['clean_vs_cp']:.3f}",
            f"{r['smudge_mb_s']:.0f}", f"{r['smudge_vs_cp']:.3f}", f"{opt(r['lfs_clean_mb_s'])}, {opt(r['lfs_smudge_mb_s'])}",
            f"{max(r['filter_clean_peak_rss_bytes'], r['filter_smudge_peak_rss_bytes']) / 1e6:.0f} MB", f"{r['diff_s']:.1f}",
            f"~{c['changed']:,} +{c['added']:,} -{c['removed']:,}" + ("" if r["diff_exact"] else " (!)"),
        )
    console.print(table)
    console.print("stored v1 fmhub/git-lfs: bytes of new objects / v1's size (git-lfs stores v1 whole); clean/cp, smudge/cp: "
                  "`git add` / `git checkout` throughput relative to a plain copy of the file (warm cache); filter RSS: peak of "
                  "`fmhub filter-clean` / `filter-smudge` on v0", highlight=False)
    if args.json:
        args.json.write_text(json.dumps({"size_mb": args.size_mb, "edit_frac": args.edit_frac, "results": results}, indent=2))
    bad = [r for r in results if not r["checkout_byte_identical"]]
    if bad:
        console.print(f"[red]checkout not byte-identical: {[(r['file'], r['pattern']) for r in bad]}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

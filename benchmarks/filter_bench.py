#!/usr/bin/env python3
"""Benchmark fmhub's git filter against plain git-lfs and a raw ``cp``, in one run.

    python benchmarks/filter_bench.py                 # 1 GiB fp32 checkpoint, 97 tensors
    python benchmarks/filter_bench.py --size-mb 8 --tensors 7 --json out.json

One safetensors checkpoint (v0) is generated once, streaming, from a fixed seed.
Each tool gets its own fresh repository (git init, tool install + track,
.gitattributes committed) and runs the same steps:

  1. first ``git add`` + ``git commit`` of v0 (the copy into the repo is not timed)
  2. re-add + commit after overwriting 2 of the tensors in place (v1)
  3. ``rm`` + ``git checkout HEAD~1 -- FILE`` (back to v0), sha256-checked against v0
  4. a third add + commit (v2: 1 % of the elements of every tensor changed)
     and ``du -sb .git`` after v0, v1 and v2
  5. with ``--repack`` (fmhub only): ``fmhub repack``, ``du -sb .git``, and
     ``git checkout HEAD~2 -- FILE`` (v0, rebuilt from packed objects), sha256-checked

``cp`` of the file is timed as the floor for steps 1 and 3. Before every timed
command the page cache is flushed (``sync``) and the pages of the checkpoint, the
work tree and ``.git`` are evicted with ``posix_fadvise(DONTNEED)``, so every tool
starts cold; binaries (git, git-lfs, Python) stay warm for all alike.

Peak RSS of the filter process is measured by pointing ``filter.<driver>.process``
at a small wrapper (written into the work dir) that runs the real filter command
as a child with inherited stdin/stdout and appends
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` to a log once the child exits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gitbench  # noqa: E402
from ckpt_gen import safetensors_header  # noqa: E402
from gitbench import (  # noqa: E402,F401  (sha256_file, evict, ... stay importable as filter_bench.<name>)
    TOOLS, Runner, du_bytes, evict, isolated_env, read_rss, sha256_file, timed_sync, tool_versions, write_wrapper,
)

MiB = 1 << 20
FILE = "model.safetensors"
GEN_CHUNK_ELEMS = 4 * MiB  # 16 MiB of float32 per generator chunk
CHANGED_FRACTION = 0.01  # v2: share of the elements of every tensor that change

# What needs a feature that is off in the run; printed next to the figures.
NOT_ON = {
    "repo_size_v2": "needs delta storage, off by default: run with --deltas (git config fmhub.deltas true); "
    "without it a 1 %-of-elements change stores every tensor in full",
}


# --------------------------------------------------------------------------- checkpoint


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    offset: int  # absolute offset of the payload in the file

    @property
    def elems(self) -> int:
        return math.prod(self.shape)

    @property
    def size(self) -> int:
        return self.elems * 4


@dataclass
class Checkpoint:
    path: Path
    tensors: list[Tensor]
    header_bytes: int
    size: int
    sha256: str

    @property
    def largest(self) -> int:
        return max(t.size for t in self.tensors)


# A Llama-like layer, relative sizes; "norm" entries are one row of the hidden size.
LAYER = [
    ("self_attn.q_proj.weight", 4.0),
    ("self_attn.k_proj.weight", 1.0),
    ("self_attn.v_proj.weight", 1.0),
    ("self_attn.o_proj.weight", 4.0),
    ("mlp.gate_proj.weight", 11.0),
    ("mlp.up_proj.weight", 11.0),
    ("mlp.down_proj.weight", 11.0),
    ("input_layernorm.weight", None),
    ("post_attention_layernorm.weight", None),
]
EMBED_SHARE = 0.15  # the embedding's share of the payload (the largest tensor)


def plan_tensors(size_mb: int, n: int) -> list[tuple[str, tuple[int, ...]]]:
    """n tensors of varying sizes whose fp32 payload is at least size_mb MiB: embedding, n-2 layer tensors, final norm."""
    if n < 3:
        raise SystemExit("--tensors must be at least 3")
    total = size_mb * MiB // 4
    hidden = 2048 if total >= 2048 * 2048 * 16 else 128
    body = [(f"model.layers.{i // len(LAYER)}.{LAYER[i % len(LAYER)][0]}", LAYER[i % len(LAYER)][1]) for i in range(n - 2)]
    weights = sum(w for _, w in body if w)
    norms = sum(1 for _, w in body if w is None) + 1
    matrix_elems = total - norms * hidden - int(total * EMBED_SHARE)
    plan: list[tuple[str, tuple[int, ...]]] = []
    for name, w in body:
        plan.append((name, (hidden,) if w is None else (max(1, round(matrix_elems * w / weights / hidden)), hidden)))
    plan.append(("model.norm.weight", (hidden,)))
    rest = sum(math.prod(s) for _, s in plan)
    embed_rows = max(1, -(-(total - rest) // hidden))  # the embedding absorbs the remainder: payload >= size_mb MiB
    return [("model.embed_tokens.weight", (embed_rows, hidden))] + plan


def build_header(plan, seed: int) -> tuple[bytes, list[Tensor]]:
    meta = {"format": "pt", "generator": "fmhub benchmarks/filter_bench.py", "seed": str(seed)}
    header, starts = safetensors_header(plan, "F32", 4, meta)
    return header, [Tensor(name, shape, len(header) + off) for (name, shape), off in zip(plan, starts)]


def random_chunks(rng: np.random.Generator, elems: int):
    """fp32 N(0, 0.02) data, GEN_CHUNK_ELEMS at a time."""
    while elems:
        n = min(GEN_CHUNK_ELEMS, elems)
        a = rng.standard_normal(n, dtype=np.float32)
        a *= 0.02
        yield a
        elems -= n


def generate(path: Path, size_mb: int, n: int, seed: int) -> Checkpoint:
    """Write the checkpoint streaming (never more than one chunk in memory); hash it on the way."""
    header, tensors = build_header(plan_tensors(size_mb, n), seed)
    rng = np.random.default_rng(seed)
    h = hashlib.sha256(header)
    with open(path, "wb") as f:
        f.write(header)
        for t in tensors:
            for a in random_chunks(rng, t.elems):
                b = a.tobytes()  # little-endian on every machine this runs on
                h.update(b)
                f.write(b)
    size = path.stat().st_size
    return Checkpoint(path, tensors, len(header), size, h.hexdigest())


def v1_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """The 2 tensors the second version changes: q and v projections of the middle layer (like a merged LoRA)."""
    layers = sorted({int(t.name.split(".")[2]) for t in tensors if t.name.startswith("model.layers.")})
    mid = layers[len(layers) // 2]
    by_name = {t.name: t for t in tensors}
    picked = [by_name.get(f"model.layers.{mid}.self_attn.q_proj.weight"), by_name.get(f"model.layers.{mid}.self_attn.v_proj.weight")]
    picked = [t for t in picked if t is not None]
    for t in sorted(tensors[1:], key=lambda t: t.size):  # too few tensors for a full layer: the smallest others
        if len(picked) == 2:
            break
        if t not in picked:
            picked.append(t)
    return picked


def apply_v1(path: Path, tensors: list[Tensor], seed: int) -> None:
    """Overwrite the 2 changed tensors' bytes in place with new random data (deterministic)."""
    rng = np.random.default_rng([seed, 1])
    with open(path, "r+b") as f:
        for t in v1_tensors(tensors):
            f.seek(t.offset)
            for a in random_chunks(rng, t.elems):
                f.write(a.tobytes())


def apply_v2(path: Path, tensors: list[Tensor], seed: int) -> int:
    """Change CHANGED_FRACTION of the elements of every tensor, at random positions, in place; returns how many."""
    rng = np.random.default_rng([seed, 2])
    changed = 0
    with open(path, "r+b") as f:
        for t in tensors:
            k = max(1, round(t.elems * CHANGED_FRACTION))
            pos = np.sort(rng.choice(t.elems, size=k, replace=False))
            values = rng.standard_normal(k, dtype=np.float32) + np.float32(1.0)  # never equal to the old value in practice
            changed += k
            for start in range(0, t.elems, GEN_CHUNK_ELEMS):
                stop = min(start + GEN_CHUNK_ELEMS, t.elems)
                lo, hi = np.searchsorted(pos, [start, stop])
                if lo == hi:
                    continue
                f.seek(t.offset + start * 4)
                a = np.frombuffer(bytearray(f.read((stop - start) * 4)), dtype=np.float32)
                a[pos[lo:hi] - start] = values[lo:hi]
                f.seek(t.offset + start * 4)
                f.write(a.tobytes())
    return changed


# --------------------------------------------------------------------------- one tool


DELTAS = False  # --deltas: fmhub stores changed tensors as delta chains (git config fmhub.deltas true)
REPACK = False  # --repack: step 5, fmhub repack and a checkout of v0 from packed objects


class ToolRepo(gitbench.ToolRepo):
    """gitbench's repository, with fmhub's deltas on under --deltas, committing the one checkpoint file."""

    def __init__(self, tool: str, root: Path, runner: Runner, wrapper: Path) -> None:
        super().__init__(tool, root, runner, wrapper, {"fmhub.deltas": "true"} if DELTAS and tool == "fmhub" else {})
        self.file = root / FILE

    def add_commit(self, msg: str) -> dict:
        return self.timed_add_commit([FILE], msg)


def run_once(ck: Checkpoint, work: Path, runner: Runner, wrapper: Path, seed: int, log) -> dict:
    """All steps for git-lfs, fmhub and cp in fresh repos; steps interleaved across tools."""
    repos = {tool: ToolRepo(tool, work / f"repo-{tool}", runner, wrapper) for tool in TOOLS}
    res: dict = {tool: {} for tool in TOOLS}
    res["cp"] = {}
    rss_dir = work / "rss"
    rss_dir.mkdir(exist_ok=True)
    for tool, repo in repos.items():
        repo.setup()

    # (1) first add + commit of v0
    log("step 1: first add + commit")
    for tool, repo in repos.items():
        shutil.copyfile(ck.path, repo.file)  # not timed
        rss = rss_dir / f"{tool}-first_add.log"
        repo.measure_rss_into(rss)
        repo.cold(ck.path)
        step = repo.add_commit("v0")
        step["writeback_seconds"] = timed_sync()
        step["filter_peak_rss_bytes"] = read_rss(rss)
        res[tool]["first_add"] = step
        res[tool]["repo_bytes"] = {"after_v0": du_bytes(repo.root / ".git")}
        res[tool]["lfs_dir_bytes"] = {"after_v0": du_bytes(repo.root / ".git" / "lfs")}
    cp_dir = work / "cp"
    cp_dir.mkdir(exist_ok=True)
    evict(ck.path, cp_dir)
    res["cp"]["first_add"] = {"seconds": runner.timed(["cp", "--reflink=never", str(ck.path), str(cp_dir / FILE)], work)}
    res["cp"]["first_add"]["writeback_seconds"] = timed_sync()

    # (2) re-add after changing 2 tensors in place
    log("step 2: re-add after a 2-tensor change")
    v1_sha = {}
    for tool, repo in repos.items():
        apply_v1(repo.file, ck.tensors, seed)  # not timed
        v1_sha[tool] = sha256_file(repo.file)
        rss = rss_dir / f"{tool}-re_add.log"
        repo.measure_rss_into(rss)
        repo.cold(ck.path)
        step = repo.add_commit("v1: 2 tensors changed")
        step["writeback_seconds"] = timed_sync()
        step["filter_peak_rss_bytes"] = read_rss(rss)
        res[tool]["re_add"] = step
        res[tool]["repo_bytes"]["after_v1"] = du_bytes(repo.root / ".git")
        res[tool]["lfs_dir_bytes"]["after_v1"] = du_bytes(repo.root / ".git" / "lfs")
    if len(set(v1_sha.values())) != 1:
        raise SystemExit(f"v1 differs between repos: {v1_sha}")

    # (3) checkout of v0 after the re-add
    log("step 3: checkout of v0")
    for tool, repo in repos.items():
        repo.file.unlink()  # not timed
        rss = rss_dir / f"{tool}-checkout.log"
        repo.measure_rss_into(rss)
        repo.cold(ck.path)
        t = runner.timed(["git", "checkout", "HEAD~1", "--", FILE], repo.root)
        step = {"seconds": t, "writeback_seconds": timed_sync(), "filter_peak_rss_bytes": read_rss(rss)}
        got = sha256_file(repo.file)
        step["sha256"] = got
        step["byte_identical"] = got == ck.sha256
        res[tool]["checkout"] = step
    (cp_dir / FILE).unlink()
    evict(ck.path, cp_dir)
    res["cp"]["checkout"] = {"seconds": runner.timed(["cp", "--reflink=never", str(ck.path), str(cp_dir / FILE)], work)}
    res["cp"]["checkout"]["writeback_seconds"] = timed_sync()
    (cp_dir / FILE).unlink()

    # (4) a third version: 1 % of the elements of every tensor changed (on top of v1)
    log("step 4: third add after a 1 %-of-elements change")
    v2_sha = {}
    for tool, repo in repos.items():
        apply_v1(repo.file, ck.tensors, seed)  # the work tree holds v0 after step 3: back to v1 (not timed)
        changed = apply_v2(repo.file, ck.tensors, seed)
        v2_sha[tool] = sha256_file(repo.file)
        rss = rss_dir / f"{tool}-third_add.log"
        repo.measure_rss_into(rss)
        repo.cold(ck.path)
        step = repo.add_commit("v2: 1 % of the elements of every tensor changed")
        step["writeback_seconds"] = timed_sync()
        step["filter_peak_rss_bytes"] = read_rss(rss)
        step["elements_changed"] = changed
        res[tool]["third_add"] = step
        res[tool]["repo_bytes"]["after_v2"] = du_bytes(repo.root / ".git")
        res[tool]["lfs_dir_bytes"]["after_v2"] = du_bytes(repo.root / ".git" / "lfs")
    if len(set(v2_sha.values())) != 1:
        raise SystemExit(f"v2 differs between repos: {v2_sha}")
    res["sha256"] = {"v1": next(iter(v1_sha.values())), "v2": next(iter(v2_sha.values()))}
    if REPACK:
        log("step 5: fmhub repack, then checkout of v0 from packed objects")
        repack_step(repos["fmhub"], res["fmhub"], runner, rss_dir, ck)
    for repo in repos.values():
        shutil.rmtree(repo.root, ignore_errors=True)
    return res


def repack_step(repo: ToolRepo, res: dict, runner: Runner, rss_dir: Path, ck: Checkpoint) -> None:
    """(5) ``fmhub repack`` of the three versions, the repo size after it, and a checkout of v0 that rebuilds packed objects."""
    repo.cold()
    res["repack"] = {"seconds": runner.timed([sys.executable, "-m", "fmhub", "repack"], repo.root), "writeback_seconds": timed_sync()}
    res["repo_bytes"]["after_repack"] = du_bytes(repo.root / ".git")
    res["lfs_dir_bytes"]["after_repack"] = du_bytes(repo.root / ".git" / "lfs")
    repo.file.unlink()  # not timed
    rss = rss_dir / "fmhub-checkout_packed.log"
    repo.measure_rss_into(rss)
    repo.cold(ck.path)
    t = runner.timed(["git", "checkout", "HEAD~2", "--", FILE], repo.root)
    got = sha256_file(repo.file)
    res["checkout_packed"] = {"seconds": t, "writeback_seconds": timed_sync(), "filter_peak_rss_bytes": read_rss(rss),
                              "sha256": got, "byte_identical": got == ck.sha256}


# --------------------------------------------------------------------------- report

STEPS = ("first_add", "re_add", "checkout", "third_add", "repack", "checkout_packed")


def median_runs(runs: list[dict]) -> dict:
    """Median seconds over repetitions; RSS is the max, sizes and byte-identity come from every run."""
    out: dict = {}
    for tool in (*TOOLS, "cp"):
        out[tool] = {}
        for step in STEPS:
            vals = [r[tool][step] for r in runs if step in r[tool]]
            if not vals:
                continue
            agg = dict(vals[-1])
            for key in ("seconds", "add_seconds", "commit_seconds", "writeback_seconds"):
                if key in agg:
                    agg[key] = statistics.median(v[key] for v in vals)
                    if len(vals) > 1:
                        agg[key + "_all"] = [v[key] for v in vals]
            if "filter_peak_rss_bytes" in agg:
                rs = [v["filter_peak_rss_bytes"] for v in vals if v["filter_peak_rss_bytes"] is not None]
                agg["filter_peak_rss_bytes"] = max(rs) if rs else None
            if "byte_identical" in agg:
                agg["byte_identical"] = all(v["byte_identical"] for v in vals)
            out[tool][step] = agg
        if tool in TOOLS:
            out[tool]["repo_bytes"] = runs[-1][tool]["repo_bytes"]
            out[tool]["lfs_dir_bytes"] = runs[-1][tool]["lfs_dir_bytes"]
    return out


def evaluate(res: dict, ck: Checkpoint) -> list[dict]:
    lfs, fm = res["git-lfs"], res["fmhub"]
    size = ck.size
    rss_cap = min(ck.largest + 256 * MiB, size * 0.25)

    def ratio(a, b):
        return a / b if a is not None and b else None

    targets = []

    def add(tid, label, target, value, ok, note=""):
        targets.append({"id": tid, "step": label, "target": target, "value": value, "status": "PASS" if ok else "MISS",
                        "needs_unbuilt_feature": tid in NOT_ON and not DELTAS,
                        "note": NOT_ON.get(tid, note) if not DELTAS else note})

    r = ratio(fm["first_add"]["seconds"], lfs["first_add"]["seconds"])
    add("first_add", "first add + commit", "<= 1.2x git-lfs", r, r <= 1.2)
    r = ratio(fm["re_add"]["seconds"], lfs["re_add"]["seconds"])
    add("re_add", "re-add, 2 tensors changed", "<= 0.2x git-lfs", r, r <= 0.2)
    r = ratio(fm["checkout"]["seconds"], lfs["checkout"]["seconds"])
    add("checkout", "checkout of v0", "<= 1.0x git-lfs", r, r <= 1.0)
    add("checkout_identical", "checkout byte-identical", "byte-identical", fm["checkout"]["byte_identical"], fm["checkout"]["byte_identical"])
    x = fm["repo_bytes"]["after_v2"] / size
    add("repo_size_v2", "repo size after 3 versions", "<= 1.15x checkpoint", x, x <= 1.15)
    for step, label in (("first_add", "peak filter RSS, first add"), ("checkout", "peak filter RSS, checkout")):
        rss = fm[step]["filter_peak_rss_bytes"]
        add(f"rss_{step}", label, f"<= largest tensor + 256 MB and < 25 % of checkpoint (<= {rss_cap / MiB:.0f} MiB)",
            rss, rss is not None and rss <= ck.largest + 256 * MiB and rss < size * 0.25)
    return targets


def render(res: dict, ck: Checkpoint, targets: list[dict], meta: dict):
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, Console().width))
    lfs, fm, cp = res["git-lfs"], res["fmhub"], res["cp"]
    tmap = {t["id"]: t for t in targets}
    size = ck.size

    def s(v):
        return "—" if v is None else f"{v:.2f} s"

    def x(v):
        return "—" if v is None else f"{v:.2f}×"

    def mb(v):
        return "—" if v is None else f"{v / MiB:.0f} MiB"

    def ratio(a, b):
        return a / b if a is not None and b else None

    def status(tid):
        t = tmap.get(tid)
        if t is None:
            return "", ""
        mark = "[green]PASS[/green]" if t["status"] == "PASS" else "[red]MISS[/red]"
        if t["needs_unbuilt_feature"]:
            mark += " [yellow](needs --deltas)[/yellow]"
        return t["target"], mark

    changed = v1_tensors(ck.tensors)
    title = (f"fmhub vs git-lfs vs cp — {size / MiB:.0f} MiB fp32 safetensors, {len(ck.tensors)} tensors "
             f"(largest {ck.largest / MiB:.0f} MiB), {meta['repeat']} run(s), cold page cache per step")
    table = Table(title=title, show_lines=False)
    for col, kw in (("step", {}), ("git-lfs", {"justify": "right"}), ("fmhub", {"justify": "right"}), ("cp", {"justify": "right"}),
                    ("fmhub/git-lfs", {"justify": "right"}), ("fmhub/cp", {"justify": "right"}), ("target", {}), ("result", {})):
        table.add_column(col, **kw)

    def time_row(label, step, tid, with_cp):
        a, b = lfs[step]["seconds"], fm[step]["seconds"]
        c = cp[step]["seconds"] if with_cp else None
        table.add_row(label, s(a), s(b), s(c), x(ratio(b, a)), x(ratio(b, c)), *status(tid))

    time_row("(1) first add + commit", "first_add", "first_add", True)
    time_row(f"(2) re-add + commit, {len(changed)}/{len(ck.tensors)} tensors changed", "re_add", "re_add", False)
    time_row("(3) checkout of v0 (git checkout HEAD~1 -- file)", "checkout", "checkout", True)
    yn = lambda v: "[green]yes[/green]" if v else "[red]NO[/red]"  # noqa: E731
    table.add_row("(3) checkout byte-identical to v0 (sha256)", yn(lfs["checkout"]["byte_identical"]), yn(fm["checkout"]["byte_identical"]),
                  "", "", "", *status("checkout_identical"))
    time_row("(4) third add + commit, 1 % of elements changed (info)", "third_add", None, False)
    for key, label, tid in (("after_v0", "(4) repo size after v0", None), ("after_v1", "(4) repo size after + 2-tensor change", None),
                            ("after_v2", "(4) repo size after + 1 %-of-elements change", "repo_size_v2")):
        a, b = lfs["repo_bytes"][key] / size, fm["repo_bytes"][key] / size
        table.add_row(label + " (× ckpt)", x(a), x(b), "", x(ratio(b, a)), "", *status(tid))
    for step, label, tid in (("first_add", "peak filter RSS, first add", "rss_first_add"), ("re_add", "peak filter RSS, re-add (info)", None),
                             ("checkout", "peak filter RSS, checkout", "rss_checkout")):
        a, b = lfs[step]["filter_peak_rss_bytes"], fm[step]["filter_peak_rss_bytes"]
        table.add_row(label, mb(a), mb(b), "", x(ratio(b, a)), "", *status(tid))
    if "repack" in fm:
        table.add_row("(5) fmhub repack (info)", "", s(fm["repack"]["seconds"]), "", "", "", "", "")
        table.add_row("(5) repo size after repack (× ckpt)", "", x(fm["repo_bytes"]["after_repack"] / size), "", "", "", "", "")
        table.add_row("(5) checkout of v0 from packed objects (info)", "", s(fm["checkout_packed"]["seconds"]), "", "", "", "", "")
        table.add_row("(5) ... byte-identical to v0 (sha256)", "", yn(fm["checkout_packed"]["byte_identical"]), "", "", "", "", "")
        table.add_row("(5) peak filter RSS, checkout from packed objects (info)", "", mb(fm["checkout_packed"]["filter_peak_rss_bytes"]),
                      "", "", "", "", "")
    table.add_row("info: writeback (sync) left after first add", s(lfs["first_add"]["writeback_seconds"]),
                  s(fm["first_add"]["writeback_seconds"]), s(cp["first_add"]["writeback_seconds"]), "", "", "", "")
    console.print(table)

    notes = [
        f"changed in v1: {', '.join(t.name for t in changed)} ({sum(t.size for t in changed) / MiB:.1f} MiB); "
        f"v2 changes {CHANGED_FRACTION:.0%} of the elements of every tensor at random positions.",
        ("fmhub ran with delta storage on (--deltas)." if DELTAS else "Repo size after v2: " + NOT_ON["repo_size_v2"] + "."),
        "Times are git add + git commit (step 1, 2, 4) or git checkout (step 3), wall clock; the copy of the file into the repo and the "
        "in-place edits are not timed. Before each timed command: sync, then posix_fadvise(DONTNEED) on the checkpoint, the work tree "
        "and .git (a hypervisor's cache below the VM cannot be dropped).",
        "fmhub fsyncs every object inside the timed command; git-lfs and cp leave dirty pages, shown as 'writeback' (not in the times).",
        "RSS: filter.<driver>.process runs a wrapper that records getrusage(RUSAGE_CHILDREN).ru_maxrss of the real filter; the wrapper "
        "(one Python start-up, ~30 ms) is in place for both tools in every step.",
        f"RSS target for this checkpoint: <= {min(ck.largest + 256 * MiB, size * 0.25) / MiB:.0f} MiB "
        f"(largest tensor {ck.largest / MiB:.0f} MiB + 256 MiB, and < 25 % of {size / MiB:.0f} MiB).",
    ]
    for n in notes:
        console.print(f"• {n}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="payload size of the checkpoint in MiB (default 1024)")
    ap.add_argument("--tensors", type=int, default=97, help="number of tensors (default 97)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build repos (a fresh subdir is made and removed; default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON to this path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deltas", action="store_true", help="turn on fmhub's delta storage (git config fmhub.deltas true)")
    ap.add_argument("--repack", action="store_true", help="step 5: run `fmhub repack`, then check out v0 from packed objects")
    ap.add_argument("--repeat", type=int, default=1, help="run every step this many times in fresh repos; times are medians")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (repos are still removed after each run)")
    args = ap.parse_args(argv)

    from rich.console import Console

    err = Console(stderr=True)

    def log(msg: str) -> None:
        err.log(msg, highlight=False)

    if shutil.which("git-lfs") is None and subprocess.run(["git", "lfs", "version"], capture_output=True).returncode != 0:
        raise SystemExit("git-lfs is not installed")
    global DELTAS, REPACK
    DELTAS, REPACK = args.deltas, args.repack
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fmhub-filter-bench-", dir=args.workdir)).resolve()
    try:
        env = isolated_env(work / "home")
        runner = Runner(env)
        wrapper = write_wrapper(work)
        log(f"generating {args.size_mb} MiB / {args.tensors} tensors in {work}")
        t0 = time.perf_counter()
        ck = generate(work / f"v0-{FILE}", args.size_mb, args.tensors, args.seed)
        log(f"generated {ck.size} bytes in {time.perf_counter() - t0:.1f} s, sha256 {ck.sha256[:16]}…")
        runs = []
        for i in range(args.repeat):
            if args.repeat > 1:
                log(f"run {i + 1}/{args.repeat}")
            run_dir = work / f"run{i}"
            run_dir.mkdir()
            runs.append(run_once(ck, run_dir, runner, wrapper, args.seed, log))
            shutil.rmtree(run_dir, ignore_errors=True)
        res = median_runs(runs)
        targets = evaluate(res, ck)
        meta = {"repeat": args.repeat, "seed": args.seed, "size_mb": args.size_mb, "tensors": args.tensors, "versions": tool_versions(env)}
        render(res, ck, targets, meta)
        if args.json:
            data = {
                "meta": meta,
                "checkpoint": {
                    "bytes": ck.size, "tensors": len(ck.tensors), "header_bytes": ck.header_bytes, "largest_tensor_bytes": ck.largest,
                    "sha256": {"v0": ck.sha256, **runs[-1]["sha256"]},
                    "v1_changed_tensors": [{"name": t.name, "bytes": t.size} for t in v1_tensors(ck.tensors)],
                    "v2_changed_fraction": CHANGED_FRACTION,
                    "tensor_sizes": [t.size for t in ck.tensors],
                },
                "results": res,
                "repo_x_checkpoint": {tool: {k: v / ck.size for k, v in res[tool]["repo_bytes"].items()} for tool in TOOLS},
                "repo_growth_after_v1_bytes": {tool: res[tool]["repo_bytes"]["after_v1"] - res[tool]["repo_bytes"]["after_v0"] for tool in TOOLS},
                "targets": targets,
                "needs_option": {} if DELTAS else NOT_ON, "deltas": DELTAS, "repack": REPACK,
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=2) + "\n")
            log(f"wrote {args.json}")
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

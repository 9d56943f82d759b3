#!/usr/bin/env python3
"""git-lfs, fmhub, zipnn and cp on a 7B-shaped bf16 checkpoint in 3 shards, side by side in one run.

    python benchmarks/scale_bench.py                          # Llama-2-7B shapes, 13.5 GB, ~(4 + 2) x 13.5 GB of disk
    python benchmarks/scale_bench.py --layers 2               # the same widths, 2 layers: ~1.2 GB
    python benchmarks/scale_bench.py --acceptance             # the issue's 256 MiB acceptance checks, PASS/FAIL
    python benchmarks/scale_bench.py --layers 1 --hidden 64 --intermediate 128 --vocab 256 --json out.json   # a smoke run

Versions (ckpt_gen.py): v0, then ``sparse`` (1 % of the elements of every
tensor), ``finetune`` (every element nudged by ~1 %) and ``lora`` (a merged
r = 16 LoRA on q_proj and v_proj), each derived from v0 and generated from
seeds straight into the work tree, never kept. History: v0 on ``main``, each
update on its own branch off ``main`` (v0 -> sparse, v0 -> finetune,
v0 -> lora), so what a version stores is measured against v0.

Per git tool (git-lfs, fmhub: nothing but install + track "*.safetensors";
the index JSON is a plain file), in a fresh repository: add + commit of every
version; rm + ``git checkout main -- .`` (v0), sha256-checked; the other
versions checked out and checked (untimed); ``git diff main sparse``;
``fmhub merge sparse:. finetune:. --base main:. -s ties`` (fmhub); ``git add``
of a tiny checkpoint; pushes of main and each branch to an LFS server on
127.0.0.1 (tests/helpers/lfs_server.py); a fresh ``git clone`` from it, checked. Every
timed step starts with the page cache of the repo (and server store) dropped.
Then the repository and the server are removed before the next tool, so disk
use stays near (versions + 2) x the checkpoint: between pushes the server keeps
only v0's objects (what the clone needs), and the work tree is removed before
pushing. zipnn compresses every tensor of every version in memory; cp copies v0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the tests' LFS server: tests.helpers.lfs_server

import ckpt_gen as cg  # noqa: E402
import gitbench as gb  # noqa: E402
import scale_report  # noqa: E402
from tests.helpers.lfs_server import running_lfs_server  # noqa: E402

GiB = 1 << 30
ALL_TOOLS = ("git-lfs", "fmhub", "zipnn", "cp")
STEPS = ("checkout", "verify", "diff", "merge", "tiny", "push")
ACCEPTANCE_VERSIONS = ["v0", "sparse", "finetune"]
ACCEPTANCE_STEPS = ("checkout", "verify", "tiny")
ACCEPTANCE_BYTES = 256 * cg.MiB
TINY_FILE = "tiny.safetensors"
TINY_TRIES = 5  # start-up dominated and noisy: the median of a few adds
MERGE_OPTIONS = ("-s", "ties", "--option", "density=0.5")


@dataclass
class Ctx:
    shape: cg.Shape
    seed: int
    shards: int
    versions: list[str]
    steps: set[str]
    work: Path
    runner: gb.Runner
    wrapper: Path
    fmhub_config: dict[str, str]
    threads: int
    log: Callable[[str], None]
    written: dict = field(default_factory=dict)  # version -> what ckpt_gen wrote (the same for every tool)

    def record(self, version: str, w: cg.Written) -> None:
        info = {"sha256": w.sha256, "elements": w.elements, "changed_elements": w.changed_elements}
        if self.written.setdefault(version, info) != info:
            raise SystemExit(f"{version} came out differently for two tools: the generator is not deterministic")


# --------------------------------------------------------------------------- one git tool


class GitToolRun:
    """Every step for one tool, in one fresh repository; ``run`` returns its results and removes everything."""

    def __init__(self, tool: str, ctx: Ctx) -> None:
        self.tool, self.ctx, self.r = tool, ctx, ctx.runner
        self.root = ctx.work / f"repo-{tool}"
        self.repo = gb.ToolRepo(tool, self.root, ctx.runner, ctx.wrapper, ctx.fmhub_config if tool == "fmhub" else {})
        self.res: dict = {"add": {}, "stored": {}}
        self.files: list[str] = []

    def run(self) -> dict:
        c = self.ctx
        try:
            self.repo.setup()
            for version in c.versions:
                self.commit(version)
            self.res["filter_peak_rss_bytes"] = max(s["filter_peak_rss_bytes"] or 0 for s in self.res["add"].values())
            if "checkout" in c.steps:
                self.checkout_v0()
            if "verify" in c.steps:
                self.res["verify"] = {v: self.checks_out(v) for v in c.versions[1:]}
            if "diff" in c.steps and "sparse" in c.versions:
                self.optional("diff", self.diff)
            if "merge" in c.steps and self.tool == "fmhub" and {"sparse", "finetune"} <= set(c.versions):
                self.optional("merge", self.merge)
            if "tiny" in c.steps:
                self.res["tiny_add"] = self.tiny_add()
            if "push" in c.steps:
                self.optional("push", self.push_and_clone)
        finally:
            for leftover in ("repo", "remote", "server", "clone", "merged"):
                shutil.rmtree(c.work / f"{leftover}-{self.tool}", ignore_errors=True)
        return self.res

    def optional(self, name: str, step) -> None:
        """A step whose failure is a finding to report, not a reason to lose the rest of a long run."""
        try:
            step()
        except gb.CommandFailed as exc:
            self.res[name] = {"error": str(exc)[-2000:]}
            self.ctx.log(f"{self.tool}: {name} failed: {str(exc)[:300]}")

    def measured(self, label: str, step) -> dict:
        """``step()`` (returning {"seconds": …}) with the filter behind the RSS wrapper and a cold page cache."""
        rss_log = self.ctx.work / f"rss-{self.tool}-{label}.log"
        rss_log.unlink(missing_ok=True)  # a log per step and run
        self.repo.measure_rss_into(rss_log)
        self.repo.cold()
        out = step()
        out["writeback_seconds"] = gb.timed_sync()
        out["filter_peak_rss_bytes"] = gb.read_rss(rss_log)
        return out

    def git_sizes(self) -> tuple[int, int]:
        git = self.root / ".git"
        return gb.du_bytes(git), gb.du_bytes(git / "lfs") if (git / "lfs").exists() else 0

    def commit(self, version: str) -> None:
        c = self.ctx
        if version != "v0":
            self.branch_off_main(version)
        c.log(f"{self.tool}: writing {version}")
        written = cg.write_version(self.root, c.shape, c.seed, version, c.shards)  # not timed
        c.record(version, written)
        self.files = list(written.sha256)
        git0, lfs0 = self.git_sizes()
        c.log(f"{self.tool}: add + commit {version}")
        self.res["add"][version] = self.measured(f"add-{version}", lambda: self.repo.timed_add_commit(self.files, version))
        git1, lfs1 = self.git_sizes()
        self.res["stored"][version] = {"git_bytes": git1 - git0, "lfs_bytes": lfs1 - lfs0}

    def branch_off_main(self, name: str) -> None:
        """HEAD and index at v0 on a new branch, the work tree untouched: the next add is measured against v0."""
        self.r.run(["git", "branch", name, "main"], self.root)
        self.r.run(["git", "symbolic-ref", "HEAD", f"refs/heads/{name}"], self.root)
        self.r.run(["git", "read-tree", name], self.root)  # no refresh: nothing is re-filtered here

    def remove_files(self) -> None:
        for f in self.files:
            (self.root / f).unlink(missing_ok=True)

    def identical(self, where: Path, version: str) -> bool:
        return all(gb.sha256_file(where / f) == sha for f, sha in self.ctx.written[version]["sha256"].items())

    def checkout_v0(self) -> None:
        self.ctx.log(f"{self.tool}: checkout of v0")
        self.remove_files()
        step = self.measured("checkout", lambda: {"seconds": self.r.timed(["git", "checkout", "main", "--", "."], self.root)})
        step["byte_identical"] = self.identical(self.root, "v0")
        self.res["checkout"] = step
        self.res["filter_peak_rss_bytes"] = max(self.res["filter_peak_rss_bytes"], step["filter_peak_rss_bytes"] or 0)

    def checks_out(self, version: str) -> bool:
        self.remove_files()
        self.r.run(["git", "checkout", version, "--", "."], self.root)
        return self.identical(self.root, version)

    def diff(self) -> None:
        self.ctx.log(f"{self.tool}: git diff main sparse")
        self.repo.cold()
        t0 = time.perf_counter()
        out = self.r.run(["git", "diff", "main", "sparse"], self.root).stdout
        self.res["diff"] = {"seconds": time.perf_counter() - t0, "lines": out.count(b"\n")}

    def merge(self) -> None:
        self.ctx.log(f"{self.tool}: fmhub merge (TIES) of sparse and finetune over v0")
        out = self.ctx.work / f"merged-{self.tool}"
        rss_log = self.ctx.work / "rss-merge.log"
        rss_log.unlink(missing_ok=True)
        cmd = gb.fmhub_cmd("merge", "sparse:.", "finetune:.", "--base", "main:.", *MERGE_OPTIONS, "-o", str(out))
        self.repo.cold()
        seconds = self.r.timed([sys.executable, "-I", str(self.ctx.wrapper), str(rss_log), *cmd], self.root)
        self.res["merge"] = {"seconds": seconds, "peak_rss_bytes": gb.read_rss(rss_log), **load_check(out / "model.safetensors", self.ctx.shape)}
        shutil.rmtree(out, ignore_errors=True)

    def tiny_add(self) -> dict:
        """``git add`` of a one-tensor checkpoint: what a filter costs to start. The real filter, no RSS wrapper."""
        self.repo.unwrap_filter()
        path, times = self.root / TINY_FILE, []
        for i in range(TINY_TRIES):
            size = cg.write_tiny(path, self.ctx.seed + i)
            self.repo.cold()
            times.append(self.r.timed(["git", "add", "--", TINY_FILE], self.root))
        return {"seconds": sorted(times)[len(times) // 2], "tries": times, "bytes": size}

    def push_and_clone(self) -> None:
        c = self.ctx
        bare = c.work / f"remote-{self.tool}"
        self.r.run(["git", "init", "-q", "--bare", str(bare)], c.work)
        with running_lfs_server(c.work / f"server-{self.tool}") as server:
            self.r.run(["git", "config", "lfs.url", server.url], self.root)
            self.r.run(["git", "remote", "add", "origin", bare.as_uri()], self.root)
            self.remove_files()  # a push needs no work tree: one checkpoint less on disk
            self.res["push"] = self.push_all(server)
            filter_config = self.filter_config()
            shutil.rmtree(self.root)  # the clone must get every object from the server
            self.res["clone"] = self.clone(server, bare, filter_config)

    def push_all(self, server) -> dict:
        per_ref, keep = {}, None
        for ref in ("main", *self.ctx.versions[1:]):
            self.ctx.log(f"{self.tool}: push {ref}")
            self.repo.cold(server.store_dir)
            per_ref[ref] = gb.measured_push(lambda: self.r.run(["git", "push", "-q", "origin", ref], self.root), server)
            keep = set(server.objects()) if keep is None else keep
            prune_server(server, keep)
        total = {k: sum(p[k] for p in per_ref.values()) for k in ("uploaded_bytes", "request_bytes", "seconds")}
        return {"per_ref": per_ref, **total}

    def clone(self, server, bare: Path, filter_config: list[str]) -> dict:
        self.ctx.log(f"{self.tool}: git clone")
        dest = self.ctx.work / f"clone-{self.tool}"
        gb.evict(server.store_dir, bare)
        cmd = ["git", "clone", "-q", *filter_config, "-c", f"lfs.url={server.url}", bare.as_uri(), str(dest)]
        seconds = self.r.timed(cmd, self.ctx.work)
        return {"seconds": seconds, "writeback_seconds": gb.timed_sync(), "byte_identical": self.identical(dest, "v0")}

    def filter_config(self) -> list[str]:
        """The repository's filter settings as ``-c`` options: a clone runs the same filter without a global install."""
        self.repo.unwrap_filter()
        lines = self.r.out(["git", "config", "--local", "--get-regexp", rf"^filter\.{self.repo.driver}\."], self.root).splitlines()
        return [arg for line in lines for arg in ("-c", "=".join(line.split(" ", 1)))]


def prune_server(server, keep: set[str]) -> None:
    """Drop the objects the clone will not need (the updates'), so the server holds about one checkpoint."""
    for p in (server.store_dir / "objects").rglob("*"):
        if p.is_file() and p.name not in keep:
            p.unlink()


def load_check(path: Path, shape: cg.Shape) -> dict:
    """Whether a merged checkpoint loads with safetensors: every tensor of v0, same shape, bf16, finite."""
    try:
        import torch
        from safetensors import safe_open
    except ImportError:
        return {"loads": None, "load_note": "torch is not installed: not checked"}
    want = dict(shape.tensors())
    bad = []
    with safe_open(str(path), framework="pt") as f:
        got = set(f.keys())
        for name in got & set(want):
            t = f.get_tensor(name)
            if t.dtype != torch.bfloat16 or tuple(t.shape) != want[name] or not bool(torch.isfinite(t).all()):
                bad.append(name)
    missing = sorted(set(want) - got)
    note = f"{len(bad)} bad tensors {bad[:3]}, missing {missing[:3]}" if bad or missing else "every tensor: bf16, v0's shape, finite"
    return {"loads": not bad and not missing, "load_note": note}


# --------------------------------------------------------------------------- cp and zipnn


def run_cp(ctx: Ctx) -> dict:
    """The floor: ``cp`` of v0's files, cold, once for the first add and once for the checkout."""
    src, dst = ctx.work / "cp-src", ctx.work / "cp-dst"
    src.mkdir()
    written = cg.write_version(src, ctx.shape, ctx.seed, "v0", ctx.shards)
    ctx.record("v0", written)
    res = {}
    for step in ("first_add", "checkout"):
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        gb.evict(src, dst)
        seconds = ctx.runner.timed(["cp", "--reflink=never", *(str(src / f) for f in written.sha256), str(dst)], ctx.work)
        res[step] = {"seconds": seconds, "writeback_seconds": gb.timed_sync()}
    shutil.rmtree(src)
    shutil.rmtree(dst)
    return res


def run_tool(tool: str, ctx: Ctx) -> dict:
    if tool in gb.TOOLS:
        return GitToolRun(tool, ctx).run()
    if tool == "cp":
        return run_cp(ctx)
    import scale_zipnn

    return scale_zipnn.run_zipnn(ctx.shape, ctx.seed, ctx.versions, ctx.threads, ctx.log)


def run_once(ctx: Ctx, tools: list[str], flip: bool) -> dict:
    """Every tool once; odd repeats run them in reverse order, so a drift in the machine's load favours none."""
    return {tool: run_tool(tool, ctx) for tool in (reversed(tools) if flip else tools)}


# --------------------------------------------------------------------------- disk, options, main


def disk_needed(shape: cg.Shape, n_versions: int, tools: list[str]) -> int:
    """Peak bytes: git-lfs's store of every version, the work tree, one version in flight on the server (cp: two copies)."""
    copies = n_versions + 2 if set(tools) & set(gb.TOOLS) else (2 if "cp" in tools else 0)
    return int(copies * shape.payload_bytes * 1.05) + GiB


def check_disk(where: Path, shape: cg.Shape, n_versions: int, tools: list[str]) -> None:
    free = shutil.disk_usage(where).free
    need = disk_needed(shape, n_versions, tools)
    if need <= free:
        return
    fits = [n for n in range(shape.layers - 1, 0, -1)
            if disk_needed(cg.Shape(shape.vocab, shape.hidden, shape.intermediate, n), n_versions, tools) <= free]
    hint = f"--layers {fits[0]} fits" if fits else "no --layers fits: free some space or use --workdir elsewhere"
    raise SystemExit(f"not enough disk under {where}: this run needs about {need / 1e9:.1f} GB "
                     f"({n_versions} versions + 2 copies of {shape.payload_bytes / 1e9:.2f} GB), {free / 1e9:.1f} GB are free; {hint}")


def thread_env(threads: int) -> dict[str, str]:
    """Pin every child's BLAS/OpenMP pools (torch in fmhub merge, numpy): their defaults vary with the machine."""
    return {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    d = cg.Shape()
    ap.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {d.layers}; --acceptance: 6)")
    ap.add_argument("--hidden", type=int, default=None, help=f"hidden size (default {d.hidden}; --acceptance: 1024)")
    ap.add_argument("--intermediate", type=int, default=None, help=f"MLP size (default {d.intermediate}; --acceptance: 2752)")
    ap.add_argument("--vocab", type=int, default=None, help=f"vocabulary (default {d.vocab}; --acceptance: fills to 256 MiB)")
    ap.add_argument("--shards", type=int, default=None, help="safetensors shards (default 3; --acceptance: 1)")
    ap.add_argument("--tools", default=",".join(ALL_TOOLS), help=f"comma-separated, from {','.join(ALL_TOOLS)} (--acceptance: git-lfs,fmhub)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {','.join(STEPS)}; adds always run")
    ap.add_argument("--acceptance", action="store_true", help="the issue's 256 MiB checks: prints PASS/FAIL, exit status 3 on a FAIL")
    ap.add_argument("--fmhub-config", action="append", default=[], metavar="KEY=VALUE",
                    help="git config for fmhub's repository after install (e.g. fmhub.deltas=true); default: none")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="BLAS/OpenMP threads of every child, and zipnn's (default: CPUs)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the repos go (a fresh subdir, removed at the end; default: temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure as JSON here")
    ap.add_argument("--repeat", type=int, default=1, help="run everything this many times; the table shows medians (min–max)")
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="run every step with N other processes each spinning on a core (checkout under load)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def configure(args) -> tuple[cg.Shape, list[str], list[str], set[str], int]:
    """Shape, tools, versions, steps and shards from the options (--acceptance changes the defaults, not explicit values)."""
    d = cg.Shape()
    layers, hidden, inter = args.layers, args.hidden, args.intermediate
    if args.acceptance:
        layers, hidden, inter = layers or 6, hidden or 1024, inter or 2752
        shape = cg.shape_of_size(ACCEPTANCE_BYTES, hidden, inter, layers) if args.vocab is None else cg.Shape(args.vocab, hidden, inter, layers)
        tools, versions, steps = ["git-lfs", "fmhub"], ACCEPTANCE_VERSIONS, set(ACCEPTANCE_STEPS)
    else:
        shape = cg.Shape(args.vocab or d.vocab, hidden or d.hidden, inter or d.intermediate, d.layers if layers is None else layers)
        tools, versions = [t.strip() for t in args.tools.split(",") if t.strip()], list(cg.VERSIONS)
        steps = {s.strip() for s in args.steps.split(",") if s.strip()}
    unknown = (set(tools) - set(ALL_TOOLS)) | (steps - set(STEPS))
    if unknown:
        raise SystemExit(f"unknown tools or steps: {', '.join(sorted(unknown))}")
    return shape, tools, versions, steps, args.shards or (1 if args.acceptance else 3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape, tools, versions, steps, shards = configure(args)
    fmhub_config = dict(kv.split("=", 1) for kv in args.fmhub_config)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    check_disk(parent, shape, len(versions), tools)
    work = Path(tempfile.mkdtemp(prefix="fmhub-scale-bench-", dir=parent)).resolve()
    try:
        env = gb.isolated_env(work / "home", thread_env(args.threads))
        ctx = Ctx(shape, args.seed, shards, versions, steps, work, gb.Runner(env), gb.write_wrapper(work), fmhub_config, args.threads, log)
        log(f"{shape.payload_bytes / 1e9:.2f} GB checkpoint, tools {tools}, steps {sorted(steps)}, in {work}")
        with gb.busy(args.load):
            runs = [run_once(ctx, tools, flip=i % 2 == 1) for i in range(args.repeat)]
        meta = {"shape": vars(shape), "checkpoint": {"payload_bytes": shape.payload_bytes, "largest_tensor_bytes": shape.largest_tensor_bytes,
                                                     "tensors": len(shape.tensors()), "shards": shards},
                "versions": versions, "written": ctx.written, "tools": tools, "steps": sorted(steps), "repeat": args.repeat,
                "seed": args.seed, "threads": args.threads, "load": args.load, "fmhub_config": fmhub_config, "acceptance": args.acceptance,
                "tool_versions": gb.tool_versions(env)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(runs, meta, args.json)


def report(runs: list[dict], meta: dict, json_path: Path | None) -> int:
    summary, spread = scale_report.aggregate(runs)
    print(scale_report.render(summary, spread, meta))
    data = {"meta": meta, "summary": summary, "spread": spread, "runs": runs, "rss_goal_bytes": scale_report.rss_goal(meta)}
    status = 0
    if meta["acceptance"]:
        checks = scale_report.acceptance(summary, meta)
        print()
        print(scale_report.render_acceptance(checks, meta))
        data["acceptance"] = checks
        status = 0 if all(c["pass"] for c in checks) else 3
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=1, default=list) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Start-up cost of git commands on one tiny checkpoint: fmhub's filter against git-lfs, in one run.

    python benchmarks/startup_bench.py                  # 20 rounds, medians
    python benchmarks/startup_bench.py --rounds 50 --json out.json

Each tool gets a fresh repository (``git init``, tool install + track). Each
round times, for a fresh 76-byte safetensors file:

  add       ``git add`` of the new file (one clean)
  status    ``git status`` after touching a committed file (git re-cleans it)
  checkout  ``git checkout -- FILE`` after deleting it (one smudge)

For a tiny file the work is nothing, so these are the filter's start-up
(interpreter, imports, plugins, config reads) plus git's own time. Medians are
printed with the ratio fmhub / git-lfs (the target is at most 3).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = ("add", "status", "checkout")
TOOLS = ("git-lfs", "fmhub")


def tiny_checkpoint(i: int) -> bytes:
    """A valid safetensors file of one 2-element float32 tensor whose values depend on ``i``."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + struct.pack("<2f", float(i), float(-i))


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def setup(repo: Path, tool: str, fmhub: list[str]) -> None:
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "bench@fmhub.invalid")
    git(repo, "config", "user.name", "bench")
    if tool == "git-lfs":
        git(repo, "lfs", "install", "--local")
        git(repo, "lfs", "track", "*.safetensors")
    else:
        subprocess.run([*fmhub, "install"], cwd=repo, check=True, capture_output=True)
        subprocess.run([*fmhub, "track", "*.safetensors"], cwd=repo, check=True, capture_output=True)
    (repo / "base.safetensors").write_bytes(tiny_checkpoint(10_000))
    git(repo, "add", ".gitattributes", "base.safetensors")
    git(repo, "commit", "-q", "-m", "base")


def timed(repo: Path, *args: str) -> float:
    start = time.perf_counter()
    git(repo, *args)
    return time.perf_counter() - start


def one_round(repo: Path, i: int) -> dict[str, float]:
    name = f"m{i}.safetensors"
    (repo / name).write_bytes(tiny_checkpoint(i))
    out = {"add": timed(repo, "add", name)}
    git(repo, "commit", "-q", "-m", name)
    # a new mtime makes the index entry stale: git status must run the clean filter to compare
    t = time.time() + i + 1
    os.utime(repo / "base.safetensors", (t, t))
    out["status"] = timed(repo, "status", "--porcelain")
    (repo / name).unlink()
    out["checkout"] = timed(repo, "checkout", "--", name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fmhub", default=f"{shlex.quote(sys.executable)} -m fmhub", help="how to run fmhub's CLI (install, track)")
    ap.add_argument("--json", help="write the medians here")
    ap.add_argument("--bytecode", action="store_true",
                    help="let Python cache compiled modules (in a temp dir) even where PYTHONDONTWRITEBYTECODE is set")
    args = ap.parse_args()
    fmhub = shlex.split(args.fmhub)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env_home = Path(tmp) / "home"
        env_home.mkdir()
        os.environ.update(HOME=str(env_home), GIT_CONFIG_GLOBAL=str(env_home / ".gitconfig"), GIT_CONFIG_NOSYSTEM="1")
        if args.bytecode:  # a development checkout with PYTHONDONTWRITEBYTECODE compiles fmhub's modules every start
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
            os.environ["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        repos = {tool: Path(tmp) / tool for tool in TOOLS}
        for tool, repo in repos.items():
            setup(repo, tool, fmhub)
        times: dict[str, dict[str, list[float]]] = {tool: {s: [] for s in STEPS} for tool in TOOLS}
        for i in range(args.rounds):
            for tool in TOOLS:  # interleaved, so drift on a busy machine hits both alike
                for step, secs in one_round(repos[tool], i).items():
                    times[tool][step].append(secs)
        config = subprocess.run(["git", "config", "filter.fmhub.process"], cwd=repos["fmhub"], capture_output=True, text=True).stdout.strip()
    for tool in TOOLS:
        results[tool] = {s: statistics.median(v) for s, v in times[tool].items()}
    print(f"filter.fmhub.process = {config}")
    print(f"{args.rounds} rounds; Python bytecode {'cached' if args.bytecode or not sys.flags.dont_write_bytecode else 'not cached (PYTHONDONTWRITEBYTECODE)'}")
    print(f"{'step':<10}{'git-lfs ms':>12}{'fmhub ms':>12}{'ratio':>8}")
    for s in STEPS:
        lfs, fm = results["git-lfs"][s], results["fmhub"][s]
        print(f"{s:<10}{lfs * 1e3:>12.1f}{fm * 1e3:>12.1f}{fm / lfs:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": args.rounds, "bytecode": args.bytecode, "median_s": results, "command": config}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

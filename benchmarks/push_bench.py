#!/usr/bin/env python3
"""Bytes (and time) a `git push` uploads with fmhub vs plain git-lfs, for the same history, in one run.

    python benchmarks/push_bench.py                   # 256 MiB fp32 checkpoint, 97 tensors, 3 versions
    python benchmarks/push_bench.py --size-mb 8 --tensors 7 --json out.json

Each tool gets a fresh repository, a bare git remote (file://) and its own
real LFS server on 127.0.0.1 (dulwich's, extended for streaming: the one the
tests use, `tests/helpers/lfs_server.py`), with ``lfs.url`` pointing at it. Both push
the same three versions: v0, then two versions that each overwrite the same 2
tensors (a fine-tune of q/v projections). Bytes uploaded are what the server
stored in response to that push (objects it did not have before); the
expected figure for fmhub is the size of the changed tensors plus a header
object when the header changed (it does not here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the tests' LFS server: tests.helpers.lfs_server

import filter_bench as fb  # noqa: E402  (checkpoint generation and in-place edits)
from gitbench import measured_push  # noqa: E402
from tests.helpers.lfs_server import running_lfs_server  # noqa: E402

FILE = "model.safetensors"


def sh(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def setup(tool: str, root: Path, lfs_url: str) -> Path:
    bare = root / f"{tool}-remote.git"
    repo = root / f"{tool}-repo"
    sh(["git", "init", "-q", "--bare", str(bare)], root)
    repo.mkdir()
    sh(["git", "init", "-q", "-b", "main"], repo)
    if tool == "git-lfs":
        sh(["git", "lfs", "install", "--local"], repo)
        sh(["git", "lfs", "track", "*.safetensors"], repo)
    else:
        sh([sys.executable, "-m", "fmhub", "install"], repo)
        sh([sys.executable, "-m", "fmhub", "track", "*.safetensors"], repo)
    for key, value in (("lfs.url", lfs_url), ("user.name", "bench"), ("user.email", "bench@fmhub.invalid")):
        sh(["git", "config", key, value], repo)
    sh(["git", "remote", "add", "origin", bare.as_uri()], repo)
    sh(["git", "add", ".gitattributes"], repo)
    sh(["git", "commit", "-qm", "track"], repo)
    return repo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--tensors", type=int, default=97)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="Where to put the temporary repositories (default: the system temp dir).")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(140, Console().width))
    root = Path(tempfile.mkdtemp(prefix="fmhub-push-bench-", dir=args.workdir))
    results: dict[str, list[dict]] = {}
    try:
        src = root / "src.safetensors"
        ck = fb.generate(src, args.size_mb, args.tensors, 0)
        changed = fb.v1_tensors(ck.tensors)
        changed_bytes = sum(t.size for t in changed)
        versions = []
        for i in range(3):
            if i:
                fb.apply_v1(src, ck.tensors, 100 + i)
            keep = root / f"v{i}.safetensors"
            shutil.copyfile(src, keep)
            versions.append(keep)
        for tool in ("git-lfs", "fmhub"):
            with running_lfs_server(root / f"{tool}-server") as server:
                repo = setup(tool, root, server.url)
                rows = []
                for i, v in enumerate(versions):
                    shutil.copyfile(v, repo / FILE)
                    sh(["git", "add", FILE], repo)
                    sh(["git", "commit", "-qm", f"v{i}"], repo)
                    pushed = measured_push(lambda: sh(["git", "push", "-q", "origin", "main"], repo), server)
                    rows.append({"version": f"v{i}", **pushed})
                results[tool] = rows
                console.print(f"{tool}: pushed {len(rows)} versions", highlight=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    table = Table(title=f"git push: fmhub vs git-lfs — {args.size_mb} MiB fp32 checkpoint, {args.tensors} tensors; v1 and v2 change {len(changed)} tensors ({changed_bytes / 2**20:.1f} MiB)")
    for col in ("push", "changed", "git-lfs uploads", "fmhub uploads", "fmhub/git-lfs", "fmhub/changed", "fmhub wire/changed", "git-lfs time", "fmhub time"):
        table.add_column(col, justify="left" if col == "push" else "right")
    for i in range(3):
        g, f = results["git-lfs"][i], results["fmhub"][i]
        want = ck.size if i == 0 else changed_bytes
        table.add_row(
            f"v{i}", f"{want / 2**20:.1f} MiB" + (" (all)" if i == 0 else ""),
            f"{g['uploaded_bytes'] / 2**20:.1f} MiB", f"{f['uploaded_bytes'] / 2**20:.1f} MiB ({f['objects']})",
            f"{f['uploaded_bytes'] / g['uploaded_bytes']:.3f}×" if g["uploaded_bytes"] else "—",
            f"{f['uploaded_bytes'] / want:.3f}×", f"{f['request_bytes'] / want:.4f}×",
            f"{g['seconds']:.2f} s", f"{f['seconds']:.2f} s",
        )
    console.print(table)
    console.print("• uploads = bytes of objects (count in brackets) the server gained from that push; fmhub/changed = 1.000× means exactly the changed tensors travelled;"
                  " on the wire = every request body of the push (batch JSON included) over the changed bytes.")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint_bytes": ck.size, "changed_bytes": changed_bytes, "results": results}, indent=1))


if __name__ == "__main__":
    main()

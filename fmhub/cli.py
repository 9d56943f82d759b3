"""The ``fmhub`` command line: a thin layer over the plumbing modules.

Imports stay inside the commands: git starts ``fmhub filter-process`` once per
git command, so start-up time is paid often.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from fmhub.errors import FmhubError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Engineer foundation models like software, in plain git.")
console = Console()
err = Console(stderr=True)


def _fail(exc: FmhubError) -> None:
    err.print(f"[red]fmhub:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def install(
    global_: bool = typer.Option(False, "--global", help="Write the drivers to your user git config instead of this repo's."),
    command: Optional[str] = typer.Option(None, help="How git should start fmhub (default: this Python, `-m fmhub`)."),
) -> None:
    """Register fmhub's filter, diff and merge drivers with git."""
    from fmhub import install as inst

    try:
        cfg = inst.install(global_, command)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"fmhub drivers installed ({'global' if global_ else 'this repository'}):")
    for key, value in cfg.items():
        console.print(f"  {key} = {value}", highlight=False)


@app.command()
def uninstall(global_: bool = typer.Option(False, "--global")) -> None:
    """Remove fmhub's drivers from git config (objects and .gitattributes stay)."""
    from fmhub import install as inst

    try:
        inst.uninstall(global_)
    except FmhubError as exc:
        _fail(exc)
    console.print("fmhub drivers removed")


@app.command()
def track(patterns: List[str] = typer.Argument(None, help='e.g. "*.safetensors"')) -> None:
    """Store files matching PATTERNS tensor by tensor (writes .gitattributes); no patterns lists them."""
    from fmhub import install as inst

    try:
        if not patterns:
            for p in inst.tracked_patterns():
                console.print(p, highlight=False)
            return
        for line in inst.track(patterns):
            console.print(f"replaced: {line}", highlight=False)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"tracking {', '.join(patterns)}; commit .gitattributes", highlight=False)


@app.command()
def untrack(patterns: List[str]) -> None:
    """Stop routing PATTERNS through fmhub."""
    from fmhub import install as inst

    try:
        dropped = inst.untrack(patterns)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"untracked {len(dropped)} pattern(s)")


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json")) -> None:
    """List loaded plugins and what each provides."""
    from fmhub import host

    try:
        rows = host.provided()
    except FmhubError as exc:
        _fail(exc)
    dists = {name: dist.project_name for name, dist in _plugin_dists()}
    if as_json:
        console.print_json(json.dumps([{"kind": r.kind, "name": r.name, "plugin": r.plugin, "package": dists.get(r.plugin, "")} for r in rows]))
        return
    table = Table("kind", "name", "plugin", "package")
    for r in rows:
        table.add_row(r.kind, r.name, r.plugin, dists.get(r.plugin, ""))
    console.print(table)


def _plugin_dists():
    from fmhub import host

    pm = host.plugin_manager()
    return [(pm.get_name(p), d) for p, d in pm.list_plugin_distinfo()]


@app.command("filter-process", hidden=True)
def filter_process() -> None:
    """git's long-running clean/smudge filter (started by git)."""
    from fmhub_filters import process

    raise typer.Exit(process.main())


def _open_store():
    from fmhub.repo import open_store

    return open_store()


@app.command()
def clean(path: str = typer.Argument("<stdin>")) -> None:
    """Checkpoint on stdin -> manifest on stdout, storing its tensors (git's one-shot clean filter)."""
    from fmhub import checkpoint

    try:
        store = _open_store()
        try:
            out = checkpoint.clean(sys.stdin.buffer, store, path)
        finally:
            store.close()
    except FmhubError as exc:
        _fail(exc)
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()


@app.command()
def smudge(path: str = typer.Argument("<stdin>")) -> None:
    """Manifest on stdin -> the original checkpoint on stdout (git's one-shot smudge filter)."""
    from fmhub import checkpoint

    try:
        checkpoint.smudge(sys.stdin.buffer.read(), _open_store(), sys.stdout.buffer, path)
    except FmhubError as exc:
        _fail(exc)
    sys.stdout.buffer.flush()


@app.command("merge-driver", hidden=True)
def merge_driver(base: str, ours: str, theirs: str, pathname: str) -> None:
    """Three-way tensor merge for git (merge.fmhub.driver)."""
    from fmhub_filters import merge_driver as md

    raise typer.Exit(md.run(base, ours, theirs, pathname))


@app.command()
def ls(path: str, rev: Optional[str] = typer.Option(None, help="Read the file as committed at REV.")) -> None:
    """List the tensors of a checkpoint (in the work tree, or at --rev)."""
    from fmhub import worktree
    from fmhub.units import human_bytes

    try:
        m = worktree.describe(path, rev)
    except FmhubError as exc:
        _fail(exc)
    table = Table("tensor", "dtype", "shape", "size", "object", title=f"{path}: {len(m.tensors)} tensors, {human_bytes(m.size)}")
    for t in m.tensors:
        table.add_row(t.name, t.dtype, str(list(t.shape)), human_bytes(t.size), t.oid[:12] if t.oid else "-")
    console.print(table)


@app.command()
def checkout(paths: List[str] = typer.Argument(None)) -> None:
    """Turn work-tree files that are still manifests (a clone made before `fmhub install`) into checkpoints."""
    from fmhub import worktree

    try:
        done = worktree.materialize(paths or None)
    except FmhubError as exc:
        _fail(exc)
    for p in done:
        console.print(f"checked out {p}", highlight=False)
    if not done:
        console.print("nothing to check out")


@app.command()
def fsck(rev: str = typer.Option("HEAD", help="Check that every checkpoint committed at REV has its objects.")) -> None:
    """Verify the object store: every object's hash, and the objects REV needs."""
    from fmhub import fsck as fsck_mod

    try:
        report = fsck_mod.fsck(rev)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"{report.objects} objects checked, {report.stale_temp} stale temp files removed")
    for line in report.problems:
        err.print(f"[red]problem:[/red] {line}", highlight=False)
    if report.problems:
        raise typer.Exit(1)
    console.print("store is consistent")


@app.command()
def demo(
    directory: Optional[str] = typer.Argument(None, help="Where to create the demo repository (default: a temp dir)."),
) -> None:
    """Build a tiny transformers model, version it with git + fmhub, and show what fmhub stores."""
    from fmhub import demo as d

    try:
        d.run(directory, console)
    except FmhubError as exc:
        _fail(exc)


def main() -> None:
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    app()

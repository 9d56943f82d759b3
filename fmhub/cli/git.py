"""``fmhub install|uninstall|track|untrack|fetch|push-objects|ls|checkout|fsck|gc|repack`` (`fmhub.api.git`)."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from fmhub.cli.common import console, err, say

app = typer.Typer()


@app.command()
def install(
    global_: bool = typer.Option(False, "--global", help="Write the drivers to your user git config instead of this repo's."),
    command: Optional[str] = typer.Option(None, help="How git should start fmhub (default: this Python through fmhub/boot.py, behind a check that both still exist)."),
) -> None:
    """Register fmhub's filter, diff and merge drivers with git."""
    from fmhub.api import git

    done = git.install(global_, command)
    console.print(f"fmhub drivers installed ({'global' if global_ else 'this repository'}):")
    console.print(f"  git starts fmhub as ($FMHUB below): {done.command}", highlight=False, markup=False, soft_wrap=True)
    for key, value in done.config.items():
        shown = "$FMHUB" + value[len(done.command):] if done.command and value.startswith(done.command + " ") else value
        console.print(f"  {key} = {shown}", highlight=False, markup=False)
    if done.pre_push_hook:
        console.print(f"  pre-push hook: {done.pre_push_hook} (uploads tensor objects on git push)", highlight=False)
    if done.pre_commit_hook:
        console.print(f"  pre-commit hook: {done.pre_commit_hook} (refuses raw checkpoints staged at tracked paths)", highlight=False)


INSTALLED = {
    "missing": "fmhub's filter was not installed in this repository: installed it (as `fmhub install`), so `git add` stores these files through fmhub",
    "stale": "the Python that `fmhub install` recorded is gone: installed fmhub again with this one (as `fmhub install`)",
}


@app.command()
def uninstall(global_: bool = typer.Option(False, "--global")) -> None:
    """Remove fmhub's drivers from git config (objects and .gitattributes stay)."""
    from fmhub.api import git

    git.uninstall(global_)
    console.print("fmhub drivers removed")


@app.command()
def track(patterns: List[str] = typer.Argument(None, help='e.g. "*.safetensors"'),
          as_json: bool = typer.Option(False, "--json", help="Print the tracked patterns (or what tracking did) as JSON.")) -> None:
    """Store files matching PATTERNS tensor by tensor (writes .gitattributes); no patterns lists them."""
    from dataclasses import asdict

    from fmhub.api import git

    if not patterns:
        listed = git.tracked_patterns()
        if as_json:
            return _json(listed)
        for p in listed:
            console.print(p, highlight=False)
        return
    done = git.track(patterns)
    if as_json:
        return _json({"tracking": list(patterns), **asdict(done)})
    if done.installed:
        say(INSTALLED[done.installed])
    for line in done.replaced:
        console.print(f"replaced: {line}", highlight=False)
    console.print(f"tracking {', '.join(patterns)}; commit .gitattributes", highlight=False)
    if done.raw_staged:
        shown = ", ".join(done.raw_staged[:5]) + (f" and {len(done.raw_staged) - 5} more" if len(done.raw_staged) > 5 else "")
        console.print(f"already staged as raw checkpoint bytes: {shown}; `git add --renormalize .` stores them through fmhub",
                      markup=False, highlight=False, soft_wrap=True)


@app.command()
def untrack(patterns: List[str]) -> None:
    """Stop routing PATTERNS through fmhub."""
    from fmhub.api import git

    console.print(f"untracked {len(git.untrack(patterns))} pattern(s)")


def _json(doc) -> None:
    """JSON on stdout, whole (no terminal width or markup applies)."""
    import json
    import sys

    from fmhub.cli.common import utf8_stdout

    utf8_stdout()
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def _summary(verb: str, report) -> str:
    from fmhub_filters.commands import summary

    return summary(verb, report)


@app.command()
def fetch(args: List[str] = typer.Argument(None, metavar="[REMOTE] [REV...]")) -> None:
    """Download every tensor object the checkpoints committed at REVs (default HEAD) need, so checkouts work offline."""
    from fmhub.api import git

    say(_summary("downloaded", git.fetch(args or [])))


@app.command("push-objects")
def push_objects(
    args: List[str] = typer.Argument(None, metavar="[REMOTE] [REV...]"),
    all_: bool = typer.Option(False, "--all", help="Every branch and tag, not just REVs."),
) -> None:
    """Upload the tensor objects of REVs' history (default HEAD) that the server lacks: for commits pushed before `fmhub install`."""
    from fmhub.api import git

    say(_summary("uploaded", git.push_objects(args or [], all_)))


@app.command()
def ls(path: str, rev: Optional[str] = typer.Option(None, help="Read the file as committed at REV."),
       as_json: bool = typer.Option(False, "--json", help="Every tensor (name, dtype, shape, bytes, object id) as JSON.")) -> None:
    """List the tensors of a checkpoint (in the work tree, or at --rev)."""
    from fmhub.api import git
    from fmhub.base.units import human_bytes

    m = git.describe(path, rev)
    if as_json:
        return _json({"path": path, "rev": rev, "bytes": m.size, "tensors": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.size, "object": t.oid or None} for t in m.tensors]})
    table = Table("tensor", "dtype", "shape", "size", "object", title=f"{path}: {len(m.tensors)} tensors, {human_bytes(m.size)}")
    for t in m.tensors:
        table.add_row(t.name, t.dtype, str(list(t.shape)), human_bytes(t.size), t.oid[:12] if t.oid else "-")
    console.print(table)


@app.command()
def checkout(paths: List[str] = typer.Argument(None)) -> None:
    """Turn work-tree files that are still manifests (a clone made before `fmhub install`) into checkpoints."""
    from fmhub.api import git

    done = git.checkout(paths or ())
    if done.installed:
        say(INSTALLED[done.installed].replace(", so `git add` stores these files through fmhub", ""))
    for p in done.paths:
        console.print(f"checked out {p}", highlight=False)
    if not done.paths:
        console.print("nothing to check out")


@app.command()
def fsck(rev: str = typer.Option("HEAD", help="Check that every checkpoint committed at REV has its objects.")) -> None:
    """Verify the object store: every object's hash, and the objects REV needs."""
    from rich.markup import escape

    from fmhub.api import git
    from fmhub.base.errors import one_line

    report = git.fsck(rev)
    console.print(f"{report.objects} objects checked, {report.stale_temp} stale temp files removed")
    for line in report.notes:
        err.print(f"note: {escape(one_line(line))}", highlight=False, soft_wrap=True)
    for line in report.problems:  # one line each, whatever the paths in them hold
        err.print(f"[red]problem:[/red] {escape(one_line(line))}", highlight=False, soft_wrap=True)
    if report.problems:
        raise typer.Exit(1)
    console.print("store is consistent")


@app.command("gc")
def gc_(
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Only say what would be removed."),
    grace: float = typer.Option(3600.0, help="Keep unreferenced objects younger than this many seconds (a running `git add` may still need them)."),
) -> None:
    """Delete store objects no commit (reachable from a ref or reflog) and no staged file refers to."""
    from fmhub.api import git
    from fmhub.base.units import human_bytes

    rep = git.gc(grace, dry_run)
    verb = "would remove" if dry_run else "removed"
    young = f"; {rep.young} unreferenced but younger than {grace:g} s kept" if rep.young else ""
    console.print(f"{verb} {len(rep.removed)} object(s), {human_bytes(rep.freed)}; {rep.kept} referenced{young}", highlight=False)


@app.command()
def repack(dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Only say what would be packed.")) -> None:
    """Store old tensor versions as deltas against newer ones; what the branch tips need stays whole."""
    from fmhub.api import git
    from fmhub.base.units import human_bytes

    rep = git.repack(dry_run)
    verb = "would pack" if dry_run else "packed"
    extra = f"; {rep.unpacked} object(s) a tip needs made whole again" if rep.unpacked else ""
    say(f"{verb} {rep.packed} object(s), store {human_bytes(rep.bytes_before)} -> {human_bytes(rep.bytes_after)}; "
        f"{rep.skipped} old version(s) left whole{extra}")

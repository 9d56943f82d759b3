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


def _utf8_stdout() -> None:
    """git may run us under LANG=C; tensor names are UTF-8 whatever the locale."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8", errors="replace")


@app.command("diff-driver", hidden=True, context_settings={"ignore_unknown_options": True})
def diff_driver(args: List[str] = typer.Argument(..., help="git's PATH OLD-FILE OLD-HEX OLD-MODE NEW-FILE NEW-HEX NEW-MODE")) -> None:
    """Semantic checkpoint diff for git (diff.fmhub.command)."""
    from fmhub_filters import diff_driver as dd

    _utf8_stdout()
    raise typer.Exit(dd.run(args))


@app.command("textconv", hidden=True)
def textconv(path: str) -> None:
    """One line per tensor (name, dtype, shape, sha256, norm, mean, std) for git log -p / show (diff.fmhub.textconv)."""
    from fmhub_filters import diff_driver as dd

    _utf8_stdout()
    raise typer.Exit(dd.textconv(path))


def _split_revs_paths(args: List[str]) -> tuple[List[str], List[str]]:
    """[REV1] [REV2] [--] [PATH...]: click swallows `--`, so find it in argv; else leading commits are revisions."""
    argv = sys.argv[1:]
    if "--" in argv:
        n_paths = len(argv) - argv.index("--") - 1
        if n_paths <= len(args):
            return args[: len(args) - n_paths], args[len(args) - n_paths :]
    from fmhub.repo import git

    revs: List[str] = []
    for a in args:
        if len(revs) == 2 or not git("rev-parse", "--verify", "--quiet", f"{a}^{{commit}}", check=False).strip():
            break
        revs.append(a)
    for p in args[len(revs) :]:
        if not os.path.exists(p):
            raise FmhubError(f"{p!r} is neither a revision nor a path in the work tree; put paths after '--'")
    return revs, args[len(revs) :]


@app.command()
def diff(
    args: List[str] = typer.Argument(None, metavar="[REV1] [REV2] [-- PATH...]"),
    as_json: bool = typer.Option(False, "--json", help="Every tensor with its status and numbers, as JSON."),
) -> None:
    """What changed in each tensor: HEAD vs the work tree, REV vs the work tree, or REV1 vs REV2.

    Tensors are matched by name across the shards of a directory; only changed tensors are listed,
    with ‖Δ‖, ‖Δ‖/‖W_old‖, the fraction of elements changed (bitwise) and max |Δ|.
    """
    from rich.markup import escape

    from fmhub import diff as df
    from fmhub.units import human_bytes

    try:
        revs, paths = _split_revs_paths(list(args or []))
        old_label, new_label, changes = df.diff_revisions(revs, paths)
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        _utf8_stdout()
        out = df.to_json(changes) | {"old": old_label, "new": new_label}
        sys.stdout.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        return
    rows = [c for c in changes if c.status != "unchanged"]
    dirs = {os.path.dirname(c.path or "") for c in changes}
    n, nbytes = df.summarize(changes)
    caption = f"{n} tensor{'' if n == 1 else 's'} unchanged ({human_bytes(nbytes)})"
    if not rows:
        caption = "no tensor changed; " + caption
    elif any(c.status in ("added", "removed", "shape") for c in rows):
        caption += "; added/removed/shape: ‖W‖ of the tensor"
    table = Table(title=f"{escape(old_label)} → {escape(new_label)}", title_justify="left", caption=caption, caption_justify="left")
    for col in ["status"] + (["file"] if len(dirs) > 1 else []) + ["tensor", "dtype shape"]:
        table.add_column(col)
    for col in ("‖Δ‖", "‖Δ‖/‖W‖", "changed", "max|Δ|"):
        table.add_column(col, justify="right")
    style = {"added": "green", "removed": "red", "dtype": "yellow", "shape": "yellow", "changed": "cyan"}
    opt = lambda x: "" if x is None else df._g(x)  # noqa: E731
    for c in rows:
        if c.status in ("added", "removed", "shape"):
            norm = {"added": opt(c.new_norm), "removed": opt(c.old_norm), "shape": f"{opt(c.old_norm)}→{opt(c.new_norm)}"}
            nums = [f"‖W‖ {norm[c.status]}", "", "", ""]
        else:
            frac = "" if c.frac_changed is None else f"{100 * c.frac_changed:.3g}%"
            nums = [opt(c.delta_norm), opt(c.rel_change), frac, opt(c.max_abs)]
        if c.note:
            nums[-1] = (nums[-1] + " " if nums[-1] else "") + f"({c.note})"
        lead = [f"[{style[c.status]}]{c.status}[/]"] + ([escape(c.path or "")] if len(dirs) > 1 else [])
        table.add_row(*lead, escape(c.name), df._kind(c).replace("->", "→"), *(escape(x) for x in nums))
    if rows:
        console.print(table)
    else:
        console.print(f"{escape(old_label)} → {escape(new_label)}: {caption}", highlight=False)


@app.command()
def merge(
    inputs: List[str] = typer.Argument(..., help="A recipe (.yaml), or the models to merge: files, shard/adapter directories, REV:PATH."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Where to write the result (overrides the recipe's `output`)."),
    base: Optional[str] = typer.Option(None, "--base", help="The common base model (needed by task-arithmetic, ties, dare-*)."),
    strategy: Optional[str] = typer.Option(None, "-s", "--strategy", help="Merge strategy for every tensor (`fmhub plugins` lists them)."),
    weight: List[float] = typer.Option([], "-w", "--weight", help="One weight per model, in order."),
    option: List[str] = typer.Option([], "--option", help="Strategy option KEY=VALUE (density=0.5, scale=1, seed=0, t=0.5)."),
    into: Optional[str] = typer.Option(None, "--into", help="For PEFT adapters: `base` (full weights) or `adapter` (one adapter)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was done per tensor as JSON."),
) -> None:
    """Merge N models (and a base) tensor by tensor into one, outside a git merge; also PEFT LoRA adapters."""
    import yaml

    from fmhub import merge as mg

    try:
        if len(inputs) == 1 and inputs[0].endswith((".yaml", ".yml")):
            data = mg.load_plan_file(inputs[0])
            where = inputs[0]
        else:
            data, where = {"models": list(inputs)}, "command line"
        for key, value in (("base", base), ("strategy", strategy), ("into", into)):
            if value is not None:
                data[key] = value
        if option:
            opts = dict(data.get("options") or {})
            for item in option:
                key, eq, value = item.partition("=")
                if not eq:
                    raise FmhubError(f"--option {item!r}: write KEY=VALUE")
                opts[key.strip()] = yaml.safe_load(value)
            data["options"] = opts
        recipe = mg.Recipe.from_dict(data, where)
        if weight:
            if len(weight) != len(recipe.models):
                raise FmhubError(f"{len(weight)} --weight values for {len(recipe.models)} models")
            recipe.plan.options["weights"] = list(weight)
        with console.status("merging", spinner="dots") as status:
            report = mg.run_recipe(recipe, output, progress=lambda name: status.update(f"merging {name}"))
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps({"output": report.output, "bytes": report.bytes_written, "tensors": [{"name": n, "action": a} for n, a in report.actions]}))
        return
    from collections import Counter

    from fmhub.units import human_bytes

    counts = Counter(a for _, a in report.actions)
    table = Table("action", "tensors", title=f"wrote {report.output} ({human_bytes(report.bytes_written)})")
    for action, n in counts.most_common():
        table.add_row(action, str(n))
    console.print(table)


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

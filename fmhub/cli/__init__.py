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

from fmhub.base.errors import FmhubError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Engineer foundation models like software, in plain git.")
console = Console()
err = Console(stderr=True)


def _fail(exc: FmhubError) -> None:
    from rich.markup import escape

    from fmhub.base.errors import one_line

    err.print(f"[red]fmhub:[/red] {escape(one_line(str(exc)))}", highlight=False, soft_wrap=True)  # a path is not markup
    raise typer.Exit(1)


@app.command()
def install(
    global_: bool = typer.Option(False, "--global", help="Write the drivers to your user git config instead of this repo's."),
    command: Optional[str] = typer.Option(None, help="How git should start fmhub (default: this Python, `-m fmhub`)."),
) -> None:
    """Register fmhub's filter, diff and merge drivers with git."""
    from fmhub.git import install as inst

    try:
        cfg = inst.install(global_, command)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"fmhub drivers installed ({'global' if global_ else 'this repository'}):")
    for key, value in cfg.items():
        console.print(f"  {key} = {value}", highlight=False)
    if not global_:
        console.print(f"  pre-push hook: {inst.pre_push_path()} (uploads tensor objects on git push)", highlight=False)


@app.command()
def uninstall(global_: bool = typer.Option(False, "--global")) -> None:
    """Remove fmhub's drivers from git config (objects and .gitattributes stay)."""
    from fmhub.git import install as inst

    try:
        inst.uninstall(global_)
    except FmhubError as exc:
        _fail(exc)
    console.print("fmhub drivers removed")


@app.command()
def track(patterns: List[str] = typer.Argument(None, help='e.g. "*.safetensors"')) -> None:
    """Store files matching PATTERNS tensor by tensor (writes .gitattributes); no patterns lists them."""
    from fmhub.git import install as inst

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
    from fmhub.git import install as inst

    try:
        dropped = inst.untrack(patterns)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"untracked {len(dropped)} pattern(s)")


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json")) -> None:
    """List loaded plugins and what each provides."""
    from fmhub.plugin import host

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
    from fmhub.plugin import host

    pm = host.plugin_manager()
    return [(pm.get_name(p), d) for p, d in pm.list_plugin_distinfo()]


# The commands git runs live in fmhub_filters.commands, which `python -m fmhub` reaches without this module;
# these entries keep them working through the `fmhub` script and list them for `--help`.


@app.command("filter-process", hidden=True)
def filter_process() -> None:
    """git's long-running clean/smudge filter (started by git)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.run(["filter-process"]))


@app.command("filter-clean", hidden=True)
def filter_clean(path: str = typer.Argument("<stdin>")) -> None:
    """Checkpoint on stdin -> manifest on stdout, storing its tensors (git's one-shot clean filter)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.filter_clean(path))


@app.command("filter-smudge", hidden=True)
def filter_smudge(path: str = typer.Argument("<stdin>")) -> None:
    """Manifest on stdin -> the original checkpoint on stdout (git's one-shot smudge filter)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.filter_smudge(path))


def _summary(verb: str, report) -> str:
    from fmhub_filters.commands import summary

    return summary(verb, report)


def _remote_and_revs(args: List[str]) -> tuple[Optional[str], List[str]]:
    """[REMOTE] [REV...]: the first word is a remote when one of that name is configured (as `git lfs fetch` reads it)."""
    from fmhub.git import sync

    if args and args[0] in sync.remote_names():
        return args[0], args[1:]
    return None, args


@app.command("pre-push", hidden=True)
def pre_push(remote: str, url: str = typer.Argument("")) -> None:
    """git's pre-push hook: upload the tensor objects of the pushed commits that the server lacks (reads git's stdin)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.pre_push(remote, url))


@app.command()
def fetch(args: List[str] = typer.Argument(None, metavar="[REMOTE] [REV...]")) -> None:
    """Download every tensor object the checkpoints committed at REVs (default HEAD) need, so checkouts work offline."""
    from fmhub.git import sync

    try:
        remote, revs = _remote_and_revs(list(args or []))
        report = sync.fetch(remote, revs or ["HEAD"])
    except FmhubError as exc:
        _fail(exc)
    console.print(_summary("downloaded", report), highlight=False, soft_wrap=True)


@app.command("push-objects")
def push_objects(
    args: List[str] = typer.Argument(None, metavar="[REMOTE] [REV...]"),
    all_: bool = typer.Option(False, "--all", help="Every branch and tag, not just REVs."),
) -> None:
    """Upload the tensor objects of REVs' history (default HEAD) that the server lacks: for commits pushed before `fmhub install`."""
    from fmhub.git import sync

    try:
        remote, revs = _remote_and_revs(list(args or []))
        report = sync.push_objects(remote or sync.default_remote(), (["--all"] if all_ else []) + (revs or ([] if all_ else ["HEAD"])))
    except FmhubError as exc:
        _fail(exc)
    console.print(_summary("uploaded", report), highlight=False, soft_wrap=True)


@app.command("merge-driver", hidden=True)
def merge_driver(base: str, ours: str, theirs: str, pathname: str) -> None:
    """Three-way tensor merge for git (merge.fmhub.driver)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.merge_driver(base, ours, theirs, pathname))


def _utf8_stdout() -> None:
    """git may run us under LANG=C; tensor names are UTF-8 whatever the locale."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8", errors="replace")


@app.command("diff-driver", hidden=True, context_settings={"ignore_unknown_options": True})
def diff_driver(args: List[str] = typer.Argument(..., help="git's PATH OLD-FILE OLD-HEX OLD-MODE NEW-FILE NEW-HEX NEW-MODE")) -> None:
    """Semantic checkpoint diff for git (diff.fmhub.command)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.diff_driver(*args))


@app.command("textconv", hidden=True)
def textconv(path: str) -> None:
    """One line per tensor (name, dtype, shape, sha256, norm, mean, std) for git log -p / show (diff.fmhub.textconv)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.textconv(path))


def _split_revs_paths(args: List[str]) -> tuple[List[str], List[str]]:
    """[REV1] [REV2] [--] [PATH...]: click swallows `--`, so find it in argv; else leading commits are revisions."""
    argv = sys.argv[1:]
    if "--" in argv:
        n_paths = len(argv) - argv.index("--") - 1
        if n_paths <= len(args):
            return args[: len(args) - n_paths], args[len(args) - n_paths :]
    from fmhub.core.repo import git

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
    Datasets (jsonl, parquet) are compared by rows: added, removed, changed, with sample rows.
    """
    from rich.markup import escape

    from dataclasses import asdict

    from fmhub.models import diff as df
    from fmhub.models.adapters import diff_adapters
    from fmhub.base.units import human_bytes

    try:
        revs, paths = _split_revs_paths(list(args or []))
        top, old_side, new_side = df.load_sides(revs, paths)
        old_label, new_label = old_side.label, new_side.label
        changes = df.diff_sides(old_side, new_side)
        from fmhub.data.rowdiff import diff_data_sides, format_data_text

        datasets = diff_data_sides(old_side, new_side, top)
        adapter_changes = diff_adapters(old_side.files, new_side.files, revs[0] if revs else "HEAD", revs[1] if len(revs) == 2 else None, top)
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        _utf8_stdout()
        out = df.to_json(changes) | {"old": old_label, "new": new_label, "adapters": [asdict(a) for a in adapter_changes]}
        out["datasets"] = [d.to_dict() for d in datasets]
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
        if c.withheld:  # the access policy withholds its values: the note says so, no number
            nums = ["", "", "", ""]
        elif c.status in ("added", "removed", "shape"):
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
    elif changes or not datasets:
        console.print(f"{escape(old_label)} → {escape(new_label)}: {caption}", highlight=False)
    for d in datasets:
        if d.status != "unchanged":
            console.print(f"[bold]{escape(d.path)}[/bold] ({escape(old_label)} → {escape(new_label)})", highlight=False)
            console.print(escape(format_data_text(d)), highlight=False, end="", soft_wrap=True)
    if datasets and all(d.status == "unchanged" for d in datasets) and not rows:
        console.print(f"{len(datasets)} dataset{'' if len(datasets) == 1 else 's'} unchanged", highlight=False)
    for a in adapter_changes:
        _print_adapter_change(a, opt)


def _print_adapter_change(a, opt) -> None:
    from rich.markup import escape

    t = Table(title=f"adapter {escape(a.path)}: effective updates scaling·B@A", title_justify="left")
    for col in ("module", "status", "‖ΔW‖ before", "‖ΔW‖ after", "‖ΔW_after − ΔW_before‖"):
        t.add_column(col, justify="left" if col in ("module", "status") else "right")
    for m in a.modules:
        t.add_row(escape(m.module), m.status, opt(m.old_norm), opt(m.new_norm), opt(m.change_norm))
    for key, before, after in a.config:
        console.print(f"adapter {escape(a.path)}: {escape(key)}: {escape(json.dumps(before))} → {escape(json.dumps(after))}", highlight=False)
    if a.modules:
        console.print(t)


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
    from fmhub.models import merge as mg
    from fmhub.base.boundedyaml import safe_load
    from fmhub.project.spec import SPEC_LIMITS

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
                opts[key.strip()] = safe_load(value, f"--option {key.strip()}", SPEC_LIMITS, FmhubError)  # `a=[` is one line
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

    from fmhub.base.units import human_bytes

    counts = Counter(a for _, a in report.actions)
    table = Table("action", "tensors", title=f"wrote {report.output} ({human_bytes(report.bytes_written)})")
    for action, n in counts.most_common():
        table.add_row(action, str(n))
    console.print(table)


@app.command()
def ls(path: str, rev: Optional[str] = typer.Option(None, help="Read the file as committed at REV.")) -> None:
    """List the tensors of a checkpoint (in the work tree, or at --rev)."""
    from fmhub.git import worktree
    from fmhub.base.units import human_bytes

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
    from fmhub.git import sync
    from fmhub.git import worktree
    from fmhub.base.errors import MissingObject

    reason = None
    try:
        reason = sync.prefetch_index(paths or ())  # downloads only what the store lacks
        done = worktree.materialize(paths or None)
    except FmhubError as exc:
        _fail(MissingObject(f"{exc}; downloading them failed: {reason}") if reason and isinstance(exc, MissingObject) else exc)
    for p in done:
        console.print(f"checked out {p}", highlight=False)
    if not done:
        console.print("nothing to check out")


@app.command()
def fsck(rev: str = typer.Option("HEAD", help="Check that every checkpoint committed at REV has its objects.")) -> None:
    """Verify the object store: every object's hash, and the objects REV needs."""
    from fmhub.git import fsck as fsck_mod

    try:
        report = fsck_mod.fsck(rev)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"{report.objects} objects checked, {report.stale_temp} stale temp files removed")
    from rich.markup import escape

    from fmhub.base.errors import one_line

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
    from fmhub.git import gc as collect
    from fmhub.base.units import human_bytes

    try:
        rep = collect.gc(grace_s=grace, dry_run=dry_run)
    except FmhubError as exc:
        _fail(exc)
    verb = "would remove" if dry_run else "removed"
    young = f"; {rep.young} unreferenced but younger than {grace:g} s kept" if rep.young else ""
    console.print(f"{verb} {len(rep.removed)} object(s), {human_bytes(rep.freed)}; {rep.kept} referenced{young}", highlight=False)


@app.command()
def repack(dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Only say what would be packed.")) -> None:
    """Store old tensor versions as deltas against newer ones; what the branch tips need stays whole."""
    from fmhub.git import repack as packer
    from fmhub.base.units import human_bytes

    try:
        rep = packer.repack(dry_run=dry_run)
    except FmhubError as exc:
        _fail(exc)
    verb = "would pack" if dry_run else "packed"
    extra = f"; {rep.unpacked} object(s) a tip needs made whole again" if rep.unpacked else ""
    console.print(
        f"{verb} {rep.packed} object(s), store {human_bytes(rep.bytes_before)} -> {human_bytes(rep.bytes_after)}; "
        f"{rep.skipped} old version(s) left whole{extra}", highlight=False, soft_wrap=True,
    )


@app.command()
def extract(
    source: str = typer.Argument(..., help="A checkpoint file or directory, or REV:PATH (e.g. main:model/)."),
    tensors: List[str] = typer.Option(..., "--tensors", "-t", help='Tensor-name pattern, e.g. "model.layers.0.*" (repeatable).'),
    output: str = typer.Option(..., "-o", "--output", help="The .safetensors file to write."),
) -> None:
    """Partial checkout: write only the matching tensors to a new file, reading (and fetching) only their objects."""
    from fmhub.models import extract as ex
    from fmhub.base.units import human_bytes
    from fmhub.models.views import open_view

    try:
        done = ex.extract(open_view(source), tensors, output, before_read=_fetch_missing)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"wrote {done.output}: {len(done.tensors)} tensors, {human_bytes(done.bytes_written)}", highlight=False)


def _fetch_missing(refs) -> None:
    """Download the objects of ``refs`` the local store lacks (only those), when a remote is set up."""
    oids = [obj for r in refs for obj in (r.storage or ([(r.oid, r.size)] if r.oid is not None else []))]
    if not oids:
        return
    try:
        from fmhub.git import sync
    except ImportError:  # remotes not available in this build
        return
    sync.ensure_objects(oids)


def _fraction(text: str) -> float:
    """``1%`` or ``0.01`` -> 0.01."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise FmhubError(f"{text!r} is not a fraction; write e.g. 1% or 0.01") from None
    if not 0 <= value <= 1:
        raise FmhubError(f"{text!r} is outside 0%..100%")
    return value


@app.command()
def fisher(
    model: str = typer.Argument(..., help="A save_pretrained directory of a causal LM."),
    data: str = typer.Option(..., "--data", help="Examples: a .jsonl ({\"text\"} or {\"input_ids\"}) or .txt file (one per line)."),
    output: str = typer.Option(..., "-o", "--output", help="The .safetensors file to write."),
    batch_size: int = typer.Option(8, help="Examples per vectorised pass."),
    max_examples: Optional[int] = typer.Option(None, help="Use at most this many examples (a seeded subset)."),
    max_length: int = typer.Option(128, help="Tokens per example, at most."),
    seed: int = typer.Option(0),
) -> None:
    """Empirical diagonal Fisher of MODEL on DATA (per-example squared gradients; CPU or GPU through accelerate)."""
    from fmhub.models.fisher import compute_fisher

    try:
        rep = compute_fisher(model, data, output, batch_size=batch_size, max_examples=max_examples, max_length=max_length, seed=seed)
    except FmhubError as exc:
        _fail(exc)
    console.print(
        f"wrote {rep.output}: Fisher of {rep.tensors} tensors ({rep.parameters:,} parameters) from {rep.examples} examples, "
        f"{rep.tokens} tokens, on {rep.device} in {rep.seconds:.1f} s ({rep.method})", highlight=False, soft_wrap=True,
    )


@app.command()
def sparsify(
    base: str = typer.Argument(..., help="The base checkpoint (file or save_pretrained directory)."),
    finetuned: str = typer.Argument(..., help="The fine-tune of BASE."),
    fisher_file: str = typer.Option(..., "--fisher", help="A Fisher file (`fmhub fisher`) for these tensors."),
    keep: str = typer.Option(..., "--keep", help="Fraction of entries whose update is kept, e.g. 1%."),
    output: str = typer.Option(..., "-o", "--output", help="Where to write (a .safetensors file, or a directory)."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluation examples: report the loss of base, fine-tune and sparse update."),
) -> None:
    """Keep only the top-K% most important entries of a fine-tune's update (FishMask); the rest get the base's exact bits.

    Commit the result with `git config fmhub.deltas true` and fmhub stores it as sparse deltas against the base.
    """
    from fmhub.models import sparse_update as su

    try:
        rep = su.sparse_update(base, finetuned, fisher_file, output, _fraction(keep))
        from fmhub.governance import lineage

        # the fine-tune's own record leads `fmhub lineage` on to its data
        lineage.record(output, "sparsify", [lineage.describe_input(base, "model"), lineage.describe_input(finetuned, "model")],
                       {"keep": keep, "fisher": fisher_file})
        losses = None
        if data:
            losses = [(name, su.eval_loss(path, data)) for name, path in (("base", base), ("fine-tune", finetuned), ("sparse", output))]
    except FmhubError as exc:
        _fail(exc)
    console.print(
        f"wrote {rep.output}: kept {rep.kept:,} of {rep.total:,} entries ({rep.kept_fraction:.2%}; {rep.changed:,} differ from the base, "
        f"of {rep.update_size:,} in the dense update), {rep.fisher_norm_retained:.1%} of the update's Fisher-weighted norm",
        highlight=False, soft_wrap=True,
    )
    if losses:
        _print_losses(dict(losses), "fine-tune")


def _print_losses(losses: dict[str, float], reference: str) -> None:
    table = Table("model", "eval loss (nats/token)", f"vs {reference}")
    for name, loss in losses.items():
        table.add_row(name, f"{loss:.4f}", f"{loss - losses[reference]:+.4f}")
    console.print(table)


@app.command()
def finetune(
    base: str = typer.Argument(..., help="A save_pretrained directory of a causal LM."),
    data: str = typer.Option(..., "--data", help="Training examples (.jsonl or .txt)."),
    output: str = typer.Option(..., "-o", "--output", help="The directory to save the fine-tune in."),
    fisher_file: Optional[str] = typer.Option(None, "--fisher", help="Train only the top --keep entries by this Fisher file."),
    keep: Optional[str] = typer.Option(None, "--keep", help="With --fisher: fraction of entries to train, e.g. 1%."),
    steps: int = typer.Option(100),
    lr: float = typer.Option(1e-3),
    batch_size: int = typer.Option(8),
    seed: int = typer.Option(0),
) -> None:
    """Fine-tune BASE (reproducibly, with accelerate); with --fisher/--keep only the masked entries change, bit-exact elsewhere."""
    from fmhub.models.sparse_update import finetune_masked

    try:
        if (fisher_file is None) != (keep is None):
            raise FmhubError("--fisher and --keep go together")
        rep = finetune_masked(base, data, output, fisher_path=fisher_file, k_fraction=_fraction(keep) if keep else None,
                              steps=steps, lr=lr, seed=seed, batch_size=batch_size)
        from fmhub.governance import lineage

        lineage.record(output, "finetune", [lineage.describe_input(base, "model"), lineage.describe_input(data, "dataset")],
                       {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "keep": keep})
    except FmhubError as exc:
        _fail(exc)
    console.print(
        f"saved {rep.output_dir}: {rep.steps} steps on {rep.device} in {rep.seconds:.1f} s, {rep.trainable:,} of {rep.total:,} "
        f"entries trainable; loss {rep.losses[0]:.4f} -> {rep.losses[-1]:.4f}", highlight=False, soft_wrap=True,
    )


@app.command()
def commit(
    path: str = typer.Argument(..., help="A fine-tuned .safetensors file or model directory whose base is committed."),
    message: str = typer.Option(..., "-m", "--message"),
    sparse: Optional[str] = typer.Option(None, "--sparse", help="Keep the top K% of the update by Fisher value, e.g. 1% (git config fmhub.sparse.keep)."),
    fisher_file: Optional[str] = typer.Option(None, "--fisher", help="The Fisher file (`fmhub fisher`; git config fmhub.sparse.fisher)."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluation examples: report base, dense and sparse eval loss."),
    base: str = typer.Option("HEAD", "--base", help="The revision holding the base version of PATH."),
) -> None:
    """Commit a fine-tune as a FishMask sparse update of its committed base: stored as sparse deltas, quality loss reported."""
    from fmhub.models.sparse_commit import sparse_commit
    from fmhub.core.repo import git
    from fmhub.base.units import human_bytes

    try:
        keep = sparse or git("config", "--get", "fmhub.sparse.keep", check=False).strip()
        fisher_path = fisher_file or git("config", "--get", "fmhub.sparse.fisher", check=False).strip()
        if not keep or not fisher_path:
            raise FmhubError("give --sparse K% and --fisher FILE (or git config fmhub.sparse.keep / fmhub.sparse.fisher); "
                             "for a plain commit use git commit")
        rep = sparse_commit(path, message, fisher_path, _fraction(keep), data, base)
    except FmhubError as exc:
        _fail(exc)
    console.print(
        f"committed {rep.commit[:12]}: kept {rep.kept_fraction:.2%} of the update; stored {human_bytes(rep.stored_bytes)} "
        f"for {human_bytes(rep.changed_bytes)} of changed tensors ({rep.stored_bytes / max(rep.changed_bytes, 1):.2%})",
        highlight=False, soft_wrap=True,
    )
    if rep.losses:
        _print_losses(rep.losses, "dense")


adapter_app = typer.Typer(no_args_is_help=True, help="PEFT LoRA adapters tracked as versions against their base model's revision.")
app.add_typer(adapter_app, name="adapter")


@adapter_app.command("add")
def adapter_add(
    adapter_dir: str = typer.Argument(..., help="A PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."),
    base: str = typer.Option(..., "--base", help="The base model's path in this repository (a file or a shard directory)."),
    rev: str = typer.Option("HEAD", "--rev", help="The commit of the base the adapter was trained on."),
) -> None:
    """Check ADAPTER_DIR fits BASE at REV, record that base in fmhub-adapter.json, and stage the adapter."""
    from fmhub.models import adapters

    try:
        info = adapters.add(adapter_dir, base, rev)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"staged {info.path}: LoRA r={info.rank} alpha={info.alpha:g} on {len(info.modules)} weights of "
                  f"{info.base.path} at {info.base.revision[:12]}", highlight=False, soft_wrap=True)


@adapter_app.command("ls")
def adapter_ls(
    rev: Optional[str] = typer.Option(None, "--rev", help="List the adapters committed at REV (default: the work tree)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Adapters, their base model revision, and whether the base has changed since."""
    from dataclasses import asdict

    from fmhub.models import adapters

    try:
        infos = adapters.list_adapters(rev)
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        _utf8_stdout()
        sys.stdout.write(json.dumps([asdict(i) for i in infos], indent=2) + "\n")
        return
    table = Table("adapter", "r", "alpha", "targets", "base", "trained on", "base now")
    for i in infos:
        now = {"same": "[green]same[/]", "missing": "[red]missing[/]"}.get(i.base_now, f"[yellow]changed[/] ({len(i.changed_files)} files)")
        table.add_row(i.path, str(i.rank), f"{i.alpha:g}", ",".join(i.modules), i.base.path, i.base.revision[:12], now)
    console.print(table if infos else "no adapters recorded (fmhub adapter add)")


@adapter_app.command("merge")
def adapter_merge(
    adapter_dir: str = typer.Argument(..., help="An adapter recorded with `fmhub adapter add`."),
    tolerance: str = typer.Option("0", "--tolerance", help="Largest error allowed per element; 0 stores the merge bit-exact."),
) -> None:
    """Merge the adapter into its base in the work tree and stage it: each changed weight a low-rank delta.

    Fails, writing nothing, when a changed weight cannot be stored as a delta within the tolerance.
    """
    from fmhub.models import adapters
    from fmhub.core.deltas import parse_tolerance
    from fmhub.base.units import human_bytes

    try:
        rep = adapters.merge_into_base(adapter_dir, parse_tolerance(tolerance, "--tolerance"))
    except FmhubError as exc:
        _fail(exc)
    table = Table("tensor", "stored as", "bytes", "of full", "max error")
    for t in rep.tensors:
        table.add_row(t.name, t.codec or "whole", human_bytes(t.stored), f"{t.stored / max(t.size, 1):.1%}",
                      "exact" if t.max_error is None else f"{t.max_error:.3g}")
    console.print(table)
    console.print(f"merged {rep.adapter} into {', '.join(rep.files)} and staged it: {human_bytes(rep.stored)} stored for "
                  f"{human_bytes(rep.full)} of changed weights ({rep.stored / max(rep.full, 1):.1%}); commit to keep it",
                  highlight=False, soft_wrap=True)


hub_app = typer.Typer(no_args_is_help=True, help="Hugging Face Hub repositories through huggingface_hub (HF_ENDPOINT, HF_TOKEN).")
app.add_typer(hub_app, name="hub")


@hub_app.command("push")
def hub_push(
    repo_id: Optional[str] = typer.Argument(None, help="user/name on the Hub (default: the repo this one was cloned from or last pushed to)."),
    rev: str = typer.Option("HEAD", "--rev", help="The git revision whose files to push."),
    branch: str = typer.Option("main", help="The Hub branch to commit to (created if missing)."),
    message: Optional[str] = typer.Option(None, "-m", "--message", help="The Hub commit message (default: from the git commit)."),
    private: bool = typer.Option(False, help="Create the Hub repo private if it does not exist."),
) -> None:
    """Commit REV's files to a Hub repo in fmhub's layout; only tensor objects the Hub lacks are uploaded."""
    from fmhub.git import hub
    from fmhub.base.units import human_bytes

    try:
        repo_id = repo_id or hub.default_repo_id()
        if not repo_id:
            raise FmhubError("which Hub repo? give REPO_ID (user/name); later pushes remember it")
        res = hub.push(repo_id, rev, branch, message, private, progress=err.is_terminal)
    except FmhubError as exc:
        _fail(exc)
    if not res.changed:
        console.print(f"{repo_id} on the Hub already holds these files ({res.objects_present} objects); nothing to push", highlight=False)
        return
    console.print(
        f"pushed {res.files} file(s) to {res.url}: {res.objects_sent} object(s) uploaded ({human_bytes(res.bytes_sent)}), "
        f"{res.objects_present} already on the Hub" + (f"; removed {', '.join(res.deleted)}" if res.deleted else ""),
        highlight=False, soft_wrap=True,
    )


@hub_app.command("clone")
def hub_clone(
    repo_id: str = typer.Argument(..., help="user/name on the Hub."),
    directory: Optional[str] = typer.Argument(None, help="Where to clone (default: the repo's name)."),
    revision: Optional[str] = typer.Option(None, "--revision", "-r", help="A Hub branch, tag or commit (default: main)."),
    checkout: bool = typer.Option(True, "--checkout/--no-checkout", help="Download objects and write the checkpoints (else manifests only; `fmhub checkout` later)."),
) -> None:
    """Clone a Hub repo pushed by fmhub into a new git repository with loadable checkpoints."""
    from fmhub.git import hub
    from fmhub.base.units import human_bytes

    try:
        res = hub.clone(repo_id, directory or repo_id.rsplit("/", 1)[-1], revision, checkout, progress=err.is_terminal)
    except FmhubError as exc:
        _fail(exc)
    what = f"{len(res.checkpoints)} checkpoint(s), {res.objects} object(s) downloaded ({human_bytes(res.bytes)})"
    if res.imported:
        what += f"; imported {len(res.imported)} plain checkpoint(s) into fmhub: {', '.join(res.imported)}"
    console.print(f"cloned {repo_id}@{res.revision[:12]} into {res.directory}: {what}", highlight=False, soft_wrap=True)


@app.command()
def label(
    pipeline_name: Optional[str] = typer.Argument(None, metavar="[PIPELINE]", help="A pipeline under 'label:' in fmhub.yaml (default: the only one)."),
    spec: Optional[str] = typer.Option(None, "--spec", help="The spec file (default: fmhub.yaml at the top of the work tree)."),
    backend: Optional[str] = typer.Option(None, help="Where the labelling functions run: serial, processes, ray (default: the pipeline's)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Worker processes (default: the pipeline's, else one per core)."),
    report: Optional[str] = typer.Option(None, help="Write the report here (.json, or .html for a page)."),
    suggest: Optional[int] = typer.Option(None, min=0, help="Suggest N rows to label by hand next (active learning)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
) -> None:
    """Weak supervision: run a pipeline's labelling functions, combine their votes, write probabilistic labels."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fmhub.data.label import pipeline as labelling
    from fmhub.data.label.report import rich_tables
    from fmhub.project.spec import load_spec

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        loaded = load_spec(spec)
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
            tasks: dict = {}

            def progress(phase: str, done: int, total: Optional[int]) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task({"votes": "voting", "write": "writing"}.get(phase, phase), total=total)
                bar.update(tasks[phase], completed=done)

            rep = labelling.run(loaded, pipeline_name, backend, workers, report, suggest, progress)
    except FmhubError as exc:
        _pipeline_failed("label-pipeline", pipeline_name, exc)
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(rep))
        return
    for table in rich_tables(rep):
        console.print(table)
    for lf in rep["lfs"]:
        if lf["errors"]:
            first = lf["first_errors"][0]
            err.print(f"[yellow]warning:[/yellow] {lf['name']} failed on {lf['errors']} row(s), counted as abstaining "
                      f"(first: row {first['position']}: {first['error']})", highlight=False, soft_wrap=True)
    bad = rep["malformed_rows"]
    if bad["count"]:
        err.print(f"[yellow]warning:[/yellow] skipped {bad['count']} malformed row(s) (first: {bad['first'][0]['error']})", highlight=False, soft_wrap=True)
    for p in rep["label_model"]["redundant_pairs"]:
        console.print(f"{p['a']} and {p['b']} agree on {100 * p['agreement']:.0f}% of their votes: counted as one source", highlight=False)
    if rep.get("withheld_by_policy"):
        console.print(f"{rep['withheld_by_policy']} row(s) withheld by policy (not read, not labelled, not written)", highlight=False)
    console.print(f"labelled {rep['rows']} rows -> {rep['output']}; report: {rep['report']}", highlight=False, soft_wrap=True)


def _pipeline_failed(what: str, name: Optional[str], exc: FmhubError) -> None:
    """A pipeline run that stopped is a run too: the audit log gets it (finished runs record themselves)."""
    from fmhub.governance import audit

    audit.record(what, name or "", "error", audit.failure(exc))


from typer.core import TyperGroup as _TyperGroup  # noqa: E402


class _CleanGroup(_TyperGroup):
    """``fmhub clean [PIPELINE] [OPTIONS]`` runs a pipeline (the ``run`` command); ``fmhub clean review ...`` is the other one."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] != "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


clean_app = typer.Typer(cls=_CleanGroup, subcommand_metavar="[PIPELINE] | review REPORT",
                        help="Data pipelines: clean a dataset as fmhub.yaml says (`fmhub clean [PIPELINE]`, options: `fmhub clean run --help`), review the decisions.")
app.add_typer(clean_app, name="clean")


@clean_app.command("run")
def clean_run(
    pipeline_name: Optional[str] = typer.Argument(None, metavar="[PIPELINE]", help="A pipeline under 'clean:' in fmhub.yaml (default: the only one)."),
    spec: Optional[str] = typer.Option(None, "--spec", help="The spec file (default: fmhub.yaml at the top of the work tree)."),
    backend: Optional[str] = typer.Option(None, help="Where row work runs: serial, processes, ray (default: the pipeline's)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Parallel workers (default: the pipeline's, else one per core)."),
    report: Optional[List[str]] = typer.Option(None, "--report", help="Write a report: PATH.json (every decision, for review) or PATH.html; repeat for both."),
    overrides: Optional[str] = typer.Option(None, "--overrides", help="A reviewer's overrides file (default: the pipeline's 'overrides')."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON instead of a table."),
) -> None:
    """Run a cleaning pipeline: read the input in batches, run its steps, write the kept rows (the input is never changed)."""
    from fmhub.data.clean import pipeline as cl
    from fmhub.base.progress import row_progress
    from fmhub.project.spec import load_spec

    try:
        loaded = load_spec(spec)
        with row_progress(err, "cleaning") as bar:
            res = cl.run(loaded, pipeline_name, backend=backend, workers=workers, reports=report or (), overrides=overrides,
                         progress=bar.advance, on_start=bar.start)
    except FmhubError as exc:
        _pipeline_failed("clean-pipeline", pipeline_name, exc)
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(res.to_dict()))
    else:
        _print_clean_summary(res)
    for w in res.warnings:
        err.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)


def _print_clean_summary(res) -> None:
    from rich.markup import escape

    table = Table("#", "step", "scope", "rows in", "dropped", "edited", "kept by reviewer", "seconds",
                  title=f"fmhub clean {escape(res.pipeline)}", caption="seconds: compute time, summed over workers")
    for col in table.columns[3:]:
        col.justify = "right"
    if res.malformed:
        table.add_row("", "input", "", str(res.rows_read + res.malformed), str(res.malformed), "", "", "", style="dim")
    if res.override_drops:
        table.add_row("", "override", "reviewer", "", str(res.override_drops), "", "", "", style="dim")
    for s in res.steps:
        table.add_row(str(s.index), escape(s.name), s.scope, str(s.rows_in), str(s.dropped), str(s.edited), str(s.overridden), f"{s.seconds:.2f}")
    dropped = res.malformed + res.override_drops + sum(s.dropped for s in res.steps)
    table.add_row("", "total", "", str(res.rows_read + res.malformed), str(dropped), str(sum(s.edited for s in res.steps)),
                  str(sum(s.overridden for s in res.steps)), "", style="bold")
    console.print(table)
    console.print(f"{res.rows_out} of {res.rows_read + res.malformed} rows kept -> {escape(res.output)} "
                  f"({res.seconds:.2f} s, {res.rows_per_s:,.0f} rows/s, {escape(res.backend)} x{res.workers})", highlight=False, soft_wrap=True)
    if res.withheld:
        console.print(f"{res.withheld} row(s) withheld by policy (not read, not written)", highlight=False)
    for path in res.reports:
        console.print(f"report: {escape(path)}", highlight=False, soft_wrap=True)


@clean_app.command("review")
def clean_review(
    report: str = typer.Argument(..., help="A JSON report of a run (fmhub clean --report run.json)."),
    keep: Optional[List[str]] = typer.Option(None, "--keep", help="Rows to keep whatever the steps say: positions or row hashes, comma-separated."),
    drop: Optional[List[str]] = typer.Option(None, "--drop", help="Rows to drop: positions or row hashes, comma-separated."),
    reason: Optional[str] = typer.Option(None, help="Why (recorded in the overrides file and in later reports)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="The overrides file (default: the one the run used)."),
) -> None:
    """Record a reviewer's decisions on a report's rows in the overrides file that the next `fmhub clean` respects."""
    from fmhub.data.clean.overrides import review

    split = lambda items: [x for item in items or [] for x in item.split(",") if x.strip()]  # noqa: E731
    if not keep and not drop:
        _fail(FmhubError("say which rows: --keep POSITIONS and/or --drop POSITIONS (positions or row hashes from the report)"))
    try:
        path, added = review(report, split(keep), split(drop), reason, output)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"{path}: {added} new override(s); the next `fmhub clean` respects them", highlight=False, soft_wrap=True)


server_app = typer.Typer(help="A git + Git LFS server that enforces the access policy (docs/server.md).")
app.add_typer(server_app, name="server")
_ROOT_OPTION = typer.Option(".", "--root", envvar="FMHUB_SERVER_ROOT", help="The directory holding the bare repositories (NAME.git).")


@server_app.callback(invoke_without_command=True)
def server(
    ctx: typer.Context,
    root: str = _ROOT_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port)."),
    threads: int = typer.Option(32, "--threads", min=1, help="Requests served at once."),
    storage: Optional[str] = typer.Option(None, "--storage", help="LFS objects directory (default ROOT/.fmhub/lfs)."),
    s3_bucket: Optional[str] = typer.Option(None, "--s3-bucket", help="Store LFS objects in this S3 bucket instead (credentials from the AWS environment)."),
    s3_endpoint: Optional[str] = typer.Option(None, "--s3-endpoint", help="An S3-compatible endpoint URL (MinIO, Ceph, ...)."),
    s3_prefix: Optional[str] = typer.Option(None, "--s3-prefix", help="Key prefix inside the bucket."),
    max_object_size: int = typer.Option(64 << 30, "--max-object-size", min=1, help="Largest object accepted, in bytes."),
    admin_role: str = typer.Option("admin", "--admin-role", help="The policy role whose members administer a repository."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.5, help="Seconds a request's line and headers may take, in all."),
    idle_timeout: int = typer.Option(60, "--idle-timeout", min=1, help="Seconds a keep-alive connection may sit idle."),
    max_connections: int = typer.Option(1000, "--max-connections", min=8, help="Connections open at once."),
) -> None:
    """Serve every bare repository under --root over git's smart HTTP and the Git LFS API, enforcing each one's policy."""
    if ctx.invoked_subcommand is not None:
        return
    from fmhub.governance import audit
    from fmhub.server.app import ServerConfig
    from fmhub.server.serve import Limits, serve, startup_warnings

    s3 = {"bucket_name": s3_bucket, "path_prefix": s3_prefix, "endpoint": s3_endpoint} if s3_bucket else None
    config = ServerConfig(os.path.abspath(root), storage, s3, max_object_size, admin_role=admin_role, audit_key=audit.env_key())

    def ready(url: str) -> None:
        for line in startup_warnings(config.root):
            err.print(f"[yellow]fmhub server: warning:[/yellow] {line}", highlight=False, soft_wrap=True)
        err.print(f"fmhub server: serving {config.root} at {url} (Ctrl-C stops)", highlight=False, soft_wrap=True)

    try:
        serve(config, host, port, threads, ready, Limits(header_timeout, idle_timeout, max_connections=max_connections))
    except FmhubError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(FmhubError(f"cannot listen on {host}:{port}: {exc.strerror}"))


@server_app.command("init")
def server_init(
    name: str = typer.Argument(..., help="The repository's name: clients clone http://HOST:PORT/NAME.git."),
    root: str = _ROOT_OPTION,
    branch: str = typer.Option("main", "--branch", help="The default (protected) branch."),
) -> None:
    """Create the bare repository ROOT/NAME.git with HEAD on --branch."""
    from fmhub.server.repos import init_repo

    try:
        path = init_repo(os.path.abspath(root), name, branch)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"created {path} (default branch {branch}); give it tokens with `fmhub server token add USER --repo {name}`",
                  highlight=False, soft_wrap=True)


@server_app.command("token")
def server_token(
    user: str = typer.Argument(..., help="The user the token acts as (what the policy's roles name)."),
    repo: list[str] = typer.Option([], "--repo", help="A repository the token may use (repeatable)."),
    admin: list[str] = typer.Option([], "--admin", help="A repository the token administers (repeatable)."),
    root: str = _ROOT_OPTION,
) -> None:
    """Make a token: print it once, store only its sha256 in ROOT/.fmhub/tokens.yaml."""
    from fmhub.server.tokens import add_token

    if not repo and not admin:
        _fail(FmhubError("name at least one --repo or --admin repository"))
    try:
        token = add_token(os.path.abspath(root), user, repo, admin)
    except FmhubError as exc:
        _fail(exc)
    print(token)


audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log of filter runs, pushes, fetches, merges and pipeline runs.")
app.add_typer(audit_app, name="audit")


def _audit_path(path: Optional[str]) -> str:
    from fmhub.governance import audit

    return path or audit.log_path()


def _audit_broken(res, command: str) -> None:
    """Say where the chain breaks (line, seq, kind: never the entry), and record that it was found."""
    from rich.markup import escape

    from fmhub.governance import audit

    p = res.problem
    if p.kind != "key needed":  # not tampering; and an unkeyed entry after keyed ones would itself fail later checks
        audit.record("audit", command, "deny", {"line": p.line, "seq": p.seq, "kind": p.kind})
    err.print(f"[red]fmhub:[/red] {escape(str(res))}", highlight=False, soft_wrap=True)  # a path or field name is not markup


@audit_app.command("verify")
def audit_verify(
    anchor: Optional[str] = typer.Option(None, "--anchor", help="HASH or SEQ:HASH from `fmhub audit anchor` (or the ref it was saved to): the log must still hold it."),
    path: Optional[str] = typer.Option(None, "--path", help="A log file to verify (default: this repository's)."),
    plain_until: int = typer.Option(0, "--plain-until", min=0, help="With FMHUB_AUDIT_KEY: the seq of the last entry written before the key was set (plain entries after it fail)."),
) -> None:
    """Walk the whole chain; name the first entry that was edited, inserted, removed, reordered or cut (exit 1)."""
    from fmhub.governance import audit

    try:
        log = _audit_path(path)
        res = audit.verify(log, audit.env_key(), audit.resolve_anchor(anchor) if anchor else None, plain_until)
    except FmhubError as exc:
        _fail(exc)
    if not res.ok:
        _audit_broken(res, "verify")
        raise typer.Exit(1)
    if res.entries == 0 and not os.path.exists(log):
        console.print(f"no audit log at {log} (nothing recorded yet)", highlight=False, soft_wrap=True)
        return
    console.print(str(res) + (" (anchor found)" if anchor else ""), highlight=False, soft_wrap=True)


@audit_app.command("log")
def audit_log(
    who: Optional[str] = typer.Option(None, "--who", help="Only entries by this identity (shell patterns: '*@example.com')."),
    what: Optional[str] = typer.Option(None, "--what", help="Only this kind: clean, smudge, push, fetch, merge, clean-pipeline, label-pipeline, access, ..."),
    since: Optional[str] = typer.Option(None, "--since", help="ISO date/time (UTC unless given) or an age: 30m, 2h, 3d, 1w."),
    until: Optional[str] = typer.Option(None, "--until", help="As --since."),
    target: Optional[str] = typer.Option(None, "--target", help="Only this path, ref or remote (shell patterns)."),
    last: Optional[int] = typer.Option(None, "-n", min=1, help="Only the last N matching entries."),
    as_json: bool = typer.Option(False, "--json", help="Print the entries as a JSON array."),
    path: Optional[str] = typer.Option(None, "--path", help="A log file to read (default: this repository's)."),
) -> None:
    """Show the entries of the audit log that match, oldest first; entries past a break in the chain are not shown (exit 1)."""
    from rich.markup import escape

    from fmhub.governance import audit

    try:
        entries, res = audit.query(_audit_path(path), who, what, since, until, target, audit.env_key())
    except FmhubError as exc:
        _fail(exc)
    if last is not None:
        entries = entries[-last:]
    if as_json:
        console.print_json(json.dumps(entries, ensure_ascii=False))
    else:
        table = Table("seq", "time (UTC)", "who", "what", "target", "decision", "details")
        table.columns[4].overflow = "fold"  # a path cut short with … could name another file
        colour = {"deny": "red", "error": "red", "conflict": "yellow"}

        from fmhub.base.errors import printable

        def show(text: str) -> str:  # neither markup nor terminal escapes: entries name other people's paths
            return escape(printable(text))

        for e in entries:
            details = " ".join(f"{k}={json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v}" for k, v in e["details"].items())
            table.add_row(str(e["seq"]), show(e["time"][:19].replace("T", " ")), show(e["who"]), show(e["what"]), show(e["target"]),
                          f"[{colour[e['decision']]}]{show(e['decision'])}[/]" if e["decision"] in colour else show(e["decision"]),
                          show(details[:120] + ("…" if len(details) > 120 else "")))
        console.print(table)
    if not res.ok:
        _audit_broken(res, "log")
        err.print("entries from there on are not shown; `fmhub audit verify` checks the whole log", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@audit_app.command("anchor")
def audit_anchor(
    save: bool = typer.Option(False, "--save", help="Also keep it as refs/fmhub/audit (push that ref to keep it off this machine)."),
    path: Optional[str] = typer.Option(None, "--path", help="A log file (default: this repository's)."),
) -> None:
    """Print SEQ:HASH of the verified log's head; keep it elsewhere, and `verify --anchor` shows the log was not cut or rewritten since."""
    from fmhub.governance import audit

    try:
        res = audit.verify(_audit_path(path), audit.env_key())
        if not res.ok:
            _audit_broken(res, "anchor")
            raise typer.Exit(1)
        if res.entries == 0:
            raise audit.AuditError("the audit log is empty: nothing to anchor yet")
        ref = audit.save_anchor(res) if save else None
    except FmhubError as exc:
        _fail(exc)
    console.print(f"{res.head_seq}:{res.head_hash}", highlight=False, soft_wrap=True)
    if ref:
        err.print(f"saved as {ref}", highlight=False, soft_wrap=True)


@app.command()
def demo(
    directory: Optional[str] = typer.Argument(None, help="Where to create the demo repository (default: a temp dir)."),
) -> None:
    """Build a tiny transformers model, version it with git + fmhub, and show what fmhub stores."""
    from fmhub.run import demo as d

    try:
        d.run(directory, console)
    except FmhubError as exc:
        _fail(exc)


@app.command("lineage")
def lineage_cmd(
    target: str = typer.Argument(..., metavar="PATH[@REV]", help="A model or dataset; @REV reads the records as committed there."),
    as_json: bool = typer.Option(False, "--json", help="Print the graph (nodes, edges) as JSON."),
) -> None:
    """Show which datasets, models and pipeline steps produced PATH (from its .lineage.json records)."""
    from rich.markup import escape
    from rich.tree import Tree

    from fmhub.governance import lineage

    path, _, rev = target.rpartition("@") if "@" in target else (target, "", "")
    try:
        graph = lineage.walk(path, rev or None)
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(graph.to_dict()))
        return
    inputs: dict[str, list[str]] = {}
    for e in graph.edges:
        inputs.setdefault(e["to"], []).append(e["from"])

    def node_label(nid: str) -> str:
        n = graph.nodes[nid]
        step = f" [cyan]{n['step']}[/cyan]" + (f" ({escape(n['pipeline'])})" if n.get("pipeline") else "") if n["step"] else " [dim]source[/dim]"
        return f"{escape(nid)} [dim]{n['kind']}[/dim]{step}"

    def grow(tree: Tree, nid: str, seen: frozenset) -> None:
        for child in inputs.get(nid, []):
            branch = tree.add(node_label(child))
            if child not in seen:  # a cycle cannot happen in committed history, but a hand-edited record could make one
                grow(branch, child, seen | {child})

    tree = Tree(node_label(graph.root))
    grow(tree, graph.root, frozenset({graph.root}))
    console.print(tree)
    datasets = graph.sources("dataset")
    console.print(f"source datasets: {', '.join(datasets) if datasets else 'none recorded'}", highlight=False, soft_wrap=True)


@app.command()
def unlearn(
    source: str = typer.Option(..., "--source", help="The data source to unlearn (a dataset path in this repository)."),
    rev: Optional[str] = typer.Option(None, "--rev", help="Look only at the history of REV (default: every branch and tag)."),
    remove: bool = typer.Option(False, "--remove", help="Also exclude SOURCE from future `fmhub clean` / `fmhub label` runs."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List every committed model version trained (directly or through a pipeline or merge) on SOURCE."""
    from fmhub.governance import lineage

    try:
        hits = lineage.trained_on(source, rev)
        excluded = lineage.exclude(source) if remove else None
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps({"source": source, "models": hits, "excluded_in": excluded}))
        return
    table = Table("commit", "model", "step", title=f"model versions trained on {source}")
    for h in hits:
        table.add_row(h["commit"][:12], h["path"], h["step"] or "")
    console.print(table if hits else f"no committed model version was trained on {source}", highlight=False)
    if excluded:
        console.print(f"excluded {source} from future pipeline runs ({excluded}); retrain or revert the models above", highlight=False, soft_wrap=True)


@app.command("run")
def run_steps(
    only: List[str] = typer.Argument(None, metavar="[STEP]...", help="Run only these steps (e.g. clean:web finetune:sentiment)."),
    spec: Optional[str] = typer.Option(None, "--spec", help="The spec file (default: fmhub.yaml at the top of the work tree)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what is out of date; run nothing."),
    commit_: bool = typer.Option(False, "--commit", help="Commit what the steps wrote (and their lineage records) as a new version."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Build what fmhub.yaml declares: data pipelines, adapters per task, selection, merge, deploy; only what is out of date."""
    try:
        loaded, outcomes, committed = _run_spec(spec, only, dry_run, commit_, quiet=as_json)
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps({"steps": [o.__dict__ for o in outcomes], "commit": committed}, default=str))
        return
    _print_run(loaded.path, outcomes, committed)


def _run_spec(spec: Optional[str], only: Optional[List[str]], dry_run: bool, commit_: bool, quiet: bool = False):
    from fmhub.run import dag
    from fmhub.run import plan as runner
    from fmhub.project.spec import load_spec

    def event(what: str, step, outcome) -> None:
        if what == "start" and not quiet:
            err.print(f"[dim]running {step.id}...[/dim]", highlight=False)

    loaded = load_spec(spec)
    p = runner.plan(loaded)
    known = {s.id for s in p.steps}
    for name in only or []:
        if name not in known:
            raise FmhubError(f"no step {name!r}; {loaded.path} declares: {', '.join(sorted(known)) or 'none'}")
    outcomes = dag.run(p.steps, dag.State(runner.state_path(loaded)), set(only) if only else None, dry_run, event)
    committed = runner.commit(loaded, outcomes, p.steps) if commit_ and not dry_run else None
    return loaded, outcomes, committed


def _print_run(path: str, outcomes, committed: Optional[str]) -> None:
    from rich.markup import escape

    table = Table("step", "status", "seconds", "result", title=f"fmhub run ({path})", title_justify="left")
    for o in outcomes:
        result = ", ".join(f"{k}={_short(v)}" for k, v in o.summary.items() if v is not None)
        table.add_row(o.step, o.status, f"{o.seconds:.1f}" if o.status == "ran" else "", escape(result))
    console.print(table)
    if committed:
        console.print(f"committed {committed[:12]}", highlight=False)


@app.command("select")
def select_cmd(
    base: Optional[str] = typer.Option(None, "--base", help="The base model directory (default: every model in fmhub.yaml's models:)."),
    adapters: List[str] = typer.Option(None, "--adapters", help="An adapter directory, a directory of adapters, or NAME=DIR; repeat."),
    task_names: List[str] = typer.Option(None, "--task", help="Rank on these tasks of fmhub.yaml's tasks: (default: all)."),
    no_base: bool = typer.Option(False, "--no-base", help="Leave the bare base model off the board."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Score cache (default: .git/fmhub/select-cache.json)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Evaluate everything again."),
    router_out: Optional[str] = typer.Option(None, "--router", help="Also train the composition-of-experts router on the tasks' texts and write it here."),
    as_json: bool = typer.Option(False, "--json", help="The leaderboard as JSON."),
    spec_file: Optional[str] = typer.Option(None, "--spec", help="The fmhub.yaml whose tasks: are ranked on."),
) -> None:
    """Rank the base model and its adapters on the declared tasks: a leaderboard, best first (mean rank over tasks)."""
    from fmhub.ml.autotune import task_of
    from fmhub.project.spec import model_dir_of
    from fmhub.run.plan import task_texts
    from fmhub.ml.selection import Candidate, default_cache, leaderboard, parse_candidates, router_from_leaderboard
    from fmhub.project.spec import load_spec

    try:
        loaded = load_spec(spec_file)
        tasks = list(task_names or loaded.spec.tasks)
        unknown = [t for t in tasks if t not in loaded.spec.tasks]
        if unknown or not tasks:
            raise FmhubError(f"no task {unknown[0]!r} in {loaded.path}" if unknown else f"{loaded.path} declares no tasks: add a tasks: section")
        if base is not None:
            cands = parse_candidates(base, adapters or [], include_base=not no_base)
        else:
            if not loaded.spec.models:
                raise FmhubError("no --base and no models: section in fmhub.yaml; give --base DIR")
            first = model_dir_of(loaded, next(iter(loaded.spec.models)))
            cands = [] if no_base else [Candidate(m, model_dir_of(loaded, m)) for m in loaded.spec.models]
            cands += parse_candidates(first, adapters or [], include_base=False)
        path = None if no_cache else (cache or default_cache())

        def progress(c, task, s) -> None:
            if not as_json:
                what = "error" if s.error else ("cached" if s.cached else f"{s.seconds:.1f}s")
                err.print(f"  {c.name} on {task}: {what}", highlight=False)

        board = leaderboard(cands, [task_of(loaded, t) for t in tasks], cache=path, on_result=progress)
        if router_out:
            router = router_from_leaderboard(board, {t: task_texts(loaded, t) for t in tasks},
                                             {t: loaded.spec.tasks[t].description for t in tasks if loaded.spec.tasks[t].description},
                                             served_names={c.name: "base" for c in cands if c.adapter_dir is None})
            router.save(router_out)
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(board.to_json()))
        return
    console.print(board.table())
    if router_out:
        console.print(f"router for {', '.join(router.classes)} written to {router_out}; serve it with backend_options: {{router: {router_out}}}",
                      highlight=False, soft_wrap=True)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


@app.command("init")
def init(
    directory: str = typer.Argument("fmhub-example", help="A new (or empty) directory."),
    example: bool = typer.Option(False, "--example", help="Write the built-in example project and run it end to end."),
    run_it: bool = typer.Option(True, "--run/--no-run", help="With --example: run `fmhub run --commit` in it."),
) -> None:
    """Start a repository with fmhub installed; --example writes a tiny model, data and an fmhub.yaml and runs it."""
    from fmhub.run import example as ex

    try:
        if not example:
            path = ex.create_empty(directory)
            console.print(f"initialized {path}: fmhub installed, *.safetensors *.jsonl *.parquet tracked, fmhub.yaml to fill in",
                          highlight=False, soft_wrap=True)
            return
        path = ex.create(directory)
        console.print(f"example project in {path}", highlight=False)
        if not run_it:
            return
        os.chdir(path)
        loaded, outcomes, committed = _run_spec(None, None, False, True)
    except FmhubError as exc:
        _fail(exc)
    _print_run(loaded.path, outcomes, committed)
    console.print(f"see it: cd {path} && git log --stat && cat runs/leaderboard.json; change data/reviews.jsonl and `fmhub run` again",
                  highlight=False, soft_wrap=True)


@app.command()
def serve(
    base: Optional[str] = typer.Option(None, "--base", help="The base model: a directory, or PATH@REV in this repository."),
    adapters: List[str] = typer.Option(None, "--adapters", help="PATH[@REV] of an adapter or a directory of adapters, or NAME=PATH[@REV]; repeat or comma-separate."),
    declared: Optional[str] = typer.Option(None, "--declared", help="Also serve the adapters recorded with `fmhub adapter add` at this revision."),
    backend_name: Optional[str] = typer.Option(None, "--backend", help="The serving backend (`fmhub plugins`): local (default), vllm."),
    host: Optional[str] = typer.Option(None, "--host", help="Default 127.0.0.1."),
    port: Optional[int] = typer.Option(None, "--port", help="Default 8000; 0 picks a free one."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu, cuda, cuda:N."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16, float16."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Rows decoding together (32)."),
    gpu_slots: Optional[int] = typer.Option(None, "--gpu-slots", help="Adapters active on the device at once (8)."),
    cpu_cache_mb: Optional[float] = typer.Option(None, "--cpu-cache-mb", help="Warm tier: adapters in host memory (2048)."),
    disk_cache_mb: Optional[float] = typer.Option(None, "--disk-cache-mb", help="Cold tier: adapters materialized from the store (20480)."),
    eviction: Optional[str] = typer.Option(None, "--eviction", help="lru (default) or lfu, for every tier."),
    cycle_time: Optional[float] = typer.Option(None, "--cycle-time", help="Seconds an adapter keeps its slot while others wait for one (0.5)."),
    max_lora_rank: Optional[int] = typer.Option(None, "--max-lora-rank", help="Largest adapter rank served (64)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Prompt + completion tokens (default: the model's)."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Default: .git/fmhub/serve-cache."),
    admin_token: Optional[str] = typer.Option(None, "--admin-token", envvar="FMHUB_ADMIN_TOKEN", help="The admin API's bearer token (fmhub deploy); default: a random one, printed at start. Required with a --host other machines reach."),
    export_only: Optional[str] = typer.Option(None, "--export-only", help="vllm: write the model, adapters and launch script to DIR, start nothing."),
    spec_file: Optional[str] = typer.Option(None, "--spec", help="The fmhub.yaml whose serve: section gives the defaults."),
) -> None:
    """Serve BASE with many LoRA adapters over an OpenAI-compatible HTTP API (`model` names the adapter).

    Options left out come from the serve: section of fmhub.yaml, when there is one.
    """
    from fmhub.serving.backends import backend
    from fmhub.serving.config import from_options
    from fmhub.project.spec import SPEC_FILE, load_spec

    cli = dict(base=base, adapters=adapters or None, declared=declared, backend=backend_name, host=host, port=port, device=device,
               dtype=dtype, max_batch=max_batch, gpu_slots=gpu_slots, cpu_cache_mb=cpu_cache_mb, disk_cache_mb=disk_cache_mb,
               eviction=eviction, cycle_time=cycle_time, max_lora_rank=max_lora_rank, max_model_len=max_model_len,
               cache_dir=cache_dir, admin_token=admin_token)
    try:
        options, cwd = {}, None
        if spec_file or os.path.exists(SPEC_FILE) or base is None:
            loaded = load_spec(spec_file)
            if loaded.spec.serve is not None:
                options, cwd = loaded.spec.serve.model_dump(), loaded.root
                options = {k: (loaded.resolve(v) if k == "cache_dir" and v else v) for k, v in options.items()}
        if cli["base"] is not None or cli["adapters"] is not None:
            cwd = None  # paths given here are relative to the current directory
        options.update({k: v for k, v in cli.items() if v is not None})
        config, name = from_options(options, cwd)
        chosen = backend(name)
        if export_only:
            if not hasattr(chosen, "export"):
                raise FmhubError(f"the {name} backend has nothing to export; --export-only is for backends that hand serving to another engine")
            plan = chosen.export(config, export_only)
            for warning in getattr(plan, "warnings", []):
                err.print(f"warning: {warning}", highlight=False, soft_wrap=True)
            console.print(f"wrote {export_only}: start it with {getattr(plan, 'script', export_only)}", highlight=False, soft_wrap=True)
            return
        handle = chosen.serve(config)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"serving {config.base.label} with {len(config.adapters)} adapter(s) at {handle.url} (Ctrl-C stops)",
                  highlight=False, soft_wrap=True)
    generated = getattr(handle, "generated_token", None)  # the local backend's admin API always wants a token
    if generated:
        console.print(f"admin token for this run (fmhub deploy --token, or FMHUB_ADMIN_TOKEN): {generated}",
                      highlight=False, soft_wrap=True)
    handle.wait()


@app.command()
def deploy(
    url: str = typer.Option(..., "--url", help="The running server, e.g. http://127.0.0.1:8000."),
    rev: str = typer.Option("HEAD", "--rev", help="Serve the adapters recorded (fmhub adapter add) at this revision."),
    base: Optional[str] = typer.Option(None, "--base", help="Only the adapters of this base path."),
    adapters: List[str] = typer.Option(None, "--adapters", help="Serve these instead (PATH[@REV], NAME=PATH[@REV])."),
    backend_name: str = typer.Option("local", "--backend"),
    token: Optional[str] = typer.Option(None, "--token", envvar="FMHUB_ADMIN_TOKEN"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Hot-swap a running server to the adapters declared at REV: new ones load, changed ones swap, removed ones go."""
    from fmhub.serving import sources
    from fmhub.serving.backends import backend

    try:
        if adapters:
            specs = sources.parse_adapters(adapters)
        else:
            specs = sources.declared_adapters(rev, sources.parse_source(f"{base}@{rev}") if base else None)
        report = backend(backend_name).deploy(url, specs, token)
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(report.to_json()))
        return
    table = Table("change", "adapters", title=f"deployed {rev} to {url}")
    for what in ("added", "updated", "removed", "unchanged"):
        names = getattr(report, what)
        if names:
            table.add_row(what, ", ".join(names))
    for name, why in report.failed.items():
        table.add_row("failed", f"{name}: {why}")
    console.print(table)
    if report.failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------- monitoring and patching (docs/monitoring.md)


def _value(v) -> str:
    return "—" if v is None else f"{v:.3f}"


@app.command("join")
def join_cmd(
    name: Optional[str] = typer.Argument(None, help="The join of fmhub.yaml's join: section (default: the only one)."),
    spec_file: Optional[str] = typer.Option(None, "--spec"),
) -> None:
    """Bring a metadata table's attributes (entity -> type, ...) into text rows, as fmhub.yaml's join: declares."""
    from fmhub.data import join
    from fmhub.project.spec import load_spec

    try:
        rep = join.run_join(load_spec(spec_file), name)
    except FmhubError as exc:
        _fail(exc)
    console.print(f"{rep['output']}: {rep['rows_out']} rows ({rep['rows_matched']} with a match, {rep['rows_dropped']} dropped); "
                  f"added {', '.join(rep['columns_added'])}", highlight=False, soft_wrap=True)


@app.command("eval")
def eval_cmd(
    name: Optional[str] = typer.Argument(None, help="The eval of fmhub.yaml's eval: section (default: the only one)."),
    model: Optional[str] = typer.Option(None, "--model", help="Score this model instead: PATH or PATH@REV."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="With this PEFT adapter: PATH or PATH@REV."),
    compare_to: Optional[str] = typer.Option(None, "--compare", help="A revision (or predictions file) to compare with: the regression table."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Where predictions and reports go (default: the eval's output)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Write no PNG/HTML."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="Exit 1 when a slice is 'flagged' or (with --compare) got 'worse'."),
    as_json: bool = typer.Option(False, "--json"),
    spec_file: Optional[str] = typer.Option(None, "--spec"),
) -> None:
    """Score a model (and adapter) row by row; store the predictions; report the metric per slice, and what changed since --compare."""
    from rich.markup import escape

    from fmhub.ml import evaluation
    from fmhub.project.spec import load_spec

    if fail_on not in (None, "flagged", "worse"):
        _fail(FmhubError("--fail-on is 'flagged' or 'worse'"))
    try:
        rep = evaluation.run_eval(load_spec(spec_file), name, model=model, adapter=adapter, output=output, compare_to=compare_to,
                                  plots=not no_plots, progress=None if as_json else lambda m: err.print(m, highlight=False))
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(rep, default=str))
    else:
        o = rep["overall"]
        t = Table("slice", "kind", "n", rep["metric"], "± se", "gap", "", title=f"eval {rep['eval']}: {rep['model']}"
                  f"{' + ' + rep['adapter'] if rep['adapter'] else ''}", title_justify="left")
        t.add_row("(all)", "", str(o["n"]), _value(o["value"]), _value(o["stderr"]), "", "")
        for s in rep["slices"]:
            t.add_row(escape(s["name"]), s["kind"], str(s["n"]), _value(s["value"]), _value(s["stderr"]),
                      "—" if s["gap"] is None else f"{s['gap']:+.3f}", "[red]FLAGGED[/red]" if s["flagged"] else "")
        console.print(t)
        if rep.get("compare"):
            c = Table("slice", "n", "old", "new", "delta", "verdict", title=f"compared with {rep['compare']['old']['label']}",
                      title_justify="left")
            colour = {"worse": "red", "better": "green", "same": "dim"}
            for r in rep["compare"]["rows"]:
                c.add_row(escape(r["slice"]), str(r["n_new"]), _value(r["old"]), _value(r["new"]),
                          "—" if r["delta"] is None else f"{r['delta']:+.3f}", f"[{colour[r['verdict']]}]{r['verdict']}[/]")
            console.print(c)
        html = rep.get("files", {}).get("html")
        console.print(f"predictions: {os.path.join(rep['output'], evaluation.PREDICTIONS)}"
                      + (f"; report: {os.path.join(rep['output'], html)}" if html else ""), highlight=False, soft_wrap=True)
    if fail_on == "flagged" and any(s["flagged"] for s in rep["slices"]):
        raise typer.Exit(1)
    if fail_on == "worse" and rep.get("compare") and any(r["verdict"] == "worse" for r in rep["compare"]["rows"]):
        raise typer.Exit(1)


@app.command("explain")
def explain_cmd(
    name: Optional[str] = typer.Argument(None, help="The eval whose failing predictions to explain (default: the only one)."),
    slice_name: Optional[str] = typer.Option(None, "--slice", help="Explain failing rows of this slice."),
    rows: List[int] = typer.Option(None, "--row", help="Explain this row (its 0-based position in predictions.jsonl); repeat."),
    limit: int = typer.Option(5, "--limit", help="At most this many failing rows."),
    k: int = typer.Option(10, "-k", help="Training rows listed per failing row."),
    method: str = typer.Option("gradient", "--method", help="gradient (TracIn: gradient similarity) or embedding (nearest neighbours)."),
    train: List[str] = typer.Option(None, "--train", help="Training data (default: what the model's lineage records)."),
    as_json: bool = typer.Option(False, "--json"),
    spec_file: Optional[str] = typer.Option(None, "--spec"),
) -> None:
    """Provenance of predictions: for failing rows, the training rows most responsible for what the model predicted."""
    from rich.markup import escape

    from fmhub.ml import explain as provenance
    from fmhub.project.spec import load_spec

    try:
        loaded = load_spec(spec_file)
        result = provenance.explain_eval(loaded, name, slice_name=slice_name, rows=rows or None, limit=limit, k=k,
                                         method=method, train=train or None)
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(result, default=str))
        return
    for q in result["queries"]:
        t = Table("score", "training row", "label", title=f"row {q['row']}: {escape(str(q['text']))!s} — predicted "
                  f"{escape(str(q['prediction']))}, expected {escape(str(q['target']))}", title_justify="left")
        for inf in q["influences"]:
            t.add_row(f"{inf['score']:+.3f}", escape(f"{inf['where']}: {inf['text']}"), escape(str(inf.get("label"))))
        console.print(t)


@app.command("patch")
def patch_cmd(
    name: Optional[str] = typer.Argument(None, help="The patch of fmhub.yaml's patch: section (default: the only one)."),
    commit_: bool = typer.Option(False, "--commit", help="Commit the patched model, its patch set and lineage as a new version."),
    as_json: bool = typer.Option(False, "--json"),
    spec_file: Optional[str] = typer.Option(None, "--spec"),
) -> None:
    """Fix a failing slice through data: label a patch set, fine-tune the base on it, and keep it only if the gate passes."""
    from fmhub.ml import patch
    from fmhub.project.spec import load_spec

    rep, failure = None, None
    try:
        loaded = load_spec(spec_file)
        rep = patch.run_patch(loaded, name, progress=None if as_json else lambda m: err.print(m, highlight=False))
    except patch.PatchRejected as exc:
        rep, failure = exc.report, exc
    except FmhubError as exc:
        _fail(exc)
    if as_json:
        console.print_json(json.dumps(rep, default=str))
    else:
        t = Table("slice", "n", "before", "after", "change", "needs", "gate", title=f"patch {rep['patch']}: gate", title_justify="left")
        for row in patch.format_gate(rep):
            t.add_row(*row[:-1], "[green]pass[/green]" if row[-1] == "pass" else "[red]FAIL[/red]")
        console.print(t)
    if failure is not None:
        _fail(failure)
    if commit_:
        from fmhub.core.repo import git

        paths = [rep["output"], rep["output"] + ".lineage.json", rep["data"], rep["data"] + ".lineage.json"]
        try:
            git("add", "--", *paths, cwd=loaded.root)
            git("commit", "-q", "-m", f"fmhub patch {rep['patch']}: slice {rep['slice']} fixed through data", "--", *paths, cwd=loaded.root)
            console.print(f"committed {git('rev-parse', 'HEAD', cwd=loaded.root).strip()[:12]}", highlight=False)
        except FmhubError as exc:
            _fail(exc)


@app.command("rebase")
def rebase_cmd(
    sources: List[str] = typer.Argument(..., help="Adapters or fine-tuned models built on the old base."),
    onto: str = typer.Option(..., "--onto", help="The new base (e.g. the patched one)."),
    old: str = typer.Option(..., "--from", help="The base they were built on."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output directory (one source only; default: rebase in place)."),
    strategy: str = typer.Option("task-arithmetic", "--strategy", help="For full models: the merge strategy (task-arithmetic, ties, ...)."),
    check: Optional[str] = typer.Option(None, "--check", help="A task of fmhub.yaml to score before and after; a regression refuses the rebase."),
    max_regression: float = typer.Option(0.02, "--max-regression"),
    retune: int = typer.Option(0, "--retune", help="An adapter that regresses on the new base trains this many more steps on the --check task, then is checked again."),
    lr: Optional[float] = typer.Option(None, "--lr", help="The retune's learning rate (default: a third or a tenth of the adapter's own, whichever does better)."),
    spec_file: Optional[str] = typer.Option(None, "--spec"),
) -> None:
    """Move adapters and fine-tunes of a base onto a new version of it: the model analogue of rebasing a branch."""
    from fmhub.ml import rebase

    if output and len(sources) > 1:
        _fail(FmhubError("--output takes one source; without it each source is rebased in place"))
    task = None
    try:
        if check:
            from fmhub.ml.autotune import task_of
            from fmhub.project.spec import load_spec

            loaded = load_spec(spec_file)
            if check not in loaded.spec.tasks:
                raise FmhubError(f"no task {check!r} in {loaded.path}")
            task = task_of(loaded, check)
        if retune and task is None:
            raise FmhubError("--retune trains on the --check task: name one")
        t = Table("source", "kind", "output", "before", "after", "retuned", title=f"rebased onto {onto}", title_justify="left")
        for src in sources:
            r = rebase.rebase(src, old, onto, output, strategy=strategy, check=task, max_regression=max_regression, retune=retune, lr=lr)
            t.add_row(src, r.kind, r.output, _value(r.score_before), _value(r.score_after), f"{r.retuned} steps" if r.retuned else "")
    except FmhubError as exc:
        _fail(exc)
    console.print(t)


def main() -> None:
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    try:
        app()
    except Exception as exc:  # what no command anticipated: one line, never a traceback (FMHUB_DEBUG=1 shows it)
        if os.environ.get("FMHUB_DEBUG"):
            raise
        from fmhub.base.errors import one_line, unexpected

        message = one_line(str(exc)) if isinstance(exc, FmhubError) else one_line(unexpected(f"fmhub {' '.join(sys.argv[1:2])}".strip(), exc))
        sys.stderr.write(f"fmhub: {message}\n")
        sys.exit(1)

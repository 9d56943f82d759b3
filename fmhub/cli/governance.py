"""``fmhub plugins``, ``fmhub lineage``, ``fmhub unlearn`` and ``fmhub audit verify|log|anchor`` (`fmhub.api.governance`)."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from fmhub.cli.common import console, err, say

app = typer.Typer()


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json")) -> None:
    """List loaded plugins and what each provides."""
    from fmhub.api import governance

    info = governance.plugins()
    if as_json:
        console.print_json(json.dumps(info.as_dict()))
        return
    table = Table("kind", "name", "plugin", "package", "problem")
    for r in info.provided:
        table.add_row(r.kind, r.name, r.plugin, r.package, f"[red]{escape(r.problem)}[/red]" if r.problem else "")
    console.print(table)
    unusual = [p for p in info.plugins if p.status != "loaded"]
    if unusual:
        table = Table("plugin", "package", "version", "status", "why")
        for p in unusual:
            table.add_row(p.name, p.package, p.version, p.status, escape(p.problem or ""))
        console.print(table)
    for c in info.clashes:
        say(f"clash: {c.kind} {c.name!r} is provided by {', '.join(c.plugins)}; using it is refused "
            "(FMHUB_DISABLE_PLUGINS=NAME turns one off)")
    if info.disabled:
        say(f"disabled (FMHUB_DISABLE_PLUGINS): {', '.join(info.disabled)}")


@app.command("lineage")
def lineage_cmd(
    target: str = typer.Argument(..., metavar="PATH[@REV]", help="A model or dataset; @REV reads the records as committed there."),
    as_json: bool = typer.Option(False, "--json", help="Print the graph (nodes, edges) as JSON."),
) -> None:
    """Show which datasets, models and pipeline steps produced PATH (from its .lineage.json records)."""
    from rich.tree import Tree

    from fmhub.api import governance

    graph = governance.lineage(target)
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
    say(f"source datasets: {', '.join(datasets) if datasets else 'none recorded'}")


@app.command()
def unlearn(
    source: str = typer.Option(..., "--source", help="The data source to unlearn (a dataset path in this repository)."),
    rev: Optional[str] = typer.Option(None, "--rev", help="Look only at the history of REV (default: every branch and tag)."),
    remove: bool = typer.Option(False, "--remove", help="Also exclude SOURCE from future `fmhub clean` / `fmhub label` runs."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List every committed model version trained (directly or through a pipeline or merge) on SOURCE."""
    from fmhub.api import governance

    hits, excluded = governance.unlearn(source, rev, remove)
    if as_json:
        console.print_json(json.dumps({"source": source, "models": hits, "excluded_in": excluded}))
        return
    table = Table("commit", "model", "step", title=f"model versions trained on {source}")
    for h in hits:
        table.add_row(h["commit"][:12], h["path"], h["step"] or "")
    console.print(table if hits else f"no committed model version was trained on {source}", highlight=False)
    if excluded:
        say(f"excluded {source} from future pipeline runs ({excluded}); retrain or revert the models above")


audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log of filter runs, pushes, fetches, merges and pipeline runs.")
app.add_typer(audit_app, name="audit")


def _say_broken(res) -> None:
    """Where the chain breaks (line, seq, kind: never the entry)."""
    err.print(f"[red]fmhub:[/red] {escape(str(res))}", highlight=False, soft_wrap=True)  # a path or field name is not markup


@audit_app.command("verify")
def audit_verify(
    anchor: Optional[str] = typer.Option(None, "--anchor", help="HASH or SEQ:HASH from `fmhub audit anchor` (or the ref it was saved to): the log must still hold it."),
    path: Optional[str] = typer.Option(None, "--path", help="A log file to verify (default: this repository's)."),
    plain_until: int = typer.Option(0, "--plain-until", min=0, help="With FMHUB_AUDIT_KEY: the seq of the last entry written before the key was set (plain entries after it fail)."),
) -> None:
    """Walk the whole chain; name the first entry that was edited, inserted, removed, reordered or cut (exit 1)."""
    from fmhub.api import governance

    done = governance.audit_verify(anchor, path, plain_until)
    res = done.result
    if not res.ok:
        _say_broken(res)
        raise typer.Exit(1)
    if res.entries == 0 and not done.exists:
        say(f"no audit log at {done.path} (nothing recorded yet)")
        return
    say(str(res) + (" (anchor found)" if anchor else ""))


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
    from fmhub.api import governance

    entries, res = governance.audit_log(who, what, since, until, target, last, path)
    if as_json:
        console.print_json(json.dumps(entries, ensure_ascii=False))
    else:
        _print_entries(entries)
    if not res.ok:
        _say_broken(res)
        err.print("entries from there on are not shown; `fmhub audit verify` checks the whole log", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _print_entries(entries: list) -> None:
    from fmhub.base.errors import printable

    table = Table("seq", "time (UTC)", "who", "what", "target", "decision", "details")
    table.columns[4].overflow = "fold"  # a path cut short with … could name another file
    colour = {"deny": "red", "error": "red", "conflict": "yellow"}

    def show(text: str) -> str:  # neither markup nor terminal escapes: entries name other people's paths
        return escape(printable(text))

    for e in entries:
        details = " ".join(f"{k}={json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v}" for k, v in e["details"].items())
        table.add_row(str(e["seq"]), show(e["time"][:19].replace("T", " ")), show(e["who"]), show(e["what"]), show(e["target"]),
                      f"[{colour[e['decision']]}]{show(e['decision'])}[/]" if e["decision"] in colour else show(e["decision"]),
                      show(details[:120] + ("…" if len(details) > 120 else "")))
    console.print(table)


@audit_app.command("anchor")
def audit_anchor(
    save: bool = typer.Option(False, "--save", help="Also keep it as refs/fmhub/audit (push that ref to keep it off this machine)."),
    path: Optional[str] = typer.Option(None, "--path", help="A log file (default: this repository's)."),
) -> None:
    """Print SEQ:HASH of the verified log's head; keep it elsewhere, and `verify --anchor` shows the log was not cut or rewritten since."""
    from fmhub.api import governance

    try:
        res, ref = governance.audit_anchor(save, path)
    except governance.AuditBroken as exc:
        _say_broken(exc.result)
        raise typer.Exit(1) from None
    say(f"{res.head_seq}:{res.head_hash}")
    if ref:
        err.print(f"saved as {ref}", highlight=False, soft_wrap=True)

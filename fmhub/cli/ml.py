"""``fmhub finetune|select|eval|explain|patch`` (`fmhub.api.ml`; docs/monitoring.md)."""

from __future__ import annotations

import json
import os
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from fmhub.cli.common import console, err, say, value

app = typer.Typer()


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
    from fmhub.api import ml

    rep = ml.finetune(base, data, output, fisher_file, keep, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    say(f"saved {rep.output_dir}: {rep.steps} steps on {rep.device} in {rep.seconds:.1f} s, {rep.trainable:,} of {rep.total:,} "
        f"entries trainable; loss {rep.losses[0]:.4f} -> {rep.losses[-1]:.4f}")


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
    from fmhub.api import ml

    def progress(c, task, s) -> None:
        if not as_json:
            what = "error" if s.error else ("cached" if s.cached else f"{s.seconds:.1f}s")
            err.print(f"  {c.name} on {task}: {what}", highlight=False)

    done = ml.select(base, adapters or [], task_names or [], no_base, cache, no_cache, router_out, spec_file, on_result=progress)
    if as_json:
        console.print_json(json.dumps(done.board.to_json()))
        return
    console.print(done.board.table())
    if done.router is not None:
        say(f"router for {', '.join(done.router.classes)} written to {router_out}; serve it with backend_options: {{router: {router_out}}}")


@app.command("eval")
def eval_cmd(
    name: Optional[str] = typer.Argument(None, help="The eval of fmhub.yaml's eval: section (default: the only one)."),
    model: Optional[str] = typer.Option(None, "--model", help="Score this model instead: PATH or PATH@REV."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="With this PEFT adapter: PATH or PATH@REV."),
    compare_to: Optional[str] = typer.Option(None, "--compare", help="A revision (or predictions file) to compare with: the regression table."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Where predictions and reports go (default: the eval's output; another model's: its own directory under it)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Write no PNG/HTML."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="Exit 1 when a slice is 'flagged' or (with --compare, required) got 'worse'."),
    as_json: bool = typer.Option(False, "--json"),
    spec_file: Optional[str] = typer.Option(None, "--spec"),
) -> None:
    """Score a model (and adapter) row by row; store the predictions; report the metric per slice, and what changed since --compare."""
    from fmhub.api import ml

    done = ml.evaluate(name, model, adapter, compare_to, output, plots=not no_plots, fail_on=fail_on, spec=spec_file,
                       progress=None if as_json else lambda m: err.print(m, highlight=False))
    if as_json:
        console.print_json(json.dumps(done.report, default=str))
    else:
        _print_eval(done.report)
    if done.failed:  # which slices broke which rule, then the exit status a CI check reads
        err.print(f"fmhub eval: --fail-on {done.rule}: {len(done.failures)} slice(s) failed", highlight=False)
        for line in done.failures:
            err.print(f"  {escape(line)}", highlight=False)
        raise typer.Exit(1)


def _print_eval(rep: dict) -> None:
    from fmhub.ml import evaluation

    o = rep["overall"]
    t = Table("slice", "kind", "n", rep["metric"], "± se", "gap", "", title=f"eval {rep['eval']}: {rep['model']}"
              f"{' + ' + rep['adapter'] if rep['adapter'] else ''}", title_justify="left")
    t.add_row("(all)", "", str(o["n"]), value(o["value"]), value(o["stderr"]), "", "")
    for s in rep["slices"]:
        t.add_row(escape(s["name"]), s["kind"], str(s["n"]), value(s["value"]), value(s["stderr"]),
                  "—" if s["gap"] is None else f"{s['gap']:+.3f}", "[red]FLAGGED[/red]" if s["flagged"] else "")
    console.print(t)
    for name, c in (rep.get("clusters") or {}).items():
        say(escape(f"clusters {name}: fitted on {c['reference']} ({c['rows']} rows placed)"))
    if rep.get("compare"):
        c = Table("slice", "n", "old", "new", "delta", "verdict", title=f"compared with {rep['compare']['old']['label']}",
                  title_justify="left")
        colour = {"worse": "red", "better": "green", "same": "dim"}
        for r in rep["compare"]["rows"]:
            n = str(r["n_new"]) if r["n_old"] == r["n_new"] else f"{r['n_old']} -> {r['n_new']}"  # rows one side lacks
            c.add_row(escape(r["slice"]), n, value(r["old"]), value(r["new"]),
                      "—" if r["delta"] is None else f"{r['delta']:+.3f}", f"[{colour[r['verdict']]}]{r['verdict']}[/]")
        console.print(c)
    html = rep.get("files", {}).get("html")
    say(f"predictions: {os.path.join(rep['output'], evaluation.PREDICTIONS)}" + (f"; report: {os.path.join(rep['output'], html)}" if html else ""))


@app.command("explain")
def explain_cmd(
    name: Optional[str] = typer.Argument(None, help="The eval whose failing predictions to explain (default: the only one)."),
    slice_name: Optional[str] = typer.Option(None, "--slice", help="Explain failing rows of this slice."),
    rows: List[int] = typer.Option(None, "--row", help="Explain this row (its 0-based position in predictions.jsonl); repeat."),
    limit: int = typer.Option(5, "--limit", help="At most this many failing rows."),
    k: int = typer.Option(10, "-k", help="Training rows listed per failing row."),
    method: str = typer.Option("gradient", "--method", help="gradient (TracIn: gradient similarity) or embedding (nearest neighbours)."),
    train: List[str] = typer.Option(None, "--train", help="Training data (default: what the model's lineage records)."),
    model: Optional[str] = typer.Option(None, "--model", help="Explain the predictions `fmhub eval --model` wrote for this model: PATH or PATH@REV."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="With this PEFT adapter, as `fmhub eval --adapter` scored it."),
    as_json: bool = typer.Option(False, "--json"),
    spec_file: Optional[str] = typer.Option(None, "--spec"),
) -> None:
    """Provenance of predictions: for failing rows, the training rows most responsible for what the model predicted."""
    from fmhub.api import ml

    result = ml.explain(name, slice_name, rows or None, limit, k, method, train or None, spec_file, model, adapter)
    if as_json:
        console.print_json(json.dumps(result, default=str))
        return
    say(escape(f"explaining {result['described']}: its predictions {result['predictions']}; training data {', '.join(result['train'])}"))
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
    from fmhub.api import ml
    from fmhub.ml.patch import PatchRejected

    try:
        done = ml.patch(name, commit_, spec_file, progress=None if as_json else lambda m: err.print(m, highlight=False))
    except PatchRejected as exc:  # the gate's table says why, then the one-line error
        _print_gate(exc.report, as_json)
        raise
    _print_gate(done.report, as_json)
    if done.commit:
        console.print(f"committed {done.commit[:12]}", highlight=False)


def _print_gate(rep: dict, as_json: bool) -> None:
    from fmhub.ml import patch

    if as_json:
        console.print_json(json.dumps(rep, default=str))
        return
    t = Table("slice", "n", "before", "after", "change", "needs", "gate", title=f"patch {rep['patch']}: gate", title_justify="left")
    for row in patch.format_gate(rep):
        t.add_row(*row[:-1], "[green]pass[/green]" if row[-1] == "pass" else "[red]FAIL[/red]")
    console.print(t)

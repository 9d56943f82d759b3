"""``fmhub run``, ``fmhub init`` and ``fmhub demo`` (`fmhub.api.run`)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from fmhub.cli.common import console, err, say, short

app = typer.Typer()


@app.command()
def demo(
    directory: Optional[str] = typer.Argument(None, help="Where to create the demo repository (default: a temp dir)."),
) -> None:
    """Build a tiny transformers model, version it with git + fmhub, and show what fmhub stores."""
    from fmhub.api import run

    run.demo(directory, console)


def _announce(quiet: bool = False):
    """The on_step callback that says which step starts, on stderr."""
    def event(what: str, step, outcome) -> None:
        if what == "start" and not quiet:
            err.print(f"[dim]running {step.id}...[/dim]", highlight=False)

    return event


@app.command("run")
def run_steps(
    only: List[str] = typer.Argument(None, metavar="[STEP]...", help="Run only these steps (e.g. clean:web finetune:sentiment)."),
    spec: Optional[str] = typer.Option(None, "--spec", help="The spec file (default: fmhub.yaml at the top of the work tree)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what is out of date; run nothing."),
    commit_: bool = typer.Option(False, "--commit", help="Commit what the steps wrote (and their lineage records) as a new version."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Build what fmhub.yaml declares: data pipelines, adapters per task, selection, merge, deploy; only what is out of date."""
    from fmhub.api import run

    result = run.run(only or [], spec, dry_run, commit_, on_step=_announce(quiet=as_json))
    if as_json:
        console.print_json(json.dumps(result.to_json(), default=str))
        return
    _print_run(result)


# what the keys of the steps' results mean: the table's caption explains those that appear in it
GLOSSARY = {
    "rows_in": "rows read", "rows_out": "rows written", "rows": "rows read", "labelled": "rows given a label",
    "output": "what the step wrote",
    "metric": "the task's metric", "score": "the adapter's metric on the task's held-out rows (accuracy: fraction right)",
    "lr": "the learning rate the search chose", "eval_loss": "the adapter's loss on the held-out rows",
    "trials": "learning rates tried",
    "best": "the top candidate per task (task: candidate)", "tensors": "tensors written",
    "scores": "the merged adapter's metric per task, on each task's held-out rows",
    "served": "names answered by a local server (started for the check, then stopped)",
    "routed": "the adapter the router chose for the deploy prompt",
}


def _print_run(result) -> None:
    table = Table("step", "status", "seconds", "result", title=f"fmhub run ({result.loaded.path})", title_justify="left")
    used = []
    for o in result.outcomes:
        summary = ", ".join(f"{k}={short(v)}" for k, v in o.summary.items() if v is not None)
        used += [k for k, v in o.summary.items() if v is not None and k in GLOSSARY and k not in used]
        table.add_row(o.step, o.status, f"{o.seconds:.1f}" if o.status == "ran" else "", escape(summary))
    console.print(table)
    if any(o.status == "ran" for o in result.outcomes):
        console.print("status: ran, or up to date (its inputs and parameters did not change since it last ran); "
                      "seconds: how long it ran", highlight=False, style="dim")
    if used:
        console.print("result: " + "; ".join(f"{k}: {GLOSSARY[k]}" for k in used), highlight=False, style="dim")
    _print_scores(result)
    if result.commit:
        console.print(f"committed {result.commit[:12]}", highlight=False)


def _print_scores(result) -> None:
    """The base, each adapter and the merged adapter on every task: what the run shows."""
    sc = result.scores
    if sc is None or not sc.tasks:
        return
    table = Table("candidate", "what", *[f"{name} {metric} {'↑' if up else '↓'}" for name, metric, up in sc.tasks],
                  title="scores on each task's held-out rows (↑: higher is better, ↓: lower)", title_justify="left")
    for name, what, scores in sc.rows:
        table.add_row(name, what, *[f"{scores[t]:.3f}" if isinstance(scores.get(t), (int, float)) else "-" for t, _, _ in sc.tasks])
    console.print(table)
    if sc.kept:
        (task, share), *rest = sc.kept.items()
        console.print(f"the merged adapter keeps {share:.0%} of the best adapter's gain over the base on {task}"
                      + "".join(f", {s:.0%} on {t}" for t, s in rest), highlight=False, style="dim")


@app.command("init")
def init(
    directory: str = typer.Argument("fmhub-example", help="A new (or empty) directory."),
    example: bool = typer.Option(False, "--example", help="Write the built-in example project and run it end to end."),
    run_it: bool = typer.Option(True, "--run/--no-run", help="With --example: run `fmhub run --commit` in it."),
) -> None:
    """Start a repository with fmhub installed; --example writes a tiny model, data and an fmhub.yaml and runs it."""
    from fmhub.api import run

    done = run.init(directory, example, run_it, on_step=_announce(),
                    on_created=lambda path: console.print(f"example project in {path}", highlight=False))
    if not done.example:
        say(f"initialized {done.path}: fmhub installed, *.safetensors *.jsonl *.parquet tracked, fmhub.yaml to fill in")
        return
    if done.run is None:
        return
    _print_run(done.run)
    say(f"see it: cd {done.path} && git log --stat && cat runs/leaderboard.json; change data/reviews.jsonl and `fmhub run` again")

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


def _print_run(result) -> None:
    table = Table("step", "status", "seconds", "result", title=f"fmhub run ({result.loaded.path})", title_justify="left")
    for o in result.outcomes:
        summary = ", ".join(f"{k}={short(v)}" for k, v in o.summary.items() if v is not None)
        table.add_row(o.step, o.status, f"{o.seconds:.1f}" if o.status == "ran" else "", escape(summary))
    console.print(table)
    if result.commit:
        console.print(f"committed {result.commit[:12]}", highlight=False)


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

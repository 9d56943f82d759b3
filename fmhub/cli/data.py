"""``fmhub clean [PIPELINE]``, ``fmhub clean review``, ``fmhub label`` and ``fmhub join`` (`fmhub.api.data`)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from fmhub.cli.common import console, err, say, warn

app = typer.Typer()


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

    from fmhub.api import data
    from fmhub.data.label.report import rich_tables

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        tasks: dict = {}

        def progress(phase: str, done: int, total: Optional[int]) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task({"votes": "voting", "write": "writing"}.get(phase, phase), total=total)
            bar.update(tasks[phase], completed=done)

        rep = data.label(pipeline_name, spec, backend=backend, workers=workers, report=report, suggest=suggest, progress=progress)
    if as_json:
        console.print_json(json.dumps(rep))
        return
    for table in rich_tables(rep):
        console.print(table)
    for lf in rep["lfs"]:
        if lf["errors"]:
            first = lf["first_errors"][0]
            warn(f"{lf['name']} failed on {lf['errors']} row(s), counted as abstaining (first: row {first['position']}: {first['error']})")
    bad = rep["malformed_rows"]
    if bad["count"]:
        warn(f"skipped {bad['count']} malformed row(s) (first: {bad['first'][0]['error']})")
    for p in rep["label_model"]["redundant_pairs"]:
        console.print(f"{p['a']} agrees with {p['b']} beyond what the class explains (kappa {p['kappa']:.2f}): read as one group", highlight=False)
    for w in rep["label_model"].get("warnings", []):
        warn(f"label model: {w}")
    if rep.get("withheld_by_policy"):
        console.print(f"{rep['withheld_by_policy']} row(s) withheld by policy (not read, not labelled, not written)", highlight=False)
    say(f"labelled {rep['rows']} rows -> {rep['output']}; report: {rep['report']}")


class _CleanGroup(TyperGroup):
    """``fmhub clean [PIPELINE] [OPTIONS]`` runs a pipeline (the ``run`` command); ``fmhub clean review ...`` is the other one."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):  # -h too
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
    from fmhub.api import data
    from fmhub.base.progress import row_progress

    with row_progress(err, "cleaning") as bar:
        res = data.clean(pipeline_name, spec, backend=backend, workers=workers, reports=report or (), overrides=overrides,
                         progress=bar.advance, on_start=bar.start)
    if as_json:
        console.print_json(json.dumps(res.to_dict()))
    else:
        _print_clean_summary(res)
    for w in res.warnings:
        warn(w)


def _print_clean_summary(res) -> None:
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
    say(f"{res.rows_out} of {res.rows_read + res.malformed} rows kept -> {escape(res.output)} "
        f"({res.seconds:.2f} s, {res.rows_per_s:,.0f} rows/s, {escape(res.backend)} x{res.workers})")
    if res.withheld:
        console.print(f"{res.withheld} row(s) withheld by policy (not read, not written)", highlight=False)
    for path in res.reports:
        say(f"report: {escape(path)}")


@clean_app.command("review")
def clean_review(
    report: str = typer.Argument(..., help="A JSON report of a run (fmhub clean --report run.json)."),
    keep: Optional[List[str]] = typer.Option(None, "--keep", help="Rows to keep whatever the steps say: positions or row hashes, comma-separated."),
    drop: Optional[List[str]] = typer.Option(None, "--drop", help="Rows to drop: positions or row hashes, comma-separated."),
    reason: Optional[str] = typer.Option(None, help="Why (recorded in the overrides file and in later reports)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="The overrides file (default: the one the run used)."),
) -> None:
    """Record a reviewer's decisions on a report's rows in the overrides file that the next `fmhub clean` respects."""
    from fmhub.api import data

    path, added = data.clean_review(report, keep or [], drop or [], reason, output)
    say(f"{path}: {added} new override(s); the next `fmhub clean` respects them")


@app.command("join")
def join_cmd(
    name: Optional[str] = typer.Argument(None, help="The join of fmhub.yaml's join: section (default: the only one)."),
    spec_file: Optional[str] = typer.Option(None, "--spec"),
) -> None:
    """Bring a metadata table's attributes (entity -> type, ...) into text rows, as fmhub.yaml's join: declares."""
    from fmhub.api import data

    rep = data.join(name, spec_file)
    say(f"{rep['output']}: {rep['rows_out']} rows ({rep['rows_matched']} with a match, {rep['rows_dropped']} dropped); "
        f"added {', '.join(rep['columns_added'])}")

"""``fmhub diff`` (`fmhub.api.models.diff`): a table per checkpoint, rows per dataset, effective updates per adapter."""

from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from fmhub.cli.common import args_of, console, utf8_stdout

app = typer.Typer()


def paths_from(words: List[str], given: List[str]) -> Optional[int]:
    """Where in ``words`` (the command's arguments) the paths after ``--`` start: click drops ``--``, so count the
    words that followed it in what was typed, ``given``."""
    if "--" not in given:
        return None
    n_paths = len(given) - given.index("--") - 1
    return len(words) - n_paths if n_paths <= len(words) else None


@app.command()
def diff(
    ctx: typer.Context,
    args: List[str] = typer.Argument(None, metavar="[REV1] [REV2] [-- PATH...]"),
    as_json: bool = typer.Option(False, "--json", help="Every tensor with its status and numbers, as JSON."),
) -> None:
    """What changed in each tensor: HEAD vs the work tree, REV vs the work tree, or REV1 vs REV2.

    Tensors are matched by name across the shards of a directory; only changed tensors are listed,
    with ‖Δ‖, ‖Δ‖/‖W_old‖, the fraction of elements changed (bitwise) and max |Δ|.
    Datasets (jsonl, parquet) are compared by rows: added, removed, changed, with sample rows.
    """
    from fmhub.api import models

    words = list(args or [])
    found = models.diff(words, paths_from(words, args_of(ctx)))
    if as_json:
        utf8_stdout()
        sys.stdout.write(json.dumps(found.to_json(), indent=2, ensure_ascii=False) + "\n")
        return
    render(found)


def _opt(x: Optional[float]) -> str:
    from fmhub.models import difftext

    return "" if x is None else difftext.number_text(x)


def render(found) -> None:
    """The tensor table, then each changed dataset's rows, then each adapter's effective updates."""
    from fmhub.base.units import human_bytes
    from fmhub.data.rowdiff import format_data_text
    from fmhub.models import difftext

    changes, datasets, old_label, new_label = found.changes, found.datasets, found.old_label, found.new_label
    rows = [c for c in changes if c.status != "unchanged"]
    dirs = {os.path.dirname(c.path or "") for c in changes}
    n, nbytes = difftext.summarize(changes)
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
    for c in rows:
        if c.withheld:  # the access policy withholds its values: the note says so, no number
            nums = ["", "", "", ""]
        elif c.status in ("added", "removed", "shape"):
            norm = {"added": _opt(c.new_norm), "removed": _opt(c.old_norm), "shape": f"{_opt(c.old_norm)}→{_opt(c.new_norm)}"}
            nums = [f"‖W‖ {norm[c.status]}", "", "", ""]
        else:
            frac = "" if c.frac_changed is None else f"{100 * c.frac_changed:.3g}%"
            nums = [_opt(c.delta_norm), _opt(c.rel_change), frac, _opt(c.max_abs)]
        if c.note:
            nums[-1] = (nums[-1] + " " if nums[-1] else "") + f"({c.note})"
        lead = [f"[{style[c.status]}]{c.status}[/]"] + ([escape(c.path or "")] if len(dirs) > 1 else [])
        table.add_row(*lead, escape(c.name), difftext.kind_text(c).replace("->", "→"), *(escape(x) for x in nums))
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
    for a in found.adapters:
        _print_adapter_change(a)


def _print_adapter_change(a) -> None:
    t = Table(title=f"adapter {escape(a.path)}: effective updates scaling·B@A", title_justify="left")
    for col in ("module", "status", "‖ΔW‖ before", "‖ΔW‖ after", "‖ΔW_after − ΔW_before‖"):
        t.add_column(col, justify="left" if col in ("module", "status") else "right")
    for m in a.modules:
        t.add_row(escape(m.module), m.status, _opt(m.old_norm), _opt(m.new_norm), _opt(m.change_norm))
    for key, before, after in a.config:
        console.print(f"adapter {escape(a.path)}: {escape(key)}: {escape(json.dumps(before))} → {escape(json.dumps(after))}", highlight=False)
    if a.modules:
        console.print(t)

"""Reports of ``fmhub clean`` runs: JSON for tools and ``fmhub clean review``, self-contained HTML for people.

Both hold the run's header (pipeline spec, input and output with sha256,
per-step counts and timings, overrides, warnings) and every decision: each
dropped or edited row with its position, row hash, step, reason and, for
edits, the columns changed. Decisions stream from the run's spool, so a run
with millions of them writes its JSON report in constant memory; the HTML
page lists the first `HTML_LIMIT`.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
from typing import Any, Iterable, Mapping

from fmhub import __version__
from fmhub.base.atomic import atomic_write

HTML_LIMIT = 5000
REPORT_VERSION = 1


def header(result: Any, loaded: Any, pipe: Any, in_sha: str | None, out_sha: str | None, started: float) -> dict[str, Any]:
    """Everything but the decisions, as plain JSON data."""
    spec = {**pipe.model_dump(exclude={"steps"}), "steps": [s.to_dict() for s in pipe.steps]}
    res = result.to_dict()
    return {
        "fmhub_clean_report": REPORT_VERSION,
        "fmhub_version": __version__,
        "pipeline": result.pipeline,
        "spec": {"path": loaded.path, "pipeline": spec},
        "input": {"path": result.input, "sha256": in_sha, "rows": result.rows_read, "malformed": result.malformed},
        "output": {"path": result.output, "sha256": out_sha, "rows": result.rows_out},
        "backend": result.backend,
        "workers": result.workers,
        "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": res["seconds"],
        "rows_per_s": res["rows_per_s"],
        "dropped_by_override": result.override_drops,
        "withheld_by_policy": getattr(result, "withheld", 0),  # a count only: withheld rows leave no other trace
        "steps": res["steps"],
        "overrides": result.overrides,
        "warnings": list(result.warnings),
    }


def write(path: str, head: Mapping[str, Any], decisions: Iterable[Mapping[str, Any]]) -> None:
    """Write a report to ``path`` (``.json`` or ``.html``), atomically."""
    if os.path.splitext(path)[1].lower() == ".html":
        with atomic_write(path, "w") as f:
            f.write(render_html(head, decisions))
        return
    with atomic_write(path, "w") as f:
        text = json.dumps(head, indent=1, ensure_ascii=False, default=str)
        f.write(text[:-2] + ',\n "decisions": [')  # the header's closing "\n}" makes way for the decisions
        for i, d in enumerate(decisions):
            f.write(("\n  " if i == 0 else ",\n  ") + json.dumps(d, ensure_ascii=False, default=str))
        f.write("\n ]\n}\n")


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.overridden td{background:#eef7ee}tr.edit td.a{color:#a60}tr.drop td.a{color:#b00}
code,.x{font-family:ui-monospace,monospace;font-size:12px}.x{white-space:pre-wrap;max-width:60em}
.warn{color:#a60}
"""


def render_html(head: Mapping[str, Any], decisions: Iterable[Mapping[str, Any]]) -> str:
    """A self-contained page: run summary, a table per step, and the decisions (every text escaped)."""
    e = lambda v: html.escape("" if v is None else str(v))  # noqa: E731
    inp, out = head["input"], head["output"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fmhub clean: {e(head['pipeline'])}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>fmhub clean: {e(head['pipeline'])}</h1>",
             "<table>",
             f"<tr><th>input</th><td><code>{e(inp['path'])}</code></td><td class=n>{inp['rows']} rows</td><td><code>{e((inp.get('sha256') or '')[:16])}</code></td></tr>",
             f"<tr><th>output</th><td><code>{e(out['path'])}</code></td><td class=n>{out['rows']} rows</td><td><code>{e((out.get('sha256') or '')[:16])}</code></td></tr>",
             f"<tr><th>malformed input rows</th><td colspan=3>{inp['malformed']}</td></tr>",
             f"<tr><th>run</th><td colspan=3>{e(head['backend'])} backend, {head['workers']} worker(s), {head['seconds']} s, "
             f"{head['rows_per_s']} rows/s, started {e(head['started'])}</td></tr>"]
    ov = head.get("overrides")
    if ov:
        state = "not found: none applied" if ov.get("missing") else f"{ov.get('entries', 0)} entries, {ov.get('matched', 0)} matched"
        parts.append(f"<tr><th>overrides</th><td colspan=3><code>{e(ov['path'])}</code> ({e(state)})</td></tr>")
    parts.append("</table>")
    for w in head.get("warnings", []):
        parts.append(f"<p class=warn>warning: {e(w)}</p>")
    parts.append("<h2>Steps</h2><table><tr><th>#</th><th>step</th><th>scope</th><th>rows in</th><th>dropped</th>"
                 "<th>edited</th><th>kept by reviewer</th><th>seconds</th></tr>")
    if head.get("dropped_by_override"):
        parts.append(f"<tr><td></td><td>override</td><td>reviewer</td><td></td><td class=n>{head['dropped_by_override']}</td><td></td><td></td><td></td></tr>")
    for s in head["steps"]:
        parts.append(f"<tr><td class=n>{s['index']}</td><td>{e(s['name'])}</td><td>{e(s['scope'])}</td><td class=n>{s['rows_in']}</td>"
                     f"<td class=n>{s['dropped']}</td><td class=n>{s['edited']}</td><td class=n>{s['overridden']}</td><td class=n>{s['seconds']}</td></tr>")
    parts.append("</table><p>Seconds are compute time summed over workers. Positions are 0-based (jsonl: line − 1).</p>")
    parts.append("<h2>Decisions</h2><table><tr><th>position</th><th>row hash</th><th>step</th><th>action</th><th>reason</th>"
                 "<th>columns</th><th>text</th></tr>")
    shown = more = 0
    for d in decisions:
        if shown >= HTML_LIMIT:
            more += 1
            continue
        shown += 1
        cls = "overridden" if d.get("overridden") else d["action"]
        action = f"{d['action']} (kept by reviewer)" if d.get("overridden") else d["action"]
        parts.append(f"<tr class={cls}><td class=n>{d['position']}</td><td><code>{e(d.get('row'))}</code></td><td>{e(d['step'])}</td>"
                     f"<td class=a>{e(action)}</td><td>{e(d['reason'])}</td><td>{e(', '.join(d.get('columns') or []))}</td>"
                     f"<td class=x>{e(d.get('excerpt'))}</td></tr>")
    parts.append("</table>")
    if more:
        parts.append(f"<p>{more} more decisions are not listed here; a JSON report (<code>--report run.json</code>) holds them all.</p>")
    if not shown:
        parts.append("<p>No row was dropped or edited.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)

"""Charts and a self-contained HTML page for an ``fmhub eval`` report (the version-1 dict).

`plot_slices` draws the metric per slice, so a failing slice stands out next to
the overall value; `plot_compare` draws old against new per slice, so a
regression hidden by a better overall number is seen; `write_html` puts the
tables and the charts (as data URIs) into one file that can be opened anywhere
or attached to a pull request; `write_all` writes the lot into a folder.

matplotlib is imported inside the functions: it is only needed when a chart
is asked for, and importing it costs a second. Figures are built with
``matplotlib.figure.Figure`` and ``FigureCanvasAgg``, never pyplot, so no
global state is touched and charts can be drawn from several threads.
Every file is written through `fmhub.base.atomic.atomic_write`: a reader never sees
half a PNG, and an error leaves no temp file.
"""

from __future__ import annotations

import base64
import html
import math
import mimetypes
import os
from typing import Any, Mapping

from fmhub.base.atomic import atomic_write

# Colours: flagged (failing) slices and worse verdicts share red, so the eye
# links "bad" across both charts; the overall bar is neutral dark grey.
SLICE_COLOUR = "#4c72b0"
FLAGGED_COLOUR = "#d62728"
OVERALL_COLOUR = "#555555"
VERDICT_COLOURS = {"better": "#2ca02c", "worse": "#d62728", "same": "#999999"}
OLD_COLOUR = "#ffffff"  # old values are hollow bars, so "same" grey never reads as "old"
MISSING = "—"
LABEL_CHARS = 48  # longer slice names are cut in chart labels (the HTML table has them whole)
MAX_FIG_INCHES = 160.0  # Agg refuses images over 2**16 px; at 100 dpi this stays far below
DPI = 100
_VERDICT_RANK = {"worse": 0, "same": 1, "better": 2}


# ---------------------------------------------------------------- values


def _num(v: Any) -> float | None:
    """A finite float, or None for a missing value (None, NaN, inf, or not a number): those get no bar and print as "—"."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v: Any, sign: bool = False) -> str:
    """A metric value for people: three decimals (more digits for tiny losses), "—" when missing."""
    f = _num(v)
    if f is None:
        return MISSING
    spec = ("+" if sign else "") + (".3f" if f == 0 or abs(f) >= 0.01 else ".3g")
    return format(f, spec)


def _higher_is_better(report: Mapping[str, Any]) -> bool:
    """The report says; older or hand-written reports fall back on the metric (only loss is lower-is-better)."""
    hib = report.get("higher_is_better")
    return bool(hib) if hib is not None else report.get("metric") != "loss"


def _model_text(report: Mapping[str, Any]) -> str:
    """``model + adapter @ rev``: what was scored, as one line."""
    text = str(report.get("model") or "?")
    if report.get("adapter"):
        text += f" + {report['adapter']}"
    if report.get("rev"):
        text += f" @ {str(report['rev'])[:12]}"
    return text


def _mpl_text(s: Any, limit: int | None = None) -> str:
    """User text made safe for a matplotlib label: one line, cut to ``limit``, and "$" escaped.

    Two dollars in a slice name ("$5-$10") would otherwise be parsed as
    mathtext, which renders wrongly or raises when the figure is drawn.
    """
    text = " ".join(str(s).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


# ---------------------------------------------------------------- charts


def _figure(width: float, height: float):
    """A Figure on its own Agg canvas (no pyplot, so no shared state between threads)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, min(height, MAX_FIG_INCHES)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _row_height(rows: int, per_row: float) -> tuple[float, float]:
    """Figure height grows with the rows; past the cap the tick font shrinks instead so labels stay apart."""
    height = 1.9 + per_row * rows
    font = 9.0
    if height > MAX_FIG_INCHES:
        font = max(3.0, font * (MAX_FIG_INCHES - 1.9) / (height - 1.9))
    return height, font


def _xlim(ax, lows: list[float], highs: list[float]) -> tuple[float, float]:
    """An x range from 0 (or below, for negative values) to past the largest bar plus error, with room for the value text."""
    lo = min([0.0] + lows)
    hi = max([0.0] + highs)
    if hi <= lo:
        hi = lo + 1.0
    hi += 0.2 * (hi - lo)
    ax.set_xlim(lo, hi)
    return lo, hi


def _save(fig, path: str) -> str:
    """Render ``fig`` as PNG into ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return path


def _slices_figure(report: Mapping[str, Any]):
    """The slice chart as a Figure (`plot_slices` saves it; tests inspect its artists).

    One bar for the whole eval, then one per slice in declaration order; a
    slice with no rows gets a "no rows" note instead of a bar.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    overall = report.get("overall") or {}
    slices = list(report.get("slices") or [])
    labels = [f"(all) (n={overall.get('n', report.get('rows', '?'))})"]
    labels += [f"{_mpl_text(s.get('name', '?'), LABEL_CHARS)} (n={s.get('n', '?')})" for s in slices]
    values = [_num(overall.get("value"))] + [_num(s.get("value")) for s in slices]
    errs = [_num(overall.get("stderr"))] + [_num(s.get("stderr")) for s in slices]
    colours = [OVERALL_COLOUR] + [FLAGGED_COLOUR if s.get("flagged") else SLICE_COLOUR for s in slices]

    height, font = _row_height(len(labels), 0.32)
    fig = _figure(9.0, height)
    ax = fig.add_subplot()
    ys = list(range(len(labels)))
    have = [i for i, v in enumerate(values) if v is not None]
    lo, hi = _xlim(ax, [values[i] - (errs[i] or 0) for i in have], [values[i] + (errs[i] or 0) for i in have])
    if have:
        ax.barh([ys[i] for i in have], [values[i] for i in have], color=[colours[i] for i in have], height=0.7, zorder=2)
    with_err = [i for i in have if errs[i] is not None]
    if with_err:
        ax.errorbar([values[i] for i in with_err], [ys[i] for i in with_err], xerr=[errs[i] for i in with_err],
                    fmt="none", ecolor="#222222", elinewidth=1, capsize=3, zorder=3)
    pad = 0.01 * (hi - lo)
    for i, v in enumerate(values):
        if v is None:
            ax.text(lo + pad, ys[i], "no rows", va="center", ha="left", fontsize=font, color="#777777", style="italic")
        else:
            ax.text(max(v, 0.0) + (errs[i] or 0) + pad, ys[i], _fmt(v), va="center", ha="left", fontsize=font * 0.9)
    overall_value = values[0]
    if overall_value is not None:
        ax.axvline(overall_value, color="#222222", linestyle="--", linewidth=1, zorder=4)
    ax.set_yticks(ys, labels, fontsize=font)
    ax.invert_yaxis()  # declaration order reads top-down
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.grid(axis="x", color="#e5e5e5", zorder=0)
    metric = str(report.get("metric", "metric"))
    direction = "higher is better" if _higher_is_better(report) else "lower is better"
    ax.set_xlabel(f"{_mpl_text(metric)} ({direction}; bars ± stderr)")
    ax.set_title(f"{_mpl_text(report.get('eval', 'eval'))}: {_mpl_text(metric)} by slice\n{_mpl_text(_model_text(report), 100)}",
                 fontsize=11)
    handles = [Patch(color=OVERALL_COLOUR, label="all rows"), Patch(color=SLICE_COLOUR, label="slice")]
    if any(s.get("flagged") for s in slices):
        handles.append(Patch(color=FLAGGED_COLOUR, label="flagged: worse than the rest"))
    if overall_value is not None:
        handles.append(Line2D([], [], color="#222222", linestyle="--", label=f"overall {_fmt(overall_value)}"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    return fig


def _compare_figure(report: Mapping[str, Any]):
    """The comparison chart as a Figure: per slice a hollow bar for old and a bar for new coloured by its verdict.

    Colours follow the ``verdict`` field, not the sign of the delta, so a
    falling loss is green. Rows stay in the report's order ((all) first).
    """
    from matplotlib.patches import Patch

    comp = report.get("compare")
    if not comp:
        raise ValueError("the report has no comparison (report['compare'] is empty)")
    rows = list(comp.get("rows") or [])
    height, font = _row_height(max(len(rows), 1), 0.55)
    fig = _figure(9.0, height)
    ax = fig.add_subplot()
    old_label = _mpl_text((comp.get("old") or {}).get("label") or "old", 40)
    new_label = _mpl_text((comp.get("new") or {}).get("label") or "new", 40)
    metric = str(report.get("metric", "metric"))
    ax.set_title(f"{_mpl_text(report.get('eval', 'eval'))}: {_mpl_text(metric)}, {old_label} → {new_label}\n"
                 f"{_mpl_text(_model_text(report), 100)}", fontsize=11)
    if not rows:
        ax.text(0.5, 0.5, "nothing to compare", ha="center", va="center", transform=ax.transAxes, color="#777777")
        ax.set_axis_off()
        return fig
    olds = [_num(r.get("old")) for r in rows]
    news = [_num(r.get("new")) for r in rows]
    present = [v for v in olds + news if v is not None]
    lo, hi = _xlim(ax, [min(0.0, v) for v in present], present)
    pad = 0.01 * (hi - lo)
    bar = 0.38
    for i, r in enumerate(rows):
        colour = VERDICT_COLOURS.get(str(r.get("verdict")), VERDICT_COLOURS["same"])
        if olds[i] is not None:
            ax.barh(i - bar / 2, olds[i], height=bar, color=OLD_COLOUR, edgecolor="#444444", linewidth=1, zorder=2)
        if news[i] is not None:
            ax.barh(i + bar / 2, news[i], height=bar, color=colour, edgecolor=colour, linewidth=1, zorder=2)
        end = max([0.0] + [v for v in (olds[i], news[i]) if v is not None])
        verdict = str(r.get("verdict") or "")
        ax.text(end + pad, i, f"{_fmt(r.get('delta'), sign=True)} {_mpl_text(verdict)}", va="center", ha="left",
                fontsize=font * 0.9, color=colour, fontweight="bold" if verdict == "worse" else "normal")
    labels = [f"{_mpl_text(r.get('slice', '?'), LABEL_CHARS)} (n={_sizes(r)})" for r in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=font)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # report order, top-down
    ax.grid(axis="x", color="#e5e5e5", zorder=0)
    direction = "higher is better" if _higher_is_better(report) else "lower is better"
    threshold = _num(comp.get("threshold"))
    ax.set_xlabel(f"{_mpl_text(metric)} ({direction}" + (f"; same: |delta| ≤ {_fmt(threshold)} or within 2 stderr)" if threshold is not None else ")"))
    handles = [Patch(facecolor=OLD_COLOUR, edgecolor="#444444", label=f"old: {old_label}")]
    handles += [Patch(color=c, label=f"new, {v}") for v, c in VERDICT_COLOURS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    return fig


def _sizes(row: Mapping[str, Any]) -> str:
    """``40``, or ``38→40`` when the two versions scored a different number of rows (a warning sign in itself)."""
    n_old, n_new = row.get("n_old", "?"), row.get("n_new", "?")
    return str(n_new) if n_old == n_new else f"{n_old}→{n_new}"


def plot_slices(report: Mapping[str, Any], path: str) -> str:
    """Write the per-slice bar chart (metric ± stderr, overall line, flagged slices in red) as a PNG; return ``path``."""
    return _save(_slices_figure(report), path)


def plot_compare(report: Mapping[str, Any], path: str) -> str:
    """Write the old-versus-new chart of ``report["compare"]`` as a PNG; return ``path``. ValueError without a comparison."""
    return _save(_compare_figure(report), path)


# ---------------------------------------------------------------- HTML


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222;max-width:70em}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.flagged td{background:#fdecea}td.flag{color:#b00;font-weight:bold}
td.worse{color:#b00;font-weight:bold}td.better{color:#1a7f1a}td.same{color:#777}
code{font-family:ui-monospace,monospace;font-size:12px}.d{color:#555;max-width:30em}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}figure{margin:1em 0}
"""


def _worst_first(rows: list[Mapping[str, Any]], higher_is_better: bool) -> list[Mapping[str, Any]]:
    """Regressions on top: by verdict (worse, same, better), then by how far the change went the wrong way.

    For a lower-is-better metric a rise is the bad direction, so the sort
    follows the direction, not the raw sign; rows without a delta close their group.
    """
    def key(r: Mapping[str, Any]) -> tuple:
        d = _num(r.get("delta"))
        badness = 0.0 if d is None else (-d if higher_is_better else d)
        return (_VERDICT_RANK.get(str(r.get("verdict")), 1), d is None, -badness)

    return sorted(rows, key=key)


def _data_uri(path: str) -> str:
    """The file as a ``data:`` URI, so the page carries its images with it."""
    with open(path, "rb") as f:
        data = f.read()
    mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else (mimetypes.guess_type(path)[0] or "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def render_html(report: Mapping[str, Any], images: Mapping[str, str] | None = None) -> str:
    """The page as a string: summary, slice table, comparison (worst first), then the images inlined. Every report string is escaped."""
    e = lambda v: html.escape("" if v is None else str(v))  # noqa: E731
    hib = _higher_is_better(report)
    overall = report.get("overall") or {}
    slices = list(report.get("slices") or [])
    title = f"fmhub eval: {e(report.get('eval'))}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{title}</h1>", "<table>",
             f"<tr><th>model</th><td><code>{e(report.get('model'))}</code></td></tr>"]
    if report.get("adapter"):
        parts.append(f"<tr><th>adapter</th><td><code>{e(report.get('adapter'))}</code></td></tr>")
    parts += [f"<tr><th>revision</th><td><code>{e(report.get('rev') or 'work tree')}</code></td></tr>",
              f"<tr><th>task</th><td>{e(report.get('task'))}</td></tr>",
              f"<tr><th>metric</th><td>{e(report.get('metric'))} ({'higher' if hib else 'lower'} is better)</td></tr>",
              f"<tr><th>rows</th><td class=n>{e(report.get('rows'))}</td></tr>",
              f"<tr><th>overall</th><td class=n>{_fmt(overall.get('value'))} ± {_fmt(overall.get('stderr'))} "
              f"(n={e(overall.get('n'))})</td></tr>"]
    flagged = [s for s in slices if s.get("flagged")]
    parts.append(f"<tr><th>slices</th><td>{len(slices)} declared, {len(flagged)} flagged</td></tr>")
    for name, c in (report.get("clusters") or {}).items():  # which model's embeddings a cluster slice was fitted on
        parts.append(f"<tr><th>clusters {e(name)}</th><td>fitted on {e(c.get('reference'))} ({e(c.get('rows'))} rows placed)</td></tr>")
    parts.append("</table>")

    parts.append("<h2>Slices</h2>")
    if not slices:
        parts.append("<p>No slices declared: only the overall metric.</p>")
    else:
        rest = any("rest" in s for s in slices)  # the value on the other rows, which flagging compares against
        parts.append("<p>gap = slice value − overall value; flagged = significantly worse than the rest of the rows.</p>")
        parts.append(f"<table><tr><th>slice</th><th>kind</th><th>description</th><th>n</th><th>{e(report.get('metric'))}</th>"
                     f"<th>± stderr</th><th>gap</th>{'<th>rest</th>' if rest else ''}<th>flagged</th></tr>")
        for s in slices:
            flag = bool(s.get("flagged"))
            parts.append(f"<tr{' class=flagged' if flag else ''}><td>{e(s.get('name'))}</td><td>{e(s.get('kind'))}</td>"
                         f"<td class=d>{e(s.get('description'))}</td><td class=n>{e(s.get('n'))}</td>"
                         f"<td class=n>{_fmt(s.get('value'))}</td><td class=n>{_fmt(s.get('stderr'))}</td>"
                         f"<td class=n>{_fmt(s.get('gap'), sign=True)}</td>"
                         + (f"<td class=n>{_fmt(s.get('rest'))}</td>" if rest else "") +
                         f"<td class=flag>{'⚑ failing' if flag else ''}</td></tr>")
        parts.append("</table>")

    comp = report.get("compare")
    if comp:
        old, new = comp.get("old") or {}, comp.get("new") or {}

        def side(x: Mapping[str, Any]) -> str:
            what = e(x.get("model") or "") + (f" @ {e(str(x['rev'])[:12])}" if x.get("rev") else "")
            return f"<b>{e(x.get('label'))}</b>" + (f" (<code>{what}</code>)" if what else "")

        rows = _worst_first(list(comp.get("rows") or []), hib)
        worse = sum(1 for r in rows if r.get("verdict") == "worse")
        parts.append(f"<h2>Comparison: {worse} slice(s) worse</h2>")
        parts.append(f"<p>old {side(old)} → new {side(new)}; a change within ±{_fmt(comp.get('threshold'))} counts as same. "
                     "Worst first.</p>")
        parts.append("<table><tr><th>slice</th><th>n old</th><th>n new</th><th>old</th><th>new</th><th>delta</th><th>verdict</th></tr>")
        for r in rows:
            verdict = str(r.get("verdict") or "")
            cls = f" class={verdict}" if verdict in VERDICT_COLOURS else ""
            parts.append(f"<tr><td>{e(r.get('slice'))}</td><td class=n>{e(r.get('n_old'))}</td><td class=n>{e(r.get('n_new'))}</td>"
                         f"<td class=n>{_fmt(r.get('old'))}</td><td class=n>{_fmt(r.get('new'))}</td>"
                         f"<td class=n>{_fmt(r.get('delta'), sign=True)}</td><td{cls}>{e(verdict)}</td></tr>")
        parts.append("</table>")

    if images:
        parts.append("<h2>Charts</h2>")
        for name, path in images.items():
            parts.append(f"<figure><img alt='{e(name)}' src='{_data_uri(path)}'><figcaption>{e(name)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(report: Mapping[str, Any], path: str, images: Mapping[str, str]) -> str:
    """Write the self-contained page (see `render_html`) atomically; ``images`` maps a caption to a PNG path. Return ``path``."""
    text = render_html(report, images)
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def write_all(report: Mapping[str, Any], out_dir: str) -> dict[str, str]:
    """Write slices.png, compare.png (only with a comparison) and report.html into ``out_dir``; return their paths.

    The keys are ``slices_png``, ``compare_png`` (absent without a comparison)
    and ``html``. A compare.png left by an earlier run is removed when this
    report has no comparison, so the folder never shows a stale chart.
    """
    os.makedirs(out_dir, exist_ok=True)
    out = {"slices_png": plot_slices(report, os.path.join(out_dir, "slices.png"))}
    images = {"metric by slice": out["slices_png"]}
    compare_png = os.path.join(out_dir, "compare.png")
    if report.get("compare"):
        out["compare_png"] = plot_compare(report, compare_png)
        images["old vs new"] = out["compare_png"]
    elif os.path.exists(compare_png):
        os.unlink(compare_png)
    out["html"] = write_html(report, os.path.join(out_dir, "report.html"), images)
    return out

"""The report of a labelling run: what each function did, what the model learnt, which rows to label next.

One plain dict (`build_report`), written as JSON, or as an HTML page for a
``.html`` path (`write_report`), and shown as tables by the CLI
(`rich_tables`).
"""

from __future__ import annotations

import html
import json
from typing import Any, Mapping

from fmhub.base.atomic import atomic_write
from fmhub.data.label.model import ABSTAIN, lf_summary

TEXT_PREVIEW = 200


def build_report(prep, collected, model, proba, labelled, gold: Mapping[int, int], unmatched: int, pairs, picks,
                 preview: Mapping[int, dict], replaced: int, backend: str, seconds: Mapping[str, float]) -> dict[str, Any]:
    import numpy as np

    classes = list(prep.pipe.classes)
    L = collected.matrix
    n = len(L)
    stats = lf_summary(L, [s.name for s in prep.specs], gold=gold or None, cardinality=len(classes))
    learned = model.accuracies()
    lfs = []
    for j, (spec, st) in enumerate(zip(prep.specs, stats)):
        lfs.append({
            "name": spec.name, "kind": spec.kind,
            "coverage": st.coverage, "overlaps": st.overlaps, "conflicts": st.conflicts,
            "polarity": [classes[c] for c in st.polarity],
            "learned_accuracy": float(learned[j]), "gold_accuracy": st.accuracy,
            "weight": float(model.weights[j]),
            "group_of": prep.specs[int(model.parents[j])].name if model.parents[j] >= 0 else None,
            "errors": collected.error_counts[j],
            "first_errors": [{"position": p, "error": e} for p, e in collected.errors[j]],
        })
    silent = (L == ABSTAIN).all(1)
    silent[list(gold)] = False
    best = labelled.argmax(1)
    counts = {c: int(((best == i) & ~silent).sum()) for i, c in enumerate(classes)}
    report: dict[str, Any] = {
        "pipeline": prep.name, "input": prep.input, "output": prep.output, "report": prep.report,
        "rows": n,
        "malformed_rows": {"count": collected.malformed, "first": [{"position": p, "error": e} for p, e in collected.malformed_first]},
        "classes": classes,
        "lfs": lfs,
        "labels": {"counts": counts, "unlabelled": int(silent.sum()), "coverage": float(1 - (L == ABSTAIN).all(1).mean())},
        "label_model": {
            "kind": "dawid-skene",
            "abstains": model.mode,  # the reading used: "evidence", "votes" or "majority" (see fmhub.data.label.model)
            "iterations": model.iterations,
            "class_balance": {c: float(p) for c, p in zip(classes, model.prior)},
            # functions read as one group: a is modelled given b; kappa is their agreement beyond what the class explains
            "redundant_pairs": [{"a": prep.specs[a].name, "b": prep.specs[b].name, "kappa": round(s, 4)} for a, b, s in pairs],
            "warnings": list(model.warnings),  # what the collapse check rejected, and why
            "diagnostics": model.diagnostics,
        },
        "gold": None,
        "replaced_label_columns": replaced,
        "suggestions": [],
        "backend": backend,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    if gold:
        rows = np.fromiter(gold, dtype=np.int64)
        truth = np.fromiter(gold.values(), dtype=np.int64)
        report["gold"] = {
            "rows": len(gold), "unmatched": unmatched,
            # the model's own estimate on the gold rows (they were clamped while fitting, so this is in-sample)
            "model_accuracy": float((proba[rows].argmax(1) == truth).mean()),
        }
    for i in picks:
        pos = int(collected.positions[i])
        row = preview.get(pos, {})
        text = row.get(prep.context.column)
        report["suggestions"].append({
            "position": pos,
            **({"key": row.get(prep.key)} if prep.key else {}),
            "text": (str(text)[:TEXT_PREVIEW] if text is not None else None),
            "probs": {c: round(float(p), 4) for c, p in zip(classes, proba[i])},
            "votes": {s.name: classes[v] for s, v in zip(prep.specs, L[i]) if v != ABSTAIN},
        })
    return report


def write_report(path: str, report: Mapping[str, Any]) -> None:
    """JSON, or a self-contained HTML page when ``path`` ends in ``.html``; atomically."""
    text = render_html(report) if path.lower().endswith((".html", ".htm")) else json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    with atomic_write(path, "w") as f:
        f.write(text)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def lf_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """The LF analysis table as strings: name, polarity, coverage, overlaps, conflicts, learned acc, gold acc, errors."""
    return [[lf["name"], ",".join(lf["polarity"]), _pct(lf["coverage"]), _pct(lf["overlaps"]), _pct(lf["conflicts"]),
             _pct(lf["learned_accuracy"]), _pct(lf["gold_accuracy"]), str(lf["errors"])] for lf in report["lfs"]]


LF_HEADER = ["function", "votes", "cover", "overlap", "conflict", "acc", "gold acc", "errors"]


def class_rows(report: Mapping[str, Any]) -> list[list[str]]:
    n = report["rows"] or 1
    bal = report["label_model"]["class_balance"]
    out = [[c, str(k), _pct(k / n), _pct(bal[c])] for c, k in report["labels"]["counts"].items()]
    out.append(["(no vote)", str(report["labels"]["unlabelled"]), _pct(report["labels"]["unlabelled"] / n), ""])
    return out


CLASS_HEADER = ["class", "rows", "share", "learned prior"]


def render_html(report: Mapping[str, Any]) -> str:
    def table(header, rows):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    sugg = [[s["position"], s["text"] or "", ", ".join(f"{c} {p:.2f}" for c, p in s["probs"].items())] for s in report["suggestions"]]
    pairs = [[p["a"], p["b"], f"{p['kappa']:.2f}"] for p in report["label_model"]["redundant_pairs"]]
    parts = [
        f"<h1>fmhub label: {html.escape(report['pipeline'])}</h1>",
        f"<p>{report['rows']} rows from {html.escape(report['input'])} to {html.escape(report['output'])}; "
        f"{report['malformed_rows']['count']} malformed.</p>",
        "<h2>Labelling functions</h2>", table(LF_HEADER, lf_rows(report)),
        "<h2>Classes</h2>", table(CLASS_HEADER, class_rows(report)),
    ]
    if pairs:
        parts += ["<h2>Dependent functions (a read given b: counted as one group)</h2>", table(["a", "b", "kappa given the class"], pairs)]
    if report["label_model"].get("warnings"):
        parts += ["<h2>Label model warnings</h2>"] + [f"<p>{html.escape(w)}</p>" for w in report["label_model"]["warnings"]]
    if sugg:
        parts += ["<h2>Label these next</h2>", table(["position", "text", "probabilities"], sugg)]
    style = "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    return f"<!doctype html><meta charset=utf-8><title>fmhub label</title><style>{style}</style>" + "".join(parts) + "\n"


def rich_tables(report: Mapping[str, Any]) -> list:
    """The summary tables for the terminal."""
    from rich.table import Table

    lf = Table(title=f"labelling functions ({report['rows']} rows)")
    for i, h in enumerate(LF_HEADER):
        # names and polarities may be long: fold them; numbers never wrap
        lf.add_column(h, overflow="fold", no_wrap=False) if i < 2 else lf.add_column(h, justify="right", no_wrap=True)
    for r in lf_rows(report):
        lf.add_row(*r)
    cls = Table(*CLASS_HEADER, title="labels")
    for r in class_rows(report):
        cls.add_row(*r)
    out = [lf, cls]
    if report["suggestions"]:
        sg = Table("position", "text", "probabilities", title="label these next (then add them to the gold file)")
        for s in report["suggestions"]:
            sg.add_row(str(s["position"]), (s["text"] or "")[:80], ", ".join(f"{c} {p:.2f}" for c, p in s["probs"].items()))
        out.append(sg)
    return out

"""Rendering tensor changes (`fmhub.models.diff.TensorChange`): aligned text for git, JSON for tools.

`format_text` writes one aligned line per added, removed or changed tensor
(status, name, dtype and shape with an arrow for what changed, the numbers),
then a line counting the unchanged ones; `to_json` a dict with every tensor
and counts per status. `number_text` and `kind_text` are the pieces
``fmhub diff``'s table shares with them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any, Iterable, Sequence

from fmhub.models.diff import STATUSES, TensorChange


def number_text(x: float | None, digits: int = 4) -> str:
    """``x`` in ``digits`` significant digits; ``?`` for None (not computed), ``nan``, ``inf``, ``-inf``."""
    if x is None:
        return "?"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def shape_text(s: tuple[int, ...] | None) -> str:
    """``[d0,d1,...]``; empty for no shape (the side without the tensor)."""
    return "[" + ",".join(str(d) for d in s) + "]" if s is not None else ""


def kind_text(ch: TensorChange) -> str:
    """dtype and shape, with an arrow for what changed (``F32->BF16 [4,4]``)."""
    if ch.status == "added":
        return f"{ch.new_dtype} {shape_text(ch.new_shape)}"
    if ch.status == "removed":
        return f"{ch.old_dtype} {shape_text(ch.old_shape)}"
    dt = ch.new_dtype if ch.old_dtype == ch.new_dtype else f"{ch.old_dtype}->{ch.new_dtype}"
    sh = shape_text(ch.new_shape) if ch.old_shape == ch.new_shape else f"{shape_text(ch.old_shape)}->{shape_text(ch.new_shape)}"
    return f"{dt} {sh}"


def _frac(ch: TensorChange) -> str:
    if ch.frac_changed is None:
        return "changed=?"
    pct = 100.0 * ch.frac_changed
    text = "100" if ch.n_changed == ch.numel else (f"{pct:.3g}" if pct >= 0.001 or pct == 0 else f"{pct:.2e}")
    return f"changed={text}% ({ch.n_changed}/{ch.numel})"


def stats_text(ch: TensorChange) -> str:
    """The numbers part of one line of `format_text`."""
    if ch.withheld:
        return f"({ch.note})"
    if ch.status == "added":
        parts = [f"norm={number_text(ch.new_norm)}"]
    elif ch.status == "removed":
        parts = [f"norm={number_text(ch.old_norm)}"]
    elif ch.status == "shape":
        parts = [f"norm={number_text(ch.old_norm)}->{number_text(ch.new_norm)}"]
    elif ch.status == "unchanged":
        parts = []
    else:
        parts = []
        if ch.delta_norm is not None or ch.note is None:
            parts += [f"delta_norm={number_text(ch.delta_norm)}", f"rel={number_text(ch.rel_change)}"]
        if ch.frac_changed is not None or ch.note is None:
            parts.append(_frac(ch))
        if ch.max_abs is not None or ch.note is None:
            parts.append(f"max_abs={number_text(ch.max_abs)}")
    if ch.note:
        parts.append(f"({ch.note})")
    return "  ".join(parts)


def summarize(changes: Iterable[TensorChange]) -> tuple[int, int]:
    """(count, bytes) of the unchanged tensors."""
    same = [c for c in changes if c.status == "unchanged"]
    return len(same), sum(c.nbytes for c in same)


def unchanged_line(changes: Sequence[TensorChange]) -> str:
    from fmhub.base.units import human_bytes

    n, nbytes = summarize(changes)
    return f"{n} tensor{'' if n == 1 else 's'} unchanged ({human_bytes(nbytes)})"


def format_text(changes: Sequence[TensorChange], path: str | None = None, metadata: tuple[Any, Any] | None = None) -> str:
    """Plain text for git: one aligned line per added/removed/changed tensor, then the unchanged count.

    ``path`` is only used for the line saying nothing changed; ``metadata`` (old, new) adds a
    line when the checkpoint's ``__metadata__`` changed.
    """
    rows = [(c.status, c.name, kind_text(c), stats_text(c)) for c in changes if c.status != "unchanged"]
    lines = []
    if rows:
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        for st, name, kind, stats in rows:
            lines.append(f"{st:<{w[0]}}  {name:<{w[1]}}  {kind:<{w[2]}}  {stats}".rstrip())
    if metadata is not None and (metadata[0] or None) != (metadata[1] or None):
        fmt = lambda m: json.dumps(dict(m), sort_keys=True, ensure_ascii=False) if m else "none"  # noqa: E731
        lines.append(f"metadata  {fmt(metadata[0])} -> {fmt(metadata[1])}")
    if not rows:
        lines.append(f"no tensor changed{' in ' + path if path else ''}")
    lines.append(unchanged_line(changes))
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def change_dict(ch: TensorChange) -> dict[str, Any]:
    d = asdict(ch)
    for k in ("old_shape", "new_shape"):
        d[k] = list(d[k]) if d[k] is not None else None
    for k in ("delta_norm", "old_norm", "new_norm", "rel_change", "frac_changed", "max_abs"):
        d[k] = _num(d[k])
    return d


def to_json(changes: Sequence[TensorChange]) -> dict[str, Any]:
    """A JSON-ready dict: every tensor with its status and numbers (null: not applicable, not
    computable, or not finite), and counts per status."""
    counts = {s: 0 for s in STATUSES}
    for c in changes:
        counts[c.status] += 1
    _, nbytes = summarize(changes)
    return {"tensors": [change_dict(c) for c in changes], "counts": counts, "unchanged_bytes": nbytes}

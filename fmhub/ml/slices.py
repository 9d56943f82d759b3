"""Slices: named subsets of evaluation rows, declared in ``fmhub.yaml`` (``slices:``), and their metrics.

A slice is one filter over a row (`fmhub.project.spec.SliceSpec`): column predicates
(``where``), a regex, a labelling function's vote (``lf``), or clusters of the
evaluated model's embeddings (``clusters``). Membership is computed from the
rows alone (and, for clusters, their embeddings), so a predictions file that
stores its rows can be re-sliced later without the model.

`metrics` turns per-row scores into a metric per slice with a standard error
and flags the slices that fail: worse than the rows outside them by more than
`FLAG_MIN_GAP` and by more than two standard errors of the difference (a
small slice's noise is not a failure). `compare` does the same between two
versions of a model, row sets matched by each row's content key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from fmhub.base.errors import FmhubError
from fmhub.project.spec import LoadedSpec, SliceSpec

OPS = ("eq", "ne", "in", "not_in", "lt", "le", "gt", "ge", "contains", "exists")
FLAG_MIN_GAP = 0.05  # a slice this close to the rest is never flagged, however many rows it has
Z = 2.0  # standard errors a difference must exceed to count (about 95 %)
ALL = "(all)"


class SliceError(FmhubError):
    """A slice that cannot be computed: a bad predicate, regex or labelling function."""


# ------------------------------------------------------------------ membership


def _values(row: Mapping[str, Any], column: str) -> list[Any]:
    """A column's values: a list column (a mentions join) is its elements, a missing one nothing."""
    if column not in row or row[column] is None:
        return []
    value = row[column]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _test(op: str, arg: Any, values: list[Any]) -> bool:
    if op == "exists":
        return bool(values) == bool(arg)
    if op in ("ne", "not_in"):  # none of the values may match
        bad = [arg] if op == "ne" else list(arg)
        return all(v not in bad for v in values)
    for v in values:
        try:
            if ((op == "eq" and v == arg) or (op == "in" and v in arg) or (op == "contains" and str(arg) in str(v))
                    or (op == "lt" and v < arg) or (op == "le" and v <= arg) or (op == "gt" and v > arg) or (op == "ge" and v >= arg)):
                return True
        except TypeError:  # a string compared with a number: that row simply does not match
            continue
    return False


def _predicates(name: str, where: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """``{column: value | {op: arg, ...}}`` as (column, op, arg) triples, checked."""
    out = []
    for column, cond in where.items():
        items = cond.items() if isinstance(cond, dict) else [("eq", cond)]
        for op, arg in items:
            if op not in OPS:
                raise SliceError(f"slice {name!r}: unknown operator {op!r} for column {column!r}; use one of {', '.join(OPS)}")
            if op in ("in", "not_in") and not isinstance(arg, list):
                raise SliceError(f"slice {name!r}: {column}.{op} needs a list of values")
            out.append((str(column), op, arg))
    if not out:
        raise SliceError(f"slice {name!r}: where: needs at least one column")
    return out


@dataclass
class Sliced:
    """Each slice's member rows (a bool per row); cluster slices appear as NAME:0 .. NAME:K-1."""

    members: dict[str, list[bool]]
    kinds: dict[str, str]
    descriptions: dict[str, str]


def membership(slices: Mapping[str, SliceSpec], rows: Sequence[Mapping[str, Any]], *, text_column: str = "text",
               classes: Sequence[str] = (), loaded: Optional[LoadedSpec] = None, embeddings: Any = None,
               seed: int = 0, fixed: Optional[Mapping[str, Sequence[list[bool]]]] = None) -> Sliced:
    """Which rows each slice holds.

    :param slices: name -> `SliceSpec`, in the order reports show them.
    :param rows: the rows, as dicts (joined metadata included).
    :param text_column: the default column of regex and lf slices.
    :param classes: the task's class names: what an lf slice's function may vote (its ``vote`` is added).
    :param loaded: the spec, so errors name the slice's line in fmhub.yaml.
    :param embeddings: (rows, dim) array of the evaluated model's embeddings; needed by clusters slices.
    :param fixed: cluster slice name -> its clusters' memberships as a reference fitted them (see
        `fmhub.ml.evaluation.reference_clusters`): used as they are, not fitted again.
    :raises SliceError: a bad predicate, regex, labelling function, or clusters without embeddings.
    """
    out = Sliced({}, {}, {})
    for name, s in slices.items():
        try:
            if s.clusters is not None:
                if embeddings is None and name not in (fixed or {}):
                    raise SliceError(f"slice {name!r}: clusters need the model's embeddings; run it through fmhub eval")
                clusters = fixed[name] if name in (fixed or {}) else kmeans(embeddings, s.clusters, seed)
                for k, member in enumerate(clusters):
                    out.members[f"{name}:{k}"] = member
                    out.kinds[f"{name}:{k}"] = "cluster"
                    out.descriptions[f"{name}:{k}"] = s.description or f"cluster {k} of {s.clusters} (k-means of embeddings)"
                continue
            out.members[name] = _members(name, s, rows, text_column, classes, loaded)
        except SliceError as exc:
            if loaded is not None:
                raise loaded.error(("slices", name), str(exc)) from None
            raise
        out.kinds[name] = next(k for k in ("where", "regex", "lf") if getattr(s, k) is not None)
        out.descriptions[name] = s.description
    return out


def _members(name: str, s: SliceSpec, rows: Sequence[Mapping[str, Any]], text_column: str,
             classes: Sequence[str], loaded: Optional[LoadedSpec]) -> list[bool]:
    if s.where is not None:
        preds = _predicates(name, s.where)
        return [all(_test(op, arg, _values(row, col)) for col, op, arg in preds) for row in rows]
    column = s.column or text_column
    if s.regex is not None:
        try:
            pattern = re.compile(s.regex)
        except re.error as exc:
            raise SliceError(f"slice {name!r}: bad regex {s.regex!r} ({exc})") from None
        return [any(isinstance(v, str) and pattern.search(v) for v in _values(row, column)) for row in rows]
    return _lf_members(name, s, rows, column, classes, loaded)


def _lf_members(name: str, s: SliceSpec, rows: Sequence[Mapping[str, Any]], column: str,
                classes: Sequence[str], loaded: Optional[LoadedSpec]) -> list[bool]:
    from fmhub.plugin import host
    from fmhub.plugin.interfaces import LabelContext
    from fmhub.data.label.votes import LFSpec, configure

    step = s.lf
    kinds = host.registry("labeler")
    if step.name not in kinds:
        raise SliceError(f"slice {name!r}: unknown labelling function kind {step.name!r}; installed: {', '.join(sorted(kinds))}")
    options = dict(step.options)
    wanted = [s.vote] if s.vote else []
    label = options.get("label")
    context = LabelContext(tuple(dict.fromkeys([*classes, *wanted, *([label] if isinstance(label, str) else [])])), column,
                           loaded.root if loaded is not None else ".")
    try:
        lf = configure(LFSpec(step.name, options, name), context)
        votes = list(lf.vote(list(rows))) if rows else []
    except (FmhubError, ValueError, TypeError) as exc:
        raise SliceError(f"slice {name!r}: {exc}") from None
    return [v is not None and (s.vote is None or v == s.vote) for v in votes]


def kmeans(points: Any, k: int, seed: int = 0, iterations: int = 50) -> list[list[bool]]:
    """k-means++ then Lloyd iterations on L2-normalised points (cosine geometry); one membership list per cluster."""
    import numpy as np

    x = np.asarray(points, dtype=np.float64)
    n = len(x)
    if n == 0:
        return [[] for _ in range(k)]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, min(k, n)):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(n, p=d / d.sum())] if d.sum() > 0 else x[rng.integers(n)])
    c = np.array(centres)
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        if _ and (new == assign).all():
            break
        assign = new
        for j in range(len(c)):
            if (assign == j).any():
                c[j] = x[assign == j].mean(0)
    # clusters numbered by their smallest member row, so the numbering does not depend on the seed's draw order
    order = sorted(range(len(c)), key=lambda j: int(np.argmax(assign == j)) if (assign == j).any() else n + j)
    return [[bool(a == j) for a in assign] for j in order] + [[False] * n for _ in range(k - len(c))]


# ------------------------------------------------------------------ metrics


def _stat(scores: Sequence[float]) -> dict[str, Any]:
    n = len(scores)
    if n == 0:
        return {"n": 0, "value": None, "stderr": None}
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    return {"n": n, "value": mean, "stderr": math.sqrt(var / n)}


def _worse(a: dict, b: dict, higher_is_better: bool, min_gap: float) -> bool:
    """Is ``a`` worse than ``b`` beyond ``min_gap`` and beyond `Z` standard errors of the difference?"""
    if not a["n"] or not b["n"]:
        return False
    gap = (a["value"] - b["value"]) * (1 if higher_is_better else -1)
    se = math.sqrt((a["stderr"] or 0) ** 2 + (b["stderr"] or 0) ** 2)
    return gap < -min_gap and gap < -Z * se


def metrics(scores: Sequence[float], sliced: Sliced, higher_is_better: bool, min_rows: int = 5) -> tuple[dict, list[dict]]:
    """(overall, per slice): n, value (mean score), stderr, gap to overall, flagged (fails against the rest)."""
    overall = _stat(scores)
    out = []
    for name, member in sliced.members.items():
        inside = _stat([s for s, m in zip(scores, member) if m])
        rest = _stat([s for s, m in zip(scores, member) if not m])
        flagged = inside["n"] >= min_rows and _worse(inside, rest, higher_is_better, FLAG_MIN_GAP)
        gap = None if inside["value"] is None else inside["value"] - overall["value"]
        out.append({"name": name, "kind": sliced.kinds[name], "description": sliced.descriptions.get(name, ""), **inside,
                    "gap": gap, "rest": rest["value"], "flagged": bool(flagged)})
    return overall, out


def compare(old: Mapping[str, float], new: Mapping[str, float], members: Mapping[str, set[str]], higher_is_better: bool,
            threshold: float) -> list[dict]:
    """The regression table between two versions: per slice (and all rows) old, new, delta and a verdict.

    :param old: row key -> score under the old version; ``new`` the same under the new one.
    :param members: slice name -> the keys of its rows, in the order the table lists them.
    :param threshold: a change smaller than this (in the metric's units) is "same", as is one within `Z` standard errors.
    :return: rows {slice, n_old, n_new, old, new, delta, verdict} with verdict better | worse | same, (all) first.

    Rows both versions scored are compared pairwise (the standard error of the
    per-row differences, which is what a change on the same rows has); a slice
    whose rows differ between the versions falls back to the two means' errors.
    """
    out = []
    for name, keys in [(ALL, set(old) | set(new)), *members.items()]:
        a = _stat([old[k] for k in keys if k in old])
        b = _stat([new[k] for k in keys if k in new])
        shared = [k for k in keys if k in old and k in new]
        verdict = "same"
        if a["n"] and b["n"]:
            if len(shared) == a["n"] == b["n"] and len(shared) > 1:
                d = _stat([(new[k] - old[k]) * (1 if higher_is_better else -1) for k in shared])
                if abs(d["value"]) > threshold and abs(d["value"]) > Z * d["stderr"]:
                    verdict = "better" if d["value"] > 0 else "worse"
            elif _worse(b, a, higher_is_better, threshold):
                verdict = "worse"
            elif _worse(a, b, higher_is_better, threshold):
                verdict = "better"
        delta = None if a["value"] is None or b["value"] is None else b["value"] - a["value"]
        out.append({"slice": name, "n_old": a["n"], "n_new": b["n"], "old": a["value"], "new": b["value"], "delta": delta,
                    "verdict": verdict})
    return out

"""Labelling functions applied to batches of rows: the per-batch work of ``fmhub label``.

A pipeline's functions travel to backend workers as `LFSpec`s (plain data:
the labeler kind and its options), never as objects; each worker process
configures them once, through the plugin host, and keeps them for every
later batch. `vote_batch` is the function the backend maps over batches.

An exception from a function fails only that function on that batch: the
batch is retried row by row, each failing row recorded (position and
message) and counted as an abstain. A vote that is not a class name is
recorded the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from fmhub.plugin.interfaces import LabelContext, LabellingFunction
from fmhub.data.label.model import ABSTAIN
from fmhub.core.rows import Batch

MAX_ERRORS_KEPT = 5  # per function and batch; the report keeps the first few overall


@dataclass(frozen=True)
class LFSpec:
    """One ``lfs:`` entry: labeler kind, its options (without ``name``), display name, where it runs."""

    kind: str
    options: dict
    name: str
    in_driver: bool = False


@dataclass
class Votes:
    """One batch's votes by some functions: ``matrix`` is rows × functions (int8, -1 abstain)."""

    matrix: Any
    error_counts: list[int]
    errors: list[list[tuple[int, str]]] = field(default_factory=list)


_configured: dict[str, LabellingFunction] = {}


def configure(spec: LFSpec, context: LabelContext) -> LabellingFunction:
    """The configured function for ``spec``, made once per process (a worker reuses it for every batch)."""
    key = json.dumps([spec.kind, spec.options, context.classes, context.column, context.base_dir], sort_keys=True, default=str)
    lf = _configured.get(key)
    if lf is None:
        from fmhub.plugin import host

        lf = host.lookup("labeler", spec.kind).configure(spec.options, context)
        _configured[key] = lf
    return lf


def vote_batch(specs: Sequence[LFSpec], context: LabelContext, batch: Batch) -> Votes:
    """Every function of ``specs`` on every row of ``batch`` (the backend's per-batch function)."""
    import numpy as np

    matrix = np.full((len(batch.rows), len(specs)), ABSTAIN, dtype=np.int8)
    counts, errors = [], []
    index = {c: i for i, c in enumerate(context.classes)}
    for j, spec in enumerate(specs):
        column, errs, n_err = apply(configure(spec, context), batch, index)
        matrix[:, j] = column
        counts.append(n_err)
        errors.append(errs)
    return Votes(matrix, counts, errors)


def apply(lf: LabellingFunction, batch: Batch, index: dict[str, int]) -> tuple[list[int], list[tuple[int, str]], int]:
    """One function's votes on a batch as class indices, with its failing rows (first few) and how many failed."""
    rows = batch.rows
    try:
        votes = list(lf.vote(rows))
        if len(votes) != len(rows):
            raise ValueError(f"returned {len(votes)} votes for {len(rows)} rows")
        results: list[Any] = votes
    except Exception:
        # find the rows at fault: one at a time, each failure kept as the exception itself
        results = []
        for row in rows:
            try:
                one = list(lf.vote([row]))
                results.append(one[0] if len(one) == 1 else ValueError(f"returned {len(one)} votes for 1 row"))
            except Exception as exc:
                results.append(exc)
    out: list[int] = []
    errors: list[tuple[int, str]] = []
    n_err = 0
    for pos, v in zip(batch.positions, results):
        if v is None:
            out.append(ABSTAIN)
            continue
        if isinstance(v, str) and v in index:
            out.append(index[v])
            continue
        n_err += 1
        out.append(ABSTAIN)
        if len(errors) < MAX_ERRORS_KEPT:
            if isinstance(v, Exception):
                errors.append((pos, f"{type(v).__name__}: {v}"))
            else:
                errors.append((pos, f"voted {v!r}, which is not a class ({', '.join(index)}) or None"))
    return out, errors, n_err

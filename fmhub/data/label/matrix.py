"""The label matrix and its statistics: checks, majority vote, Snorkel-style LF analysis, pairwise redundancy.

A label matrix ``L`` (n rows × m labelling functions) holds each function's
vote for each row: a class in ``0 … k-1``, or ``ABSTAIN`` (-1). It is kept
as int8 (int16 beyond 127 classes): a million rows and fifty functions are
50 MB, and nothing here widens it whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from fmhub.base.errors import FmhubError

ABSTAIN = -1


class LabelModelError(FmhubError):
    """The label matrix cannot be modelled: wrong shape or values, or every function abstains everywhere."""


def check_matrix(L, cardinality: int):
    """``L`` as a small-integer array of shape (n, m) with values in {-1, 0, …, k-1}, or a clear error."""
    arr = np.asarray(L)
    if arr.ndim != 2:
        raise LabelModelError(f"the label matrix must be 2-D (rows × labelling functions); got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise LabelModelError(f"the label matrix must hold integers (a class, or {ABSTAIN} for abstain); got {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < ABSTAIN or hi >= cardinality:
            bad = (arr < ABSTAIN) | (arr >= cardinality)
            i, j = map(int, np.argwhere(bad)[0])
            raise LabelModelError(f"row {i}, labelling function {j}: vote {arr[i, j]} is not a class 0..{cardinality - 1} or {ABSTAIN} (abstain)")
    return arr.astype(np.int8 if cardinality <= 127 else np.int16, copy=False)


@dataclass
class LFStats:
    name: str
    coverage: float  # fraction of rows it votes on
    overlaps: float  # fraction of rows it votes on where another function votes too
    conflicts: float  # fraction of rows it votes on where another function votes differently
    polarity: list[int]  # the classes it ever votes for
    accuracy: float | None = None  # on the gold rows it votes on, when gold labels are given


def lf_summary(L, names: Sequence[str] | None = None, gold: Mapping[int, int] | None = None, cardinality: int | None = None) -> list[LFStats]:
    """Per-function coverage, overlaps and conflicts as fractions of all rows (Snorkel's LF analysis)."""
    arr = np.asarray(L)
    k = cardinality if cardinality is not None else int(arr.max(initial=0)) + 1
    arr = check_matrix(arr, k)
    n, m = arr.shape
    names = list(names) if names is not None else [f"lf{j}" for j in range(m)]
    votes = arr != ABSTAIN
    n_votes = votes.sum(1)
    per_class = np.stack([(arr == c).sum(1) for c in range(k)], 1) if n else np.zeros((0, k), np.int64)
    gold_rows = np.array([i for i in (gold or {}) if 0 <= i < n], dtype=np.int64)
    gold_cls = np.array([gold[i] for i in gold_rows], dtype=np.int64)
    out = []
    for j in range(m):
        mine = votes[:, j]
        # rows where some other function votes a class other than this one's: all votes minus those for its class
        same = per_class[np.arange(n), np.where(mine, arr[:, j], 0)]
        disagree = mine & (n_votes - same > 0)
        acc = None
        if gold_rows.size:
            hit = mine[gold_rows]
            acc = float((arr[gold_rows[hit], j] == gold_cls[hit]).mean()) if hit.any() else None
        out.append(LFStats(
            names[j], float(mine.mean()) if n else 0.0, float((mine & (n_votes > 1)).mean()) if n else 0.0,
            float(disagree.mean()) if n else 0.0, sorted(int(v) for v in np.unique(arr[mine, j])), acc,
        ))
    return out


def redundant_pairs(L, threshold: float = 0.8) -> list[tuple[int, int, float]]:
    """Pairs (j, k, c): function ``j`` votes as ``k`` does on a fraction ``c`` ≥ ``threshold`` of its own votes.

    ``j`` is the function with fewer votes (the copy, or the narrower rule).
    Agreement that ``k``'s breadth explains is not redundancy: a function
    voting on 90 % of rows agrees with most others on most of their rows. So
    a pair also needs the excess (c − coverage of k) / (1 − coverage of k) to
    be at least 1/2: ``j``'s votes fill at least half the room between chance
    and a perfect copy.
    """
    arr = np.asarray(L)
    n, m = arr.shape
    votes = arr != ABSTAIN
    counts = votes.sum(0)
    out = []
    for a in range(m):
        for b in range(a + 1, m):
            small, big = (a, b) if (counts[a], a) < (counts[b], b) else (b, a)
            if counts[small] == 0 or counts[big] == n:
                continue
            contained = float((votes[:, small] & (arr[:, small] == arr[:, big])).sum() / counts[small])
            cover = counts[big] / n
            if contained >= threshold and (contained - cover) / (1 - cover) >= 0.5:
                out.append((int(small), int(big), contained))
    return out


def redundancy_weights(m: int, pairs: Sequence[tuple[int, int, float]], threshold: float = 0.8):
    """Per function, its weight in the posterior: 1, scaled down for each function it copies (see `redundant_pairs`).

    A perfect copy (agreement 1) gets 0: it adds nothing its container did not
    say. The weight rises linearly to 1 at agreement ``threshold``, so a
    function just over the line keeps nearly all of its say.
    """
    w = np.ones(m)
    for small, _big, contained in pairs:
        w[small] *= min(1.0, max(0.0, (1.0 - contained) / max(1.0 - threshold, 1e-9)))
    return w


def majority_vote(L, cardinality: int):
    """The most common vote per row (ties and all-abstain rows: ``ABSTAIN``)."""
    arr = check_matrix(L, cardinality)
    counts = np.stack([(arr == c).sum(1) for c in range(cardinality)], 1)
    best = counts.argmax(1)
    tie = (counts == counts.max(1, keepdims=True)).sum(1) > 1
    return np.where(tie | (counts.max(1) == 0), ABSTAIN, best)

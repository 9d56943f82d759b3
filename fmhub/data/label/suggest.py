"""Active learning: which rows to label by hand next, to help the label model most.

A row is worth a person's time when the model is unsure of it (high
posterior entropy) and the functions disagree on it (a hand label there
tells the model which of them is right, which sharpens their accuracies for
every other row they vote on). Rows no function votes on count half: a label
there helps an end model, but teaches the label model nothing about the
functions. Rows with the same votes have the same posterior, so the list
takes one row per vote pattern before taking a second from any pattern:
twenty copies of one ambiguous pattern would be nineteen wasted labels.
"""

from __future__ import annotations

from typing import Iterable

from fmhub.data.label.model import ABSTAIN


def suggest(proba, L, count: int, exclude: Iterable[int] = ()) -> list[int]:
    """Up to ``count`` row indices of ``L`` to label next, best first (rows in ``exclude``, e.g. gold, are skipped)."""
    import numpy as np

    n, k = proba.shape
    if count <= 0 or n == 0:
        return []
    p = np.clip(proba, 1e-12, 1.0)
    entropy = -(p * np.log(p)).sum(1) / np.log(k)
    votes = L != ABSTAIN
    n_votes = votes.sum(1)
    top = np.stack([(L == c).sum(1) for c in range(k)], 1).max(1)
    disagreement = np.where(n_votes > 0, 1 - top / np.maximum(n_votes, 1), 0.0)
    score = entropy * (1 + disagreement) * np.where(n_votes > 0, 1.0, 0.5)
    score[list(exclude)] = -np.inf
    _, pattern = np.unique(L, axis=0, return_inverse=True)
    pattern = pattern.reshape(-1)
    # rank of each row within its vote pattern, best score first
    order = np.lexsort((-score, pattern))
    first = np.r_[True, pattern[order][1:] != pattern[order][:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - start
    chosen = np.lexsort((-score, rank))
    chosen = chosen[np.isfinite(score[chosen])]
    return [int(i) for i in chosen[:count]]

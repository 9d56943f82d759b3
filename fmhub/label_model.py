"""Weak supervision: combine noisy labelling functions into probabilistic labels, without ground truth.

A label matrix ``L`` (n rows × m labelling functions) holds each function's
vote for each row: a class in ``0 … k-1``, or ``ABSTAIN`` (-1). `LabelModel`
is the Dawid–Skene generative model fitted by EM: a class prior π and, per
function j, a confusion matrix θⱼ[c, v] = P(function j outputs v | true class
c), where v ranges over the k classes *and abstain*, so a function that fires
mostly for one class (a keyword rule) tells the model something even when it
abstains. Functions are assumed independent given the class (the model's one
simplification, shared with Snorkel's default); Dirichlet pseudo-counts keep
rare outcomes from getting probability 0.

Why Dawid–Skene rather than a dependency on ``snorkel``: it is ~100 lines of
numpy, has no heavy or pinned dependencies, and learns per-class accuracies
(θ is a full confusion matrix) rather than one accuracy per function; the
benchmark compares it with snorkel's LabelModel on the same functions.

`lf_summary` gives Snorkel-style statistics per function: coverage, overlaps,
conflicts, and (when gold labels are known) empirical accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from fmhub.errors import FmhubError

ABSTAIN = -1


class LabelModelError(FmhubError):
    """The label matrix cannot be modelled: wrong shape or values, or every function abstains everywhere."""


def _np():
    import numpy as np

    return np


def check_matrix(L, cardinality: int):
    """``L`` as an int64 array of shape (n, m) with values in {-1, 0, …, k-1}, or a clear error."""
    np = _np()
    arr = np.asarray(L)
    if arr.ndim != 2:
        raise LabelModelError(f"the label matrix must be 2-D (rows × labelling functions); got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise LabelModelError(f"the label matrix must hold integers (a class, or {ABSTAIN} for abstain); got {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = (arr < ABSTAIN) | (arr >= cardinality)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise LabelModelError(f"row {i}, labelling function {j}: vote {arr[i, j]} is not a class 0..{cardinality - 1} or {ABSTAIN} (abstain)")
    return arr


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
    np = _np()
    arr = np.asarray(L, dtype=np.int64)
    arr = check_matrix(arr, cardinality if cardinality is not None else int(arr.max(initial=0)) + 1)
    n, m = arr.shape
    names = list(names) if names is not None else [f"lf{j}" for j in range(m)]
    votes = arr != ABSTAIN
    n_votes = votes.sum(1)
    out = []
    for j in range(m):
        mine = votes[:, j]
        others = np.where(votes, arr, ABSTAIN)
        others[:, j] = ABSTAIN
        disagree = ((others != ABSTAIN) & (others != arr[:, [j]])).any(1)
        acc = None
        if gold:
            rows = [i for i in gold if 0 <= i < n and mine[i]]
            acc = float(np.mean([arr[i, j] == gold[i] for i in rows])) if rows else None
        out.append(LFStats(
            names[j], float(mine.mean()) if n else 0.0, float((mine & (n_votes > 1)).mean()) if n else 0.0,
            float((mine & disagree).mean()) if n else 0.0, sorted(int(v) for v in np.unique(arr[mine, j])), acc,
        ))
    return out


def majority_vote(L, cardinality: int):
    """The most common vote per row (ties and all-abstain rows: ``ABSTAIN``)."""
    np = _np()
    arr = check_matrix(L, cardinality)
    counts = np.stack([(arr == c).sum(1) for c in range(cardinality)], 1)
    best = counts.argmax(1)
    tie = (counts == counts.max(1, keepdims=True)).sum(1) > 1
    return np.where(tie | (counts.max(1) == 0), ABSTAIN, best)


class LabelModel:
    """Dawid–Skene label model fitted by EM (see the module docstring)."""

    def __init__(self, cardinality: int = 2, max_iter: int = 500, tol: float = 1e-7, pseudo_count: float = 1.0) -> None:
        if cardinality < 2:
            raise LabelModelError("a label model needs at least two classes")
        self.k = cardinality
        self.max_iter, self.tol, self.alpha = max_iter, tol, pseudo_count
        self.prior = None  # π, shape (k,)
        self.confusion = None  # θ, shape (m, k, k+1): the last column is abstain
        self.iterations = 0

    def fit(self, L, gold: Mapping[int, int] | None = None, class_balance: Sequence[float] | None = None) -> "LabelModel":
        """Learn the prior and each function's confusion matrix from ``L``.

        :param gold: known labels of some rows (row -> class): clamped during EM, which anchors the estimate.
        :param class_balance: a known class prior; learnt from the data when not given.
        """
        np = _np()
        arr = check_matrix(L, self.k)
        n, m = arr.shape
        if n == 0 or m == 0:
            raise LabelModelError("the label matrix is empty: no rows or no labelling functions")
        if (arr == ABSTAIN).all():
            raise LabelModelError("every labelling function abstains on every row: there is nothing to learn from")
        fixed_prior = None
        if class_balance is not None:
            fixed_prior = np.asarray(class_balance, dtype=np.float64)
            if fixed_prior.shape != (self.k,) or (fixed_prior <= 0).any():
                raise LabelModelError(f"class_balance must be {self.k} positive numbers")
            fixed_prior = fixed_prior / fixed_prior.sum()
        onehot = self._onehot(arr)  # (n, m, k+1)
        gold_rows = np.array(sorted(gold), dtype=np.int64) if gold else np.empty(0, np.int64)
        gold_cls = np.array([gold[i] for i in gold_rows], dtype=np.int64) if gold else np.empty(0, np.int64)
        if gold_rows.size and ((gold_rows < 0).any() or (gold_rows >= n).any() or (gold_cls < 0).any() or (gold_cls >= self.k).any()):
            raise LabelModelError("a gold label names a row or class outside the label matrix")
        post = self._initial_posterior(arr)
        prev = -np.inf
        for it in range(1, self.max_iter + 1):
            post[gold_rows] = np.eye(self.k)[gold_cls]
            prior = fixed_prior if fixed_prior is not None else (post.sum(0) + self.alpha) / (n + self.alpha * self.k)
            counts = np.einsum("ic,ijv->jcv", post, onehot) + self.alpha  # (m, k, k+1)
            confusion = counts / counts.sum(2, keepdims=True)
            log_joint = np.log(prior)[None, :] + np.einsum("ijv,jcv->ic", onehot, np.log(confusion))
            top = log_joint.max(1, keepdims=True)
            ll = float((top[:, 0] + np.log(np.exp(log_joint - top).sum(1))).sum())
            post = np.exp(log_joint - top)
            post /= post.sum(1, keepdims=True)
            self.iterations = it
            if ll - prev < self.tol * max(1.0, abs(ll)):
                break
            prev = ll
        self.prior, self.confusion = prior, confusion
        return self

    def _onehot(self, arr):
        np = _np()
        idx = np.where(arr == ABSTAIN, self.k, arr)
        return np.eye(self.k + 1)[idx]

    def _initial_posterior(self, arr):
        np = _np()
        counts = np.stack([(arr == c).sum(1) for c in range(self.k)], 1).astype(np.float64) + 0.1
        return counts / counts.sum(1, keepdims=True)

    def predict_proba(self, L):
        """P(class | votes) per row, shape (n, k).

        Abstains count as evidence: a row where every function abstains gets
        P(class | all abstained), not the bare prior, since a rule that fires
        mostly for one class says something by staying silent.
        """
        np = _np()
        if self.confusion is None:
            raise LabelModelError("fit the label model first")
        arr = check_matrix(L, self.k)
        if arr.shape[1] != self.confusion.shape[0]:
            raise LabelModelError(f"fitted on {self.confusion.shape[0]} labelling functions, given {arr.shape[1]}")
        log_joint = np.log(self.prior)[None, :] + np.einsum("ijv,jcv->ic", self._onehot(arr), np.log(self.confusion))
        p = np.exp(log_joint - log_joint.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    def predict(self, L):
        return self.predict_proba(L).argmax(1)

    def accuracies(self):
        """Each function's estimated accuracy when it votes: Σ_c π_c θ[c, c] / Σ_c π_c (1 − θ[c, abstain])."""
        np = _np()
        diag = np.einsum("c,jcc->j", self.prior, self.confusion[:, :, : self.k])
        fires = np.einsum("c,jc->j", self.prior, 1 - self.confusion[:, :, self.k])
        return diag / np.maximum(fires, 1e-12)

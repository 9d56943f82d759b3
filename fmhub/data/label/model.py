"""Weak supervision: combine noisy labelling functions into probabilistic labels, without ground truth.

A label matrix ``L`` (n rows × m labelling functions) holds each function's
vote for each row: a class in ``0 … k-1``, or ``ABSTAIN`` (-1). `LabelModel`
learns a class prior π and how far each function can be trusted, by EM
(Dawid–Skene), and combines the votes of each row into P(class | votes). It
has two ways to read a function, and by default picks between them:

``evidence``
    The Dawid–Skene generative model with abstain as one more outcome: per
    function j a confusion matrix θⱼ[c, v] = P(j outputs v | true class c),
    v over the k classes *and abstain*. A rule that fires mostly for one class
    (a keyword) says something even by staying silent. It is the most
    informative reading, and the most fragile: it assumes the functions fire
    independently given the class, and when they do not (every function
    fires more on long texts, two rules share their words), EM is free to
    explain *when functions fire* by a latent variable that is not the label,
    and it will, with confidence.
``votes``
    Abstains carry no evidence: per function j and class v it votes, the
    precision Qⱼ[v, c] = P(true class c | j votes v), learnt by EM from how
    the function's votes agree with the combined posterior of every row it
    votes on, and held at least at the base rate and at 1/k (Qⱼ[v, v] ≥
    max(π_v, 1/k): a function is no worse than chance, the assumption Snorkel
    makes too; the 1/k keeps EM from collapsing the prior onto one class). A vote v
    multiplies the odds of class c by Qⱼ[v, c] / π_c. It needs only that the
    functions' *errors* are independent given the class, not their firing.
``auto`` (default)
    Fits ``evidence`` and keeps it if every function comes out better than
    chance for each class it votes; otherwise (the sign that the latent
    variable is not the label) refits with ``votes``. ``mode`` says which.

Why this and not a dependency on ``snorkel``: it is ~200 lines of numpy with no
heavy or pinned dependencies, learns per-class parameters, anchors on gold
labels by clamping them in EM, and, on the benchmark (benchmarks/label_bench.py,
reviews whose functions fire more on longer texts and include a rule's narrower
copy), snorkel's LabelModel ends up worse than majority vote while this does
not.

`lf_summary` gives Snorkel-style statistics per function: coverage, overlaps,
conflicts, and (when gold labels are known) empirical accuracy.

**Correlated functions.** Conditional independence is what lets a model
learn accuracies without labels, and what a copied rule breaks: two functions
that always vote together count as two independent witnesses, so their shared
errors outvote a third, better function. Snorkel models such dependencies
when it is told the graph; here `redundant_pairs` finds them from the votes:
a function that votes with another on nearly all of its own votes (a copy, or
a narrower variant of a rule), far more often than the other's coverage
explains. `redundancy_weights` then gives the contained function a weight
near 0 in the posterior (it adds nothing its container did not say), so the
evidence counts once; its own parameters are still learnt and reported. The
pipelines report the pairs found.

**Scale.** Rows with the same votes have the same posterior, so EM runs on
the distinct vote patterns with their counts (a few thousand at most for a
dozen functions, however many rows), and on gold rows individually.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from fmhub.base.errors import FmhubError

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
    np = _np()
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
    np = _np()
    w = np.ones(m)
    for small, _big, contained in pairs:
        w[small] *= min(1.0, max(0.0, (1.0 - contained) / max(1.0 - threshold, 1e-9)))
    return w


def majority_vote(L, cardinality: int):
    """The most common vote per row (ties and all-abstain rows: ``ABSTAIN``)."""
    np = _np()
    arr = check_matrix(L, cardinality)
    counts = np.stack([(arr == c).sum(1) for c in range(cardinality)], 1)
    best = counts.argmax(1)
    tie = (counts == counts.max(1, keepdims=True)).sum(1) > 1
    return np.where(tie | (counts.max(1) == 0), ABSTAIN, best)


MODES = ("auto", "evidence", "votes")


class LabelModel:
    """Dawid–Skene label model fitted by EM, reading abstains as evidence or not (see the module docstring)."""

    def __init__(self, cardinality: int = 2, max_iter: int = 500, tol: float = 1e-7, pseudo_count: float = 1.0,
                 abstains: str = "auto") -> None:
        if cardinality < 2:
            raise LabelModelError("a label model needs at least two classes")
        if abstains not in MODES:
            raise LabelModelError(f"abstains must be one of {', '.join(MODES)}, not {abstains!r}")
        self.k = cardinality
        self.max_iter, self.tol, self.alpha, self.abstains = max_iter, tol, pseudo_count, abstains
        self.mode = None  # the reading used: "evidence" or "votes"
        self.prior = None  # π, shape (k,)
        self.confusion = None  # evidence: θ, shape (m, k, k+1), the last column is abstain
        self.precision = None  # votes: Q, shape (m, k, k): Q[j, v, c] = P(class c | j votes v)
        self.weights = None  # per function, its vote's weight in the posterior
        self.iterations = 0
        self._loglik = None  # (m, k, k+1): what each outcome v adds to log P(class c), before weighting
        self._vote_freq = None  # (m, k): how often each function votes each class

    def fit(self, L, gold: Mapping[int, int] | None = None, class_balance: Sequence[float] | None = None,
            weights: Sequence[float] | None = None) -> "LabelModel":
        """Learn the prior and each function's parameters from ``L``.

        :param gold: known labels of some rows (row -> class): clamped during EM, which anchors the estimate.
        :param class_balance: a known class prior; learnt from the data when not given.
        :param weights: per function, how much its vote counts in the posterior (see `redundancy_weights`); default 1.
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
        self.weights = self._check_weights(weights, m)
        gold_rows = np.array(sorted(gold), dtype=np.int64) if gold else np.empty(0, np.int64)
        gold_cls = np.array([gold[i] for i in gold_rows], dtype=np.int64) if gold else np.empty(0, np.int64)
        if gold_rows.size and ((gold_rows < 0).any() or (gold_rows >= n).any() or (gold_cls < 0).any() or (gold_cls >= self.k).any()):
            raise LabelModelError("a gold label names a row or class outside the label matrix")
        # EM over distinct vote patterns (weighted by how many rows have each), gold rows one by one
        free = np.ones(n, bool)
        free[gold_rows] = False
        patterns, counts = np.unique(arr[free], axis=0, return_counts=True) if free.any() else (np.empty((0, m), np.int64), np.empty(0, np.int64))
        X = np.concatenate([patterns, arr[gold_rows]]).astype(np.int64)
        w = np.concatenate([counts, np.ones(gold_rows.size)]).astype(np.float64)
        idx = np.where(X == ABSTAIN, self.k, X)
        self._vote_freq = np.stack([np.bincount(idx[:, j], weights=w, minlength=self.k + 1)[: self.k] for j in range(m)]) / n
        clamp = (len(patterns), np.eye(self.k)[gold_cls])
        if self.abstains in ("auto", "evidence"):
            self._em(idx, w, clamp, fixed_prior, "evidence")
            if self.abstains == "evidence" or self._plausible():
                return self
        self._em(idx, w, clamp, fixed_prior, "votes")
        return self

    def _em(self, idx, w, clamp, fixed_prior, mode: str) -> None:
        np = _np()
        n, k = w.sum(), self.k
        post = self._initial_posterior(idx)
        start, known = clamp
        for it in range(1, self.max_iter + 1):
            post[start:] = known
            prior = fixed_prior if fixed_prior is not None else (w @ post + self.alpha) / (n + self.alpha * k)
            wp = post * w[:, None]
            # (m, k, k+1): expected count of rows of class c where function j output v (v = k: abstain)
            counts = np.stack([np.stack([np.bincount(col, weights=wp[:, c], minlength=k + 1) for c in range(k)]) for col in idx.T])
            loglik = self._evidence_params(counts) if mode == "evidence" else self._votes_params(counts, prior)
            log_joint = self._log_joint(idx, prior, loglik)
            new = np.exp(log_joint - log_joint.max(1, keepdims=True))
            new /= new.sum(1, keepdims=True)
            self.iterations = it
            done = np.abs(new - post).max() < self.tol * 10 if it > 1 else False
            post = new
            if done:
                break
        self.mode, self.prior, self._loglik = mode, prior, loglik

    def _evidence_params(self, counts):
        np = _np()
        counts = counts + self.alpha
        self.confusion = counts / counts.sum(2, keepdims=True)
        self.precision = None
        return np.log(self.confusion)

    def _votes_params(self, counts, prior):
        np = _np()
        k = self.k
        # Q[j, v, c] = P(class c | j votes v), smoothed towards the prior by alpha*k pseudo-rows
        votes = counts[:, :, :k].transpose(0, 2, 1) + self.alpha * k * prior[None, None, :]
        Q = votes / votes.sum(2, keepdims=True)
        for v in range(k):
            # no worse than chance: lift Q[j, v, v] to the base rate π_v, and to 1/k, so that a vote is never
            # evidence against its own class (1/k keeps the prior from collapsing onto one class: against a
            # prior of 0.999 every rule for the other class would pass as "better than chance"), shrinking the rest
            floor = max(prior[v], 1.0 / k)
            low = Q[:, v, v] < floor
            if low.any():
                rest = Q[low, v].copy()
                rest[:, v] = 0
                rest *= (1 - floor) / np.maximum(rest.sum(1, keepdims=True), 1e-300)
                rest[:, v] = floor
                Q[low, v] = rest
        self.precision, self.confusion = Q, None
        loglik = np.zeros((Q.shape[0], k, k + 1))
        loglik[:, :, :k] = (np.log(Q) - np.log(prior)[None, None, :]).transpose(0, 2, 1)  # abstain (v = k) adds 0
        return loglik

    def _plausible(self) -> bool:
        """Whether no function that counts is clearly worse than chance for a class it votes, under the evidence fit.

        "Clearly": its vote for v at least halves the odds of v against the base
        rate. Real rules hover near chance (a broad keyword may be right a little
        less often than the base rate); a fit that has latched onto something
        other than the label makes whole groups of rules anti-informative.
        """
        np = _np()
        k = self.k
        # P(class v | j votes v) = π_v θ[j, v, v] / Σ_c π_c θ[j, c, v], against the base rate π_v
        joint = self.prior[None, :, None] * self.confusion[:, :, :k]  # (m, c, v)
        hit = np.clip(np.einsum("jvv->jv", joint) / np.maximum(joint.sum(1), 1e-300), 1e-12, 1 - 1e-12)
        base = np.broadcast_to(self.prior, hit.shape)
        odds_ratio = (hit / (1 - hit)) / (base / (1 - base))
        counts = (self._vote_freq > 0) & (self.weights[:, None] > 0)
        return bool((odds_ratio[counts] >= 0.5).all())

    def _check_weights(self, weights, m: int):
        np = _np()
        if weights is None:
            return np.ones(m)
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (m,) or (w < 0).any():
            raise LabelModelError(f"weights must be {m} non-negative numbers, one per labelling function")
        return w

    def _log_joint(self, idx, prior, loglik):
        """log π_c + Σ_j w_j loglik_j[c, v_ij] for each row of ``idx`` (votes with abstain as class k)."""
        np = _np()
        out = np.tile(np.log(prior), (len(idx), 1))
        for j in range(idx.shape[1]):
            out += self.weights[j] * loglik[j][:, idx[:, j]].T
        return out

    def _initial_posterior(self, idx):
        np = _np()
        counts = np.stack([(idx == c).sum(1) for c in range(self.k)], 1).astype(np.float64) + 0.1
        return counts / counts.sum(1, keepdims=True)

    def predict_proba(self, L):
        """P(class | votes) per row, shape (n, k).

        In the evidence reading, abstains count: a row where every function
        abstains gets P(class | all abstained), not the bare prior, since a
        rule that fires mostly for one class says something by staying silent.
        In the votes reading it gets the prior.
        """
        np = _np()
        if self._loglik is None:
            raise LabelModelError("fit the label model first")
        arr = check_matrix(L, self.k)
        if arr.shape[1] != self._loglik.shape[0]:
            raise LabelModelError(f"fitted on {self._loglik.shape[0]} labelling functions, given {arr.shape[1]}")
        if not len(arr):
            return np.empty((0, self.k))
        patterns, inverse = np.unique(arr, axis=0, return_inverse=True)
        log_joint = self._log_joint(np.where(patterns == ABSTAIN, self.k, patterns), self.prior, self._loglik)
        p = np.exp(log_joint - log_joint.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True))[inverse.reshape(-1)]

    def predict(self, L):
        return self.predict_proba(L).argmax(1)

    def accuracies(self):
        """Each function's estimated accuracy when it votes: P(its vote is the true class | it votes)."""
        np = _np()
        if self.mode == "evidence":
            diag = np.einsum("c,jcc->j", self.prior, self.confusion[:, :, : self.k])
            fires = np.einsum("c,jc->j", self.prior, 1 - self.confusion[:, :, self.k])
            return diag / np.maximum(fires, 1e-12)
        hit = np.einsum("jvv->jv", self.precision)
        return (hit * self._vote_freq).sum(1) / np.maximum(self._vote_freq.sum(1), 1e-12)

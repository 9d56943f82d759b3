"""Weak supervision: combine noisy labelling functions into probabilistic labels, without ground truth.

A label matrix ``L`` (n rows × m labelling functions) holds each function's
vote for each row: a class in ``0 … k-1``, or ``ABSTAIN`` (-1). `LabelModel`
learns a class prior π and, per function, the distribution of its output
given the class (Dawid–Skene, fitted by EM from a majority-vote start), and
combines the votes of each row into P(class | votes).

**Two readings of a function.**

``evidence``
    Abstain is one more outcome: θⱼ[c, v] = P(j outputs v | class c), v over
    the k classes and abstain. A rule that fires mostly for one class (a
    keyword) says something even by staying silent. The most informative
    reading, and the most fragile: when functions fire together for a reason
    that is not the label (all fire more on long texts), EM can explain the
    firing by a latent variable that is not the label.
``votes``
    The same parameters, but silence is no evidence: a vote v multiplies the
    odds of class c by P(v | c) / P(v), an abstain by 1. A function that
    votes two classes or more is read by P(v | c, it votes): when it fires is
    no evidence either, only what it says. A function that votes one class
    (a keyword rule) keeps P(v | c), or it would say nothing at all.

Neither reading floors a function at chance: a function that is right less
often than chance comes out with a confusion matrix whose votes point away
from the class they name, and counts as evidence *against* it (a negative
weight), in both readings.

**Dependencies** (`fmhub.data.label.structure`): pairs of functions that agree
beyond what the class explains (a kappa given the class, from the votes) are
grouped, and each member of a group is modelled given the group's broadest
member, so a group of near-copies counts once. ``dependencies=None``
assumes independence.

**One-class functions.** When every function votes a single class, the votes
say only *when* functions fire, and whatever makes them fire together can
pass for the label; EM's expected counts then keep a tenth (`ANCHOR`) of
majority vote's, which holds the fit near the label without fixing it there.

**Collapse check** (`fmhub.data.label.collapse`, with ``abstains="auto"``):
a fitted reading can still latch onto something that is not the label.
Both readings are fitted and scored, with majority vote, by how well each
predicts every function's vote from the other functions' votes; the best
is used (``votes`` on a tie, then ``evidence``, then majority vote). When
every function votes one class only, a reading is rejected if it strays
from majority vote or reads a rule as evidence against its own class. Each
reading rejected as collapsed gets a sentence in ``warnings`` (`fmhub label`
reports and prints them); ``mode`` says what was used: "evidence", "votes"
or "majority"; ``diagnostics`` holds the scores.

**Scale.** Rows with the same votes have the same posterior, so EM runs on
the distinct vote patterns with their counts; beyond `SAMPLE_ROWS` distinct
patterns EM runs on a sample of that many rows and finishes with one step
on every pattern (see `fmhub.data.label.em`); memory stays a small multiple
of the int8 label matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fmhub.data.label import em
from fmhub.data.label.matrix import (ABSTAIN, LabelModelError, LFStats, check_matrix, lf_summary, majority_vote,
                                     redundancy_weights, redundant_pairs)

__all__ = ["ABSTAIN", "LabelModel", "LabelModelError", "LFStats", "check_matrix", "lf_summary", "majority_vote",
           "redundancy_weights", "redundant_pairs", "MODES"]

MODES = ("auto", "evidence", "votes")
SAMPLE_ROWS = 100_000  # EM on a sample of this many rows when there are more distinct patterns than this
FIRING_FREE = True  # in the votes reading, functions voting two classes or more: their firing is no evidence
ANCHOR = 0.1  # one-class functions only: EM's counts are pulled towards majority vote's by this share (see _em)
STRUCTURE_TOL = 1e-5  # the independent fit behind the dependency search needs a fair posterior, not a converged one


@dataclass
class Fit:
    """One reading's EM result on the fitting patterns."""

    reading: str
    prior: Any  # (k,)
    logp: Any  # (m, k, (k+1)²): log P(outcome code | class), abstain 0 in the votes reading
    counts: Any  # (m, k, (k+1)²): expected counts from the last E-step
    post: Any  # (p, k) on the fitting patterns
    iterations: int = 0
    notes: dict = field(default_factory=dict)


class LabelModel:
    """Dawid–Skene label model with learnt dependencies, two readings of abstains, and a collapse check."""

    def __init__(self, cardinality: int = 2, max_iter: int = 500, tol: float = 1e-7, pseudo_count: float = 1.0,
                 abstains: str = "auto", dependencies: Optional[float] = 0.7) -> None:
        """:param dependencies: the kappa given the class above which two functions are grouped (see
        `fmhub.data.label.structure`); None to assume every function independent."""
        if cardinality < 2:
            raise LabelModelError("a label model needs at least two classes")
        if abstains not in MODES:
            raise LabelModelError(f"abstains must be one of {', '.join(MODES)}, not {abstains!r}")
        if dependencies is not None and not 0 < float(dependencies) <= 1:
            raise LabelModelError("dependencies must be a kappa threshold in (0, 1], or None")
        self.k = cardinality
        self.max_iter, self.tol, self.alpha, self.abstains = max_iter, tol, pseudo_count, abstains
        self.dependencies = dependencies
        self.mode: Optional[str] = None  # the reading used: "evidence", "votes" or "majority"
        self.prior = None  # π, shape (k,)
        self.confusion = None  # (m, k, k+1): P(output v | class c), v = k is abstain
        self.weights = None  # per function, its weight in the posterior (given, default 1)
        self.parents = None  # per function, the function it is modelled given (-1: none)
        self.groups: list[list[int]] = []  # dependent groups found, each [root, members...]
        self.kappa = None  # (m, m): agreement beyond the class, per pair
        self.warnings: list[str] = []  # what the collapse check found, in words
        self.diagnostics: dict = {}  # per reading: agreement with majority vote and the other reading
        self.iterations = 0
        self._logp = None
        self._acc = None
        self._one_class = False
        self._polar = None

    # ----------------------------------------------------------------------------------- fitting

    def fit(self, L, gold: Mapping[int, int] | None = None, class_balance: Sequence[float] | None = None,
            weights: Sequence[float] | None = None) -> "LabelModel":
        """Learn the prior, the dependencies and each function's parameters from ``L``.

        :param gold: known labels of some rows (row -> class): clamped during EM, which anchors the estimate.
        :param class_balance: a known class prior; learnt from the data when not given.
        :param weights: per function, how much its vote counts in the posterior; default 1.
        """
        from fmhub.data.label import collapse

        arr = check_matrix(L, self.k)
        n, m = arr.shape
        if n == 0 or m == 0:
            raise LabelModelError("the label matrix is empty: no rows or no labelling functions")
        if not (arr != ABSTAIN).any():
            raise LabelModelError("every labelling function abstains on every row: there is nothing to learn from")
        fixed_prior = self._check_prior(class_balance)
        self.weights = self._check_weights(weights, m)
        everything, (X, w, clamp) = self._fitting_patterns(arr, gold)
        q0 = mv_posterior(X, self.k)
        self._polar = polar(X, w, self.k)
        self._one_class = not self._polar.any()
        self.parents, self.groups, self.kappa = np.full(m, -1, np.int64), [], np.zeros((m, m))
        if self.dependencies is not None:
            self._learn_structure(X, w, clamp, fixed_prior, q0)
        codes = em.Codes(em.outcome_codes(X, self.k, self.parents), self.k)
        readings = ("evidence", "votes") if self.abstains == "auto" else (self.abstains,)
        fits = {r: self._em(codes, w, clamp, fixed_prior, r, q0.copy()) for r in readings}
        fits["majority"] = self._majority_fit(codes, w, q0, fixed_prior)
        for f in fits.values():
            if f.reading != "majority":
                collapse.align(f, X, w, self.k)
        chosen, self.warnings, self.diagnostics = collapse.choose(fits, codes, X, w, self.parents, self.weights, self.k, self.abstains)
        if len(everything[0]) > len(X):
            chosen = self._polish(everything, chosen, fixed_prior)
        self._keep(chosen)
        return self

    def _learn_structure(self, X, w, clamp, fixed_prior, q0) -> None:
        """Group dependent functions (see `fmhub.data.label.structure`), from kappas given the class as an
        independent evidence fit reads it and as majority vote does, the larger of the two."""
        from fmhub.data.label import structure

        m = X.shape[1]
        codes = em.Codes(em.outcome_codes(X, self.k, self.parents), self.k)
        q = self._em(codes, w, clamp, fixed_prior, "evidence", q0.copy(), tol=max(self.tol, STRUCTURE_TOL)).post
        # agreement beyond the class as majority vote reads it, or as the fit does: a group the fit latched onto
        # looks independent given the fit's "class" (it is that class), never given majority vote's
        self.kappa = np.maximum(structure.conditional_kappa(X, w, q, self.k), structure.conditional_kappa(X, w, q0, self.k))
        found = structure.groups(self.kappa, float(self.dependencies))
        self.parents = structure.parents_of(found, (w[:, None] * (X != ABSTAIN)).sum(0), m)
        self.groups = [sorted(g, key=lambda j: (self.parents[j] >= 0, j)) for g in found]

    def _fitting_patterns(self, arr, gold):
        """(all, fitting): each as (patterns, counts, clamp), distinct free patterns with counts, then gold rows one
        by one (clamp: where they start, their one-hot classes). ``fitting`` is ``all`` unless there are more than
        `SAMPLE_ROWS` distinct patterns; then it holds those of a sample of that many rows (the counts scaled up)."""
        n, m = arr.shape
        gold_rows, gold_cls = self._check_gold(gold, n)
        free = np.ones(n, bool)
        free[gold_rows] = False
        pats = em.unique_rows(arr[free] if gold_rows.size else arr)
        known = np.eye(self.k)[gold_cls]

        def with_gold(X, w):
            return (np.concatenate([X, arr[gold_rows].astype(X.dtype)]), np.concatenate([w, np.ones(gold_rows.size)]),
                    (len(X), known))

        everything = with_gold(pats.X, pats.counts)
        if len(pats.X) <= SAMPLE_ROWS:
            return everything, everything
        w = pats.counts
        drawn = np.random.default_rng(0).multinomial(SAMPLE_ROWS, w / w.sum()).astype(np.float64)
        keep = drawn > 0
        return everything, with_gold(pats.X[keep], drawn[keep] * (w.sum() / SAMPLE_ROWS))

    def _em(self, codes, w, clamp, fixed_prior, reading: str, post, iters: Optional[int] = None,
            tol: Optional[float] = None) -> Fit:
        """EM from the posterior ``post`` until the mean log-likelihood per row moves less than ``tol``."""
        k = self.k
        start, known = clamp
        total = w.sum()
        prev = -np.inf
        fit = Fit(reading, None, None, None, post)
        # when every function votes one class, the votes say only *when* functions fire, and anything that makes
        # them fire together (long rows) can pass for the label: EM's counts keep a share of majority vote's
        anchor = em.expected_counts(codes, post * w[:, None], k) * ANCHOR if self._one_class else 0.0
        for it in range(1, (iters or self.max_iter) + 1):
            post[start:] = known
            prior = fixed_prior if fixed_prior is not None else (w @ post + self.alpha) / (total + self.alpha * k)
            counts = em.expected_counts(codes, post * w[:, None], k) + anchor
            logp = em.cpt(counts, k, self.parents, self.alpha, reading == "votes", FIRING_FREE and self._polar)
            post, ll = em.posterior(codes, em.table_of(logp, self.weights), np.log(prior))
            mean_ll = float(w @ ll) / total
            fit = Fit(reading, prior, logp, counts, post, it)
            if abs(mean_ll - prev) < (tol or self.tol):
                break
            prev = mean_ll
        fit.post[start:] = known
        return fit

    def _majority_fit(self, codes, w, q0, fixed_prior) -> Fit:
        """Majority vote as a candidate: each vote adds one to the log-odds of its class (abstains nothing); its
        counts, for the collapse check and the accuracies, are those of majority vote's soft labels."""
        k = self.k
        fit = self._em(codes, w, (len(w), np.empty((0, k))), fixed_prior, "votes", q0.copy(), iters=1)
        logp = np.zeros((len(self.parents), k, k + 1, k + 1))
        logp[:, :, :, :k] = np.eye(k)[None, :, None, :]
        logp[self.parents < 0, :, 1:, :] = 0.0
        fit.logp = logp.reshape(len(self.parents), k, (k + 1) ** 2)
        fit.reading, fit.post, fit.prior = "majority", q0, np.full(k, 1.0 / k)
        return fit

    def _polish(self, everything, fit: Fit, fixed_prior) -> Fit:
        """One EM step on every distinct pattern from the sampled fit's parameters: its E-step labels them all, its
        M-step re-estimates the parameters from all of them (from a sample of 10⁵ rows EM has converged to within
        sampling noise; one pass over everything removes that noise without another dozen passes)."""
        if fit.reading == "majority":
            return fit
        X, w, (start, known) = everything
        codes = em.Codes(em.outcome_codes(X, self.k, self.parents), self.k)
        post, _ = em.posterior(codes, em.table_of(fit.logp, self.weights), np.log(fit.prior))
        post[start:] = known
        prior = fixed_prior if fixed_prior is not None else (w @ post + self.alpha) / (w.sum() + self.alpha * self.k)
        counts = em.expected_counts(codes, post * w[:, None], self.k)
        if self._one_class:  # the same pull towards majority vote as in _em
            counts = counts + em.expected_counts(codes, mv_posterior(X, self.k) * w[:, None], self.k) * ANCHOR
        logp = em.cpt(counts, self.k, self.parents, self.alpha, fit.reading == "votes", FIRING_FREE and self._polar)
        return Fit(fit.reading, prior, logp, counts, fit.post, fit.iterations + 1, fit.notes)

    def _keep(self, fit: Fit) -> None:
        k = self.k
        self.mode, self.prior, self._logp, self.iterations = fit.reading, fit.prior, fit.logp, fit.iterations
        own = em.root_counts(fit.counts, k, self.parents) + self.alpha  # (m, k, k+1), summed over parents' outcomes
        self.confusion = own / own.sum(2, keepdims=True)
        votes = fit.counts.reshape(len(own), k, k + 1, k + 1).sum(2)[:, :, :k]
        self._acc = np.einsum("jcc->j", votes) / np.maximum(votes.sum((1, 2)), 1e-12)

    # ----------------------------------------------------------------------------------- checks

    def _check_prior(self, class_balance):
        if class_balance is None:
            return None
        p = np.asarray(class_balance, dtype=np.float64)
        if p.shape != (self.k,) or (p <= 0).any():
            raise LabelModelError(f"class_balance must be {self.k} positive numbers")
        return p / p.sum()

    def _check_gold(self, gold, n: int):
        rows = np.array(sorted(gold), dtype=np.int64) if gold else np.empty(0, np.int64)
        cls = np.array([gold[i] for i in rows], dtype=np.int64) if gold else np.empty(0, np.int64)
        if rows.size and ((rows < 0).any() or (rows >= n).any() or (cls < 0).any() or (cls >= self.k).any()):
            raise LabelModelError("a gold label names a row or class outside the label matrix")
        return rows, cls

    def _check_weights(self, weights, m: int):
        if weights is None:
            return np.ones(m)
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (m,) or (w < 0).any():
            raise LabelModelError(f"weights must be {m} non-negative numbers, one per labelling function")
        return w

    # ----------------------------------------------------------------------------------- using it

    def predict_proba(self, L):
        """P(class | votes) per row, shape (n, k).

        In the evidence reading abstains count: a row where every function
        abstains gets P(class | all abstained), not the bare prior, since a
        rule that fires mostly for one class says something by staying silent.
        In the votes reading (and majority vote's) it gets the prior.
        """
        if self._logp is None:
            raise LabelModelError("fit the label model first")
        arr = check_matrix(L, self.k)
        m = self._logp.shape[0]
        if arr.shape[1] != m:
            raise LabelModelError(f"fitted on {m} labelling functions, given {arr.shape[1]}")
        if not len(arr):
            return np.empty((0, self.k))
        pats = em.unique_rows(arr, inverse=True)
        codes = em.Codes(em.outcome_codes(pats.X, self.k, self.parents), self.k)
        post, _ = em.posterior(codes, em.table_of(self._logp, self.weights), np.log(self.prior))
        return post[pats.inverse]

    def dependent_pairs(self) -> list[tuple[int, int, float]]:
        """(member, root, kappa) for each function read as part of another's group (see `fmhub.data.label.structure`)."""
        if self.parents is None:
            return []
        return [(j, int(p), float(self.kappa[j, p])) for j, p in enumerate(self.parents) if p >= 0]

    def predict(self, L):
        """The most probable class per row."""
        return self.predict_proba(L).argmax(1)

    def accuracies(self):
        """Each function's estimated accuracy when it votes: P(its vote is the true class | it votes)."""
        if self._acc is None:
            raise LabelModelError("fit the label model first")
        return self._acc


def polar(X, w, k: int):
    """Per function, whether it votes two classes or more (each on at least 1 % of its votes, and 5 rows)."""
    per = np.stack([(w[:, None] * (X == c)).sum(0) for c in range(k)], 1)  # (m, k)
    return (per >= np.maximum(5.0, 0.01 * per.sum(1, keepdims=True))).sum(1) >= 2


def mv_posterior(X, k: int):
    """A soft majority vote per pattern: each vote adds one to its class, plus 0.1 to every class."""
    counts = np.stack([(X == c).sum(1) for c in range(k)], 1).astype(np.float64) + 0.1
    return counts / counts.sum(1, keepdims=True)

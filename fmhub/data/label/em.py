"""The numeric core of the label model: distinct vote patterns, outcome codes, and EM steps, vectorised.

Everything here works on *patterns*: the distinct rows of the label matrix,
each with the number of rows that have it, so the cost of an EM iteration
grows with the number of distinct patterns, not rows. Work arrays are built
in blocks of `BLOCK` patterns, so memory stays a small multiple of the label
matrix itself (int8) whatever its size.

A function's *outcome* is its vote, with abstain as one more value ``k``.
A function with a parent (see `fmhub.data.label.structure`) is read jointly
with it: its outcome code is ``parent outcome × (k+1) + own outcome``, and
its parameters are P(own outcome | class, parent's outcome). A function
without one uses the first ``k+1`` codes. The codes of all functions live in
one flat table of ``m × (k+1)²`` entries per class, so an E-step is one
gather and a sum, an M-step one weighted bincount.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

ABSTAIN = -1
BLOCK = 1 << 15  # patterns per block of work arrays: 32k × 50 functions × 8 bytes = 13 MB


@dataclass
class Patterns:
    """The distinct rows of a label matrix (int8, abstain -1), how many rows have each, and each row's pattern."""

    X: Any  # (p, m) int8
    counts: Any  # (p,) float64
    inverse: Optional[Any] = None  # (n,) int64: row -> pattern, when asked for


def unique_rows(L, inverse: bool = False) -> Patterns:
    """Distinct rows with counts: each row's bytes hashed to 64 bits (eight votes per word) and sorted, then the
    grouping checked against the rows themselves, so the result is exact."""
    L = np.ascontiguousarray(L, dtype=np.int8)
    n, m = L.shape
    if n == 0:
        return Patterns(L.copy(), np.zeros(0), np.zeros(0, np.int64) if inverse else None)
    words = -(-m // 8)
    mult = np.random.default_rng(12345).integers(1, 2**63 - 1, size=words, dtype=np.uint64) | np.uint64(1)
    h = np.empty(n, np.uint64)
    step = BLOCK * 8
    for s in range(0, n, step):
        block = np.zeros((min(step, n - s), words * 8), np.int8)
        block[:, :m] = L[s:s + step]
        acc = np.zeros(len(block), np.uint64)
        with np.errstate(over="ignore"):
            for i, word in enumerate(block.view(np.uint64).T):
                acc = (acc ^ word) * mult[i]
                acc ^= acc >> np.uint64(29)
        h[s:s + step] = acc
    _, first, inv, counts = np.unique(h, return_index=True, return_inverse=True, return_counts=True)
    X = L[first]
    for s in range(0, n, step):
        if not np.array_equal(X[inv[s:s + step]], L[s:s + step]):
            return _exact_unique(L, inverse)  # a hash collision (never seen in practice): the slow exact way
    return Patterns(X, counts.astype(np.float64), inv.astype(np.int64) if inverse else None)


def _exact_unique(L, inverse: bool) -> Patterns:
    X, inv, counts = np.unique(L, axis=0, return_inverse=True, return_counts=True)
    return Patterns(X.astype(np.int8), counts.astype(np.float64), inv.reshape(-1).astype(np.int64) if inverse else None)


def outcome_codes(X, k: int, parents) -> Any:
    """Each pattern's outcome code per function (see the module docstring): (p, m) uint8/uint16."""
    A = k + 1
    a = np.where(X < 0, k, X).astype(np.uint16)
    code = a.copy()
    for j, pa in enumerate(parents):
        if pa >= 0:
            code[:, j] = a[:, pa] * A + a[:, j]
    return code.astype(np.uint8) if A * A <= 256 else code


def flat_offsets(m: int, k: int):
    """Where function j's codes start in the flat table."""
    return (np.arange(m, dtype=np.int64) * (k + 1) ** 2)[None, :]


class Codes:
    """Outcome codes as flat indices into the parameter table (function j's codes start at j·(k+1)²), built per block.

    Small inputs keep the int32 indices for every EM iteration; large ones
    rebuild each block's on the fly, so memory stays bounded.
    """

    KEEP = 20_000_000  # indices kept at most (80 MB)

    def __init__(self, codes, k: int) -> None:
        self.codes, self.k = codes, k
        self.p, self.m = codes.shape
        self.off = flat_offsets(self.m, k).astype(np.int32)
        self._kept = self._make(0, self.p) if self.p * self.m <= self.KEEP else None

    def _make(self, s: int, e: int):
        return self.codes[s:e].astype(np.int32) + self.off

    def blocks(self):
        """(start, end, flat indices) per block of patterns."""
        for s in range(0, self.p, BLOCK):
            e = min(s + BLOCK, self.p)
            yield s, e, (self._kept[s:e] if self._kept is not None else self._make(s, e))


def log_joint(codes: Codes, table, log_prior):
    """log π_c + Σ_j table[c, j's code] per pattern: (p, k). ``table`` is (k, m·(k+1)²), weights already applied."""
    k = table.shape[0]
    out = np.empty((codes.p, k))
    for s, e, f in codes.blocks():
        for c in range(k):
            out[s:e, c] = table[c][f].sum(1)
    return out + log_prior[None, :]


def posterior(codes: Codes, table, log_prior):
    """P(class | pattern) and the log-likelihood of each pattern."""
    lj = log_joint(codes, table, log_prior)
    top = lj.max(1, keepdims=True)
    e = np.exp(lj - top)
    z = e.sum(1, keepdims=True)
    return e / z, (np.log(z) + top)[:, 0]


def expected_counts(codes: Codes, wpost, k: int):
    """Σ over patterns of count × P(class c) for each (function, code): (m, k, (k+1)²)."""
    m = codes.m
    size = (k + 1) ** 2
    out = np.zeros((k, m * size))
    for s, e, f in codes.blocks():
        flat = f.ravel()
        for c in range(k):
            out[c] += np.bincount(flat, weights=np.repeat(wpost[s:e, c], m), minlength=m * size)
    return out.reshape(k, m, size).transpose(1, 0, 2)


def table_of(logp, weights):
    """The (k, m·(k+1)²) table `log_joint` gathers from: log-parameters times each function's weight."""
    m, k, size = logp.shape
    return (logp * weights[:, None, None]).transpose(1, 0, 2).reshape(k, m * size)


def cpt(counts, k: int, parents, alpha: float, votes_only: bool, firing_free=None):
    """log P(own outcome | class, parent's outcome) from expected counts, smoothed by ``alpha`` per cell: (m, k, (k+1)²).

    With ``votes_only`` an abstain's log-probability is replaced by 0: silence
    is no evidence, and a vote v multiplies the odds of class c by
    P(v | c) / P(v) (the constant P(v) cancels), so a rule that votes one class
    only still says something when it fires. Functions marked ``firing_free``
    (those voting two classes or more) are read by P(v | c, it votes): when
    they fire is not taken as evidence either, only what they say.
    """
    m = counts.shape[0]
    A = k + 1
    c = counts.reshape(m, k, A, A) + alpha  # (function, class, parent outcome, own outcome)
    logp = np.log(c / c.sum(3, keepdims=True))
    if votes_only:
        if firing_free is not None and np.any(firing_free):
            cv = c[firing_free][..., :k]
            logp[firing_free, ..., :k] = np.log(cv / cv.sum(3, keepdims=True))
        logp[..., k] = 0.0
    roots = np.asarray(parents) < 0
    # a function without a parent has one row of parameters (parent outcome 0); the other rows are never used
    logp[roots, :, 1:, :] = 0.0
    return logp.reshape(m, k, A * A)


def root_counts(counts, k: int, parents):
    """Expected (function, class, own outcome) counts, summed over the parent's outcome: (m, k, k+1)."""
    m = counts.shape[0]
    return counts.reshape(m, k, k + 1, k + 1).sum(2)

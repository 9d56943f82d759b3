"""Dependencies between labelling functions, learnt from the votes (structure learning for weak supervision).

A label model learns how far to trust each function from how the functions
agree, assuming they err independently given the true class. Copies of a
rule, or rules sharing their words, break that: they agree because they are
the same rule, and a group of them outvotes everything else, or becomes
the "class" the model learns. Following the idea of Bach et al. (2017) and
Varma et al. (2019), dependencies are found as agreement *beyond what the
class explains*:

For a pair of functions and each class c (rows weighted by an estimate of
P(class c | votes)), compare how often their outputs agree, abstain counting
as one more output, with how often two functions with the same output rates
given c would agree if independent: Cohen's kappa given the class,

    κ_c = (agree_c − expected_c) / (1 − expected_c),

averaged over classes by their weight. Independent functions score near 0
however accurate they are; near-copies score near 1; so does a narrower
variant of a keyword rule, which fires only where the rule does (abstains
are what relate two rules that each vote one class). The estimate of the
class matters: against a noisy one two accurate functions agree "beyond
the class". It is read twice (by majority vote, and by an independent
fit of the model), and the larger kappa counts: a group the fit latched
onto looks independent given that fit's "class" (it *is* that class), never
given majority vote's. Pairs above a threshold
are linked, and each connected group of linked functions is read as one
source: its broadest member (the most votes) is the group's *root*, and each
other member is modelled given the root (its parameters are P(its output |
class, root's output)), so the group's evidence counts once, and a member
that disagrees with the root, when it does, still counts. See
`fmhub.data.label.em` for how parents enter the model.

The kappas are computed on at most `SAMPLE_PATTERNS` distinct vote patterns
(drawn by count when there are more: they are rates, which a sample pins
down), so the cost does not grow with the data.
"""

from __future__ import annotations

import numpy as np

from fmhub.data.label.em import BLOCK

MIN_SHARED = 30.0  # rows needed before a pair's agreement is judged
SAMPLE_PATTERNS = 50_000  # beyond this many distinct patterns, kappas come from a sample of them


def conditional_kappa(X, counts, q, k: int):
    """(m, m) kappa given the class for every pair of functions, over their whole output (abstain included) on
    every row; 0 on the diagonal and where undefined."""
    if len(X) > SAMPLE_PATTERNS:  # rates: a sample drawn by count estimates them; each drawn pattern then counts once
        pick = np.sort(np.random.default_rng(2).choice(len(X), SAMPLE_PATTERNS, replace=False, p=counts / counts.sum()))
        X, counts, q = X[pick], np.ones(len(pick)), q[pick]
    m, a = X.shape[1], k + 1  # outputs compared: the k votes and abstain
    G = np.zeros((k, m * a, m * a))
    cols = np.arange(m) * a
    for s in range(0, len(X), BLOCK):
        x = X[s:s + BLOCK].astype(np.int64)
        x = np.where(x < 0, k, x)
        V = np.zeros((len(x), m * a), np.float32)
        rows, fns = np.nonzero(x >= 0)
        V[rows, cols[fns] + x[rows, fns]] = 1.0
        for c in range(k):
            G[c] += V.T @ (V * (counts[s:s + BLOCK] * q[s:s + BLOCK, c])[:, None].astype(np.float32))
    G = G.reshape(k, m, a, m, a)  # class, function j, its output, function l, its output
    weight = G.sum((2, 4))  # (k, m, m): the weight of each class's rows
    agree = np.einsum("cjvlv->cjl", G)
    expected = np.einsum("cjvl,cjlv->cjl", G.sum(4), G.sum(2))
    with np.errstate(divide="ignore", invalid="ignore"):
        obs = agree / weight
        exp = expected / weight**2
        kappa = np.where((weight > 1e-9) & (1 - exp > 1e-6), (obs - exp) / (1 - exp), 0.0)
    total = weight.sum(0)
    score = np.where(total >= MIN_SHARED, (kappa * weight).sum(0) / np.maximum(total, 1e-12), 0.0)
    np.fill_diagonal(score, 0.0)
    return score


def groups(score, threshold: float) -> list[list[int]]:
    """Connected groups of functions linked by a kappa ≥ ``threshold`` (groups of one left out)."""
    m = len(score)
    label = list(range(m))

    def find(a: int) -> int:
        while label[a] != a:
            label[a] = label[label[a]]
            a = label[a]
        return a

    for a, b in zip(*np.nonzero(np.triu(score >= threshold, 1))):
        label[find(int(a))] = find(int(b))
    out: dict[int, list[int]] = {}
    for j in range(m):
        out.setdefault(find(j), []).append(j)
    return [g for g in out.values() if len(g) > 1]


def parents_of(found: list[list[int]], votes_per_function, m: int):
    """Each function's parent (-1: none): every member of a group hangs on the group's broadest member."""
    parents = np.full(m, -1, np.int64)
    for g in found:
        root = max(g, key=lambda j: (votes_per_function[j], -j))
        for j in g:
            if j != root:
                parents[j] = root
    return parents

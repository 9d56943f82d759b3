"""Is a fitted label model reading the label, or something else? The collapse check behind ``abstains="auto"``.

EM maximises the likelihood of the votes under a latent variable; nothing
forces that variable to be the label. When functions share something other
than the label (they fire together on long rows; a group of near-copies
outnumbers the rest), the best latent variable can be *that*, and the fit
collapses: confident, self-consistent, and worse than majority vote.

A collapsed fit has a tell: it explains the votes of the functions it
latched onto, not the votes of the others. So each candidate fit is scored
by how well it predicts every function's vote from the *other* functions'
votes (a pseudo-likelihood, held out one function, or one dependent group,
at a time): P(vote of j | j votes, the others' votes) = Σ_c P(c | others) ·
P(vote | c, j votes). A model whose latent variable is the label predicts
everyone's votes through it; one that latched onto a group predicts that
group and little else. Candidates: the ``evidence`` and ``votes`` readings,
and majority vote (each vote adds one to its class's log-odds; its vote
rates given the class learnt from majority vote's labels). The best-scoring
one is used, ``votes`` first among scores within `EPS` (it assumes less),
then ``evidence``, then majority vote; a warning names each reading that
scored clearly worse than majority vote (collapsed), and why.

When every function votes one class only (keyword rules), nothing can be
held out (each function always votes the same class), and a collapse onto
a cause of firing shows otherwise: the reading strays from majority vote, or
reads a rule as evidence against the class it names (`one_class_doubts`).
The first reading without such doubts is used (``evidence``, then
``votes``), else majority vote.

Functions worse than chance are not doubts on their own: with functions
that vote several classes a reading may learn that one is wrong more often
than right, and count its votes against the class they name.
"""

from __future__ import annotations

import numpy as np

from fmhub.data.label import em
from fmhub.data.label.matrix import ABSTAIN


def hard_majority(X, k: int):
    """Majority vote per pattern (ABSTAIN on ties and empty rows)."""
    counts = np.stack([(X == c).sum(1) for c in range(k)], 1)
    best = counts.argmax(1)
    tie = (counts == counts.max(1, keepdims=True)).sum(1) > 1
    return np.where(tie | (counts.max(1) == 0), ABSTAIN, best)


def agreement(a, b, w, mask) -> float:
    """The weighted share of ``mask`` rows where ``a`` and ``b`` agree."""
    tot = w[mask].sum()
    return float((w * (a == b))[mask].sum() / tot) if tot > 0 else 1.0


def held_out_score(fit, codes: em.Codes, X, w, parents, weights, k: int) -> float:
    """Mean log P(vote of j | j votes, others' votes) over the votes of functions with two or more classes.

    A function's own factor and those of its dependent group are left out of
    the posterior that predicts it; a group is predicted through its root.
    """
    m = X.shape[1]
    table = em.table_of(fit.logp, weights)
    own = em.root_counts(fit.counts, k, parents)[:, :, :k] + 1.0  # (m, k, k): class, vote
    vote_given = own / own.sum(2, keepdims=True)
    roots = np.flatnonzero(parents < 0)
    member = np.zeros((m, len(roots)))  # function -> its group (the root's column)
    member[np.arange(m), np.searchsorted(roots, np.where(parents < 0, np.arange(m), parents))] = 1.0
    polar = (own.sum(1)[roots] > 1.5 + k).sum(1) >= 2  # votes at least two classes (beyond the smoothing)
    if not polar.any():
        return 0.0
    roots, member = roots[polar], member[:, polar]
    total = count = 0.0
    for s, e, f in codes.blocks():
        lj = np.stack([table[c][f] for c in range(k)], 2)  # (b, m, k): each function's factor
        full = lj.sum(1) + np.log(fit.prior)[None, :]
        rest = full[:, None, :] - (lj.transpose(0, 2, 1) @ member).transpose(0, 2, 1)  # (b, g, k): less the group's factors
        p = np.exp(rest - rest.max(2, keepdims=True))
        p /= p.sum(2, keepdims=True)
        v = X[s:e][:, roots].astype(np.int64)  # (b, g): the root's vote
        fires = v >= 0
        given = vote_given[roots][np.arange(len(roots))[None, :, None], np.arange(k)[None, None, :], np.maximum(v, 0)[:, :, None]]
        pred = (p * given).sum(2)  # (b, g)
        ww = np.broadcast_to(w[s:e, None], pred.shape)
        total += float((ww * np.log(np.maximum(pred, 1e-12)))[fires].sum())
        count += float(ww[fires].sum())
    return total / count if count else 0.0


SCORE_PATTERNS = 20_000  # the held-out score is a mean: this many patterns, drawn by their counts, estimate it


def diagnose(fits, codes, X, w, parents, weights, k: int) -> dict:
    """Per candidate: its agreement with majority vote (rows where that is decided) and its held-out score."""
    sub, w_sub = np.arange(len(X)), w
    if len(X) > SCORE_PATTERNS:  # drawn by count, so each drawn pattern then counts once
        sub = np.sort(np.random.default_rng(1).choice(len(X), SCORE_PATTERNS, replace=False, p=w / w.sum()))
        w_sub = np.ones(len(sub))
    sub_codes = em.Codes(codes.codes[sub], k)
    mv = hard_majority(X, k)
    decided = mv != ABSTAIN
    covered = (X != ABSTAIN).any(1)
    diag = {}
    for r, f in fits.items():
        diag[r] = {"agree_majority": round(agreement(f.post.argmax(1), mv, w, decided), 4),
                   "held_out": round(held_out_score(f, sub_codes, X[sub], w_sub, parents, weights, k), 5)}
    if "evidence" in fits and "votes" in fits:
        a = round(agreement(fits["evidence"].post.argmax(1), fits["votes"].post.argmax(1), w, covered), 4)
        diag["evidence"]["agree_other"] = diag["votes"]["agree_other"] = a
    return diag


def align(fit, X, w, k: int):
    """Rename the fit's classes so that its labels agree best with majority vote (EM's labels are only defined up to
    a permutation; a fit that reads every vote backwards is the same fit with its classes swapped)."""
    import itertools

    if k > 6:
        return fit
    mv = hard_majority(X, k)
    decided = mv != ABSTAIN
    table = np.zeros((k, k))
    np.add.at(table, (fit.post.argmax(1)[decided], mv[decided]), w[decided])
    perm = max(itertools.permutations(range(k)), key=lambda p: (sum(table[p[c], c] for c in range(k)), p == tuple(range(k))))
    if perm == tuple(range(k)):
        return fit
    idx = list(perm)  # new class c is the old class perm[c]
    fit.prior, fit.post = fit.prior[idx], fit.post[:, idx]
    fit.logp, fit.counts = fit.logp[:, idx], fit.counts[:, idx]
    fit.notes["relabelled"] = idx
    return fit


EPS = 0.002  # nats per vote: held-out scores closer than this are a tie
TIE_ORDER = ("votes", "evidence", "majority")
STRAY = 0.05  # a rejected reading this much further from majority vote than the one used has collapsed


MIN_AGREE_ONE_CLASS = 0.9  # one-class functions: a reading must agree with majority vote on this share of its rows


def one_class_doubts(fit, diag: dict, k: int) -> list[str]:
    """Why a fit on functions that each vote one class is suspect: it disagrees with majority vote on more than
    a tenth of the rows majority vote decides, or it reads a rule's vote as evidence *against* the class the
    rule names (its vote at least halves that class's odds against the base rate). With one-class functions
    there is nothing to hold out (each always votes the same), and a latent cause of firing (long rows) is the
    usual collapse; it shows as exactly these two symptoms."""
    out = []
    if diag["agree_majority"] < MIN_AGREE_ONE_CLASS:
        out.append(f"it agrees with majority vote on only {100 * diag['agree_majority']:.0f}% of the rows majority vote decides")
    own = fit.counts.reshape(len(fit.counts), k, k + 1, k + 1).sum(2)[:, :, :k]  # (m, class, vote)
    votes = own.sum(1)  # (m, vote)
    hit = np.clip(np.einsum("jvv->jv", own) / np.maximum(votes, 1e-12), 1e-9, 1 - 1e-9)
    base = np.clip(fit.prior, 1e-9, 1 - 1e-9)[None, :]
    odds = (hit / (1 - hit)) / (base / (1 - base))
    bad = np.argwhere((votes >= np.maximum(5.0, 0.01 * votes.sum())) & (odds < 0.5))
    if len(bad):
        out.append(f"it reads {len(bad)} one-class function(s) as evidence against the class they vote")
    return out


def choose(fits, codes, X, w, parents, weights, k: int, abstains: str):
    """The fit to use, the warnings, and the diagnostics (see the module docstring)."""
    diag = diagnose(fits, codes, X, w, parents, weights, k)
    if abstains != "auto":
        return fits[abstains], _manual_warnings(abstains, diag), diag
    if any(d["held_out"] != 0 for d in diag.values()):
        best = max(d["held_out"] for d in diag.values())
        pick = next(r for r in TIE_ORDER if diag[r]["held_out"] >= best - EPS)
        return fits[pick], _held_out_warnings(pick, diag), diag
    # every function votes one class only: nothing to hold out
    warns = []
    for r in ("evidence", "votes"):
        doubts = one_class_doubts(fits[r], diag[r], k)
        if not doubts:
            return fits[r], warns, diag
        warns.append(f"the {r} reading was rejected (collapse): " + "; ".join(doubts))
    warns.append("labels are majority vote's: both readings of the label model look collapsed")
    return fits["majority"], warns, diag


def _manual_warnings(reading: str, diag: dict) -> list[str]:
    if diag[reading]["held_out"] < diag["majority"]["held_out"] - EPS:
        return [f"the {reading} reading predicts the functions' votes from each other worse than majority vote "
                f"(held-out log-likelihood {diag[reading]['held_out']:.3f} against {diag['majority']['held_out']:.3f}): "
                "it may have latched onto something other than the label; try abstains: auto"]
    return []


def _held_out_warnings(pick: str, diag: dict) -> list[str]:
    """A sentence per reading that scored clearly worse than the one picked and either strays further from majority
    vote than it (by `STRAY`) or scores below majority vote: collapsed. (A reading that is merely less informative
    is set aside silently; the scores are in the diagnostics.)"""
    out = []
    for r in ("evidence", "votes"):
        if r == pick or diag[r]["held_out"] >= diag[pick]["held_out"] - EPS:
            continue
        strays = diag[r]["agree_majority"] < diag[pick]["agree_majority"] - STRAY
        if not strays and diag[r]["held_out"] >= diag["majority"]["held_out"] - EPS:
            continue
        why = ("and strays further from majority vote" if strays else "and than majority vote does")
        out.append(f"the {r} reading was rejected (collapse): it predicts each function's votes from the others' worse "
                   f"(held-out log-likelihood {diag[r]['held_out']:.3f}) than the {pick} reading does ({diag[pick]['held_out']:.3f}) {why}; "
                   "it has likely latched onto something other than the label, such as a group of similar functions or when functions fire")
    if pick == "majority":
        out.append("labels are majority vote's: neither reading of the label model explains the votes better than majority vote does")
    return out

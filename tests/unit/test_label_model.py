"""The Dawid–Skene label model: learns labelling functions' accuracies without ground truth, and beats majority vote."""

from __future__ import annotations

import numpy as np
import pytest

from fmhub.data.label.model import ABSTAIN, LabelModel, LabelModelError, lf_summary, majority_vote, redundancy_weights, redundant_pairs
from fmhub.data.label.suggest import suggest


def synthetic(n=4000, seed=0):
    """True labels (30% positive) and 6 labelling functions with known accuracies and coverages.

    Two functions are good, four are weak; the weak ones outnumber the good ones, which is where majority vote
    goes wrong and a model of each function's accuracy does not. One function fires only for class 1 (a keyword).
    """
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    spec = [(0.95, 0.6), (0.9, 0.5), (0.6, 0.9), (0.58, 0.9), (0.6, 0.8), (0.55, 0.9)]  # (accuracy, coverage)
    cols = []
    for acc, cov in spec:
        vote = np.where(rng.random(n) < acc, y, 1 - y)
        cols.append(np.where(rng.random(n) < cov, vote, ABSTAIN))
    keyword = np.where((y == 1) & (rng.random(n) < 0.5), 1, ABSTAIN)
    keyword[(y == 0) & (rng.random(n) < 0.03)] = 1
    cols.append(keyword)
    return np.stack(cols, 1), y, [s[0] for s in spec]


def accuracy(pred, y):
    return float((pred == y).mean())


def test_beats_majority_vote_and_recovers_the_accuracies():
    L, y, true_acc = synthetic()
    mv = majority_vote(L, 2)
    mv_acc = accuracy(np.where(mv == ABSTAIN, 0, mv), y)  # ties and empty rows: the majority class
    model = LabelModel(2).fit(L)
    lm_acc = accuracy(model.predict(L), y)
    assert lm_acc > mv_acc + 0.05, (lm_acc, mv_acc)
    assert lm_acc > 0.9
    np.testing.assert_allclose(model.accuracies()[:6], true_acc, atol=0.04)
    assert model.prior[1] == pytest.approx(0.3, abs=0.03)
    proba = model.predict_proba(L)
    assert proba.shape == (len(y), 2) and np.allclose(proba.sum(1), 1)


def test_gold_labels_anchor_the_estimate():
    L, y, _ = synthetic(n=600, seed=3)
    gold = {i: int(y[i]) for i in range(0, 600, 10)}
    without = accuracy(LabelModel(2).fit(L).predict(L), y)
    with_gold = accuracy(LabelModel(2).fit(L, gold=gold).predict(L), y)
    assert with_gold >= without - 0.01


def test_all_abstain_rows_are_read_as_silence_and_a_silent_matrix_is_refused():
    L, _, _ = synthetic(n=500)
    L[:5] = ABSTAIN
    model = LabelModel(2).fit(L)
    # P(c | every function abstained) = π_c Π_j θ_j[c, abstain], normalised
    want = model.prior * np.prod(model.confusion[:, :, 2], axis=0)
    np.testing.assert_allclose(model.predict_proba(L[:5]), np.tile(want / want.sum(), (5, 1)))
    assert model.predict_proba(L[:1])[0, 0] > model.prior[0]  # the keyword rule's silence points to class 0
    with pytest.raises(LabelModelError, match="abstains on every row"):
        LabelModel(2).fit(np.full((10, 3), ABSTAIN))
    with pytest.raises(LabelModelError, match="empty"):
        LabelModel(2).fit(np.empty((0, 3), dtype=int))
    with pytest.raises(LabelModelError, match="row 1, labelling function 0: vote 7"):
        LabelModel(2).fit(np.array([[0, 1], [7, 0]]))


def test_lf_summary_counts_coverage_overlap_and_conflict():
    L = np.array([[0, 0, ABSTAIN], [1, 0, ABSTAIN], [ABSTAIN, ABSTAIN, 1], [1, ABSTAIN, ABSTAIN]])
    s = lf_summary(L, ["a", "b", "c"], gold={0: 0, 1: 1, 3: 0}, cardinality=2)
    assert [x.coverage for x in s] == [0.75, 0.5, 0.25]
    assert [x.overlaps for x in s] == [0.5, 0.5, 0.0]
    assert [x.conflicts for x in s] == [0.25, 0.25, 0.0]
    assert s[0].polarity == [0, 1] and s[2].polarity == [1]
    assert s[0].accuracy == pytest.approx(2 / 3) and s[2].accuracy is None


def test_a_copied_rule_is_found_and_counted_once():
    L, y, _ = synthetic(n=3000, seed=5)
    copy = L[:, 6].copy()
    copy[::7] = ABSTAIN  # a narrower variant of the keyword rule: fires on a subset of its rows
    L2 = np.column_stack([L, copy])
    pairs = redundant_pairs(L2)
    assert [(a, b) for a, b, _ in pairs] == [(7, 6)]
    w = redundancy_weights(L2.shape[1], pairs)
    assert w[7] == 0.0 and (w[:7] == 1).all()
    # two independent broad functions agree often, but no more than their coverage explains: not copies
    assert all({a, b} != {2, 3} for a, b, _ in redundant_pairs(L))


def test_votes_reading_ignores_silence_and_auto_falls_back_to_it_when_evidence_is_implausible():
    L, y, true_acc = synthetic(n=4000, seed=1)
    votes = LabelModel(2, abstains="votes").fit(L)
    assert votes.mode == "votes"
    np.testing.assert_allclose(votes.predict_proba(np.full((1, L.shape[1]), ABSTAIN))[0], votes.prior)
    assert accuracy(votes.predict(L), y) > accuracy(np.where(majority_vote(L, 2) == ABSTAIN, 0, majority_vote(L, 2)), y)
    assert LabelModel(2).fit(L).mode == "evidence"  # independent functions: the evidence fit is plausible and kept
    # rules that fire together on long rows, whatever the class: a latent "long row" explains the firing better than the label
    rng = np.random.default_rng(2)
    n = 4000
    y = (rng.random(n) < 0.6).astype(int)
    long_row = rng.random(n) < 0.4
    cols = []
    for cls, acc in [(1, 0.6), (1, 0.62), (1, 0.65), (0, 0.9), (0, 0.95)]:
        fires = rng.random(n) < np.where(long_row, 0.7, 0.08)
        right = rng.random(n) < acc
        cols.append(np.where(fires & ((y == cls) == right), cls, ABSTAIN))
    L = np.stack(cols, 1)
    evidence = LabelModel(2, abstains="evidence").fit(L)
    assert (evidence.accuracies()[3:] < 0.2).all()  # the strong negative rules read as anti-informative: not the label
    auto = LabelModel(2).fit(L)
    assert auto.mode == "votes"
    assert (auto.accuracies() >= 0.5).all()
    assert accuracy(auto.predict(L), y) > accuracy(evidence.predict(L), y) + 0.1


def test_suggestions_prefer_uncertain_conflicted_rows_one_per_vote_pattern():
    L = np.array([[0, 1], [0, 1], [0, 1], [1, 1], [1, ABSTAIN], [ABSTAIN, ABSTAIN], [0, 0]])
    proba = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.05, 0.95], [0.3, 0.7], [0.45, 0.55], [0.99, 0.01]])
    picks = suggest(proba, L, 4, exclude=[0])
    assert picks[0] == 1  # conflicted and 50/50; row 0 is gold already
    assert 2 not in picks[:3]  # the same votes as row 1: another pattern first
    assert len(picks) == 4 and len(set(picks)) == 4

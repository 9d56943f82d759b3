"""The Dawid–Skene label model: learns labelling functions' accuracies without ground truth, and beats majority vote."""

from __future__ import annotations

import numpy as np
import pytest

from fmhub.label_model import ABSTAIN, LabelModel, LabelModelError, lf_summary, majority_vote


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

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


def mv_accuracy(L, y, k=2):
    """Majority vote's accuracy on the rows some function votes on, ties broken at random (seeded)."""
    counts = np.stack([(L == c).sum(1) for c in range(k)], 1) + np.random.default_rng(0).random((len(L), k)) * 1e-3
    covered = (L != ABSTAIN).any(1)
    return float((counts.argmax(1) == y)[covered].mean())


def covered_accuracy(model, L, y):
    covered = (L != ABSTAIN).any(1)
    return float((model.predict(L) == y)[covered].mean())


def long_rows(seed=2, n=4000):
    """Keyword rules that fire together on long rows, whatever the class: a latent "long row" explains the firing
    better than the label (two strong negative rules, three weak positive ones)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    long_row = rng.random(n) < 0.4
    cols = []
    for cls, acc in [(1, 0.6), (1, 0.62), (1, 0.65), (0, 0.9), (0, 0.95)]:
        fires = rng.random(n) < np.where(long_row, 0.7, 0.08)
        right = rng.random(n) < acc
        cols.append(np.where(fires & ((y == cls) == right), cls, ABSTAIN))
    return np.stack(cols, 1), y


def test_votes_reading_ignores_silence_and_auto_rejects_collapsed_readings():
    L, y, true_acc = synthetic(n=4000, seed=1)
    votes = LabelModel(2, abstains="votes").fit(L)
    assert votes.mode == "votes"
    np.testing.assert_allclose(votes.predict_proba(np.full((1, L.shape[1]), ABSTAIN))[0], votes.prior)
    assert accuracy(votes.predict(L), y) > accuracy(np.where(majority_vote(L, 2) == ABSTAIN, 0, majority_vote(L, 2)), y)
    auto = LabelModel(2).fit(L)
    assert auto.mode == "evidence" and auto.warnings == []  # independent functions: the evidence fit is kept, silently
    L, y = long_rows()
    evidence = LabelModel(2, abstains="evidence").fit(L)
    assert (evidence.accuracies()[3:] < 0.5).all()  # the strong negative rules read as anti-informative: not the label
    assert covered_accuracy(evidence, L, y) < mv_accuracy(L, y) - 0.05  # the input collapses a plain fit...
    auto = LabelModel(2).fit(L)
    assert auto.mode == "majority"  # ... and auto notices: both readings rejected, labels are majority vote's
    assert any("evidence reading was rejected (collapse)" in w for w in auto.warnings)
    assert covered_accuracy(auto, L, y) >= mv_accuracy(L, y) - 0.01


def near_copies(seed, n=4000):
    """Six independent functions (accuracy 0.65-0.8) and two groups of four near-copies of a mediocre rule (0.6)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(np.int64)

    def vote(acc, cov):
        v = np.where(rng.random(n) < acc, y, 1 - y)
        return np.where(rng.random(n) < cov, v, ABSTAIN)

    cols = [vote(rng.uniform(0.65, 0.8), rng.uniform(0.3, 0.6)) for _ in range(6)]
    for _ in range(2):
        base = vote(0.6, rng.uniform(0.4, 0.7))
        cols += [np.where(rng.random(n) < 0.95, base, vote(0.6, rng.uniform(0.4, 0.7))) for _ in range(4)]
    return np.stack(cols, 1), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_near_copies_are_grouped_and_counted_once(seed):
    from fmhub.data.label.pipeline import model_from_options

    L, y = near_copies(seed)
    mv = mv_accuracy(L, y)
    plain = LabelModel(2, abstains="evidence", dependencies=None).fit(L)
    assert covered_accuracy(plain, L, y) < mv - 0.02  # what used to happen: the copies pass for the label
    model = LabelModel(2).fit(L)
    assert sorted(sorted(g) for g in model.groups) == [[6, 7, 8, 9], [10, 11, 12, 13]]
    assert covered_accuracy(model, L, y) >= mv + 0.03
    assert any("rejected (collapse)" in w for w in model.warnings)  # the evidence reading still latches on: said so
    configured = model_from_options({}, 2).fit(L)  # as `fmhub label` configures it: the same model
    np.testing.assert_allclose(configured.predict_proba(L), model.predict_proba(L))


@pytest.mark.parametrize("seed", [0, 1])
def test_functions_worse_than_chance_count_against_their_vote_in_every_reading(seed):
    rng = np.random.default_rng(seed)
    n = 4000
    y = (rng.random(n) < 0.5).astype(np.int64)
    accs = [0.3, 0.35, 0.3] + list(rng.uniform(0.65, 0.85, 7))
    L = np.stack([np.where(rng.random(n) < rng.uniform(0.3, 0.7), np.where(rng.random(n) < a, y, 1 - y), ABSTAIN) for a in accs], 1)
    mv = mv_accuracy(L, y)
    for reading in ("auto", "evidence", "votes"):
        model = LabelModel(2, abstains=reading).fit(L)
        assert (model.accuracies()[:3] < 0.45).all(), reading
        assert covered_accuracy(model, L, y) >= mv + 0.05, reading


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_class_rules_stay_at_least_at_majority_vote(seed):
    """Keyword-like rules (one class each) that fire more on long rows: neither reading may fall below majority vote."""
    rng = np.random.default_rng(seed)
    n = 4000
    y = (rng.random(n) < 0.6).astype(np.int64)
    length = np.clip(rng.lognormal(0, 0.6, n), 0.2, 4)
    cols = []
    for j in range(10):
        hit, miss = rng.uniform(0.1, 0.4), rng.uniform(0.01, 0.08)
        cols.append(np.where(rng.random(n) < np.clip(np.where(y == j % 2, hit, miss) * length, 0, 1), j % 2, ABSTAIN))
    L = np.stack(cols, 1)
    mv = mv_accuracy(L, y)
    for reading in ("auto", "votes"):
        assert covered_accuracy(LabelModel(2, abstains=reading).fit(L), L, y) >= mv - 0.01, reading


def test_distinct_patterns_with_counts_fit_as_the_expanded_rows_do(monkeypatch):
    from fmhub.data.label import em, model as model_mod

    L, y, _ = synthetic(n=3000, seed=4)
    pats = em.unique_rows(L, inverse=True)
    assert len(pats.X) < len(L) and pats.counts.sum() == len(L)
    np.testing.assert_array_equal(pats.X[pats.inverse], L)
    exact = em._exact_unique(np.asarray(L, np.int8), True)  # the collision fallback groups the same rows
    assert len(exact.X) == len(pats.X) and sorted(exact.counts) == sorted(pats.counts)
    # one EM step on patterns with counts equals the same step on every row with count 1
    k = 2
    parents = np.full(L.shape[1], -1)
    post = np.random.default_rng(0).dirichlet([1, 1], len(pats.X))
    on_patterns = em.expected_counts(em.Codes(em.outcome_codes(pats.X, k, parents), k), post * pats.counts[:, None], k)
    rows = em.Codes(em.outcome_codes(np.asarray(L, np.int8), k, parents), k)
    np.testing.assert_allclose(on_patterns, em.expected_counts(rows, post[pats.inverse], k))
    table = np.random.default_rng(1).normal(size=(k, L.shape[1] * (k + 1) ** 2))
    np.testing.assert_allclose(em.posterior(rows, table, np.log([0.3, 0.7]))[0],
                               em.posterior(em.Codes(em.outcome_codes(pats.X, k, parents), k), table, np.log([0.3, 0.7]))[0][pats.inverse])
    # past SAMPLE_ROWS distinct patterns, EM runs on a sample of rows and takes one step on all of them: as good
    rng = np.random.default_rng(7)
    y = (rng.random(4000) < 0.4).astype(np.int64)
    L = np.stack([np.where(rng.random(4000) < rng.uniform(0.3, 0.6), np.where(rng.random(4000) < rng.uniform(0.6, 0.8), y, 1 - y), ABSTAIN)
                  for _ in range(20)], 1)
    full = LabelModel(2).fit(L).predict(L)
    monkeypatch.setattr(model_mod, "SAMPLE_ROWS", 1500)
    assert len(em.unique_rows(L).X) > 1500  # so the sampled path runs
    sampled = LabelModel(2).fit(L).predict(L)
    assert (full == sampled).mean() > 0.97 and accuracy(sampled, y) >= accuracy(full, y) - 0.005


def test_suggestions_prefer_uncertain_conflicted_rows_one_per_vote_pattern():
    L = np.array([[0, 1], [0, 1], [0, 1], [1, 1], [1, ABSTAIN], [ABSTAIN, ABSTAIN], [0, 0]])
    proba = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.05, 0.95], [0.3, 0.7], [0.45, 0.55], [0.99, 0.01]])
    picks = suggest(proba, L, 4, exclude=[0])
    assert picks[0] == 1  # conflicted and 50/50; row 0 is gold already
    assert 2 not in picks[:3]  # the same votes as row 1: another pattern first
    assert len(picks) == 4 and len(set(picks)) == 4

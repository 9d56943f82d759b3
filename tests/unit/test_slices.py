"""Slices (fmhub.ml.slices): membership by predicate, regex, labelling function and cluster; flagged slices; regression verdicts."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fmhub.ml.slices import ALL, Sliced, SliceError, compare, kmeans, membership, metrics
from fmhub.project.spec import SliceSpec, SpecError, parse_spec

ROWS = [
    {"text": "the zorbo kite is great", "category": ["toys"], "stars": 5},
    {"text": "my acme drill was bad", "category": ["tools"], "stars": 1},
    {"text": "nice soup from nomi", "category": ["food"], "stars": 4},
    {"text": "the kipi doll is awful", "category": ["toys"], "stars": 2},
    {"text": "no brand here", "category": [], "stars": None},
]


def member(**spec) -> list[bool]:
    return membership({"s": SliceSpec(**spec)}, ROWS, classes=["neg", "pos"]).members["s"]


def test_where_predicates_over_scalars_and_list_columns():
    assert member(where={"category": "toys"}) == [True, False, False, True, False]
    assert member(where={"category": {"in": ["food", "tools"]}}) == [False, True, True, False, False]
    assert member(where={"category": {"ne": "toys"}}) == [False, True, True, False, True]
    assert member(where={"stars": {"ge": 4}}) == [True, False, True, False, False]
    assert member(where={"stars": {"lt": 3}, "category": "toys"}) == [False, False, False, True, False]  # all must hold
    assert member(where={"category": {"exists": False}}) == [False, False, False, False, True]
    assert member(where={"text": {"contains": "kite"}}) == [True, False, False, False, False]
    with pytest.raises(SliceError, match="unknown operator 'like'"):
        member(where={"text": {"like": "x"}})
    with pytest.raises(SliceError, match="needs a list"):
        member(where={"category": {"in": "toys"}})


def test_regex_and_labelling_function_slices():
    assert member(regex=r"\bfrom\b") == [False, False, True, False, False]
    assert member(regex="^the", column="text") == [True, False, False, True, False]
    with pytest.raises(SliceError, match="bad regex"):
        member(regex="(")
    neg = member(lf={"keyword": {"words": ["bad", "awful"], "label": "neg"}}, vote="neg")
    assert neg == [False, True, False, True, False]
    anyvote = member(lf={"keyword": {"words": ["great"], "label": "pos"}})
    assert anyvote == [True, False, False, False, False]
    with pytest.raises(SliceError, match="unknown labelling function kind 'nope'"):
        member(lf={"nope": {}})


def test_slice_errors_name_the_spec_line():
    loaded = parse_spec("slices:\n  ok: {regex: x}\n  broken:\n    where: {text: {like: 1}}\n")
    with pytest.raises(SpecError, match=r"fmhub.yaml:3: slices.broken: .*unknown operator"):
        membership(loaded.spec.slices, ROWS, loaded=loaded)
    with pytest.raises(SpecError, match="exactly one of"):
        parse_spec("slices:\n  two: {regex: x, clusters: 3}\n")
    with pytest.raises(SpecError, match="vote: is for lf"):
        parse_spec("slices:\n  v: {regex: x, vote: pos}\n")


def test_clusters_follow_the_embeddings_and_are_deterministic():
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10
    truth = [i % 3 for i in range(60)]
    points = np.array([centres[t] + rng.normal(0, 0.3, 3) for t in truth])
    clusters = kmeans(points, 3, seed=1)
    assert clusters == kmeans(points, 3, seed=1)
    for c in clusters:  # each cluster is exactly one planted group
        assert len({truth[i] for i, m in enumerate(c) if m}) == 1 and sum(c) == 20
    sliced = membership({"c": SliceSpec(clusters=3)}, [{"text": str(i)} for i in range(60)], embeddings=points)
    assert list(sliced.members) == ["c:0", "c:1", "c:2"] and set(sliced.kinds.values()) == {"cluster"}
    assert sliced.members["c:0"][0]  # numbered by first member row
    with pytest.raises(SliceError, match="need the model's embeddings"):
        membership({"c": SliceSpec(clusters=3)}, ROWS)


def test_a_failing_slice_is_flagged_and_a_small_or_noisy_one_is_not():
    rnd = random.Random(0)
    n = 400
    bad = [i < 80 for i in range(n)]
    tiny = [i in (100, 101, 102) for i in range(n)]
    scores = [float(rnd.random() < (0.4 if b else 0.9)) for b in bad]
    for i in (100, 101, 102):
        scores[i] = 0.0  # three wrong rows: too few to say anything
    sliced = Sliced({"bad": bad, "tiny": tiny, "rest": [not b for b in bad]}, {"bad": "where", "tiny": "where", "rest": "where"}, {})
    overall, per = metrics(scores, sliced, higher_is_better=True, min_rows=5)
    by = {s["name"]: s for s in per}
    assert by["bad"]["flagged"] and not by["tiny"]["flagged"] and not by["rest"]["flagged"]
    assert overall["n"] == n and by["bad"]["n"] == 80 and by["bad"]["gap"] < -0.3 and by["bad"]["stderr"] > 0
    # for a loss, higher is worse: the same slice with losses instead of accuracies is flagged too
    _, per_loss = metrics([1 - s for s in scores], sliced, higher_is_better=False)
    assert {s["name"]: s["flagged"] for s in per_loss}["bad"]


def test_regression_table_verdicts():
    keys = [f"k{i}" for i in range(200)]
    members = {"a": set(keys[:100]), "b": set(keys[100:])}
    old = {k: 1.0 if i % 2 else 0.0 for i, k in enumerate(keys)}  # 0.5 everywhere
    new = dict(old)
    for k in keys[:100]:
        new[k] = 1.0  # a: 0.5 -> 1.0
    for k in keys[100:110]:
        new[k] = 1.0 - new[k]  # b: a few flips both ways: noise, not a change
    rows = {r["slice"]: r for r in compare(old, new, members, higher_is_better=True, threshold=0.02)}
    assert rows["a"]["verdict"] == "better" and rows["a"]["delta"] == pytest.approx(0.5)
    assert rows["b"]["verdict"] == "same"
    assert rows[ALL]["n_old"] == 200 and list(rows)[0] == ALL
    back = {r["slice"]: r for r in compare(new, old, members, higher_is_better=True, threshold=0.02)}
    assert back["a"]["verdict"] == "worse"
    assert {r["slice"]: r for r in compare(new, old, members, higher_is_better=False, threshold=0.02)}["a"]["verdict"] == "better"

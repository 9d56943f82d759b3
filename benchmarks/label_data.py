"""A deterministic product-review dataset with ground truth, for the label benchmark and tests.

No real labelled text dataset ships inside a PyPI package reachable here
(nltk's corpora, sklearn's 20 newsgroups, keras' IMDB all download at run
time), so this generates one from a seed. It is built to be hard in the ways
real reviews are, which is what separates label models:

- a review is one to four sentences, each drawn on its own given the
  review's class; some sentences point the other way ("the design is nice."
  in a negative review) and some carry nothing ("Arrived on Tuesday.");
- negation flips words ("not great", "can't complain", "not bad at all");
- sarcasm uses positive words for negative reviews ("Oh great, another
  charger that doesn't charge");
- star ratings appear in some reviews and sometimes contradict the text
  (people click the wrong star);
- typos, shouting and filler sentences that carry no sentiment;
- 60 % of reviews are positive.

Each row: ``{"id": "r00042", "text": ..., "stars": 5 or null, "truth": "positive"}``.
"""

from __future__ import annotations

import random

PRODUCTS = ["headphones", "blender", "laptop stand", "coffee maker", "running shoes", "phone case", "vacuum",
            "desk lamp", "backpack", "kettle", "keyboard", "air fryer", "charger", "water bottle", "office chair"]
ASPECTS = ["battery", "sound", "build quality", "price", "delivery", "design", "screen", "fit", "instructions",
           "customer service", "cable", "motor", "handle", "packaging"]

POS = ["works great", "I love it", "excellent {a}", "highly recommend it", "exceeded my expectations",
       "worth every penny", "very happy with the {a}", "the {a} is amazing", "perfect for my needs",
       "does exactly what it says", "the {a} is solid", "great value", "my kids love it", "super comfortable",
       "would buy again", "five stars from me", "best {p} I have owned", "really impressed with the {a}"]
NEG = ["broke after a week", "waste of money", "terrible {a}", "very disappointed", "I returned it",
       "stopped working after two days", "poor quality", "the {a} feels cheap", "do not buy", "asked for a refund",
       "awful {a}", "it died within a month", "the {a} is flimsy", "worst {p} ever", "never again",
       "fell apart", "useless {a}", "had to send it back"]
# negated phrases: the sentiment word points the other way
NEG_NEGATED = ["not great", "not worth it", "I don't love it", "the {a} is not good", "not happy with the {a}",
               "can't recommend it", "not what I expected"]
POS_NEGATED = ["not bad at all", "can't complain", "no problems so far", "never had an issue with the {a}",
               "nothing to complain about", "not disappointed"]
SARCASM = ["Oh great, it broke on day two.", "Just perfect, another {p} that doesn't work.",
           "Love how the {a} fell off immediately.", "Amazing how fast it stopped working.",
           "Excellent, if you enjoy returning things."]
MILD_POS = ["it's fine", "decent {a}", "does the job", "okay for the price", "pretty good"]
MILD_NEG = ["a bit meh", "the {a} could be better", "not the best", "somewhat underwhelming", "mediocre {a}"]
FILLER = ["I bought this for my son.", "Arrived on Tuesday.", "Used it for three weeks now.", "Got it on sale.",
          "This is my second {p}.", "Ordered the blue one.", "Bought it as a gift.", "My wife picked it."]
TYPOS = {"great": "grate", "terrible": "terible", "excellent": "excelent", "disappointed": "dissapointed",
         "recommend": "reccomend", "quality": "qualty", "returned": "retuned"}


def _phrase(rng: random.Random, bank: list[str]) -> str:
    return rng.choice(bank).format(a=rng.choice(ASPECTS), p=rng.choice(PRODUCTS))


CONTRARY_FOR_POS = ["the {a} is a bit weak", "the {a} could be better", "shipping was slow", "the {a} broke but support replaced it"]
CONTRARY_FOR_NEG = ["the {a} is nice", "looks great", "the {a} is fine", "I wanted to love it"]

# sentence kinds per true class, with their chances: each sentence of a review is drawn on its own
MIX = {
    True: [(POS, 0.40), (POS_NEGATED, 0.12), (MILD_POS, 0.10), (CONTRARY_FOR_POS, 0.10), (FILLER, 0.28)],
    False: [(NEG, 0.36), (NEG_NEGATED, 0.14), (SARCASM, 0.08), (MILD_NEG, 0.08), (CONTRARY_FOR_NEG, 0.10), (FILLER, 0.24)],
}


def review(rng: random.Random, positive: bool) -> tuple[str, int | None]:
    """One review's text and star rating (None when the reviewer gave none)."""
    banks, weights = zip(*MIX[positive])
    sentences = []
    for _ in range(rng.choice([1, 2, 2, 3, 3, 4])):
        s = _phrase(rng, rng.choices(banks, weights)[0])
        sentences.append(s if s.endswith(".") else s[0].upper() + s[1:] + ".")
    text = " ".join(sentences)
    if rng.random() < 0.15:
        for right, wrong in TYPOS.items():
            text = text.replace(right, wrong)
    if rng.random() < 0.05:
        text = text.upper()
    if rng.random() < (0.30 if positive else 0.18):  # people shout both ways, a little more when happy
        text = text[:-1] + "!" * rng.choice([1, 1, 2, 3])
    stars = None
    if rng.random() < 0.3:
        stars = rng.choice([4, 5, 5]) if positive else rng.choice([1, 1, 2])
        if rng.random() < 0.08:  # the wrong star clicked
            stars = 6 - stars
    return text, stars


def reviews(n: int, seed: int = 0, positive_share: float = 0.6) -> list[dict]:
    """``n`` reviews with ground truth, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        positive = rng.random() < positive_share
        text, stars = review(rng, positive)
        out.append({"id": f"r{i:05d}", "text": text, "stars": stars, "truth": "positive" if positive else "negative"})
    return out


# The labelling functions of the benchmark, as an fmhub.yaml 'lfs:' list: realistic first attempts, each noisy.
LFS = [
    {"keyword": {"name": "pos_words", "words": ["great", "love", "excellent", "amazing", "perfect", "happy"], "label": "positive"}},
    {"keyword": {"name": "neg_words", "words": ["terrible", "broke", "waste", "disappointed", "awful", "cheap", "flimsy", "useless"], "label": "negative"}},
    {"regex": {"name": "recommend", "pattern": r"\b(highly recommend|would buy again|worth every penny)", "ignore_case": True, "label": "positive"}},
    {"regex": {"name": "returned", "pattern": r"\b(return|returned|refund|send it back)\b", "ignore_case": True, "label": "negative"}},
    {"python": {"name": "negation", "function": "bench_lfs.py:negation"}},
    {"python": {"name": "stars", "function": "bench_lfs.py:stars"}},
    {"keyword": {"name": "pos_words_2", "words": ["great", "love", "amazing"], "label": "positive"}},  # a narrower copy of pos_words
    {"regex": {"name": "exclaim", "pattern": "!", "label": "positive"}},  # weak: people shout both ways
    {"keyword": {"name": "mild", "words": ["fine", "okay", "decent", "does the job", "pretty good"], "label": "positive"}},
]

LFS_PY = '''
import re

_NEG = re.compile(r"(\\bnot\\b|n't\\b|\\bnever\\b|\\bno\\b)\\W*(\\w+\\W+){0,2}?(great|good|worth|happy|love|recommend|bad|problems?|issue|complain|disappointed)", re.I)
_TURN = {"bad", "problem", "problems", "issue", "complain", "disappointed"}


def negation(row):
    """A negated sentiment word flips it: 'not great' -> negative, 'not bad' -> positive."""
    m = _NEG.search(row["text"] or "")
    if not m:
        return None
    return "positive" if m.group(3).lower() in _TURN else "negative"


def stars(row):
    s = row.get("stars")
    if s is None:
        return None
    return "positive" if s >= 4 else "negative" if s <= 2 else None
'''


# ---------------------------------------------------------------------------------------------
# Label-model regimes: vote matrices with ground truth drawn straight from a seed (no text), each
# built to stress one assumption of a label model. `REGIMES` maps a name to a function
# (n, seed) -> (L, y, k); `label_bench.py` runs every label model on each of them.


def _np_rng(seed: int, salt: int):
    import numpy as np

    return np, np.random.default_rng([seed, salt])


def _vote(np, rng, y, k, acc, cov, fire_scale=None, polarity=None):
    """One function's votes: fires with probability ``cov`` (times ``fire_scale`` per row), is right with
    probability ``acc[y]``, else votes a uniform other class (within ``polarity`` when given)."""
    n = len(y)
    p_fire = np.clip(cov * (fire_scale if fire_scale is not None else 1.0), 0, 1)
    right = rng.random(n) < np.asarray(acc)[y]
    others = list(range(k)) if polarity is None else list(polarity)
    wrong = rng.choice(others, size=n)
    clash = wrong == y  # a wrong vote must be another class
    while clash.any() and len(others) > 1:
        wrong[clash] = rng.choice(others, size=int(clash.sum()))
        clash = wrong == y
    vote = np.where(right, y, wrong)
    if polarity is not None:
        vote = np.where(np.isin(vote, others), vote, -1)
    return np.where(rng.random(n) < p_fire, vote, -1)


def _generic(n, seed, salt, prior, accs, covs):
    np, rng = _np_rng(seed, salt)
    k = len(prior)
    y = rng.choice(k, size=n, p=prior)
    cols = [_vote(np, rng, y, k, acc, cov) for acc, cov in zip(accs, covs)]
    return np.stack(cols, 1).astype(np.int8), y, k


def regime_balanced(n: int, seed: int):
    """Two classes 50/50; ten independent functions, accuracy 0.6-0.85 per class, coverage 0.3-0.7."""
    _, rng = _np_rng(seed, 100)
    return _generic(n, seed, 1, [0.5, 0.5], rng.uniform(0.6, 0.85, (10, 2)), rng.uniform(0.3, 0.7, 10))


def regime_imbalanced(n: int, seed: int):
    """Two classes 10/90; ten independent functions as in balanced."""
    _, rng = _np_rng(seed, 101)
    return _generic(n, seed, 2, [0.1, 0.9], rng.uniform(0.6, 0.85, (10, 2)), rng.uniform(0.3, 0.7, 10))


def regime_one_class(n: int, seed: int):
    """Keyword-like rules: each votes only its class, fires 10-40 % of the rows of that class and 1-8 % of the
    others, and every rule fires more on long rows (a latent length that is not the label)."""
    np, rng = _np_rng(seed, 3)
    y = (rng.random(n) < 0.6).astype(np.int64)
    length = np.clip(rng.lognormal(0, 0.6, n), 0.2, 4)
    cols = []
    for j in range(10):
        cls = j % 2
        hit, miss = rng.uniform(0.1, 0.4), rng.uniform(0.01, 0.08)
        p = np.where(y == cls, hit, miss) * length
        cols.append(np.where(rng.random(n) < np.clip(p, 0, 1), cls, -1))
    return np.stack(cols, 1).astype(np.int8), y, 2


def regime_three_classes(n: int, seed: int):
    """Three classes 60/30/10; twelve functions, accuracy 0.55-0.85 per class, coverage 0.2-0.6."""
    _, rng = _np_rng(seed, 103)
    return _generic(n, seed, 4, [0.6, 0.3, 0.1], rng.uniform(0.55, 0.85, (12, 3)), rng.uniform(0.2, 0.6, 12))


def regime_copies(n: int, seed: int):
    """Six independent functions (accuracy 0.65-0.8) and two groups of four near-copies of a mediocre rule
    (accuracy 0.6): each copy repeats its rule's output on 95 % of rows, else votes on its own."""
    np, rng = _np_rng(seed, 5)
    y = (rng.random(n) < 0.5).astype(np.int64)
    cols = [_vote(np, rng, y, 2, rng.uniform(0.65, 0.8, 2), rng.uniform(0.3, 0.6)) for _ in range(6)]
    for _ in range(2):
        base = _vote(np, rng, y, 2, [0.6, 0.6], rng.uniform(0.4, 0.7))
        for _ in range(4):
            own = _vote(np, rng, y, 2, [0.6, 0.6], rng.uniform(0.4, 0.7))
            cols.append(np.where(rng.random(n) < 0.95, base, own))
    return np.stack(cols, 1).astype(np.int8), y, 2


def regime_adversarial(n: int, seed: int):
    """Ten functions, three of them worse than chance (accuracy 0.25-0.4), the rest 0.65-0.85."""
    np, rng = _np_rng(seed, 106)
    accs = np.concatenate([rng.uniform(0.25, 0.4, (3, 2)), rng.uniform(0.65, 0.85, (7, 2))])
    return _generic(n, seed, 6, [0.5, 0.5], accs, rng.uniform(0.3, 0.7, 10))


def regime_sparse(n: int, seed: int):
    """Ten functions with coverage 3-12 %: most rows get one vote or none."""
    _, rng = _np_rng(seed, 107)
    return _generic(n, seed, 7, [0.5, 0.5], rng.uniform(0.65, 0.9, (10, 2)), rng.uniform(0.03, 0.12, 10))


def regime_many_weak(n: int, seed: int):
    """Sixty weak functions: accuracy 0.52-0.62, coverage 0.1-0.4, classes 40/60."""
    _, rng = _np_rng(seed, 108)
    return _generic(n, seed, 8, [0.4, 0.6], rng.uniform(0.52, 0.62, (60, 2)), rng.uniform(0.1, 0.4, 60))


REGIMES = {
    "balanced": regime_balanced,
    "imbalanced 10/90": regime_imbalanced,
    "one-class rules": regime_one_class,
    "3 classes 60/30/10": regime_three_classes,
    "near-copies": regime_copies,
    "3 of 10 worse than chance": regime_adversarial,
    "sparse coverage": regime_sparse,
    "60 weak functions": regime_many_weak,
}

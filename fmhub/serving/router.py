"""Composition of experts: route each request to the adapter best suited to it.

A `Router` is a small text classifier whose classes are adapter names. It is
trained (`Router.fit`) from example texts per adapter (prompts of the task the
adapter was tuned for) and/or one description per adapter, and answers
``route(text) -> (adapter, confidence)``. The server uses it for
``"model": "auto"`` (docs/serving.md; ``backend_options: {router: PATH}``).

How it works (numpy only, deterministic: the same inputs give the same file
and the same routes, on any machine):

* **Features.** Lower-cased text, whitespace collapsed, first `MAX_CHARS`
  characters. Two groups: words (``\\w+``) and character n-grams (3 to 5 by
  default) of the whole text, so punctuation (code) and word pieces (typos,
  inflections) count too. Each group is TF-IDF weighted (``1 + log tf`` times
  smoothed idf) and L2-normalised on its own, then scaled by ``1/sqrt(2)``, so
  both groups weigh the same whatever the text's length. The vocabulary is the
  `max_features` features found in most training texts (ties: alphabetical).
* **Classifier.** Multinomial logistic regression with an L2 penalty, fitted
  by accelerated full-batch gradient descent on sparse features (a convex
  problem: no randomness, no initialisation to choose). Classes are weighted
  so that each adapter counts the same, however many examples it brought; a
  description counts as ``description_weight`` examples. The confidence is
  the softmax probability of the chosen adapter. There is no intercept: with
  the classes balanced the prior is uniform, so a text with no known feature
  gets exactly ``1/K`` for K adapters.
* **Descriptions and examples.** Either alone works; mixed, an adapter
  known only by its description competes with adapters whose examples also
  teach their style (filler words, length), so texts that are only mildly on
  its topic may go elsewhere: give every adapter a few examples when you can.
* **Fallback.** Below ``min_confidence`` the route is ``fallback`` (an adapter
  name, or the base model's name, e.g. ``base``).

File format (JSON, ``"format": "fmhub-router"``, ``"version": 1``)::

    {"format": "fmhub-router", "version": 1,
     "classes": ["code", "cooking", "legal"],          # adapter names, sorted
     "features": {"words": true, "char_ngrams": [3, 5], "max_chars": 20000},
     "vocab": ["c:  de", "w:recipe", ...],            # "w:" words, "c:" character n-grams; row order of weights
     "idf": [1.69, ...],                               # one per vocab entry
     "weights": [[0.12, -0.03, -0.09], ...],           # vocab x classes
     "min_confidence": 0.0, "fallback": null,
     "training": {"examples": {"code": 40, ...}, "descriptions": ["code"], "l2": 0.0001, "iterations": 400}}

Numbers are rounded to 6 decimals when fitted, so what is saved is exactly
what routes in memory: a saved and loaded router routes identically. A
reader refuses a newer ``version``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from fmhub.base import boundedjson
from fmhub.base.errors import FmhubError

FORMAT = "fmhub-router"
VERSION = 1
MAX_CHARS = 20_000  # a long prompt's head says what it is about; bounds the work per request
MAX_FILE_BYTES = 256 << 20  # a saved router: a weight per vocabulary entry and class, ~10 bytes each
DECIMALS = 6
_WORD = re.compile(r"\w+")


class RouterError(FmhubError):
    """A router that cannot be trained or read."""


# -- features ------------------------------------------------------------------------------

def _normalise(text: str, max_chars: int) -> str:
    return " ".join(text.lower().split())[:max_chars]


def _features(text: str, words: bool, ngrams: tuple[int, int], max_chars: int) -> tuple[Counter, Counter]:
    """Word counts and character n-gram counts of ``text``, keyed as stored in ``vocab`` ("w:..." / "c:...")."""
    t = _normalise(text, max_chars)
    w = Counter("w:" + m for m in _WORD.findall(t)) if words else Counter()
    c: Counter = Counter()
    lo, hi = ngrams
    if hi >= lo >= 1:
        padded = f" {t} "  # the edges of the text are n-grams too
        for n in range(lo, hi + 1):
            c.update("c:" + padded[i:i + n] for i in range(len(padded) - n + 1))
    return w, c


@dataclass
class _Sparse:
    """Rows of TF-IDF vectors as COO triplets (row, column, value): memory grows with the features present, not the vocabulary."""

    n: int
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray

    def dot(self, w: np.ndarray) -> np.ndarray:  # X @ W, [n, K]
        out = np.zeros((self.n, w.shape[1]))
        for k in range(w.shape[1]):
            out[:, k] = np.bincount(self.rows, weights=self.vals * w[self.cols, k], minlength=self.n)
        return out

    def tdot(self, g: np.ndarray, v: int) -> np.ndarray:  # X.T @ G, [V, K]
        out = np.zeros((v, g.shape[1]))
        for k in range(g.shape[1]):
            out[:, k] = np.bincount(self.cols, weights=self.vals * g[self.rows, k], minlength=v)
        return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# -- the router ------------------------------------------------------------------------------

@dataclass
class Router:
    """A trained router; build one with `Router.fit` or `Router.load`, see the module doc."""

    classes: list[str]
    vocab: list[str]
    idf: np.ndarray  # [V]
    weights: np.ndarray  # [V, K]
    min_confidence: float = 0.0
    fallback: str | None = None
    words: bool = True
    char_ngrams: tuple[int, int] = (3, 5)
    max_chars: int = MAX_CHARS
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {f: i for i, f in enumerate(self.vocab)}

    # -- training ----------------------------------------------------------------------------
    @classmethod
    def fit(cls, examples: Mapping[str, Iterable[str]] | None, descriptions: Mapping[str, str] | None = None,
            min_confidence: float = 0.0, fallback: str | None = None, *, max_features: int = 20_000,
            char_ngrams: tuple[int, int] = (3, 5), words: bool = True, l2: float = 1e-4, iterations: int = 400,
            description_weight: float = 1.0, max_chars: int = MAX_CHARS) -> "Router":
        """Train on ``examples`` (adapter name -> texts) and ``descriptions`` (adapter name -> what it is for).

        Every adapter needs at least one text (an example or its description).
        ``min_confidence`` in [0, 1): routes less sure than that go to
        ``fallback``, which is then required.
        """
        examples = {k: [t for t in v if isinstance(t, str) and t.strip()] for k, v in (examples or {}).items()}
        descriptions = {k: v for k, v in (descriptions or {}).items() if isinstance(v, str) and v.strip()}
        classes = sorted(set(examples) | set(descriptions))
        if not classes:
            raise RouterError("a router needs example texts or a description for at least one adapter")
        empty = [c for c in classes if not examples.get(c) and c not in descriptions]
        if empty:
            raise RouterError(f"no example text and no description for adapter(s) {', '.join(empty)}: give some, or leave them out")
        if not 0.0 <= min_confidence < 1.0:
            raise RouterError(f"min_confidence must be in [0, 1), not {min_confidence}")
        if min_confidence > 0 and not fallback:
            raise RouterError("min_confidence needs a fallback: the adapter (or the base model, e.g. 'base') that unsure requests go to")
        lo, hi = char_ngrams
        if not words and not (hi >= lo >= 1):
            raise RouterError("no features: enable words or give char_ngrams=(lo, hi) with 1 <= lo <= hi")
        if max_features < 1 or iterations < 1 or l2 < 0 or description_weight <= 0:
            raise RouterError("max_features and iterations must be ≥ 1, l2 ≥ 0, description_weight > 0")

        # training documents, in a fixed order (class, then examples, then the description)
        docs: list[tuple[int, str, float]] = []
        for k, c in enumerate(classes):
            docs += [(k, t, 1.0) for t in examples.get(c, [])]
            if c in descriptions:
                docs.append((k, descriptions[c], description_weight))
        counted = [_features(t, words, (lo, hi), max_chars) for _, t, _ in docs]
        df: Counter = Counter()
        for w, c in counted:
            df.update(w.keys())
            df.update(c.keys())
        vocab = sorted(df, key=lambda f: (-df[f], f))[:max_features]
        vocab.sort()
        n = len(docs)
        idf = np.round(np.array([math.log((1 + n) / (1 + df[f])) + 1.0 for f in vocab]), DECIMALS)

        router = cls(classes, vocab, idf, np.zeros((len(vocab), len(classes))), min_confidence,
                     fallback, words, (lo, hi), max_chars)
        x = router._matrix(counted)
        y = np.array([k for k, _, _ in docs])
        sample_w = np.array([w for _, _, w in docs])
        # each adapter weighs the same in the loss, however many texts it brought
        per_class = np.bincount(y, weights=sample_w, minlength=len(classes))
        sample_w = sample_w / per_class[y] / len(classes)
        router.weights = np.round(_fit_logreg(x, y, sample_w, len(vocab), len(classes), l2, iterations), DECIMALS)
        router.training = {"examples": {c: len(examples.get(c, [])) for c in classes}, "descriptions": sorted(descriptions),
                           "l2": l2, "iterations": iterations, "max_features": max_features,
                           "description_weight": description_weight}
        return router

    # -- routing -----------------------------------------------------------------------------
    def probabilities(self, text: str) -> dict[str, float]:
        """Each adapter's probability for ``text``."""
        [p] = _softmax(self._matrix([self._count(text)]).dot(self.weights))
        return {c: float(v) for c, v in zip(self.classes, p)}

    def route(self, text: str) -> tuple[str, float]:
        """The adapter for ``text`` and the router's confidence in it; ``fallback`` when that is under ``min_confidence``.

        The confidence returned is always the best adapter's probability, so a
        fallback route shows how unsure the router was.
        """
        probs = self.probabilities(text if isinstance(text, str) else "")
        best = max(self.classes, key=lambda c: (probs[c], -self.classes.index(c)))  # ties: the first name
        confidence = probs[best]
        if self.fallback is not None and confidence < self.min_confidence:
            return self.fallback, confidence
        return best, confidence

    # -- files -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "classes": list(self.classes),
                "features": {"words": self.words, "char_ngrams": list(self.char_ngrams), "max_chars": self.max_chars},
                "vocab": list(self.vocab), "idf": self.idf.tolist(), "weights": self.weights.tolist(),
                "min_confidence": self.min_confidence, "fallback": self.fallback, "training": self.training}

    def save(self, path: str) -> None:
        """Write the router as JSON (atomically: a reader never sees half a file)."""
        from fmhub.base.atomic import atomic_write

        with atomic_write(str(path), "w") as f:
            json.dump(self.to_json(), f, separators=(",", ":"))
            f.write("\n")

    @classmethod
    def from_json(cls, doc: dict, where: str = "router") -> "Router":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise RouterError(f"{where}: not an fmhub router file (no \"format\": \"{FORMAT}\")")
        version = doc.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise RouterError(f"{where}: router format version {version!r}; this fmhub reads version {VERSION} and older: upgrade fmhub")
        try:
            feats = doc["features"]
            classes, vocab = [str(c) for c in doc["classes"]], [str(v) for v in doc["vocab"]]
            idf = np.array(doc["idf"], dtype=float).reshape(len(vocab))
            weights = np.array(doc["weights"], dtype=float).reshape(len(vocab), len(classes))
            lo, hi = (int(v) for v in feats["char_ngrams"])
            return cls(classes, vocab, idf, weights, float(doc.get("min_confidence", 0.0)), doc.get("fallback"),
                       bool(feats["words"]), (lo, hi), int(feats.get("max_chars", MAX_CHARS)), dict(doc.get("training") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise RouterError(f"{where}: malformed router file ({exc.__class__.__name__}: {exc}); train and save it again") from None

    @classmethod
    def load(cls, path: str) -> "Router":
        """Read a file written by `save`."""
        try:  # a committed router may come from a clone: bounded in size, nesting and numbers
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES >> 20} MiB")
            doc = boundedjson.loads(data, allow_nan=True)  # as json.load read it: a weight may be NaN
        except OSError as exc:
            raise RouterError(f"cannot read router {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise RouterError(f"{path}: not JSON ({exc}); is it a router file written by Router.save?") from None
        return cls.from_json(doc, str(path))

    # -- internals ---------------------------------------------------------------------------
    def _count(self, text: str) -> tuple[Counter, Counter]:
        return _features(text, self.words, self.char_ngrams, self.max_chars)

    def _matrix(self, counted: list[tuple[Counter, Counter]]) -> _Sparse:
        rows, cols, vals = [], [], []
        for i, groups in enumerate(counted):
            for group in groups:
                idx = [self._index[f] for f in group if f in self._index]
                if not idx:
                    continue
                idx.sort()  # a fixed order of additions: the same floats everywhere
                v = np.array([(1.0 + math.log(group[self.vocab[j]])) * self.idf[j] for j in idx])
                v *= 1.0 / (np.linalg.norm(v) * math.sqrt(2.0))
                rows += [i] * len(idx)
                cols += idx
                vals += v.tolist()
        return _Sparse(len(counted), np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), np.array(vals, dtype=float))


def _fit_logreg(x: _Sparse, y: np.ndarray, sample_w: np.ndarray, v: int, k: int, l2: float, iterations: int) -> np.ndarray:
    """Weighted multinomial logistic regression without intercept, by Nesterov-accelerated gradient descent."""
    onehot = np.zeros((x.n, k))
    onehot[np.arange(x.n), y] = 1.0
    # rows have norm ≤ 1 and softmax's Hessian is ≤ 1/2: the gradient is (1/2 + l2)-Lipschitz, and 1/L the classic step
    step = 1.0 / (0.5 + l2)
    w = w_prev = np.zeros((v, k))
    t = 1.0
    for _ in range(iterations):
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        yw = w + (t - 1.0) / t_next * (w - w_prev)
        g = (_softmax(x.dot(yw)) - onehot) * sample_w[:, None]  # sample weights sum to 1: a weighted mean
        w_prev, w = w, yw - step * (x.tdot(g, v) + l2 * yw)
        t = t_next
    return w

"""Built-in plugin: ``dedup`` (exact duplicates) and ``near-dup`` (MinHash-LSH), both dataset-scoped.

The first occurrence of a text is kept, later ones are dropped with the
position of the row they repeat. Hashing and MinHash signatures are computed
in the data backend's workers (``prepare``); the pass that remembers what it
has seen runs in order in the calling process.

``near-dup`` shingles each text into word n-grams (default 3) or character
n-grams (default 5), hashes each shingle to 64 bits, and takes ``num_perm``
minima under random affine maps ``(a·h + b) >> 32`` (a signature, computed
for a whole batch at once with numpy). Signatures are cut into LSH bands as
datasketch's `MinHashLSH` chooses them for ``threshold``, weighted for recall
(at 0.7 and 128 permutations: 20 bands of 6 values, which make a pair at the
threshold a candidate 92% of the time, at 0.8 99.8%). The workers also hash
each band to a 64-bit key and send signatures and keys back as bytes; the
pass (`fmhub.data.clean.lsh.BandIndex`) looks a whole batch's keys up in
sorted numpy runs and goes through Python only for rows with a candidate
(datasketch's own index re-encodes every band in the calling process: 300 µs
a row; a dict per band: ~30 µs and 2.4 KB a kept row). A candidate counts as
a duplicate when the signatures agree on at least ``threshold`` of their
positions: the estimated Jaccard similarity of the shingle sets, recorded
with the drop. Memory in the calling process: about 760 bytes per kept row
at the defaults (the signature and 12 bytes per band).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np
from pydantic import Field

from fmhub import hookimpl
from fmhub.data.clean.lsh import STEP, BandIndex, mix64
from fmhub.plugin.options import Options, parse_options, text_of
from fmhub.plugin.interfaces import CleanContext, Drop

_WORD = re.compile(r"\w+")


def _normalize(text: str, casefold: bool, whitespace: bool) -> str:
    if casefold:
        text = text.casefold()
    if whitespace:
        text = " ".join(text.split())  # every run of Unicode whitespace to one space, ends trimmed
    return text


# ---------------------------------------------------------------- exact


class DedupOptions(Options):
    casefold: bool = Field(False, description="compare texts case-insensitively")
    whitespace: bool = Field(True, description="collapse runs of whitespace and trim ends before comparing")


@dataclass(frozen=True)
class DedupConfig:
    columns: tuple[str, ...]
    casefold: bool
    whitespace: bool


class Dedup:
    """Drops rows whose (normalized) text equals an earlier row's."""

    name = "dedup"
    scope = "dataset"

    def configure(self, options: Mapping[str, Any], context: CleanContext) -> DedupConfig:
        o = parse_options(self.name, DedupOptions, options)
        return DedupConfig(tuple(context.columns), o.casefold, o.whitespace)

    def prepare(self, rows: Sequence[Mapping[str, Any]], config: DedupConfig) -> list:
        out: list = []
        for row in rows:
            text = text_of(row, config.columns)
            if isinstance(text, Drop):
                out.append(text)
            else:
                # 64 bits: a false match needs ~4e9 distinct texts for even odds
                digest = hashlib.blake2b(_normalize(text, config.casefold, config.whitespace).encode("utf-8", "surrogatepass"), digest_size=8)
                out.append(int.from_bytes(digest.digest(), "little"))
        return out

    def open(self, config: DedupConfig) -> "DedupPass":
        return DedupPass()


class DedupPass:
    def __init__(self) -> None:
        self.first: dict[int, int] = {}

    def clean(self, positions: Sequence[int], prepared: Sequence[Any]) -> list:
        out: list = []
        for pos, digest in zip(positions, prepared):
            if isinstance(digest, Drop):
                out.append(digest)
                continue
            first = self.first.setdefault(digest, pos)
            out.append(None if first == pos else Drop(f"exact duplicate of position {first}", {"duplicate_of": first}))
        return out


# ---------------------------------------------------------------- near


class NearDupOptions(Options):
    shingle: Literal["word", "char"] = "word"
    ngram: Optional[int] = Field(None, ge=1, le=64, description="shingle size (default: 3 words, or 5 characters)")
    num_perm: int = Field(128, ge=16, le=1024)
    threshold: float = Field(0.7, gt=0, lt=1, description="estimated Jaccard similarity at which a row is a near-duplicate")
    seed: int = Field(1, ge=0)
    casefold: bool = True
    verify: bool = Field(True, description="check each LSH candidate's estimated similarity against threshold; false: a "
                                           "shared band alone makes a duplicate, as datatrove's MinHash pipeline does")


@dataclass(frozen=True)
class NearDupConfig:
    columns: tuple[str, ...]
    shingle: str
    ngram: int
    num_perm: int
    threshold: float
    seed: int
    casefold: bool
    bands: int = 0
    band_size: int = 0
    verify: bool = True


class NearDup:
    """Drops rows whose shingle set is within ``threshold`` Jaccard similarity of a kept row's (MinHash-LSH)."""

    name = "near-dup"
    scope = "dataset"

    def configure(self, options: Mapping[str, Any], context: CleanContext) -> NearDupConfig:
        from datasketch import MinHashLSH

        o = parse_options(self.name, NearDupOptions, options)
        ngram = o.ngram or (3 if o.shingle == "word" else 5)
        # datasketch's choice of bands for this threshold, weighted for recall: a candidate is checked
        # against its signature, so a false positive costs one comparison, a false negative a duplicate kept
        lsh = MinHashLSH(threshold=o.threshold, num_perm=o.num_perm, weights=(0.1, 0.9))
        return NearDupConfig(tuple(context.columns), o.shingle, ngram, o.num_perm, o.threshold, o.seed, o.casefold, lsh.b, lsh.r,
                             o.verify)

    def prepare(self, rows: Sequence[Mapping[str, Any]], config: NearDupConfig) -> list:
        """Per row: ``(signature bytes, band keys as uint64 bytes)``; None without shingles; a `Drop` without text."""
        sigs = signatures([text_of(row, config.columns) for row in rows], config)
        have = [i for i, s in enumerate(sigs) if isinstance(s, np.ndarray)]
        if have:
            keys = band_keys(np.stack([sigs[i] for i in have]), config.bands, config.band_size)
            for k, i in enumerate(have):
                sigs[i] = (sigs[i].tobytes(), keys[k].tobytes())  # bytes: pickled back to the pass at memory speed
        return sigs

    def open(self, config: NearDupConfig) -> "NearDupPass":
        return NearDupPass(config)


class NearDupPass:
    """The rows kept so far, in a `BandIndex`: each batch is looked up at once, the rows with candidates decided in order."""

    def __init__(self, config: NearDupConfig) -> None:
        self.threshold = config.threshold if config.verify else 0.0  # unverified: any candidate (a shared band) is a match
        self.index = BandIndex(config.num_perm, config.bands)

    def clean(self, positions: Sequence[int], prepared: Sequence[Any]) -> list:
        out: list = list(prepared)  # no text (a Drop), or too little to shingle (None): nothing to compare
        have = [i for i, p in enumerate(prepared) if isinstance(p, tuple)]
        if not have:
            return out
        sigs = np.frombuffer(b"".join(prepared[i][0] for i in have), dtype=np.uint32).reshape(len(have), -1)
        keys = np.frombuffer(b"".join(prepared[i][1] for i in have), dtype=np.uint64).reshape(len(have), -1)
        found = self.index.decide([positions[i] for i in have], sigs, keys, self.threshold)
        for i, f in zip(have, found):
            if f is None:
                out[i] = None
            else:
                best, j = f
                out[i] = Drop(f"near-duplicate of position {best} (Jaccard ≈ {j:.2f})", {"duplicate_of": best, "jaccard": round(j, 4)})
        return out


# ---------------------------------------------------------------- signatures

_CHUNK = 4096  # shingles per matrix: 4096 x num_perm x 8 bytes (4 MB at 128) stays in cache


@functools.lru_cache(maxsize=8)
def _perms(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a[:, None], b[:, None]


_word_hashes: dict[str, int] = {}


def _word_hash(word: str) -> int:
    h = _word_hashes.get(word)
    if h is None:
        if len(_word_hashes) > 1 << 20:  # bounded: a worker streaming a huge vocabulary
            _word_hashes.clear()
        h = _word_hashes[word] = int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h


def _units(text: str, config: NearDupConfig) -> np.ndarray:
    """The text as 64-bit hashes of its words (or characters), the units shingles are made of."""
    if config.shingle == "word":
        words = _WORD.findall(text.casefold() if config.casefold else text)
        hashes = list(map(_word_hashes.get, words))  # mostly cache hits: word frequencies are Zipfian
        if None in hashes:
            hashes = [h if h is not None else _word_hash(w) for h, w in zip(hashes, words)]
        return np.array(hashes, dtype=np.uint64)
    text = _normalize(text, config.casefold, True)
    return mix64(np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64) + STEP)


def _batch_units(texts: list[tuple[int, str]], config: NearDupConfig) -> list[tuple[int, np.ndarray]]:
    """`_units` of each text, the word hashes of a whole batch looked up in one pass and made one array."""
    if config.shingle != "word":
        return [(i, _units(t, config)) for i, t in texts]
    words = [_WORD.findall(t.casefold() if config.casefold else t) for _, t in texts]
    flat = [w for ws in words for w in ws]
    hashes = list(map(_word_hashes.get, flat))  # mostly cache hits: word frequencies are Zipfian
    if None in hashes:
        hashes = [h if h is not None else _word_hash(w) for h, w in zip(hashes, flat)]
    arr = np.array(hashes, dtype=np.uint64)
    cuts = np.cumsum([len(ws) for ws in words])[:-1]
    return [(i, u) for (i, _), u in zip(texts, np.split(arr, cuts))] if texts else []


def _ngrams(units: np.ndarray, n: int) -> np.ndarray:
    """The hash of every run of ``n`` consecutive units (order matters: "a b c" and "c b a" differ)."""
    acc = units[: len(units) - n + 1].copy()
    for k in range(1, n):
        acc = mix64(acc * STEP + units[k: len(units) - n + 1 + k])
    return acc


def shingle_hashes(text: str, config: NearDupConfig) -> np.ndarray:
    """64-bit hashes of one text's shingles; a text shorter than one shingle is one shingle."""
    units = _units(text, config)
    return _ngrams(units, min(config.ngram, len(units))) if len(units) else units


def signatures(texts: Sequence[str | Drop], config: NearDupConfig) -> list:
    """One MinHash signature (``num_perm`` uint32) per text; a `Drop` stays a Drop, a text without shingles gives None.

    The whole batch is hashed at once: the texts' units are concatenated, every
    n-gram hashed in one pass, and the n-grams that straddle two texts dropped.
    """
    n = config.ngram
    out: list = [t if isinstance(t, Drop) else None for t in texts]
    units = _batch_units([(i, t) for i, t in enumerate(texts) if not isinstance(t, Drop)], config)
    rows = [(i, u) for i, u in units if len(u)]
    if not rows:
        return out
    lens = np.array([len(u) for _, u in rows])
    units = np.concatenate([u for _, u in rows])
    counts = np.maximum(lens - n + 1, 0)
    hashes = _ngrams(units, n) if len(units) >= n else np.empty(0, dtype=np.uint64)
    if n > 1 and len(hashes):
        ends = np.cumsum(lens)
        straddling = (ends - n + 1)[:, None] + np.arange(n - 1)[None, :]
        keep = np.ones(len(hashes), dtype=bool)
        keep[straddling[(straddling >= 0) & (straddling < len(hashes))]] = False
        hashes = hashes[keep]
    if (counts == 0).any():  # texts shorter than one shingle: one shingle each, put in their place
        parts = np.split(hashes, np.cumsum(counts)[:-1])
        parts = [p if c else _ngrams(u, len(u)) for p, c, (_, u) in zip(parts, counts, rows)]
        counts = np.array([len(p) for p in parts])
        hashes = np.concatenate(parts)
    sigs = _minhash_segments(hashes, counts, *_perms(config.num_perm, config.seed))
    for k, (i, _) in enumerate(rows):
        out[i] = sigs[k]
    return out


def _minhash_segments(hashes: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per segment of ``hashes`` (lengths ``counts``, all > 0): the minima of ``(a·h + b) >> 32`` over h, as uint32 rows."""
    sigs = np.empty((len(counts), len(a)), dtype=np.uint32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    first = 0
    while first < len(counts):
        last, size = first, 0
        while last < len(counts) and (last == first or size + counts[last] <= _CHUNK):
            size += counts[last]
            last += 1
        lo = starts[first]
        if last == first + 1:  # one segment, maybe longer than a chunk: slice by slice
            sig = None
            for s in range(lo, lo + counts[first], _CHUNK):
                part = _permute(hashes[s: min(s + _CHUNK, lo + counts[first])], a, b).min(axis=1)
                sig = part if sig is None else np.minimum(sig, part)
            sigs[first] = sig
        else:
            # maps in rows, shingles in columns: reducing along contiguous memory is ~6x faster
            block = _permute(hashes[lo: lo + size], a, b)
            sigs[first:last] = np.minimum.reduceat(block, starts[first:last] - lo, axis=1).T
        first = last
    return sigs


def _permute(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a·h + b) >> 32`` for every map (rows) and shingle hash h (columns), in one buffer (uint64, wrapping)."""
    out = np.multiply(a, hashes[None, :])
    out += b
    out >>= np.uint64(32)
    return out


def band_keys(sigs: np.ndarray, bands: int, size: int) -> np.ndarray:
    """One 64-bit key per band of ``size`` signature values, for each signature (rows): the LSH buckets."""
    cut = sigs[:, : bands * size].reshape(len(sigs), bands, size).astype(np.uint64)
    acc = cut[:, :, 0] + STEP
    for k in range(1, size):
        acc = mix64(acc * STEP + cut[:, :, k])
    return acc


@hookimpl
def fmhub_cleaners():
    return [Dedup(), NearDup()]

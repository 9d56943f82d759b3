"""The LSH index behind ``near-dup``'s in-order pass: MinHash signatures and band keys in flat numpy arrays.

A pass keeps every row that has no near-duplicate among the rows kept before
it, so it must run in input order, in one process: the one every batch goes
through. A dict per band holding a Python int per key cost about 2.4 KB and
20 dict probes per kept row; here a batch is looked up at once:

* band keys (salted with their band, so one index serves every band) sit in
  sorted runs of ``(key, kept row)`` pairs, 12 bytes a pair, merged like a
  binary counter (a run is merged into the one before it once it is at least
  half its size, up to ``MAX_RUN`` pairs), so a batch costs one
  ``searchsorted`` per run;
* signatures sit in blocks of ``BLOCK`` rows (``num_perm`` uint32 each), so
  growing never copies what is already stored.

Only rows with a candidate (a shared band key with a kept row, earlier in the
index or earlier in the batch) go through Python, in order. Memory: about
``num_perm × 4 + bands × 12 + 8`` bytes per kept row (760 at 128 and 20
bands), and up to ~130 MB while two runs merge.
"""

from __future__ import annotations

from array import array
from typing import Iterator, Sequence

import numpy as np

BLOCK = 1 << 14  # signatures per block: 8 MB at 128 permutations
# pairs per run at most: a merge briefly needs ~32 bytes a pair more, so runs stop growing here (4M pairs: 48 MB,
# ~130 MB to merge) rather than ending as one run of every pair, whose last merge doubled the pass's memory
MAX_RUN = 1 << 22

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
STEP = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the output (uint64, wrapping); MinHash's shingle hashing uses it too."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


class BandIndex:
    """Kept rows' signatures and band keys; `match` decides a batch in order and remembers the rows it keeps."""

    def __init__(self, num_perm: int, bands: int) -> None:
        self.num_perm, self.bands = num_perm, bands
        self.salt = (np.arange(1, bands + 1, dtype=np.uint64) * STEP)[None, :]
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # sorted salted keys, kept-row ordinals
        self.blocks: list[np.ndarray] = []
        self.positions = array("q")  # kept ordinal -> input position

    def __len__(self) -> int:
        return len(self.positions)

    def decide(self, positions: Sequence[int], sigs: np.ndarray, keys: np.ndarray, threshold: float) -> list[tuple[int, float] | None]:
        """Per row, in order: None when it is kept (and now indexed), else ``(position of its best kept match, similarity)``.

        ``sigs``: one signature per row (rows × num_perm uint32); ``keys``: the
        band keys (rows × bands uint64). A candidate is a kept row sharing a
        band key, in the index or kept earlier in this batch; the best is the
        one whose signature agrees on most values (the earliest on a tie), and
        the row is dropped when the share it agrees on is at least ``threshold``.
        """
        m = len(positions)
        salted = mix64(keys ^ self.salt)
        flat = salted.ravel()
        order = np.argsort(flat, kind="stable")  # sorted queries: searchsorted narrows each search from the last
        known = self._lookup(flat[order], order)
        earlier = _earlier_in_batch(flat[order], order, self.bands)
        out: list[tuple[int, int] | None] = [None] * m
        kept = np.ones(m, dtype=bool)
        for r in sorted(set(known) | set(earlier)):
            prior = sorted(known.get(r, ()))
            mates = [q for q in sorted(earlier.get(r, ())) if kept[q]]
            if not prior and not mates:
                continue
            cand = np.concatenate([self._sigs(prior), sigs[mates]]) if mates else self._sigs(prior)
            agree = np.count_nonzero(cand == sigs[r], axis=1)
            best = int(np.argmax(agree))  # the first maximum: the earliest kept row
            similarity = int(agree[best]) / self.num_perm
            if similarity >= threshold:
                where = self.positions[prior[best]] if best < len(prior) else positions[mates[best - len(prior)]]
                out[r] = (where, similarity)
                kept[r] = False
        self._add([p for p, k in zip(positions, kept) if k], sigs[kept], salted[kept])
        return out

    def _lookup(self, queries: np.ndarray, order: np.ndarray) -> dict[int, set[int]]:
        """Batch row -> ordinals of the kept rows sharing one of its keys, for the rows that share any.

        ``queries``: the batch's salted keys sorted; ``order``: where each sits in the batch (flat row × band).
        """
        rows, ords = [], []
        for run_keys, run_ords in self.runs:
            lo = np.searchsorted(run_keys, queries, "left")
            hit = np.flatnonzero(run_keys[np.minimum(lo, len(run_keys) - 1)] == queries)
            if not len(hit):
                continue
            start = lo[hit]
            cnt = np.searchsorted(run_keys, queries[hit], "right") - start
            offsets = np.repeat(start - np.concatenate([[0], np.cumsum(cnt)[:-1]]), cnt) + np.arange(int(cnt.sum()))
            rows.append(np.repeat(order[hit] // self.bands, cnt))
            ords.append(run_ords[offsets])
        found: dict[int, set[int]] = {}
        if rows:
            for r, o in zip(np.concatenate(rows).tolist(), np.concatenate(ords).tolist()):
                found.setdefault(r, set()).add(o)
        return found

    def _sigs(self, ordinals: list[int]) -> np.ndarray:
        if not ordinals:
            return np.empty((0, self.num_perm), dtype=np.uint32)
        return np.stack([self.blocks[o // BLOCK][o % BLOCK] for o in ordinals])

    def _add(self, positions: list[int], sigs: np.ndarray, salted: np.ndarray) -> None:
        if not positions:
            return
        first = len(self.positions)
        if first + len(positions) >= 2**31:  # ordinals are int32
            raise OverflowError("near-dup: more than 2^31 kept rows in one pass")
        self._store(sigs, first)
        self.positions.extend(positions)
        ords = np.repeat(np.arange(first, first + len(positions), dtype=np.int32), self.bands)
        flat = salted.ravel()
        order = np.argsort(flat, kind="stable")
        self.runs.append((flat[order], ords[order]))
        while (len(self.runs) > 1 and len(self.runs[-1][0]) * 2 >= len(self.runs[-2][0])
               and len(self.runs[-1][0]) + len(self.runs[-2][0]) <= MAX_RUN):
            (ka, oa), (kb, ob) = self.runs.pop(-2), self.runs.pop()
            keys = np.concatenate([ka, kb])
            order = np.argsort(keys, kind="stable")
            self.runs.append((keys[order], np.concatenate([oa, ob])[order]))

    def _store(self, sigs: np.ndarray, first: int) -> None:
        done = 0
        while done < len(sigs):
            at = (first + done) % BLOCK
            if at == 0:
                self.blocks.append(np.empty((BLOCK, self.num_perm), dtype=np.uint32))
            take = min(BLOCK - at, len(sigs) - done)
            self.blocks[-1][at: at + take] = sigs[done: done + take]
            done += take


def _earlier_in_batch(sorted_keys: np.ndarray, order: np.ndarray, bands: int) -> dict[int, set[int]]:
    """Batch row -> the earlier rows of the batch sharing one of its keys (rows sharing none are left out)."""
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    found: dict[int, set[int]] = {}
    if not len(same):
        return found
    for group in _groups(order, same):
        rows = sorted({int(i) // bands for i in group})
        for k, r in enumerate(rows[1:], 1):
            found.setdefault(r, set()).update(rows[:k])
    return found


def _groups(order: np.ndarray, same: np.ndarray) -> Iterator[np.ndarray]:
    """The runs of equal keys (as flat indices) that ``same`` (i where sorted[i] == sorted[i + 1]) marks."""
    breaks = np.flatnonzero(np.diff(same) != 1)
    starts = np.concatenate([[same[0]], same[breaks + 1]])
    ends = np.concatenate([same[breaks], [same[-1]]]) + 2
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield order[s:e]

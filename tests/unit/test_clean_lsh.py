"""`fmhub.data.clean.lsh.BandIndex` decides exactly as a row-at-a-time pass with one dict per band, in any batching."""

from __future__ import annotations

import numpy as np
import pytest

from fmhub.core.rows import LineBatch, parse_lines, read_batches, read_line_batches
from fmhub.data.clean.lsh import BandIndex

PERM, BANDS, SIZE = 32, 8, 4


def _corpus(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Signatures with near copies (some values changed) and band keys (the band's values, as its key)."""
    rng = np.random.default_rng(seed)
    sigs = rng.integers(0, 50, size=(n, PERM), dtype=np.uint32)  # few values: chance collisions in bands too
    for i in range(1, n):
        if rng.random() < 0.3:
            sigs[i] = sigs[rng.integers(i)]
            flip = rng.random(PERM) < rng.choice([0.05, 0.2, 0.4])
            sigs[i, flip] = rng.integers(0, 50, size=int(flip.sum()))
    cut = sigs[:, : BANDS * SIZE].reshape(n, BANDS, SIZE).astype(np.uint64)
    keys = cut[:, :, 0] * np.uint64(1 << 48) + cut[:, :, 1] * np.uint64(1 << 32) + cut[:, :, 2] * np.uint64(1 << 16) + cut[:, :, 3]
    return sigs, keys


def _reference(positions, sigs, keys, threshold) -> list:
    """The pass as it was: per band a dict key -> kept positions; best = most agreeing values, earliest on a tie."""
    tables = [{} for _ in range(BANDS)]
    kept: dict[int, np.ndarray] = {}
    out = []
    for pos, sig, ks in zip(positions, sigs, keys.tolist()):
        cands = sorted({c for t, k in zip(tables, ks) for c in t.get(k, ())})
        best, best_j = -1, -1.0
        for c in cands:
            j = np.count_nonzero(kept[c] == sig) / PERM
            if j > best_j:
                best, best_j = c, j
        if best_j >= threshold:
            out.append((best, best_j))
            continue
        for t, k in zip(tables, ks):
            t.setdefault(k, []).append(pos)
        kept[pos] = sig
        out.append(None)
    return out


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_band_index_matches_the_row_at_a_time_pass(batch):
    sigs, keys = _corpus(600, seed=batch)
    positions = list(range(0, 1800, 3))  # positions need not be consecutive
    want = _reference(positions, sigs, keys, 0.6)
    index, got = BandIndex(PERM, BANDS), []
    for s in range(0, len(positions), batch):
        got += index.decide(positions[s:s + batch], sigs[s:s + batch], keys[s:s + batch], 0.6)
    assert got == want
    assert sum(g is not None for g in got) > 50 and len(index) == sum(g is None for g in got)


def test_band_index_grows_its_signature_blocks_and_runs(monkeypatch):
    import fmhub.data.clean.lsh as lsh

    monkeypatch.setattr(lsh, "BLOCK", 16)  # many blocks, rows straddling them
    monkeypatch.setattr(lsh, "MAX_RUN", 400)  # runs that stop growing
    sigs, keys = _corpus(300, seed=5)
    want = _reference(list(range(300)), sigs, keys, 0.5)
    index, got = BandIndex(PERM, BANDS), []
    for s in range(0, 300, 13):
        got += index.decide(list(range(s, min(s + 13, 300))), sigs[s:s + 13], keys[s:s + 13], 0.5)
    assert got == want and all(len(keys) <= 400 for keys, _ in index.runs[:-1]) and len(index.runs) > 5


def test_line_batches_parse_as_read_batches_do(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \nnot json\n[1]\n{"a": 2, "b": 3}\n{"deep": ' + b"[" * 200 + b"]" * 200 + b"}\n")
    parsed = [parse_lines(b, ["a"]) for b in read_line_batches(str(path), 2)]
    direct = list(read_batches(str(path), 2, ["a"]))
    flat = lambda bs: ([p for b in bs for p in b.positions], [r for b in bs for r in b.rows], [e for b in bs for e in b.errors])  # noqa: E731
    assert flat(parsed) == flat(direct)
    assert flat(parsed)[0] == [0, 5] and [p for p, _ in flat(parsed)[2]] == [3, 4, 6]
    assert parse_lines(LineBatch([9], [b'{"x": "\xff"}'])).errors[0][0] == 9  # not UTF-8: one error, not a crash

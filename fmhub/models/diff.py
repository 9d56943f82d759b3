"""Semantic checkpoint diffs: what changed in each tensor, and by how much.

Inputs are views (`fmhub.models.views.CheckpointView`): tensors by name from a
manifest plus the store, a file on disk, or several shards combined, so
tensors are matched by name whatever shard holds them.

`diff_views(old, new)` compares two views tensor by tensor:

* equal oids mean unchanged without reading a byte; otherwise the two
  tensors' bytes are streamed side by side in chunks of `CHUNK_ELEMS` elements,
  so memory stays at a few chunks whatever the tensor size;
* "fraction changed" compares elements bitwise (their raw integer views), so a
  NaN that stays NaN is unchanged and -0.0 vs 0.0 is a change;
* norms are sums of squares in float64; Δ counts only the elements whose bits
  differ, so an unchanged NaN or Inf does not poison ‖Δ‖ (a changed one does);
* a dtype change with the same shape compares values (both sides decoded to
  float64); a shape change reports the norms of both sides;
* a stored tensor the access policy denies the user (checkout's rule,
  `fmhub.models.views.guard`) is listed by what the manifests say (its status by
  oid, dtype, shape) with a note naming the rule, and no number derived from
  its values (``withheld``); a denied dataset's rows are not read.

Elements are decoded by `fmhub.models.tensorstats` (numpy only). The changes
are rendered by `fmhub.models.difftext`; `fmhub.models.diffsides` gathers the
views of a revision, the index or the work tree for `fmhub diff`, and
`fmhub.models.textconv` describes one side for git's textconv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from fmhub.base.errors import FmhubError
from fmhub.models.tensorstats import (CHUNK_ELEMS, Codec, Reader, chunk_elems_for, codec, maxabs, nanmax, norm, sha256,
                                      sumsq)
from fmhub.models.views import CheckpointView, TensorRef

STATUSES = ("added", "removed", "dtype", "shape", "changed", "unchanged")


@dataclass
class TensorChange:
    """How one tensor differs between two checkpoints. Norms are L2 over all elements, in float64.

    ``delta_norm`` ‖new − old‖, ``old_norm`` ‖old‖, ``new_norm`` ‖new‖, ``rel_change``
    ‖Δ‖/‖old‖, ``frac_changed`` the fraction of elements whose bits (values, for a dtype
    change) differ, ``max_abs`` max |Δ|. A field is None where it does not apply or could
    not be computed (``note`` says why).
    """

    name: str
    status: str  # one of STATUSES
    old_dtype: str | None = None
    new_dtype: str | None = None
    old_shape: tuple[int, ...] | None = None
    new_shape: tuple[int, ...] | None = None
    delta_norm: float | None = None
    old_norm: float | None = None
    new_norm: float | None = None
    rel_change: float | None = None
    frac_changed: float | None = None
    n_changed: int | None = None
    max_abs: float | None = None
    numel: int = 0
    nbytes: int = 0
    path: str | None = None
    note: str | None = None
    withheld: bool = False  # the access policy denies the user its values: no number derived from them


class _Acc:
    def __init__(self) -> None:
        self.delta_sq = 0.0
        self.old_sq = 0.0
        self.new_sq = 0.0
        self.max_abs = 0.0
        self.n_changed = 0


def diff_views(old: CheckpointView, new: CheckpointView, chunk_elems: int = CHUNK_ELEMS) -> list[TensorChange]:
    """Every tensor of either view with how it changed: tensors of ``new`` in its order, then removed ones."""
    changes = []
    for name, n in new.tensors.items():
        o = old.tensors.get(name)
        changes.append(_added(n, chunk_elems) if o is None else diff_tensor(o, n, chunk_elems))
    for name, o in old.tensors.items():
        if name not in new.tensors:
            changes.append(_removed(o, chunk_elems))
    return changes


def diff_tensor(o: TensorRef, n: TensorRef, chunk_elems: int = CHUNK_ELEMS) -> TensorChange:
    ch = TensorChange(
        n.name, "changed", o.dtype, n.dtype, o.shape, n.shape, numel=n.numel, nbytes=n.size, path=n.path or o.path
    )
    if o.denied is not None or n.denied is not None:
        return _withheld(ch, o, n)
    if o.shape != n.shape:
        ch.status = "shape"
        ch.old_norm = _guard(ch, lambda: norm(o, chunk_elems))
        ch.new_norm = _guard(ch, lambda: norm(n, chunk_elems))
        return ch
    if o.dtype != n.dtype:
        ch.status = "dtype"
        _guard(ch, lambda: _value_diff(o, n, ch, chunk_elems))
        return ch
    if o.oid is not None and o.oid == n.oid:
        ch.status = "unchanged"
        return ch
    if o.size != n.size:  # only possible for a dtype fmhub does not know the width of
        ch.note = f"payload size {o.size} -> {n.size} bytes"
        return ch
    known_changed = o.oid is not None and n.oid is not None
    _guard(ch, lambda: _bit_diff(o, n, ch, chunk_elems, known_changed))
    if ch.note is not None and (o.oid is None) != (n.oid is None):
        # one side could not be read (its object is missing): the other side's bytes may still hash to its oid
        known, other = (o, n) if o.oid is not None else (n, o)
        try:
            if sha256(other) == known.oid:
                ch.status, ch.note = "unchanged", None
        except (FmhubError, OSError):
            pass
    return ch


def withheld_note(why: Exception, what: str = "values") -> str:
    """The note of a tensor (or dataset) whose ``what`` the access policy withholds: the rule, never a value."""
    d = getattr(why, "decision", None)
    return f"{what} withheld by the access policy" + (f" ({d.where})" if d is not None and d.where else "")


def _withheld(ch: TensorChange, o: TensorRef | None, n: TensorRef | None) -> TensorChange:
    """A tensor the user may not read (checkout would deny it): what the manifests say, by oid; no number from its values."""
    ch.withheld, ch.note = True, withheld_note((n if n is not None and n.denied is not None else o).denied)
    if o is None or n is None:
        return ch
    if o.shape != n.shape or o.dtype != n.dtype:
        ch.status = "shape" if o.shape != n.shape else "dtype"
    elif o.oid is not None and n.oid is not None:
        ch.status = "unchanged" if o.oid == n.oid else "changed"
    else:  # a work-tree side (no oid, the user's own bytes): its hash against the stored side's oid
        known, other = (o, n) if o.oid is not None else (n, o)
        try:
            same = other.denied is None and sha256(other) == known.oid
        except (FmhubError, OSError):
            same = False
        ch.status = "unchanged" if same else "changed"
    if ch.status == "unchanged":
        ch.withheld, ch.note = False, None  # nothing to show, nothing withheld
    return ch


def _guard(ch: TensorChange, fn: Callable[[], Any]) -> Any:
    """Run a computation; a missing or unreadable object leaves the numbers empty and says why."""
    try:
        return fn()
    except (FmhubError, OSError) as exc:
        ch.note = str(exc)
        return None


def _added(n: TensorRef, chunk_elems: int) -> TensorChange:
    ch = TensorChange(n.name, "added", None, n.dtype, None, n.shape, numel=n.numel, nbytes=n.size, path=n.path)
    if n.denied is not None:
        return _withheld(ch, None, n)
    ch.new_norm = _guard(ch, lambda: norm(n, chunk_elems))
    return ch


def _removed(o: TensorRef, chunk_elems: int) -> TensorChange:
    ch = TensorChange(o.name, "removed", o.dtype, None, o.shape, None, numel=o.numel, nbytes=o.size, path=o.path)
    if o.denied is not None:
        return _withheld(ch, o, None)
    ch.old_norm = _guard(ch, lambda: norm(o, chunk_elems))
    return ch


def _bit_diff(o: TensorRef, n: TensorRef, ch: TensorChange, chunk_elems: int, known_changed: bool) -> None:
    """Same dtype and shape: stream both sides, compare bits, accumulate norms of what differs."""
    c = codec(n.dtype)
    step = c.nbytes(chunk_elems_for(c, chunk_elems))
    acc = _Acc()
    saw_diff = False
    deferred: list[tuple[int, int]] = []  # unchanged chunks before the first difference: the old norm needs them
    per_element = c.bits in (4, 8, 16, 32, 64)
    with Reader(o) as ro, Reader(n) as rn:
        pos = 0
        while pos < n.size:
            k = min(step, n.size - pos)
            a, b = ro.read(k), rn.read(k)
            if a == b:
                if not (saw_diff or known_changed):
                    deferred.append((pos, k))
                elif c.decodable:
                    acc.old_sq += sumsq(c.values(a))
            else:
                if not saw_diff:
                    saw_diff = True
                    if c.decodable:
                        for p, m in deferred:
                            acc.old_sq += sumsq(c.values(ro.read_at(p, m)))
                    deferred = []
                _accumulate(c, a, b, acc, per_element)
            pos += k
    if not saw_diff:  # equal bytes (different oids cannot name equal bytes, but a file side has no oid)
        ch.status = "unchanged"
        return
    ch.n_changed = acc.n_changed if per_element else None
    ch.frac_changed = acc.n_changed / ch.numel if per_element and ch.numel else None
    if c.decodable:
        _finish_norms(ch, acc)
    else:
        ch.note = f"values of {c.dtype} are not decoded; compared by bytes only"


def _accumulate(c: Codec, a: bytes, b: bytes, acc: _Acc, per_element: bool) -> None:
    cnt, neq = c.count_diff(a, b)
    if per_element:
        acc.n_changed += cnt
    if not c.decodable:
        return
    va = c.values(a)
    acc.old_sq += sumsq(va)
    if neq is not None:
        if cnt == 0:
            return
        d = c.values_where(b, neq) - va[neq]  # the new side decoded only where it differs (1% of a sparse update)
    else:
        d = c.values(b) - va
    acc.delta_sq += sumsq(d)
    acc.max_abs = nanmax(acc.max_abs, maxabs(d))


def _finish_norms(ch: TensorChange, acc: _Acc) -> None:
    ch.delta_norm = math.sqrt(acc.delta_sq)
    ch.old_norm = math.sqrt(acc.old_sq)
    ch.max_abs = acc.max_abs
    ch.rel_change = _ratio(ch.delta_norm, ch.old_norm)


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _value_diff(o: TensorRef, n: TensorRef, ch: TensorChange, chunk_elems: int) -> None:
    """Same shape, different dtype: compare values in float64 (NaN equals NaN)."""
    import numpy as np

    co, cn = codec(o.dtype), codec(n.dtype)
    if not (co.decodable and cn.decodable):
        ch.note = f"cannot decode {o.dtype if not co.decodable else n.dtype}; dtype change not measured"
        return
    align = max(co.chunk_align, cn.chunk_align)
    elems = max(chunk_elems - chunk_elems % align, align)
    acc = _Acc()
    total = ch.numel
    with Reader(o) as ro, Reader(n) as rn:
        done = 0
        while done < total:
            k = min(elems, total - done)
            va, vb = co.values(ro.read(co.nbytes(k))), cn.values(rn.read(cn.nbytes(k)))
            acc.old_sq += sumsq(va)
            acc.new_sq += sumsq(vb)
            neq = ~((va == vb) | (np.isnan(va) & np.isnan(vb)))
            cnt = int(np.count_nonzero(neq))
            acc.n_changed += cnt
            if cnt:
                d = vb[neq] - va[neq]
                acc.delta_sq += sumsq(d)
                acc.max_abs = nanmax(acc.max_abs, maxabs(d))
            done += k
    ch.n_changed = acc.n_changed
    ch.frac_changed = acc.n_changed / total if total else None
    ch.new_norm = math.sqrt(acc.new_sq)
    _finish_norms(ch, acc)

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

Decoding needs numpy only (not torch): BF16 and every 8-bit float format are
decoded by bit shifting or a 256-entry table, F4 (E2M1, two per byte, low
nibble first) by a 16-entry table. F6 and unknown dtypes are compared by bytes
only.

`format_text` renders changes for git (one aligned line per changed tensor and
a summary of the unchanged ones); `to_json` for tools. The rest of the module
gathers the views of a revision, the index or the work tree for `fmhub diff`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from fmhub.base.errors import CorruptCheckpoint, FmhubError
from fmhub.core.manifest import MAX_MANIFEST_BYTES, Manifest, is_manifest
from fmhub.core.store import ObjectStore, file_sha256
from fmhub.models.views import CheckpointView, TensorRef, guard

CHUNK_ELEMS = 1 << 22  # elements per side read and decoded at a time
READ_CHUNK = 1 << 20  # bytes per read when only hashing / comparing

STATUSES = ("added", "removed", "dtype", "shape", "changed", "unchanged")

class _Reader:
    """Sequential reads of one tensor's bytes, with re-reads of earlier ranges."""

    def __init__(self, ref: TensorRef) -> None:
        self.ref = ref
        self._f, self._base = ref.open()
        self._f.seek(self._base)
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = self._read_exact(n)
        self.pos += n
        return data

    def read_at(self, pos: int, n: int) -> bytes:
        self._f.seek(self._base + pos)
        data = self._read_exact(n)
        self._f.seek(self._base + self.pos)
        return data

    def _read_exact(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            part = self._f.read(n - got)
            if not part:
                raise CorruptCheckpoint(f"{self.ref.path}: tensor {self.ref.name!r} is truncated (the file changed while being read?)")
            parts.append(part)
            got += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Decoding raw elements (numpy)


def _np():
    import numpy

    return numpy


def _minifloat_table(ebits: int, mbits: int, bias: int, kind: str) -> list[float]:
    """Value of every code of a small float format. kind: ieee (Inf/NaN at max exponent), fn (NaN at all ones,
    no Inf), fnuz (NaN at the negative-zero code, no Inf), finite (no special values)."""
    n = 1 << (1 + ebits + mbits)
    emax, mmax = (1 << ebits) - 1, (1 << mbits) - 1
    out = []
    for code in range(n):
        sign = -1.0 if code >> (ebits + mbits) & 1 else 1.0
        e, m = (code >> mbits) & emax, code & mmax
        if kind == "fnuz" and code == n >> 1:
            out.append(math.nan)
        elif kind == "ieee" and e == emax:
            out.append(sign * math.inf if m == 0 else math.nan)
        elif kind == "fn" and e == emax and m == mmax:
            out.append(math.nan)
        elif e == 0:
            out.append(sign * math.ldexp(m / (1 << mbits), 1 - bias))
        else:
            out.append(sign * math.ldexp(1 + m / (1 << mbits), e - bias))
    return out


_TABLE_FORMATS = {
    "F8_E4M3": (4, 3, 7, "fn"),
    "F8_E5M2": (5, 2, 15, "ieee"),
    "F8_E4M3FNUZ": (4, 3, 8, "fnuz"),
    "F8_E5M2FNUZ": (5, 2, 16, "fnuz"),
    "F4": (2, 1, 1, "finite"),
}
_NATIVE = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "C64": "<c8",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "u1",
}
_BITS_VIEW = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}
_tables: dict[str, Any] = {}


def _table(dtype: str):
    np = _np()
    if dtype not in _tables:
        if dtype == "F8_E8M0":
            vals = [math.nan if c == 255 else math.ldexp(1.0, c - 127) for c in range(256)]
        else:
            vals = _minifloat_table(*_TABLE_FORMATS[dtype])
        _tables[dtype] = np.array(vals, dtype=np.float64)
    return _tables[dtype]


@dataclass(frozen=True)
class Codec:
    """How to read a run of raw elements of one dtype."""

    dtype: str
    bits: int | None  # per element; None: unknown (compared as bytes)
    decodable: bool

    @property
    def chunk_align(self) -> int:
        """Elements per whole number of bytes."""
        return 2 if self.bits == 4 else (4 if self.bits == 6 else 1)

    def nbytes(self, elems: int) -> int:
        return elems * (self.bits or 8) // 8

    def values(self, raw: bytes):
        """float64 (complex128 for C64) array of the elements in ``raw``."""
        np = _np()
        d = self.dtype
        if d in _NATIVE:
            a = np.frombuffer(raw, dtype=_NATIVE[d])
            return a.astype(np.complex128 if d == "C64" else np.float64)
        if d == "BF16":
            return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if d == "F4":
            b = np.frombuffer(raw, dtype=np.uint8)
            codes = np.empty(b.size * 2, dtype=np.uint8)
            codes[0::2], codes[1::2] = b & 0xF, b >> 4
            return _table(d)[codes]
        if d in _TABLE_FORMATS or d == "F8_E8M0":
            return _table(d)[np.frombuffer(raw, dtype=np.uint8)]
        raise ValueError(f"cannot decode {d}")

    def count_diff(self, a: bytes, b: bytes) -> tuple[int, Any]:
        """(elements whose bits differ, boolean mask of them or None when not per element)."""
        np = _np()
        if self.bits in (8, 16, 32, 64):
            dt = _BITS_VIEW[self.bits // 8]
            neq = np.frombuffer(a, dtype=dt) != np.frombuffer(b, dtype=dt)
            return int(np.count_nonzero(neq)), neq
        if self.bits == 4:
            x = np.frombuffer(a, dtype=np.uint8) ^ np.frombuffer(b, dtype=np.uint8)
            neq = np.empty(x.size * 2, dtype=bool)
            neq[0::2], neq[1::2] = (x & 0xF) != 0, (x >> 4) != 0
            return int(np.count_nonzero(neq)), neq
        return -1, None  # F6 / unknown: no element boundaries we can trust


def codec(dtype: str) -> Codec:
    from fmhub.core.tensors import DTYPE_BITS

    bits = DTYPE_BITS.get(dtype)
    decodable = dtype in _NATIVE or dtype in _TABLE_FORMATS or dtype in ("BF16", "F8_E8M0")
    return Codec(dtype, bits, decodable)


def _sumsq(x) -> float:
    np = _np()
    if x.size == 0:
        return 0.0
    if np.iscomplexobj(x):
        return float(np.vdot(x, x).real)
    return float(np.dot(x, x))


def _maxabs(x) -> float:
    np = _np()
    return float(np.max(np.abs(x))) if x.size else 0.0


def _nanmax(a: float, b: float) -> float:
    """max that lets NaN win (a NaN change must show)."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


def _chunk_elems(c: Codec, chunk_elems: int) -> int:
    return max(chunk_elems - chunk_elems % c.chunk_align, c.chunk_align)


# ---------------------------------------------------------------------------
# Diffing


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
        ch.old_norm = _guard(ch, lambda: _norm(o, chunk_elems))
        ch.new_norm = _guard(ch, lambda: _norm(n, chunk_elems))
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
            if _sha256(other) == known.oid:
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
            same = other.denied is None and _sha256(other) == known.oid
        except (FmhubError, OSError):
            same = False
        ch.status = "unchanged" if same else "changed"
    if ch.status == "unchanged":
        ch.withheld, ch.note = False, None  # nothing to show, nothing withheld
    return ch


def _sha256(ref: TensorRef) -> str:
    h = hashlib.sha256()
    with _Reader(ref) as r:
        left = ref.size
        while left:
            k = min(READ_CHUNK, left)
            h.update(r.read(k))
            left -= k
    return h.hexdigest()


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
    ch.new_norm = _guard(ch, lambda: _norm(n, chunk_elems))
    return ch


def _removed(o: TensorRef, chunk_elems: int) -> TensorChange:
    ch = TensorChange(o.name, "removed", o.dtype, None, o.shape, None, numel=o.numel, nbytes=o.size, path=o.path)
    if o.denied is not None:
        return _withheld(ch, o, None)
    ch.old_norm = _guard(ch, lambda: _norm(o, chunk_elems))
    return ch


def _norm(ref: TensorRef, chunk_elems: int) -> float | None:
    c = codec(ref.dtype)
    if not c.decodable:
        return None
    step = c.nbytes(_chunk_elems(c, chunk_elems))
    total = 0.0
    with _Reader(ref) as r:
        left = ref.size
        while left:
            k = min(step, left)
            total += _sumsq(c.values(r.read(k)))
            left -= k
    return math.sqrt(total)


def _bit_diff(o: TensorRef, n: TensorRef, ch: TensorChange, chunk_elems: int, known_changed: bool) -> None:
    """Same dtype and shape: stream both sides, compare bits, accumulate norms of what differs."""
    c = codec(n.dtype)
    step = c.nbytes(_chunk_elems(c, chunk_elems))
    acc = _Acc()
    saw_diff = False
    deferred: list[tuple[int, int]] = []  # unchanged chunks before the first difference: the old norm needs them
    per_element = c.bits in (4, 8, 16, 32, 64)
    with _Reader(o) as ro, _Reader(n) as rn:
        pos = 0
        while pos < n.size:
            k = min(step, n.size - pos)
            a, b = ro.read(k), rn.read(k)
            if a == b:
                if not (saw_diff or known_changed):
                    deferred.append((pos, k))
                elif c.decodable:
                    acc.old_sq += _sumsq(c.values(a))
            else:
                if not saw_diff:
                    saw_diff = True
                    if c.decodable:
                        for p, m in deferred:
                            acc.old_sq += _sumsq(c.values(ro.read_at(p, m)))
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
    acc.old_sq += _sumsq(va)
    if neq is not None:
        if cnt == 0:
            return
        d = _values_where(c, b, neq) - va[neq]  # the new side decoded only where it differs (1% of a sparse update)
    else:
        d = c.values(b) - va
    acc.delta_sq += _sumsq(d)
    acc.max_abs = _nanmax(acc.max_abs, _maxabs(d))


def _values_where(c: Codec, raw: bytes, mask) -> Any:
    """``c.values(raw)[mask]`` without decoding the elements outside ``mask`` (whole-byte elements only)."""
    np = _np()
    if c.bits in (8, 16, 32, 64) and c.dtype != "C64":
        return c.values(np.frombuffer(raw, dtype=_BITS_VIEW[c.bits // 8])[mask].tobytes())
    return c.values(raw)[mask]


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
    np = _np()
    co, cn = codec(o.dtype), codec(n.dtype)
    if not (co.decodable and cn.decodable):
        ch.note = f"cannot decode {o.dtype if not co.decodable else n.dtype}; dtype change not measured"
        return
    align = max(co.chunk_align, cn.chunk_align)
    elems = max(chunk_elems - chunk_elems % align, align)
    acc = _Acc()
    total = ch.numel
    with _Reader(o) as ro, _Reader(n) as rn:
        done = 0
        while done < total:
            k = min(elems, total - done)
            va, vb = co.values(ro.read(co.nbytes(k))), cn.values(rn.read(cn.nbytes(k)))
            acc.old_sq += _sumsq(va)
            acc.new_sq += _sumsq(vb)
            neq = ~((va == vb) | (np.isnan(va) & np.isnan(vb)))
            cnt = int(np.count_nonzero(neq))
            acc.n_changed += cnt
            if cnt:
                d = vb[neq] - va[neq]
                acc.delta_sq += _sumsq(d)
                acc.max_abs = _nanmax(acc.max_abs, _maxabs(d))
            done += k
    ch.n_changed = acc.n_changed
    ch.frac_changed = acc.n_changed / total if total else None
    ch.new_norm = math.sqrt(acc.new_sq)
    _finish_norms(ch, acc)


def metadata_changed(old: CheckpointView, new: CheckpointView) -> bool:
    return (old.metadata or None) != (new.metadata or None)


# ---------------------------------------------------------------------------
# Rendering


def _g(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "?"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _shape(s: tuple[int, ...] | None) -> str:
    return "[" + ",".join(str(d) for d in s) + "]" if s is not None else ""


def _kind(ch: TensorChange) -> str:
    """dtype and shape, with an arrow for what changed."""
    if ch.status == "added":
        return f"{ch.new_dtype} {_shape(ch.new_shape)}"
    if ch.status == "removed":
        return f"{ch.old_dtype} {_shape(ch.old_shape)}"
    dt = ch.new_dtype if ch.old_dtype == ch.new_dtype else f"{ch.old_dtype}->{ch.new_dtype}"
    sh = _shape(ch.new_shape) if ch.old_shape == ch.new_shape else f"{_shape(ch.old_shape)}->{_shape(ch.new_shape)}"
    return f"{dt} {sh}"


def _frac(ch: TensorChange) -> str:
    if ch.frac_changed is None:
        return "changed=?"
    pct = 100.0 * ch.frac_changed
    text = "100" if ch.n_changed == ch.numel else (f"{pct:.3g}" if pct >= 0.001 or pct == 0 else f"{pct:.2e}")
    return f"changed={text}% ({ch.n_changed}/{ch.numel})"


def stats_text(ch: TensorChange) -> str:
    """The numbers part of one line of `format_text`."""
    if ch.withheld:
        return f"({ch.note})"
    if ch.status == "added":
        parts = [f"norm={_g(ch.new_norm)}"]
    elif ch.status == "removed":
        parts = [f"norm={_g(ch.old_norm)}"]
    elif ch.status == "shape":
        parts = [f"norm={_g(ch.old_norm)}->{_g(ch.new_norm)}"]
    elif ch.status == "unchanged":
        parts = []
    else:
        parts = []
        if ch.delta_norm is not None or ch.note is None:
            parts += [f"delta_norm={_g(ch.delta_norm)}", f"rel={_g(ch.rel_change)}"]
        if ch.frac_changed is not None or ch.note is None:
            parts.append(_frac(ch))
        if ch.max_abs is not None or ch.note is None:
            parts.append(f"max_abs={_g(ch.max_abs)}")
    if ch.note:
        parts.append(f"({ch.note})")
    return "  ".join(parts)


def summarize(changes: Iterable[TensorChange]) -> tuple[int, int]:
    """(count, bytes) of the unchanged tensors."""
    same = [c for c in changes if c.status == "unchanged"]
    return len(same), sum(c.nbytes for c in same)


def unchanged_line(changes: Sequence[TensorChange]) -> str:
    from fmhub.base.units import human_bytes

    n, nbytes = summarize(changes)
    return f"{n} tensor{'' if n == 1 else 's'} unchanged ({human_bytes(nbytes)})"


def format_text(changes: Sequence[TensorChange], path: str | None = None, metadata: tuple[Any, Any] | None = None) -> str:
    """Plain text for git: one aligned line per added/removed/changed tensor, then the unchanged count.

    ``path`` is only used for the line saying nothing changed; ``metadata`` (old, new) adds a
    line when the checkpoint's ``__metadata__`` changed.
    """
    rows = [(c.status, c.name, _kind(c), stats_text(c)) for c in changes if c.status != "unchanged"]
    lines = []
    if rows:
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        for st, name, kind, stats in rows:
            lines.append(f"{st:<{w[0]}}  {name:<{w[1]}}  {kind:<{w[2]}}  {stats}".rstrip())
    if metadata is not None and (metadata[0] or None) != (metadata[1] or None):
        fmt = lambda m: json.dumps(dict(m), sort_keys=True, ensure_ascii=False) if m else "none"  # noqa: E731
        lines.append(f"metadata  {fmt(metadata[0])} -> {fmt(metadata[1])}")
    if not rows:
        lines.append(f"no tensor changed{' in ' + path if path else ''}")
    lines.append(unchanged_line(changes))
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def change_dict(ch: TensorChange) -> dict[str, Any]:
    d = asdict(ch)
    for k in ("old_shape", "new_shape"):
        d[k] = list(d[k]) if d[k] is not None else None
    for k in ("delta_norm", "old_norm", "new_norm", "rel_change", "frac_changed", "max_abs"):
        d[k] = _num(d[k])
    return d


def to_json(changes: Sequence[TensorChange]) -> dict[str, Any]:
    """A JSON-ready dict: every tensor with its status and numbers (null: not applicable, not
    computable, or not finite), and counts per status."""
    counts = {s: 0 for s in STATUSES}
    for c in changes:
        counts[c.status] += 1
    _, nbytes = summarize(changes)
    return {"tensors": [change_dict(c) for c in changes], "counts": counts, "unchanged_bytes": nbytes}


# ---------------------------------------------------------------------------
# textconv: one line per tensor, for `git log -p` / `git show`


class _Moments:
    """Running count, sum and sum of squares (Chan's parallel update for the variance)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.sq = 0.0

    def add(self, x) -> None:
        np = _np()
        if x.size == 0:
            return
        if np.iscomplexobj(x):
            x = np.abs(x)
        self.sq += _sumsq(x)
        k = x.size
        mean = float(x.mean())
        m2 = float(np.dot(x - mean, x - mean))
        delta = mean - self.mean
        tot = self.n + k
        self.mean += delta * k / tot
        self.m2 += m2 + delta * delta * self.n * k / tot
        self.n = tot

    def stats(self) -> str:
        if self.n == 0:
            return "norm=0 mean=- std=-"
        std = math.sqrt(self.m2 / self.n) if self.m2 >= 0 else math.nan
        return f"norm={_g(math.sqrt(self.sq), 6)} mean={_g(self.mean, 6)} std={_g(std, 6)}"


def _tensor_line(name: str, dtype: str, shape: tuple[int, ...], oid: str | None, stats: str) -> str:
    sha = f"sha256:{oid[:12]}" if oid else "sha256:?"
    return f"tensor {json.dumps(name, ensure_ascii=False)} {dtype} {_shape(shape)} {sha} {stats}".rstrip()


def _summary_lines(fmt: str, size: int, count: int, metadata: Mapping[str, str] | None) -> list[str]:
    from fmhub.base.units import human_bytes

    lines = [f"fmhub {fmt} checkpoint: {count} tensors, {human_bytes(size)}"]
    if metadata is not None:
        lines.append("metadata " + json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False, separators=(",", ":")))
    return lines


def textconv(filename: str, store_opener: Callable[[], ObjectStore] | None = None, chunk_elems: int = CHUNK_ELEMS) -> Iterator[str]:
    """Lines describing a checkpoint file (or a manifest, read through the store): one per tensor,
    ``tensor NAME DTYPE [SHAPE] sha256:<12 hex> norm=.. mean=.. std=..``, streaming the file.

    Where an access policy governs, no statistic, for anyone (`textconv_withheld`).
    """
    from fmhub.core.checkpoint import SNIFF_BYTES, file_layout, sniff_format

    withheld = textconv_withheld()
    with open(filename, "rb") as f:
        head = f.read(SNIFF_BYTES)
        if not head:
            return
        if is_manifest(head):
            m = Manifest.from_bytes(head + f.read(MAX_MANIFEST_BYTES), filename)
            yield from _summary_lines(m.format, m.size, len(m.tensors), m.metadata)
            store = store_opener() if store_opener and not withheld else None
            view = CheckpointView.from_manifest(m, store, filename) if store is not None else None
            for t in m.tensors:
                stats = withheld or "norm=? mean=? std=?"
                if view is not None:
                    mom = _Moments()
                    c = codec(t.dtype)
                    try:
                        if c.decodable:
                            with _Reader(view.tensors[t.name]) as r:
                                _stream(r.read, t.size, c, chunk_elems, None, mom)
                            stats = mom.stats()
                        else:
                            stats = ""
                    except (FmhubError, OSError):
                        pass  # object not here: name and hash only
                yield _tensor_line(t.name, t.dtype, t.shape, t.oid, stats)
            return
        if sniff_format(head) is None:
            yield f"not a checkpoint fmhub can read ({os.path.getsize(filename)} bytes, sha256:{file_sha256(filename)[:12]})"
            return
        fmt, layout = file_layout(f, filename)
        size = os.path.getsize(filename)
        yield from _summary_lines(fmt.name, size, len(layout.tensors), layout.metadata)
        for t in layout.tensors:
            c = codec(t.dtype)
            h = hashlib.sha256()
            mom = _Moments() if c.decodable and not withheld else None

            def read(n: int) -> bytes:
                data = f.read(n)
                if len(data) != n:
                    raise CorruptCheckpoint(f"{filename}: tensor {t.name!r} is truncated; the file is incomplete")
                return data

            _stream(read, t.size, c, chunk_elems, h, mom)
            yield _tensor_line(t.name, t.dtype, t.shape, h.hexdigest(), withheld or (mom.stats() if mom else ""))


def textconv_withheld(what: str = "values") -> str | None:
    """What git's textconv shows instead of every statistic (``what``: values, rows) where an access policy
    governs the repository, for every user alike; None where none does.

    git caches textconv output per blob for every user of the clone (``diff.fmhub.cachetextconv``, which
    makes ``git log -p`` cheap: each side is otherwise smudged and read in full on every run), and it gives
    no path to decide by. So the output must not depend on who made it: only what the manifest says
    (names, dtypes, shapes, hashes), the same from the checkpoint a permitted user gets and from the
    placeholder another gets. `fmhub diff` and ``git diff`` show each user what they may read.
    """
    from fmhub.governance.access import governs

    return f"({what} withheld by the access policy for every user: git caches this output; see `fmhub diff`)" if governs() else None


def _stream(read: Callable[[int], bytes], size: int, c: Codec, chunk_elems: int, h, mom: _Moments | None) -> None:
    step = c.nbytes(_chunk_elems(c, chunk_elems)) if c.bits else READ_CHUNK
    left = size
    while left:
        k = min(step, left)
        data = read(k)
        if h is not None:
            h.update(data)
        if mom is not None:
            mom.add(c.values(data))
        left -= k


# ---------------------------------------------------------------------------
# Reading checkpoints out of git: by blob id, at a revision, in the index or the work tree


ZERO_HEX = "0" * 40


class GitBlobs:
    """Blobs by id through ``git cat-file`` processes started once (sizes first, so a big blob is never read)."""

    def __init__(self, cwd: str | None = None) -> None:
        self._cwd = cwd
        self._procs: dict[str, subprocess.Popen] = {}

    def _proc(self, mode: str) -> subprocess.Popen:
        if mode not in self._procs:
            self._procs[mode] = subprocess.Popen(
                ["git", "cat-file", mode], cwd=self._cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
        return self._procs[mode]

    def _ask(self, mode: str, spec: str) -> list[bytes]:
        proc = self._proc(mode)
        proc.stdin.write(spec.encode() + b"\n")
        proc.stdin.flush()
        return proc.stdout.readline().split()

    def get(self, spec: str, limit: int = MAX_MANIFEST_BYTES) -> bytes | None:
        """The blob's bytes; None when it is missing, not a blob, or over ``limit`` bytes (a raw checkpoint
        committed before tracking is not read)."""
        head = self._ask("--batch-check", spec)
        if len(head) != 3 or head[1] != b"blob" or int(head[2]) > limit:  # "<spec> missing", a tree, too big
            return None
        head = self._ask("--batch", head[0].decode())
        if len(head) != 3:
            return None
        n = int(head[2])
        out = self._proc("--batch").stdout
        parts, got = [], 0
        while got < n:
            part = out.read(min(n - got, 1 << 20))
            if not part:
                raise FmhubError("git cat-file stopped early")
            parts.append(part)
            got += len(part)
        out.read(1)  # the newline after the contents
        return b"".join(parts)

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait()
        self._procs.clear()

    def __enter__(self) -> "GitBlobs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _git(args: Sequence[str], cwd: str, input: str | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, input=input)
    if proc.returncode != 0:
        raise FmhubError(f"git {' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _fmhub_paths(paths: list[str], top: str) -> list[str]:
    """The paths (relative to ``top``) whose ``filter`` attribute is fmhub."""
    if not paths:
        return []
    out = _git(["check-attr", "-z", "--stdin", "filter"], top, "\0".join(paths) + "\0").split("\0")
    return [out[i] for i in range(0, len(out) - 2, 3) if out[i + 2] == "fmhub"]


def _zsplit(text: str) -> list[str]:
    return [p for p in text.split("\0") if p]


DIFF_VIA = "fmhub diff"  # the reader, in the audit log's records of read decisions


def guard_data(side: Any, path: str, root: str | None = None, via: str = DIFF_VIA) -> Any:
    """A dataset side (`fmhub.core.datafile.DataSide`) read from the store, its rows withheld when the read policy
    denies the user the file (checkout would); a file on disk (no chunk oids) is the user's already."""
    if side is None or not getattr(side, "chunk_oids", ()):
        return side
    from fmhub.governance.access import read_denials

    denied = read_denials(path, (), root, via)
    return withhold_rows(side, denied[""]) if denied else side


def withhold_rows(side: Any, why: Exception | str) -> Any:
    """``side`` whose rows cannot be read: diffs and textconv then show sizes and hashes, and the note why
    (``why``: the denial, or the note itself)."""
    from dataclasses import replace

    from fmhub.base.errors import UnreadableRows

    note = why if isinstance(why, str) else withheld_note(why, "rows")

    def refuse():
        raise UnreadableRows(note)

    return replace(side, opener=refuse)


@dataclass
class Side:
    """The fmhub-tracked files of one side of `fmhub diff`: checkpoints as views, datasets as `DataSide`, by path."""

    label: str
    files: dict[str, CheckpointView]
    data: dict[str, Any] = field(default_factory=dict)  # path -> fmhub.core.datafile.DataSide


def resolve_rev(rev: str, top: str) -> str:
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=top, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FmhubError(f"unknown revision {rev!r}")
    return proc.stdout.strip()


def side_at_rev(rev: str, pathspecs: list[str], top: str, store: ObjectStore, blobs: GitBlobs) -> Side:
    """Checkpoints committed at ``rev`` under ``pathspecs`` (attributes as in the work tree)."""
    sha = resolve_rev(rev, top)
    entries = {}
    for rec in _zsplit(_git(["ls-tree", "-r", "-z", "--full-tree", sha, "--", *pathspecs], top)):
        meta, _, path = rec.partition("\t")
        mode, kind, oid = meta.split()
        if kind == "blob":
            entries[path] = oid
    files, datasets = {}, {}
    for path in _fmhub_paths(list(entries), top):
        data = blobs.get(entries[path])
        if data is not None and is_manifest(data):
            m = Manifest.from_bytes(data, f"{rev}:{path}")
            if m.is_data:
                from fmhub.core.datafile import DataSide

                datasets[path] = guard_data(DataSide.from_manifest(m, store, path), path, top)
            else:
                files[path] = guard(CheckpointView.from_manifest(m, store, path), path, top, DIFF_VIA)
    return Side(rev, files, datasets)


def side_in_worktree(pathspecs: list[str], top: str, store: ObjectStore, blobs: GitBlobs) -> Side:
    """Checkpoints in the work tree under ``pathspecs``: a file git's index says is unmodified is read from
    its staged manifest (no file read); any other is read from disk."""
    listed = _zsplit(_git(["ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *pathspecs], top))
    staged: dict[str, str] = {}
    for rec in _zsplit(_git(["ls-files", "-s", "-z", "--", *pathspecs], top)):
        meta, _, path = rec.partition("\t")
        mode, oid, stage = meta.split()
        if stage == "0":
            staged[path] = oid
    dirty = set(_zsplit(_git(["diff-files", "-z", "--name-only", "--", *pathspecs], top)))
    from fmhub.core.datafile import DataSide, side_from_file

    files, datasets = {}, {}
    for path in _fmhub_paths(sorted(set(listed)), top):
        full = os.path.join(top, path)
        if not os.path.isfile(full):
            continue
        if path in staged and path not in dirty:
            data = blobs.get(staged[path])
            if data is not None and is_manifest(data):
                m = Manifest.from_bytes(data, path)
                if m.is_data:
                    datasets[path] = guard_data(DataSide.from_manifest(m, store, path), path, top)
                else:
                    files[path] = guard(CheckpointView.from_manifest(m, store, path), path, top, DIFF_VIA)
                continue
        side = side_from_file(full, path, lambda: store)
        if side is not None:
            datasets[path] = guard_data(side, path, top)  # a file still holding a manifest is read from the store
        else:
            files[path] = guard(CheckpointView.from_file(full, path, store), path, top, DIFF_VIA)
    return Side("work tree", files, datasets)


def group_by_checkpoint(files: Mapping[str, CheckpointView]) -> dict[str, CheckpointView]:
    """Files of one directory are one checkpoint (shards, or a model next to its adapter): tensors by name."""
    groups: dict[str, list[CheckpointView]] = {}
    for path in sorted(files):
        groups.setdefault(os.path.dirname(path), []).append(files[path])
    out = {}
    for d, views in groups.items():
        label = d or "."
        if len(views) == 1:
            v = views[0]
            out[d] = CheckpointView(v.tensors, v.metadata, v.path)
        else:
            out[d] = CheckpointView.combine(views, label + "/")
    return out


def diff_sides(old: Side, new: Side, chunk_elems: int = CHUNK_ELEMS) -> list[TensorChange]:
    """Tensor changes of every checkpoint (directory) on either side; shards matched by tensor name."""
    og, ng = group_by_checkpoint(old.files), group_by_checkpoint(new.files)
    changes: list[TensorChange] = []
    for d in sorted(set(og) | set(ng)):
        changes += diff_views(og.get(d, CheckpointView.empty()), ng.get(d, CheckpointView.empty()), chunk_elems)
    return changes


def diff_revisions(
    revs: Sequence[str], paths: Sequence[str] = (), cwd: str | None = None, chunk_elems: int = CHUNK_ELEMS
) -> tuple[str, str, list[TensorChange]]:
    """`fmhub diff`: no rev, HEAD vs the work tree; one rev, REV vs the work tree; two, REV1 vs REV2.

    ``paths`` are relative to ``cwd``, as on git's command line. Returns (old label, new label, changes).
    """
    _top, old, new = load_sides(revs, paths, cwd)
    return old.label, new.label, diff_sides(old, new, chunk_elems)


def load_sides(revs: Sequence[str], paths: Sequence[str] = (), cwd: str | None = None) -> tuple[str, Side, Side]:
    """The two sides `diff_revisions` compares, and the repository's top directory."""
    from fmhub.core.repo import open_store, toplevel

    if len(revs) > 2:
        raise FmhubError("give at most two revisions")
    cwd = os.path.abspath(cwd or os.getcwd())
    top = toplevel(cwd)
    pathspecs = [os.path.relpath(os.path.abspath(os.path.join(cwd, p)), top) for p in paths]
    if any(p == ".." or p.startswith(".." + os.sep) for p in pathspecs):
        raise FmhubError("a path is outside the repository")
    pathspecs = [p.replace(os.sep, "/") for p in pathspecs] or ["."]
    store = open_store(top, create=False)
    with GitBlobs(top) as blobs:
        old = side_at_rev(revs[0] if revs else "HEAD", pathspecs, top, store, blobs)
        new = side_at_rev(revs[1], pathspecs, top, store, blobs) if len(revs) == 2 else side_in_worktree(pathspecs, top, store, blobs)
    return top, old, new

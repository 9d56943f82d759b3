"""Row-level diffs of datasets (jsonl, parquet): rows added, removed and changed, with a few samples.

Each side is read once, row by row, through its format's ``rows``
(`fmhub.plugin.interfaces.DataFormat`), keeping only an 8-byte hash per row (and per
key): memory is 16 bytes a row, never the rows. The rows shown as samples
are fetched by a second pass that stops once it has them.

A row's identity is the blake2b-64 of its canonical JSON (sorted keys, no
spaces), so re-serialising a jsonl file with other spacing or key order
changes no row. A line that is not valid JSON is a row too (hashed by its
text), and is reported with its line number.

Matching rows:

* by key, when the path has the git attribute ``fmhub-key=COLUMN`` or, failing
  that, when every row on both sides has an ``id``: rows with the same key
  and different content are *changed*, keys only in the new side are
  *added*, only in the old side *removed*. Keys must be unique on each side;
  otherwise rows are matched by position, and the diff says why;
* by position otherwise: the two sequences of row hashes are aligned with
  `difflib.SequenceMatcher` (after stripping the common prefix and suffix,
  and for long inputs first on content-defined groups of rows, so a million
  rows align in seconds); an equal-length replaced block counts as changed
  rows, any other replaced block as removed plus added rows.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from array import array
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from fmhub.core.datafile import DataSide
from fmhub.base.errors import FmhubError, UnreadableRows

if TYPE_CHECKING:
    import numpy as np

SAMPLES = 3  # rows shown per kind (added, removed, changed)
WIDTH = 120  # characters of a row shown before it is cut with "…"
MAX_ERRORS = 5  # malformed rows listed per side (all are counted)
MAX_COLUMNS = 1000  # distinct top-level keys tracked per side
DIRECT_ALIGN = 20_000  # rows SequenceMatcher aligns directly; longer runs are first aligned by groups
GROUP_MOD = 32  # a row whose hash is 0 mod this ends a group (content-defined groups of ~32 rows)
TEXTCONV_MAX_ROWS = 100_000  # rows `git log -p` lists per version (the diff driver compares all)


def canonical(record: Any) -> str:
    """The row as compact JSON with sorted keys; non-JSON values (bytes, dates, decimals) as strings."""
    try:
        return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_jsonable)
    except TypeError:  # keys of mixed types cannot be sorted: keep the row's own order
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "0x" + bytes(value).hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _row_text(record: Any, error: str | None) -> str:
    return record if error is not None else canonical(record)


def _row_hash(record: Any, error: str | None) -> int:
    # a malformed line is hashed by its text, marked so it can never equal a parsed row
    return _h64("\0bad\0" + record) if error is not None else _h64(canonical(record))


def cut(text: str, width: int = WIDTH) -> str:
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class RowError:
    side: str  # "old" or "new"
    row: int  # line number (jsonl) or row number (parquet), 1-based
    message: str


@dataclass
class _Digest:
    """What one pass over a side keeps: a hash per row, the key's hash per row, columns and errors."""

    hashes: array = field(default_factory=lambda: array("Q"))
    keys: array = field(default_factory=lambda: array("Q"))
    keyed: bool = True  # every row so far has the key column
    columns: dict[str, None] = field(default_factory=dict)
    errors: list[RowError] = field(default_factory=list)
    error_count: int = 0

    @property
    def rows(self) -> int:
        return len(self.hashes)


def _digest(side: DataSide, label: str, key: str | None) -> _Digest:
    d = _Digest(keyed=key is not None)
    with side.open() as f:
        for number, record, error in side.format.rows(f, side.path):
            d.hashes.append(_row_hash(record, error))
            if error is not None:
                d.error_count += 1
                if len(d.errors) < MAX_ERRORS:
                    d.errors.append(RowError(label, number, error))
                d.keyed = False
                continue
            if isinstance(record, dict):
                if len(d.columns) < MAX_COLUMNS:
                    for k in record:
                        d.columns.setdefault(k, None)
                if d.keyed:
                    if key in record:
                        d.keys.append(_h64(canonical(record[key])))
                    else:
                        d.keyed = False
            else:
                d.keyed = False
    return d


def _rows_at(side: DataSide, wanted: set[int]) -> dict[int, tuple[int, str]]:
    """Row index (0-based, in file order) -> (row number, canonical text) for the indexes in ``wanted``."""
    out: dict[int, tuple[int, str]] = {}
    if not wanted:
        return out
    last = max(wanted)
    with side.open() as f:
        for i, (number, record, error) in enumerate(side.format.rows(f, side.path)):
            if i in wanted:
                out[i] = (number, _row_text(record, error))
            if i >= last:
                break
    return out


# ---------------------------------------------------------------------------
# Aligning rows by position


Opcode = tuple[str, int, int, int, int]


def _u64(values: Sequence[int] | array) -> "np.ndarray":
    import numpy as np

    if isinstance(values, array):
        return np.frombuffer(values, dtype=np.uint64) if len(values) else np.zeros(0, dtype=np.uint64)
    return np.asarray(values, dtype=np.uint64)


def align(a: Sequence[int] | array, b: Sequence[int] | array) -> list[Opcode]:
    """`difflib` opcodes turning row hashes ``a`` into ``b``, fast for long, mostly equal sequences."""
    ops: list[Opcode] = []
    _align(_u64(a), _u64(b), 0, 0, ops)
    return _merge(ops)


def _common_prefix(a: "np.ndarray", b: "np.ndarray") -> int:
    k = min(len(a), len(b))
    diff = (a[:k] != b[:k]).nonzero()[0]
    return int(diff[0]) if len(diff) else k


def _align(a: "np.ndarray", b: "np.ndarray", ia: int, ib: int, ops: list[Opcode]) -> None:
    n, m = len(a), len(b)
    pre = _common_prefix(a, b)
    suf = _common_prefix(a[pre:][::-1], b[pre:][::-1])
    if pre:
        ops.append(("equal", ia, ia + pre, ib, ib + pre))
    a_mid, b_mid = a[pre : n - suf], b[pre : m - suf]
    ja, jb = ia + pre, ib + pre
    if not len(a_mid) or not len(b_mid):
        if len(a_mid):
            ops.append(("delete", ja, ja + len(a_mid), jb, jb))
        if len(b_mid):
            ops.append(("insert", ja, ja, jb, jb + len(b_mid)))
    elif max(len(a_mid), len(b_mid)) <= DIRECT_ALIGN:
        _align_rows(a_mid, b_mid, ja, jb, ops)
    else:
        _align_groups(a_mid, b_mid, ja, jb, ops)
    if suf:
        ops.append(("equal", ia + n - suf, ia + n, ib + m - suf, ib + m))


def _align_rows(a: "np.ndarray", b: "np.ndarray", ia: int, ib: int, ops: list[Opcode]) -> None:
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a.tolist(), b.tolist()).get_opcodes():
        ops.append((tag, ia + i1, ia + i2, ib + j1, ib + j2))


def _groups(rows: "np.ndarray") -> tuple[list[int], list[int]]:
    """Content-defined groups of rows (one ends at each row whose hash is 0 mod GROUP_MOD, so an edit
    changes one group): the start of each group, and a hash of each group's row hashes."""
    import numpy as np

    ends = ((rows % np.uint64(GROUP_MOD)) == 0).nonzero()[0] + 1
    bounds = [0] + [int(e) for e in ends if e < len(rows)] + [len(rows)]
    return bounds[:-1], [hash(rows[s:e].tobytes()) for s, e in zip(bounds, bounds[1:])]


def _align_groups(a: "np.ndarray", b: "np.ndarray", ia: int, ib: int, ops: list[Opcode]) -> None:
    """Align groups of ~32 rows first, then rows inside the groups that differ: a few edits in a long file stay cheap."""
    sa, ga = _groups(a)
    sb, gb = _groups(b)
    sa.append(len(a))
    sb.append(len(b))
    for tag, g1, g2, h1, h2 in difflib.SequenceMatcher(None, ga, gb).get_opcodes():
        r1, r2, s1, s2 = sa[g1], sa[g2], sb[h1], sb[h2]
        if tag == "equal":
            ops.append(("equal", ia + r1, ia + r2, ib + s1, ib + s2))
        elif r2 - r1 < len(a) or s2 - s1 < len(b):  # a smaller problem: recurse into it
            _align(a[r1:r2], b[s1:s2], ia + r1, ib + s1, ops)
        else:  # no group in common at all: rows one by one
            _align_rows(a, b, ia, ib, ops)


def _merge(ops: list[Opcode]) -> list[Opcode]:
    """Join adjacent opcodes of the same tag (recursion splits them)."""
    out: list[Opcode] = []
    for op in ops:
        if op[1] == op[2] and op[3] == op[4]:
            continue
        if out and out[-1][0] == op[0] and out[-1][2] == op[1] and out[-1][4] == op[3]:
            prev = out.pop()
            op = (op[0], prev[1], op[2], prev[3], op[4])
        out.append(op)
    return out


# ---------------------------------------------------------------------------
# The diff of one dataset


@dataclass
class RowSample:
    kind: str  # "added", "removed", "changed"
    old_row: int | None = None  # line / row number on the old side
    new_row: int | None = None
    old: str | None = None  # canonical JSON (or the raw line), cut to WIDTH
    new: str | None = None


@dataclass
class DatasetChange:
    """How one dataset file differs between two versions. Counts are None where they could not be computed."""

    path: str
    format: str
    status: str  # "added", "removed", "changed", "unchanged"
    old_rows: int | None = None
    new_rows: int | None = None
    added: int | None = None
    removed: int | None = None
    changed: int | None = None
    unchanged: int | None = None
    key: str | None = None  # the key column rows were matched by; None: matched by position
    old_bytes: int | None = None
    new_bytes: int | None = None
    columns_added: list[str] = field(default_factory=list)
    columns_removed: list[str] = field(default_factory=list)
    samples: list[RowSample] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    error_count: int = 0
    notes: list[str] = field(default_factory=list)
    row_label: str = "row"  # "line" for line-based formats: numbers are line numbers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diff_data(old: DataSide | None, new: DataSide | None, key: str | None = None, path: str | None = None) -> DatasetChange:
    """Compare two versions of a dataset (None: the file does not exist on that side).

    ``key`` is the key column from the ``fmhub-key`` attribute; without one a
    column named ``id`` is used when every row of both sides has it.
    """
    some = new or old
    if some is None:
        raise FmhubError("diff_data needs at least one side")
    fmt = some.format
    ch = DatasetChange(path or some.path, fmt.name, "changed", row_label="line" if getattr(fmt.chunking, "method", "") == "lines" else "row")
    ch.old_bytes = old.size if old is not None else None
    ch.new_bytes = new.size if new is not None else None
    if old is not None and new is not None and old.format.name != new.format.name:
        ch.notes.append(f"format changed: {old.format.name} -> {new.format.name}")
    if old is not None and new is not None and old.size == new.size:
        # a work-tree file has no recorded sha256: hashing it (~1 GB/s) is cheaper than reading rows to find it equal
        for side in (old, new):
            if side.sha256 is None and (old.sha256 or new.sha256):
                side.sha256 = _file_sha256(side)
        if old.sha256 is not None and old.sha256 == new.sha256:
            ch.status = "unchanged"
            return ch
    wanted_key = key or "id"
    digests: dict[str, _Digest | None] = {}
    for label, side in (("old", old), ("new", new)):
        if side is None:
            digests[label] = _Digest()
            continue
        try:
            digests[label] = _digest(side, label, wanted_key)
        except UnreadableRows as exc:
            digests[label] = None
            ch.notes.append(f"{'a' if label == 'old' else 'b'}/{side.path} {_strip_path(str(exc), side.path)}")
    do, dn = digests["old"], digests["new"]
    if old is None:
        ch.status = "added"
    elif new is None:
        ch.status = "removed"
    for d in (do, dn):
        if d is not None:
            ch.errors += d.errors
            ch.error_count += d.error_count
    ch.old_rows = do.rows if do is not None and old is not None else (0 if old is None else None)
    ch.new_rows = dn.rows if dn is not None and new is not None else (0 if new is None else None)
    if do is None or dn is None:
        return ch  # a side's rows cannot be read: the notes say so, sizes and sha256 are all there is
    if old is not None and new is not None:
        ch.columns_added = [c for c in dn.columns if c not in do.columns]
        ch.columns_removed = [c for c in do.columns if c not in dn.columns]
    by_key = _key_usable(do, dn, wanted_key, key is not None, ch)
    if by_key:
        ch.key = wanted_key
        samples = _by_key(do, dn, ch)
    else:
        samples = _by_position(do, dn, ch)
    if ch.status == "changed" and not (ch.added or ch.removed or ch.changed):
        if do.hashes != dn.hashes:
            ch.notes.append("same rows, in another order")
        elif ch.row_label == "line":
            ch.notes.append("same rows; the bytes differ only in formatting (whitespace, key order, number spelling)")
        else:
            ch.notes.append("same rows; the bytes differ only in how they are encoded (compression, pages, row groups, metadata)")
    _fill_samples(old, new, samples, ch)
    return ch


def _strip_path(message: str, path: str) -> str:
    return message[len(path) + 2 :] if message.startswith(path + ": ") else message


def _key_usable(do: _Digest, dn: _Digest, key: str, explicit: bool, ch: DatasetChange) -> bool:
    """Whether rows can be matched by ``key``: every row has it and it is unique on each side."""
    import numpy as np

    if not (do.keyed and dn.keyed) or (do.rows == 0 and dn.rows == 0):
        if explicit:
            ch.notes.append(f"key column {key!r} (fmhub-key) is missing from some rows; rows matched by position")
        return False
    for d, side in ((do, "old"), (dn, "new")):
        keys = np.sort(_u64(d.keys))
        if len(keys) > 1 and bool((keys[1:] == keys[:-1]).any()):
            ch.notes.append(f"key column {key!r} is not unique in the {side} version; rows matched by position")
            return False
    return True


_Samples = list[tuple[str, int | None, int | None]]  # (kind, old index, new index)


def _by_key(do: _Digest, dn: _Digest, ch: DatasetChange) -> _Samples:
    """Match rows by key hash with sorted arrays (no per-row Python objects): a million rows is ~50 MB."""
    import numpy as np

    ok, nk, oh, nh = _u64(do.keys), _u64(dn.keys), _u64(do.hashes), _u64(dn.hashes)
    if len(ok):
        order = np.argsort(ok)
        sorted_keys = ok[order]
        pos = np.minimum(np.searchsorted(sorted_keys, nk), len(ok) - 1)
        found = sorted_keys[pos] == nk
        old_index = np.where(found, order[pos], 0)  # the old row of each new row (where found)
        changed = found & (oh[old_index] != nh)
    else:
        found = changed = np.zeros(len(nk), dtype=bool)
        old_index = np.zeros(len(nk), dtype=np.int64)
    added = ~found
    removed = ~np.isin(ok, nk)
    ch.added, ch.removed, ch.changed = int(added.sum()), int(removed.sum()), int(changed.sum())
    ch.unchanged = len(nk) - ch.added - ch.changed
    samples: _Samples = []
    for j in added.nonzero()[0][:SAMPLES].tolist():
        samples.append(("added", None, j))
    for i in removed.nonzero()[0][:SAMPLES].tolist():
        samples.append(("removed", i, None))
    for j in changed.nonzero()[0][:SAMPLES].tolist():
        samples.append(("changed", int(old_index[j]), j))
    return samples


def _by_position(do: _Digest, dn: _Digest, ch: DatasetChange) -> _Samples:
    counts = {"added": 0, "removed": 0, "changed": 0, "unchanged": 0}
    samples: _Samples = []

    def take(kind: str, pairs: Iterator[tuple[int | None, int | None]], n: int) -> None:
        before = counts[kind]
        counts[kind] += n
        for i, j in pairs:
            if before >= SAMPLES:
                break
            samples.append((kind, i, j))
            before += 1

    for tag, i1, i2, j1, j2 in align(do.hashes, dn.hashes):
        if tag == "equal":
            counts["unchanged"] += i2 - i1
        elif tag == "replace" and i2 - i1 == j2 - j1:
            take("changed", zip(range(i1, i2), range(j1, j2)), i2 - i1)
        else:
            if i2 > i1:
                take("removed", ((i, None) for i in range(i1, i2)), i2 - i1)
            if j2 > j1:
                take("added", ((None, j) for j in range(j1, j2)), j2 - j1)
    ch.added, ch.removed, ch.changed, ch.unchanged = counts["added"], counts["removed"], counts["changed"], counts["unchanged"]
    return samples


def _fill_samples(old: DataSide | None, new: DataSide | None, samples: _Samples, ch: DatasetChange) -> None:
    """Read back just the sample rows (a second pass per side that stops at the last one)."""
    old_rows = _rows_at(old, {i for _, i, _ in samples if i is not None}) if old is not None else {}
    new_rows = _rows_at(new, {j for _, _, j in samples if j is not None}) if new is not None else {}
    order = {"added": 0, "removed": 1, "changed": 2}
    for kind, i, j in sorted(samples, key=lambda s: order[s[0]]):
        s = RowSample(kind)
        if i is not None and i in old_rows:
            s.old_row, text = old_rows[i]
            s.old = cut(text)
        if j is not None and j in new_rows:
            s.new_row, text = new_rows[j]
            s.new = cut(text)
        ch.samples.append(s)


# ---------------------------------------------------------------------------
# Rendering


def _n(x: int | None) -> str:
    return "?" if x is None else f"{x:,}"


def format_data_text(ch: DatasetChange) -> str:
    """Plain text for git: counts, then a few sample rows of each kind, then problems."""
    what = {"added": "new dataset", "removed": "dataset deleted", "changed": "dataset", "unchanged": "dataset unchanged"}[ch.status]
    lines = [f"{ch.format} {what}: {_n(ch.old_rows)} -> {_n(ch.new_rows)} rows" if ch.status != "unchanged" else f"{ch.format} {what}"]
    if ch.added is not None:
        how = f"matched by key {ch.key!r}" if ch.key else "matched by position"
        lines.append(f"rows: +{ch.added:,} added, -{ch.removed:,} removed, ~{ch.changed:,} changed, {ch.unchanged:,} unchanged ({how})")
    if ch.old_bytes is not None and ch.new_bytes is not None and ch.old_bytes != ch.new_bytes:
        from fmhub.base.units import human_bytes

        lines.append(f"bytes: {human_bytes(ch.old_bytes)} -> {human_bytes(ch.new_bytes)}")
    if ch.columns_added or ch.columns_removed:
        lines.append("columns: " + " ".join([f"+{c}" for c in ch.columns_added] + [f"-{c}" for c in ch.columns_removed]))
    shown = {"added": 0, "removed": 0, "changed": 0}
    for s in ch.samples:
        shown[s.kind] += 1
        if s.kind == "added":
            lines.append(f"+ {ch.row_label} {s.new_row}: {s.new}")
        elif s.kind == "removed":
            lines.append(f"- {ch.row_label} {s.old_row}: {s.old}")
        else:
            lines.append(f"~ {ch.row_label} {s.old_row}: {s.old}")
            lines.append(f"  -> {ch.row_label} {s.new_row}: {s.new}")
    more = [f"{n - shown[k]:,} more {k}" for k, n in (("added", ch.added), ("removed", ch.removed), ("changed", ch.changed)) if n and n > shown[k]]
    if more:
        lines.append(f"  ({', '.join(more)} not shown)")
    for e in ch.errors:
        lines.append(f"! {'a' if e.side == 'old' else 'b'}/{ch.path}: {ch.row_label} {e.row}: {e.message}")
    if ch.error_count > len(ch.errors):
        lines.append(f"! {ch.error_count - len(ch.errors)} more malformed rows")
    for note in ch.notes:
        lines.append(f"! {note}" if "cannot be parsed" in note else f"note: {note}")
    return "\n".join(lines) + "\n"


def textconv_lines(side: DataSide, max_rows: int = TEXTCONV_MAX_ROWS) -> Iterator[str]:
    """One version of a dataset for ``git log -p``: a summary line, the columns, then one line per row.

    A row line is the row's 8-hex-digit hash and its canonical JSON cut to
    WIDTH, without its number, so an inserted row does not make git show every
    later row as changed.
    """
    from fmhub.base.units import human_bytes

    sha = side.sha256 or _file_sha256(side)  # in the summary line, so any change of bytes shows
    head = f"fmhub {side.format.name} dataset: {human_bytes(side.size)}, sha256:{sha[:12]}"
    rows: list[str] = []
    columns: dict[str, None] = {}
    count = 0
    try:
        with side.open() as f:
            for number, record, error in side.format.rows(f, side.path):
                count += 1
                if isinstance(record, dict) and error is None and len(columns) < MAX_COLUMNS:
                    for k in record:
                        columns.setdefault(k, None)
                if count <= max_rows:
                    h = _row_hash(record, error)
                    if error is not None:
                        rows.append(f"! {number}: {error}: {cut(record)}")
                    else:
                        rows.append(f"{h & 0xFFFFFFFF:08x} {cut(canonical(record))}")
    except UnreadableRows as exc:
        yield head
        yield f"! {_strip_path(str(exc), side.path)}"
        return
    yield f"{head}, {count:,} rows"
    if columns:
        yield "columns: " + ", ".join(columns)
    yield from rows
    if count > max_rows:
        yield f"... {count - max_rows:,} more rows (`fmhub diff` compares every row)"


def _file_sha256(side: DataSide) -> str:
    h = hashlib.sha256()
    with side.open() as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def key_attribute(path: str, cwd: str | None = None) -> str | None:
    """The ``fmhub-key`` git attribute of ``path`` (the key column of a dataset), or None when unset."""
    from fmhub.core.repo import git

    out = git("check-attr", "fmhub-key", "--", path, cwd=cwd, check=False).strip()
    value = out.rsplit(": ", 1)[-1] if out else ""
    return None if value in ("", "unspecified", "unset", "set") else value



def diff_data_sides(old: Any, new: Any, top: str | None = None) -> list[DatasetChange]:
    """Every dataset of either `fmhub.models.diffsides.Side` (``.data``), by path; the key column from each path's attributes."""
    changes = []
    for path in sorted(set(old.data) | set(new.data)):
        changes.append(diff_data(old.data.get(path), new.data.get(path), key_attribute(path, top), path))
    return changes

"""``fmhub join``: bring a metadata table's attributes into text rows (data integration).

A ``join`` pipeline of ``fmhub.yaml`` (`fmhub.project.spec.JoinSpec`) names an input
dataset, a table with one row per entity (``.csv``, ``.jsonl`` or
``.parquet``) and how rows find their entities:

``on: COLUMN``
    the row's COLUMN holds the entity; it is looked up by exact equality and
    each joined column is a scalar (null when the entity is not in the table).
``mentions: COLUMN``
    COLUMN is text; every table entity it names, as whole words and
    case-insensitively, is joined. Each joined column is then a list with one
    value per distinct entity, in order of first mention, and
    ``PREFIX + "entities"`` lists those entities as the table writes them.

Joined columns are named ``PREFIX + column``; one that already exists in a
row stops the run rather than overwrite the row's own data. Rows that find no
entity follow ``missing``: kept (nulls or empty lists), dropped, or an error
that names the row's line.

The input is only read. The output appears only when every row is written
(`fmhub.core.rows.RowWriter`), so a failed run leaves no output behind and an
earlier output untouched; a lineage record then names both the input and the
table, so `fmhub lineage` and `fmhub unlearn` follow the metadata too.
"""

from __future__ import annotations

import csv
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from fmhub.governance import gate as governance
from fmhub.base.errors import FmhubError
from fmhub.core.rows import DataError, RowWriter, data_format, read_batches
from fmhub.project.spec import JoinSpec, LoadedSpec, pipeline

TABLE_FORMATS = (".csv", ".jsonl", ".parquet")
BATCH_SIZE = 1000  # rows per read/write batch when the spec sets none
TOP_ENTITIES = 20  # per-entity match counts kept in the report

Table = dict[str, dict[str, Any]]


class JoinError(FmhubError):
    """A join that cannot be done: an unreadable or ambiguous table, a column clash, a row with no entity under ``missing: error``."""


def read_table(path: str, key: str, *, fold_case: bool = False, rows: Optional[governance.Rows] = None) -> Table:
    """The table at ``path`` as ``{entity: row}``, in file order; each row keeps every column, the key included.

    Keys are ``str()`` of the key column, because rows' values are compared
    to them as text. Duplicates are refused, naming both lines: a join that
    silently picked one of two rows would be wrong half the time. With
    ``fold_case`` (``mentions`` mode, which matches case-insensitively)
    "Acme" and "ACME" are duplicates too. Empty CSV cells read as null.
    ``rows``: the table as `fmhub.governance.gate.open_rows` let it through;
    rows its policy withholds from the user are left out (and counted).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in TABLE_FORMATS:
        raise JoinError(f"table {path}: unknown format {ext or '(no extension)'!r}; fmhub joins tables in {', '.join(TABLE_FORMATS)}")
    if not os.path.isfile(path):
        raise JoinError(f"table {path} does not exist; check the join's table: path")
    table: Table = {}
    first: dict[str, tuple[str, str]] = {}  # normalized key -> (where it was first seen, as written)
    withheld = 0
    for where, row in _csv_rows(path) if ext == ".csv" else _data_rows(path):
        if rows is not None and not rows.readable(row):
            withheld += 1
            continue
        if key not in row:
            have = ", ".join(k for k in row if k is not None) or "none"
            raise JoinError(f"{where}: no key column {key!r} (columns: {have}); set the join's key: to the entity column")
        value = row[key]
        name = "" if value is None else str(value)
        if not name.strip():
            raise JoinError(f"{where}: empty entity key in column {key!r}; give every table row an entity or remove the row")
        norm = " ".join(name.split()).lower() if fold_case else name
        if norm in first:
            seen_at, seen_as = first[norm]
            same = "" if seen_as == name else f" (as {seen_as!r}; mentions match case-insensitively)"
            raise JoinError(f"{where}: duplicate entity {name!r}, already at {seen_at}{same}; keep one row per entity")
        first[norm] = (where, name)
        table[name] = row
    if rows is not None:
        rows.withheld = withheld
    if not table:
        raise JoinError(f"table {path} has no rows; a join needs at least one entity")
    return table


def _csv_rows(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets often write a BOM
            reader = csv.DictReader(f)
            for row in reader:
                if None in row:
                    raise JoinError(f"{path}:{reader.line_num}: more cells than the header has columns; quote cells that hold commas")
                yield f"{path}:{reader.line_num}", {k: (v if v != "" else None) for k, v in row.items()}
    except UnicodeDecodeError as exc:
        raise JoinError(f"table {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except csv.Error as exc:
        raise JoinError(f"table {path} is not valid CSV ({exc})") from None


def _data_rows(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    parquet = path.lower().endswith(".parquet")
    for batch in read_batches(path):
        if batch.errors:
            pos, msg = batch.errors[0]
            raise JoinError(f"table {path}: {msg}; fix that line")
        for pos, row in zip(batch.positions, batch.rows):
            yield (f"{path} row {pos}" if parquet else f"{path}:{pos + 1}"), row


def _name_pattern(name: str) -> str:
    """An entity name as a regex: its words literally, any run of whitespace between them (text wraps lines)."""
    return r"\s+".join(map(re.escape, name.split()))


_SEP = " "  # the trie's token for the whitespace between a name's words
_MAX_NESTING = 200  # branch points along one name; deeper (names "a", "aa", "aaa"...): the plain alternation


def _trie_pattern(names) -> str:
    """One regular expression for every name (words literally, ``\\s+`` between them), factored by common prefix.

    Characters are keyed case-insensitively, so a prefix shared by "ACME" and
    "Acme Lumen" is one branch, as the case-insensitive match sees it.
    """
    root: dict = {}
    for name in names:
        node = root
        for tok in _SEP.join(name.split()):
            key = tok.lower() if len(tok.lower()) == 1 else tok
            node = node.setdefault(key, {"": tok}) if key != _SEP else node.setdefault(_SEP, {"": _SEP})
        node[None] = True  # a name ends here
    return _emit(root)


def _emit(node: dict, depth: int = 0) -> str:
    """The pattern under ``node``; a run of single-child nodes is one literal, so only branch points nest (and recurse)."""
    parts = []
    for key, child in node.items():
        if key in ("", None):
            continue
        run = []
        while True:  # follow the chain while the node has one way on and no name ends there
            run.append(r"\s+" if child[""] == _SEP else re.escape(child[""]))
            ways = [k for k in child if k not in ("", None)]
            if len(ways) != 1 or None in child:
                break
            child = child[ways[0]]
        if depth > _MAX_NESTING:
            raise RecursionError("entity names nest too deeply for one pattern")
        parts.append("".join(run) + _emit(child, depth + 1))
    if None in node:
        parts.append("")  # ending here is tried last: longer names first
    if len(parts) == 1:
        return parts[0]
    return "(?:" + "|".join(parts) + ")"


def _where(source: str, pos: int) -> str:
    return f"{source} row {pos}" if source.lower().endswith(".parquet") else f"{source}:{pos + 1}"


class Joiner:
    """One spec's join, prepared once (column names, the mentions regex) and applied row by row."""

    def __init__(self, table: Table, spec: JoinSpec) -> None:
        if not table:
            raise JoinError("the table has no rows; a join needs at least one entity")
        self.table, self.spec = table, spec
        have = list(dict.fromkeys(c for row in table.values() for c in row))
        if spec.columns is not None:
            unknown = [c for c in spec.columns if c not in have]
            if unknown:
                raise JoinError(f"the table has no column {', '.join(map(repr, unknown))}; it has: {', '.join(have)}")
            self.columns = list(spec.columns)
        else:
            self.columns = [c for c in have if c != spec.key]
        self.added = [spec.prefix + c for c in self.columns]
        if spec.mentions is not None:
            self.added.append(spec.prefix + "entities")
            self._compile()
        clash = [c for c, n in Counter(self.added).items() if n > 1]
        if clash:
            raise JoinError(f"joined column {clash[0]!r} would be written twice; set prefix: (e.g. 'meta_') or choose columns:")

    def _compile(self) -> None:
        # one alternation, longest names first, so "New York City" wins over "New York";
        # lookarounds rather than \b, so names that start or end in punctuation ("C++") still match whole
        self.by_lower: dict[str, str] = {}
        for name in self.table:
            norm = " ".join(name.split()).lower()
            if norm in self.by_lower:
                raise JoinError(f"table entities {self.by_lower[norm]!r} and {name!r} differ only in case or spacing; mentions match case-insensitively: keep one")
            self.by_lower[norm] = name
        # the names as a trie, so each text position costs a step per character matched rather than one attempt per
        # name (an alternation of 1,000 names ran at ~300 µs a row); a name's continuation comes before its end, so
        # the longest name matching at a position wins, as "New York City" should over "New York"
        try:
            alts = _trie_pattern(self.table)
        except RecursionError:
            alts = "(?:" + "|".join(_name_pattern(n) for n in sorted(self.table, key=lambda n: (-len(n.strip()), n))) + ")"
        self.pattern = re.compile(rf"(?<!\w){alts}(?!\w)", re.IGNORECASE)

    def _entity(self, text: str) -> Optional[str]:
        norm = " ".join(text.split()).lower()
        if norm in self.by_lower:
            return self.by_lower[norm]
        # re's case-insensitivity and str.lower() disagree on a few characters (e.g. 'İ'): ask each name
        return next((n for n in self.table if re.fullmatch(_name_pattern(n), text, re.IGNORECASE)), None)

    def entities(self, row: dict[str, Any], where: str) -> list[str]:
        """The table entities ``row`` refers to: none or one in ``on`` mode, distinct ones in order of first mention for ``mentions``."""
        spec = self.spec
        col = spec.on if spec.on is not None else spec.mentions
        value = row.get(col)
        if value is None:
            return []
        if spec.on is not None:
            if isinstance(value, (list, dict)):
                raise JoinError(f"{where}: column {col!r} holds a {type(value).__name__}, not one entity; use mentions: for text naming several")
            name = str(value)
            return [name] if name in self.table else []
        if not isinstance(value, str):
            raise JoinError(f"{where}: column {col!r} holds a {type(value).__name__}, not text; mentions: needs a text column")
        found = (self._entity(m.group(0)) for m in self.pattern.finditer(value))
        return list(dict.fromkeys(n for n in found if n is not None))

    def join(self, row: dict[str, Any], where: str, stats: Optional["JoinStats"] = None) -> Optional[dict[str, Any]]:
        """``row`` with the joined columns added (a new dict), or None when ``missing: drop`` drops it."""
        clash = [c for c in self.added if c in row]
        if clash:
            raise JoinError(f"{where}: the row already has a column {clash[0]!r}; set the join's prefix: (e.g. 'meta_') so joined columns do not overwrite it")
        found = self.entities(row, where)
        if stats is not None:
            stats.rows_in += 1
        if not found:
            if self.spec.missing == "error":
                col = self.spec.on or self.spec.mentions
                raise JoinError(f"{where}: no table entity in column {col!r} (value {str(row.get(col))[:60]!r}); "
                                "add it to the table, or set missing: keep or drop")
            if self.spec.missing == "drop":
                if stats is not None:
                    stats.dropped += 1
                return None
        out = dict(row)
        if self.spec.on is not None:
            entity = self.table[found[0]] if found else {}
            for col, name in zip(self.columns, self.added):
                out[name] = entity.get(col)
        else:
            rows = [self.table[n] for n in found]
            for col, name in zip(self.columns, self.added):
                out[name] = [r.get(col) for r in rows]
            out[self.added[-1]] = found
        if stats is not None:
            stats.matched += bool(found)
            stats.entities.update(found)
        return out


@dataclass
class JoinStats:
    """What a join did, for the report: rows in, matched and dropped, and how many rows each entity matched."""

    rows_in: int = 0
    matched: int = 0
    dropped: int = 0
    entities: Counter = field(default_factory=Counter)


def join_rows(rows: Iterable[dict[str, Any]], table: Table, spec: JoinSpec, *, positions: Optional[Iterable[int]] = None,
              source: str = "input", stats: Optional[JoinStats] = None) -> Iterator[dict[str, Any]]:
    """Each row of ``rows`` with the table's columns joined in (see the module docstring); dropped rows are left out.

    ``positions`` are the rows' 0-based positions in ``source`` (default
    0, 1, ...), so an error names ``source:LINE`` as a person finds it.
    ``stats``, when given, is updated as rows go by.
    """
    joiner = Joiner(table, spec)
    pos_iter = iter(positions) if positions is not None else None
    for i, row in enumerate(rows):
        pos = next(pos_iter, i) if pos_iter is not None else i
        out = joiner.join(row, _where(source, pos), stats)
        if out is not None:
            yield out


def run_join(loaded: LoadedSpec, name: Optional[str] = None) -> dict[str, Any]:
    """Run the ``join`` pipeline ``name`` of a loaded spec (the only one when None) and return its report."""
    name, spec = pipeline(loaded, "join", name)
    inp, table_path, out = loaded.dataset_path(spec.input), loaded.resolve(spec.table), loaded.resolve(spec.output)
    for what, path in (("input", inp), ("table", table_path)):
        if os.path.realpath(out) == os.path.realpath(path):
            raise loaded.error(("join", name, "output"), f"output is the {what}; fmhub join never modifies its inputs: write to another path")
    for what, path in (("input", inp), ("output", out)):
        try:
            data_format(path)  # a format fmhub cannot read or write is refused before any work
        except DataError as exc:
            raise loaded.error(("join", name, what), str(exc)) from None
    if not os.path.isfile(inp):
        raise loaded.error(("join", name, "input"), f"input {inp} does not exist")
    if not os.path.isfile(table_path):
        raise loaded.error(("join", name, "table"), f"table {table_path} does not exist")
    # columns the user may not read, excluded sources, licences: refused before any row is read; rows withheld as read
    reader = governance.pipeline_step(loaded, "join", name)
    rows = governance.open_rows(reader, inp, [spec.on or spec.mentions], dataset=spec.input)
    table_rows = governance.open_rows(reader, table_path, [spec.key, *(spec.columns or [])], field="table")

    t0 = time.perf_counter()
    table = read_table(table_path, spec.key, fold_case=spec.mentions is not None, rows=table_rows)
    try:
        joiner = Joiner(table, spec)
    except JoinError as exc:
        raise loaded.error(("join", name, "columns" if spec.columns is not None else "prefix"), str(exc)) from None
    col = spec.on if spec.on is not None else spec.mentions
    stats = JoinStats()
    checked = False
    with RowWriter(out) as writer:
        for batch in rows.batches(getattr(spec, "batch_size", None) or BATCH_SIZE):
            if batch.errors:  # a join keeps every row or says why: a line it cannot read is not silently left out
                pos, msg = batch.errors[0]
                raise JoinError(f"{inp}: {msg}; fix it (or run fmhub clean first, which drops such lines)")
            if batch.rows and not checked:
                checked = True
                if not any(col in row for row in batch.rows):
                    have = sorted({k for row in batch.rows for k in row})
                    what = "on" if spec.on is not None else "mentions"
                    raise loaded.error(("join", name, what), f"{inp} has no column {col!r} (it has: {', '.join(have)})")
            writer.write([j for row, pos in zip(batch.rows, batch.positions)
                          if (j := joiner.join(row, _where(inp, pos), stats)) is not None])
    mode = {"on": spec.on} if spec.on is not None else {"mentions": spec.mentions}
    governance.record_output(reader, out, [rows, table_rows],
                             {**mode, "key": spec.key, "columns": joiner.columns, "prefix": spec.prefix, "missing": spec.missing},
                             audit_what="join-pipeline", counts={"rows": stats.rows_in, "matched": stats.matched, "dropped": stats.dropped})
    seconds = time.perf_counter() - t0
    return {
        "pipeline": name, "input": inp, "table": table_path, "output": out, **mode,
        "rows_in": stats.rows_in, "rows_out": stats.rows_in - stats.dropped,
        "rows_matched": stats.matched, "rows_dropped": stats.dropped,
        "entities_in_table": len(table), "entities_matched": len(stats.entities),
        "entity_counts": dict(stats.entities.most_common(TOP_ENTITIES)),
        "columns_added": joiner.added, "seconds": round(seconds, 4),
    }

"""Rows of a data asset: read ``.jsonl`` / ``.parquet`` files in batches, write them atomically.

Cleaning and labelling pipelines stream through these: a batch holds at most
``batch_size`` rows, so a dataset larger than memory is fine. A row is a plain
``dict`` (column -> value).

Every row carries its *position*: the 0-based index of the record in the
input file. For ``.jsonl`` that is the line index (blank lines and malformed
lines count too, so position ``p`` is always line ``p + 1``); for
``.parquet`` the row index. Reports and override files name rows by position,
which stays meaningful to a person looking at the source file.

A ``.jsonl`` line that is not a JSON object does not stop the read: it is
returned in the batch's ``errors`` as ``(position, message)`` and the
pipelines record it per row. A file that cannot be read at all raises
`DataError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from fmhub.base import boundedjson
from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError

Row = dict[str, Any]
FORMATS = (".jsonl", ".parquet")


class DataError(FmhubError):
    """A data asset that cannot be read, written or used (unknown format, unreadable file, bad JSON line, schema
    mismatch, no or too short examples). The one error of every data reader (`fmhub.data.texts` too)."""


# data rows come with clones: parsed within bounds, as `plugins.data_formats` parses them for diffs
ROW_MAX_DEPTH = 128  # real rows nest a few levels; json's recursion (RecursionError, a traceback) starts near 1,000
ROW_MAX_INT_DIGITS = 1000  # wider than any real id or count; int() of n digits costs n^2


def parse_row(line: str | bytes) -> Any:
    """One JSON line of a dataset within the bounds above; NaN is kept (Python's json.dumps writes it).

    Raises `boundedjson.JSONLimitError` (a ValueError) with a one-line reason: `row_problem` words it.
    """
    return boundedjson.loads(line, max_depth=ROW_MAX_DEPTH, allow_nan=True, max_int_digits=ROW_MAX_INT_DIGITS)


def row_problem(exc: ValueError) -> str:
    """``not valid JSON (why)`` for `parse_row`'s error, whichever bound or syntax rule the line broke."""
    text = str(exc)
    return text if text.startswith("not valid JSON") else f"not valid JSON ({text})"


@dataclass
class Batch:
    """Consecutive rows of one input: ``rows[i]`` sits at position ``positions[i]``."""

    positions: list[int]
    rows: list[Row]
    errors: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def data_format(path: str) -> str:
    """``jsonl`` or ``parquet``, from the file name; anything else is refused with the formats fmhub reads."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise DataError(f"{path}: unknown data format {ext or '(no extension)'!r}; fmhub reads {', '.join(FORMATS)}")
    return ext[1:]


def count_rows(path: str) -> int:
    """Rows in a file, cheaply (parquet footer; newline count for jsonl), for progress bars."""
    if data_format(path) == "parquet":
        return _parquet_file(path).metadata.num_rows
    n, last = 0, b"\n"
    with _open(path) as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def read_batches(path: str, batch_size: int = 1000, columns: Sequence[str] | None = None) -> Iterator[Batch]:
    """Yield the file's rows in batches of at most ``batch_size``, in file order.

    ``columns`` keeps only those columns (a column missing from a jsonl row is
    simply absent from its dict; a parquet file without it is an error).
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, not {batch_size}")
    if data_format(path) == "parquet":
        yield from _parquet_batches(path, batch_size, columns)
    else:
        yield from _jsonl_batches(path, batch_size, columns)


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _jsonl_batches(path: str, batch_size: int, columns: Sequence[str] | None) -> Iterator[Batch]:
    for raw in read_line_batches(path, batch_size):
        yield parse_lines(raw, columns)


@dataclass
class LineBatch:
    """Consecutive non-blank ``.jsonl`` lines as read (bytes, unparsed): ``lines[i]`` is the line at ``positions[i]``.

    What a pipeline sends its workers, which parse it (`parse_lines`): bytes
    pickle at memory speed, where dicts of parsed rows cost the reading
    process as much again as parsing them.
    """

    positions: list[int]
    lines: list[bytes]

    def __len__(self) -> int:
        return len(self.lines)


def read_line_batches(path: str, batch_size: int = 1000) -> Iterator[LineBatch]:
    """The non-blank lines of a ``.jsonl`` file in batches of at most ``batch_size``, unparsed, with their positions."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, not {batch_size}")
    batch = LineBatch([], [])
    with _open(path) as f:
        for pos, raw in enumerate(f):
            if not raw.strip():
                continue
            batch.positions.append(pos)
            batch.lines.append(raw)
            if len(batch.lines) >= batch_size:
                yield batch
                batch = LineBatch([], [])
    if batch.lines:
        yield batch


def parse_lines(raw: LineBatch, columns: Sequence[str] | None = None) -> Batch:
    """A `LineBatch` parsed: its rows, and a one-line error per line that is not a JSON object."""
    keep = set(columns) if columns is not None else None
    batch = Batch([], [])
    for pos, line in zip(raw.positions, raw.lines):
        try:
            row = parse_row(line)
        except ValueError as exc:
            batch.errors.append((pos, f"line {pos + 1} is {row_problem(exc)}"))
            continue
        if not isinstance(row, dict):
            batch.errors.append((pos, f"line {pos + 1} is a JSON {type(row).__name__}, not an object"))
            continue
        if keep is not None:
            row = {k: v for k, v in row.items() if k in keep}
        batch.positions.append(pos)
        batch.rows.append(row)
    return batch


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except OSError as exc:
        raise DataError(f"cannot read {path} as parquet: {exc}") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid (a ValueError) for a corrupt footer
        raise DataError(f"{path} is not a readable parquet file ({exc}); is it truncated or corrupt?") from None


def _parquet_batches(path: str, batch_size: int, columns: Sequence[str] | None) -> Iterator[Batch]:
    pf = _parquet_file(path)
    if columns is not None:
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{path} has no column {', '.join(map(repr, missing))}; it has {', '.join(pf.schema_arrow.names)}")
    pos = 0
    try:
        for rb in pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns is not None else None):
            rows = rb.to_pylist()
            yield Batch(list(range(pos, pos + len(rows))), rows)
            pos += len(rows)
    except OSError as exc:
        raise DataError(f"{path}: parquet data is unreadable after row {pos} ({exc}); is the file truncated?") from None


class RowWriter:
    """Writes rows to a new ``.jsonl`` or ``.parquet`` file that appears only when every row is written.

    Use as a context manager: on an exception the partial output is removed and
    an existing file at ``path`` is left as it was. Parquet columns take their
    types from the first batch written; a later row that does not fit that
    schema raises `DataError`.
    """

    def __init__(self, path: str, row_group_size: int = 10_000) -> None:
        self.path = path
        self.format = data_format(path)
        self.rows_written = 0
        self._row_group_size = row_group_size
        self._cm = None
        self._f = None
        self._pq = None
        self._pending: list[Row] = []

    def __enter__(self) -> "RowWriter":
        self._cm = atomic_write(self.path, "wb")
        self._f = self._cm.__enter__()
        return self

    def write(self, rows: Sequence[Row]) -> None:
        if self.format == "jsonl":
            self._f.write(b"".join(map(encode_row, rows)))
        else:
            self._pending.extend(rows)
            if len(self._pending) >= self._row_group_size:
                self._flush_parquet()
        self.rows_written += len(rows)

    def write_encoded(self, lines: Sequence[bytes]) -> None:
        """Rows a worker already encoded with `encode_row` (``.jsonl`` only: the bytes `write` would write)."""
        if self.format != "jsonl":
            raise DataError(f"{self.path}: encoded rows can only be written to .jsonl")
        self._f.write(b"".join(lines))
        self.rows_written += len(lines)

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        try:
            if self._pq is None:
                table = pa.Table.from_pylist(self._pending)
                self._pq = pq.ParquetWriter(self._f, table.schema)
            else:
                table = pa.Table.from_pylist(self._pending, schema=self._pq.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"{self.path}: rows do not fit one parquet schema ({exc}); normalize the schema first") from None
        self._pq.write_table(table)
        self._pending = []

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None and self.format == "parquet":
                self._flush_parquet()
                if self._pq is None:  # no rows at all: still a valid, empty parquet file
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    pq.write_table(pa.table({}), self._f)
        except BaseException:
            exc_type, exc, tb = sys.exc_info()
            self._abandon_parquet()
            self._cm.__exit__(exc_type, exc, tb)
            raise
        if exc_type is not None:
            self._abandon_parquet()
        elif self._pq is not None:
            self._pq.close()
        return bool(self._cm.__exit__(exc_type, exc, tb))

    def _abandon_parquet(self) -> None:
        # close pyarrow's writer before the temp file goes, or it writes a footer into a closed file later
        if self._pq is not None:
            with contextlib.suppress(Exception):
                self._pq.close()
            self._pq = None


def encode_row(row: Row) -> bytes:
    """One row as a ``.jsonl`` line (UTF-8, newline-terminated), exactly as `RowWriter` writes it."""
    return json.dumps(row, ensure_ascii=False, default=_json_default).encode("utf-8") + b"\n"


def _json_default(obj: Any) -> Any:
    # parquet hands back datetimes, decimals, bytes: write them readably rather than fail
    if isinstance(obj, (bytes, bytearray)):
        return obj.decode("utf-8", errors="replace")
    return str(obj)


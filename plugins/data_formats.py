"""Built-in plugin: datasets stored as content-defined chunks, and read as rows for diffs.

* ``jsonl`` (``*.jsonl``, ``*.ndjson``): one JSON value a line. No magic bytes,
  so it is chosen by file name. Chunks end only at line ends (``lines``
  chunking), so a chunk is a whole number of rows.
* ``parquet`` (``*.parquet``, ``*.pq``, or any file starting with ``PAR1``):
  byte-level chunks (``gear`` chunking); unchanged pages of unchanged columns
  and row groups dedupe.

Storing never parses the file: a truncated parquet file or a jsonl file with a
bad line is stored and checked out byte for byte; only ``rows`` (diffs) reads
them, and says what it cannot read. pyarrow is imported only to read parquet
rows, so the git filter process never loads it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, BinaryIO, Iterator

from fmhub import hookimpl
from fmhub.base import boundedjson
from fmhub.core.chunking import DEFAULT_GEAR, DEFAULT_LINES
from fmhub.base.errors import UnreadableRows

if TYPE_CHECKING:
    from fmhub.plugin.interfaces import Row

PARQUET_BATCH_ROWS = 8192  # rows decoded at a time: memory stays at a batch whatever the file size
MAX_LINE_BYTES = 64 << 20  # a longer jsonl line is an unreadable row, skipped without being held whole
SKIP_BYTES = 1 << 20  # read at a time while skipping a long line
LONG_LINE_SHOWN = 1024  # bytes of a long line kept to show
ROW_MAX_DEPTH = 128  # real rows nest a few levels; json's recursion (and RecursionError) starts near 1,000
ROW_MAX_INT_DIGITS = 1000  # wider than any real id or count; int() of n digits costs n^2


class JsonlFormat:
    name = "jsonl"
    extensions = (".jsonl", ".ndjson")
    chunking = DEFAULT_LINES

    def sniff(self, head: bytes) -> bool:
        return False  # any text could be jsonl: the file name decides

    def rows(self, f: BinaryIO, path: str) -> Iterator[Row]:
        """Non-blank lines as parsed JSON, numbered by line; a bad line comes with its error and the diff goes on.

        The file comes from a remote, so every line is parsed within bounds (`boundedjson`: nesting, integer
        digits) and none is read whole past `MAX_LINE_BYTES`: a bad row is reported, never a traceback.
        """
        for lineno, (line, length, digest) in enumerate(_lines(f), start=1):
            if digest is not None:
                yield lineno, _long_text(line, length, digest), f"a line of {length:,} bytes (at most {MAX_LINE_BYTES:,})"
                continue
            if not line.strip():
                continue
            try:
                yield lineno, _parse_row(line), None
            except boundedjson.JSONLimitError as exc:
                yield lineno, _text(line), str(exc).replace(" at line 1 column ", " at column ")  # the row's own line


def _parse_row(line: bytes) -> object:
    # NaN/Infinity are accepted: Python's json.dumps writes them, and rows are data, not instructions
    return boundedjson.loads(line.rstrip(b"\r\n"), max_depth=ROW_MAX_DEPTH, allow_nan=True, max_int_digits=ROW_MAX_INT_DIGITS)


def _lines(f: BinaryIO) -> Iterator[tuple[bytes, int, str | None]]:
    """(line, its length, None), or for a line over `MAX_LINE_BYTES` (its first bytes, its length, its sha256).

    A long line is hashed as it is skipped, a buffer at a time, so two different long lines still differ in a diff.
    """
    while line := f.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line, len(line), None
            continue
        h, length, head = hashlib.sha256(line), len(line), line[:LONG_LINE_SHOWN]
        del line
        while (rest := f.readline(SKIP_BYTES)) and not rest.endswith(b"\n"):
            h.update(rest)
            length += len(rest)
        h.update(rest)
        length += len(rest)
        yield head, length, h.hexdigest()


class ParquetFormat:
    name = "parquet"
    extensions = (".parquet", ".pq")
    chunking = DEFAULT_GEAR

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b"PAR1")

    def rows(self, f: BinaryIO, path: str) -> Iterator[Row]:
        """Rows as dicts, a batch of row groups' pages at a time; a file pyarrow cannot read raises UnreadableRows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise UnreadableRows(f"{path}: cannot be parsed as parquet rows ({_one_line(exc)})") from None
        n = 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    n += 1
                    yield n, record, None
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise UnreadableRows(f"{path}: cannot be parsed as parquet rows after row {n} ({_one_line(exc)})") from None


def _text(line: bytes) -> str:
    return line.rstrip(b"\r\n").decode("utf-8", "replace")


def _long_text(head: bytes, length: int, digest: str) -> str:
    # the hash stands for the whole line: diffs compare bad rows by this text
    return f"{_text(head)}… ({length:,} bytes, sha256:{digest})"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@hookimpl
def fmhub_data_formats():
    return [JsonlFormat(), ParquetFormat()]

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

import json
from typing import TYPE_CHECKING, BinaryIO, Iterator

from fmhub import hookimpl
from fmhub.chunking import DEFAULT_GEAR, DEFAULT_LINES
from fmhub.errors import FmhubError, UnreadableRows

if TYPE_CHECKING:
    from fmhub.interfaces import Row

PARQUET_BATCH_ROWS = 8192  # rows decoded at a time: memory stays at a batch whatever the file size


class JsonlFormat:
    name = "jsonl"
    extensions = (".jsonl", ".ndjson")
    chunking = DEFAULT_LINES

    def sniff(self, head: bytes) -> bool:
        return False  # any text could be jsonl: the file name decides

    def rows(self, f: BinaryIO, path: str) -> Iterator[Row]:
        """Non-blank lines as parsed JSON, numbered by line; a bad line comes with its error and the diff goes on."""
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield lineno, _text(line), f"not valid JSON ({exc.msg} at column {exc.colno})"
            except UnicodeDecodeError as exc:
                yield lineno, _text(line), f"not UTF-8 ({exc.reason} at byte {exc.start})"


class ParquetFormat:
    name = "parquet"
    extensions = (".parquet", ".pq")
    chunking = DEFAULT_GEAR

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b"PAR1")

    def rows(self, f: BinaryIO, path: str) -> Iterator[Row]:
        """Rows as dicts, a batch of row groups' pages at a time; a file pyarrow cannot read raises UnreadableRows."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise FmhubError(f"{path}: reading parquet rows needs pyarrow (`pip install pyarrow`)") from None
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@hookimpl
def fmhub_data_formats():
    return [JsonlFormat(), ParquetFormat()]

"""The one gate every pipeline reads rows and writes outputs through: governance wired once.

`open_rows` comes before a pipeline reads a row of an input. In this order it
checks

1. the read policy (`fmhub.governance.access`): each column the pipeline
   names, so the error names the column, then the whole file, as a pipeline
   may copy every column of a row to its output ("...; no row was read");
2. for reads whose rows go into a new dataset or model version
   (``new_version``): that `fmhub unlearn --remove` did not exclude the
   source (`fmhub.governance.lineage`), and the licence policy on the
   dataset's declared terms (`fmhub.governance.licences`);

then hands back `Rows`: the input's rows, read through `fmhub.core.rows` (or
line by line for the ML readers, `Rows.lines`), less those a ``rows:`` rule
withholds from the user. Withheld rows keep no trace but their count.

`record_output` comes after the output is written: the count of withheld
rows (one ``access`` audit record per input, never a row), the pipeline's
audit record with its counts (``audit.pipeline_run``), and the lineage record
``<output>.lineage.json`` naming the inputs (with the licence and consent
fmhub.yaml declares for them).

A `Step` says who reads: a pipeline ``SECTION.NAME`` of a loaded
``fmhub.yaml`` (errors and audit records then name its line) or a library call
with no spec (errors name it, e.g. ``task 'sentiment'``). Without any policy
installed the checks cost a few cached look-ups.

Used by ``fmhub clean``, ``fmhub label``, ``fmhub join``, and the ML readers of
training and eval rows (`fmhub.ml.tasks`, hence fine-tuning, evaluation,
selection and provenance) and of texts (`fmhub.data.texts`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from fmhub.core.rows import Batch, LineBatch, data_format, parse_row, read_batches, read_line_batches, row_problem
from fmhub.governance import access, licences, lineage


@dataclass(frozen=True)
class Step:
    """Who reads or writes: pipeline ``section.name`` of ``loaded`` (a `LoadedSpec`), or a library call (``loaded`` None).

    ``cwd`` is the directory relative paths are taken from (the spec's
    directory for a pipeline, the process's for a library call).
    """

    section: str
    name: str
    loaded: Any = None
    cwd: str = "."

    def where(self, field: str = "input") -> str:
        """How errors and audit records name the reader: ``fmhub.yaml:LINE: SECTION.NAME``, or ``SECTION 'NAME'``."""
        if self.loaded is None:
            return f"{self.section} {self.name!r}"
        return access.pipeline_where(self.loaded, self.section, self.name, field)

    def start(self, path: str) -> str:
        """A directory of the repository whose policy governs ``path``: the spec's, else the file's own."""
        return self.loaded.root if self.loaded is not None else os.path.dirname(os.path.abspath(path))


def pipeline_step(loaded: Any, section: str, name: str) -> Step:
    """The `Step` of pipeline ``section.name`` of a loaded ``fmhub.yaml``."""
    return Step(section, name, loaded, loaded.root)


@dataclass(frozen=True)
class Line:
    """One non-blank line of a file read by `Rows.lines`: 1-based ``number``, the ``text`` as read, and its row.

    ``row`` is the parsed JSON value (a ``.jsonl`` file) or ``{column: text}``
    (any other file); None with ``problem`` set when the line is not valid JSON.
    """

    number: int
    text: str
    row: Any
    problem: Optional[str] = None


class Rows:
    """An input `open_rows` let through: read it (as often as needed) and only the rows the user may read come out."""

    def __init__(self, path: str, step: Step, gate: Optional[access.RowGate], dataset: Optional[str]) -> None:
        self.path = path
        self.step = step
        self.gate = gate
        self.dataset = dataset

    @property
    def withheld(self) -> int:
        """Rows the policy withheld in the last pass."""
        return self.gate.withheld if self.gate else 0

    @withheld.setter
    def withheld(self, count: int) -> None:  # a reader that parses rows itself and asks `readable` of each counts them
        if self.gate:
            self.gate.withheld = count

    def batches(self, batch_size: int = 1000) -> Iterator[Batch]:
        """`fmhub.core.rows.read_batches` less the withheld rows (the others keep their file positions)."""
        batches = read_batches(self.path, batch_size)
        return self.gate.filter(batches) if self.gate else batches

    def line_batches(self, batch_size: int = 1000) -> Optional[Iterator[LineBatch]]:
        """The ``.jsonl`` input's lines unparsed (`fmhub.core.rows.read_line_batches`), for workers to parse.

        None when rows must be parsed here: a ``rows:`` rule has to see each
        row to withhold it, and parquet is read by columns anyway.
        """
        if self.gate is not None or data_format(self.path) != "jsonl":
            return None
        return read_line_batches(self.path, batch_size)

    def readable(self, row: Mapping[str, Any]) -> bool:
        """May the user read ``row`` of this input (a reader that parses rows itself, e.g. a join's CSV table)?"""
        return self.gate is None or bool(self.gate.readable(row))

    def lines(self, column: str = "text") -> Iterator[Line]:
        """Every non-blank line, in file order, as the ML readers take them (a ``.jsonl`` line parsed, another file's as ``{column: line}``).

        Lines are split as `str.splitlines` splits them (their numbers are
        those readers' line numbers). A withheld row is skipped; a line that
        is not valid JSON, or not an object, comes out as it is for the caller
        to refuse. Raises `OSError` or `UnicodeDecodeError` when the file
        cannot be read as UTF-8 text.
        """
        with open(self.path, encoding="utf-8") as f:
            text = f.read().splitlines()
        jsonl = self.path.endswith(".jsonl")
        withheld = 0
        for n, line in enumerate(text, 1):
            if not line.strip():
                continue
            if not jsonl:
                row: Any = {column: line}
            else:
                try:
                    row = parse_row(line)
                except ValueError as exc:  # nesting or a huge number too: one line, not a RecursionError
                    yield Line(n, line, None, row_problem(exc))
                    continue
            if isinstance(row, dict) and not self.readable(row):
                withheld += 1
                continue
            yield Line(n, line, row)
        self.withheld = withheld

    def record_withheld(self) -> None:
        """One audit record with the count of rows withheld in the last pass (none when there were none), once."""
        if self.gate:
            self.gate.record()
            self.gate.withheld = 0

    def lineage_input(self, cwd: Optional[str] = None) -> dict[str, Any]:
        """This input as a lineage record names it, with the licence and consent fmhub.yaml declares for its dataset."""
        described = lineage.describe_input(self.path, "dataset", self.step.cwd if cwd is None else cwd)
        if self.dataset is not None and self.step.loaded is not None:
            described |= licences.dataset_terms(self.step.loaded, self.dataset)
        return described


def open_rows(step: Step, path: str, columns: Sequence[str] = (), *, dataset: Optional[str] = None, field: str = "input",
              new_version: bool = True, governed_as: Optional[str] = None) -> Rows:
    """Check that ``step`` may read ``path`` (see the module docstring), before any row is read; then its `Rows`.

    :param columns: the columns the step names (text, key, join columns);
        checked one by one, then the whole file.
    :param dataset: the name fmhub.yaml's ``datasets:`` (or the step) gives
        the input, for the licence check and the lineage record (pipelines
        with a spec only).
    :param field: the spec key naming ``path`` (for the line in errors).
    :param new_version: the rows go into a new dataset or model version:
        excluded sources and the licence policy are checked too.
    :param governed_as: the work-tree path whose rules govern ``path`` when
        ``path`` is a copy of it (a file materialized from ``REV:PATH``).
    :raises AccessDenied: a column or the file the user may not read.
    :raises ExcludedSource: a source `fmhub unlearn --remove` excluded.
    :raises LicenceError: a dataset whose licence the policy refuses.
    """
    governed = governed_as or path
    start = step.start(governed)
    access.check_file_read(start, step.where(field), governed, columns)
    if new_version:
        lineage.check_not_excluded(governed, step.cwd)  # a source `fmhub unlearn --remove` took out stays out of new versions
        if step.loaded is not None and dataset is not None:
            licences.check_pipeline(step.loaded, step.section, step.name, dataset, governed)
    return Rows(path, step, access.row_gate(start, step.where(), governed), dataset)


Input = Union[Rows, tuple[str, str], Mapping[str, Any]]


def record_output(step: Step, output: str, inputs: Sequence[Input], params: Optional[Mapping[str, Any]] = None, *,
                  lineage_step: Optional[str] = None, audit_what: Optional[str] = None,
                  counts: Optional[Mapping[str, Any]] = None) -> str:
    """After ``step`` wrote ``output``: withheld counts, the audit record, the lineage record; returns the record's path.

    :param inputs: what the output was made from: opened `Rows`, ``(kind, path)``
        pairs (a base model: ``("model", dir)``) or `lineage.describe_input` dicts.
    :param lineage_step: the record's ``step`` (default: the step's section).
    :param audit_what: with ``counts``, the audit record ``audit.pipeline_run``
        writes (input: the first input, output: ``output``); None writes none.
    """
    for inp in inputs:
        if isinstance(inp, Rows):
            inp.record_withheld()
    if audit_what is not None:
        from fmhub.governance import audit

        first = next((i.path for i in inputs if isinstance(i, Rows)), "")
        audit.pipeline_run(audit_what, step.name, first, output, dict(counts or {}), step.cwd)
    described = [i.lineage_input() if isinstance(i, Rows)
                 else lineage.describe_input(i[1], i[0], step.cwd) if isinstance(i, tuple) else dict(i) for i in inputs]
    return lineage.record(output, lineage_step or step.section, described, params,
                          pipeline=step.name if step.loaded is not None else None, cwd=step.cwd)

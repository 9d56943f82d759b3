"""``fmhub clean``: run a cleaning pipeline of ``fmhub.yaml`` over a dataset, streaming, in batches.

How a run goes:

1. Every step's cleaner is looked up and configured before any row is read,
   so a bad option stops the run with its ``fmhub.yaml`` line.
2. Batches of input go to the data backend (`fmhub.plugin.interfaces.DataBackend`):
   a ``.jsonl`` input as unparsed lines (`fmhub.core.rows.LineBatch`) unless
   a ``rows:`` access rule must see each row here first. In the workers,
   `run_batch` parses them, takes each row through the row-scoped steps,
   in order, and computes the dataset-scoped steps' ``prepare`` values. A
   dataset step never edits rows, so the workers can run the row steps that
   come after it too: their verdicts count only for rows it keeps. For a
   ``.jsonl`` output the workers also encode the rows, so this process,
   which every batch goes through, handles bytes, not dicts.
3. Back in this process, batch by batch in input order, `Run.apply` replays
   each row through the steps: the worker's verdicts for row steps, the
   dataset steps' passes (dedup state) live. Kept rows go to a `RowWriter`:
   the output appears only when complete, and a failed or interrupted run
   leaves nothing behind (re-running starts over cleanly).
4. Every dropped or edited row becomes a `Decision` (position, row hash,
   step, reason); with a report asked for they are spooled to a temporary
   file and written out at the end (`fmhub.data.clean.report`).

Overrides (`fmhub.data.clean.overrides`): rows a reviewer said to drop leave
before the first step; rows they said to keep go on through every step that
would drop them (edits still apply), and reports mark those decisions
``overridden``. A kept row does not join a dedup step's memory, so later
copies of it are still compared with the row the step kept.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from fmhub.governance import access
from fmhub.governance import gate as governance
from fmhub.plugin import host
from fmhub.data.clean.overrides import Overrides, load_overrides, row_hash
from fmhub.plugin.options import OptionError
from fmhub.base.errors import PluginError
from fmhub.plugin.interfaces import CleanContext, Drop, Edit
from fmhub.core.rows import Batch, DataError, LineBatch, RowWriter, count_rows, data_format, encode_row, parse_lines
from fmhub.project.spec import CleanPipeline, LoadedSpec, pipeline
from fmhub.core.store import file_sha256

REPORT_FORMATS = (".json", ".html")


@dataclass(frozen=True)
class PlannedStep:
    """A configured step, as the workers get it (plain data: the cleaner is looked up again there)."""

    index: int
    name: str
    scope: str
    config: Any
    prepare: bool = False


@dataclass(frozen=True)
class Decision:
    """One row a step dropped or edited (``step`` is ``input`` for a malformed row, ``override`` for a reviewer's drop)."""

    position: int
    row: Optional[str]
    step: str
    step_index: int
    action: str
    reason: str
    detail: Optional[Mapping[str, Any]] = None
    columns: Optional[list[str]] = None
    overridden: bool = False
    excerpt: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        """As reports write it: the optional fields only when set."""
        out = {"position": self.position, "row": self.row, "step": self.step, "step_index": self.step_index,
               "action": self.action, "reason": self.reason}
        for key in ("detail", "columns", "overridden", "excerpt"):
            value = getattr(self, key)
            if value is not None and value is not False:
                out[key] = value
        return out


@dataclass
class StepStats:
    index: int
    name: str
    scope: str
    rows_in: int = 0
    dropped: int = 0
    edited: int = 0
    overridden: int = 0
    seconds: float = 0.0


@dataclass
class BatchOut:
    """What a worker hands back for one batch."""

    positions: list[int]
    rows: Optional[list[Optional[dict]]]  # after the row steps' edits; None once a row step dropped it (all None: sent as lines)
    fate: list[int]  # per row: the step that dropped it, -1 a reviewer's drop, len(steps) none
    events: list[tuple[int, Decision]]  # (row index, decision) for the row steps
    prepared: dict[int, list]  # dataset step index -> one value per row (None where the row did not get there)
    forced: set[int]  # rows a reviewer said to keep
    hashes: dict[int, str]
    seconds: list[float]
    matched: set
    errors: list[tuple[int, str]]
    lines: Optional[list[Optional[bytes]]] = None  # the rows encoded for a .jsonl output, in the worker
    excerpts: Optional[dict[int, str]] = None  # with lines: the excerpt of each row a dataset step may drop


@dataclass
class CleanResult:
    """What a run did: counts per step, where things went, what to look at."""

    pipeline: str
    input: str
    output: str
    backend: str
    workers: int
    rows_read: int = 0
    malformed: int = 0
    override_drops: int = 0
    withheld: int = 0  # rows the access policy withheld from this user (a count, nothing else)
    rows_out: int = 0
    seconds: float = 0.0
    steps: list[StepStats] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    overrides: Optional[dict] = None

    @property
    def rows_per_s(self) -> float:
        return (self.rows_read + self.malformed) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows_per_s"] = round(self.rows_per_s, 1)
        for s in out["steps"]:
            s["seconds"] = round(s["seconds"], 4)
        out["seconds"] = round(self.seconds, 4)
        return out


# ---------------------------------------------------------------- planning


def plan_steps(loaded: LoadedSpec, name: str, pipe: CleanPipeline) -> list[PlannedStep]:
    """Look up and configure every step; errors point at the step's (or option's) line in ``fmhub.yaml``."""
    default_columns = tuple(pipe.columns or [loaded.text_column(pipe.input)])
    planned = []
    cleaners = host.registry("cleaner")
    for i, step in enumerate(pipe.steps):
        loc = step.loc or ("clean", name, "steps", i)
        cleaner = cleaners.get(step.name)
        if cleaner is None:
            raise loaded.error(loc, f"unknown cleaner {step.name!r}; installed: {', '.join(sorted(cleaners)) or 'none'} (see `fmhub plugins`)")
        scope = getattr(cleaner, "scope", None)
        if scope not in ("row", "dataset") or not hasattr(cleaner, "configure") or not hasattr(cleaner, "clean" if scope == "row" else "open"):
            raise PluginError(f"cleaner {step.name!r} breaks the Cleaner contract (scope 'row' with clean(), or 'dataset' with open()); see fmhub.plugin.hookspecs")
        options = dict(step.options)
        columns = options.pop("columns", None)
        if columns is None:
            columns = default_columns
        elif isinstance(columns, str):
            columns = (columns,)
        elif isinstance(columns, list) and columns and all(isinstance(c, str) for c in columns):
            columns = tuple(columns)
        else:
            raise loaded.error(loc + (step.name, "columns"), "columns must be a column name or a non-empty list of them")
        try:
            config = cleaner.configure(options, CleanContext(columns, loaded.root))
        except OptionError as exc:
            raise loaded.error(loc + ((step.name, exc.option) if exc.option else ()), str(exc)) from None
        except (ValueError, TypeError) as exc:  # a third-party cleaner's own validation
            raise loaded.error(loc, f"{step.name}: {exc}") from None
        ps = PlannedStep(i, step.name, scope, config, scope == "dataset" and hasattr(cleaner, "prepare"))
        try:
            pickle.dumps(ps)
        except Exception as exc:
            raise PluginError(f"cleaner {step.name!r} returned a config that cannot be sent to workers ({exc}); configure must return plain data") from None
        planned.append(ps)
    return planned


# ---------------------------------------------------------------- workers


@functools.lru_cache(maxsize=None)
def _cleaner(name: str) -> Any:
    return host.lookup("cleaner", name)


def run_batch(steps: Sequence[PlannedStep], overrides: Overrides, excerpt: int, text_columns: Sequence[str], hash_all: bool,
              encode: bool, batch: Batch | LineBatch) -> BatchOut:
    """The per-batch work, in a worker: parsing, reviewer drops, the row steps in order, the dataset steps' ``prepare``.

    Rows are hashed (for reports and overrides) as read, before any edit;
    ``hash_all`` hashes every row, else only those a row step decides on.
    ``encode``: hand the surviving rows back as ``.jsonl`` lines, so the
    calling process (the one every batch goes through) only writes bytes.
    """
    if isinstance(batch, LineBatch):
        batch = parse_lines(batch)
    out = _row_steps(steps, overrides, excerpt, text_columns, hash_all, batch)
    if encode:
        if excerpt > 0 and out.prepared:  # a dataset step's drop shows an excerpt of the row: made here, from the row
            out.excerpts = {i: _excerpt(r, text_columns, excerpt) for i, r in enumerate(out.rows) if r is not None}
        out.lines = [None if r is None else encode_row(r) for r in out.rows]
        out.rows = None
    return out


def _row_steps(steps: Sequence[PlannedStep], overrides: Overrides, excerpt: int, text_columns: Sequence[str], hash_all: bool,
               batch: Batch) -> BatchOut:
    n, end = len(batch.rows), len(steps)
    rows: list[Optional[dict]] = list(batch.rows)
    fate = [end] * n
    out = BatchOut(batch.positions, rows, fate, [], {}, set(), {}, [0.0] * end, set(), batch.errors)
    hashes = out.hashes
    if hash_all or overrides.by_hash:
        for i, row in enumerate(batch.rows):
            hashes[i] = row_hash(row)
    if len(overrides):
        for i, pos in enumerate(batch.positions):
            h = hashes.get(i)
            for key, table in ((("position", pos), overrides.drop_positions), (("row", h), overrides.drop_hashes)):
                if key[1] in table:
                    out.matched.add(("drop",) + key)
                    fate[i] = -1
                    h = hashes[i] = h or row_hash(batch.rows[i])
                    # no excerpt: the reviewer has seen the row, and it has not been through any redaction step
                    out.events.append((i, Decision(pos, h, "override", -1, "drop", f"dropped by reviewer: {table[key[1]]}")))
                    rows[i] = None
                    break
            if fate[i] == -1:
                continue
            for key, table in ((("position", pos), overrides.keep_positions), (("row", h), overrides.keep_hashes)):
                if key[1] in table:
                    out.matched.add(("keep",) + key)
                    out.forced.add(i)
    alive = [i for i in range(n) if fate[i] == end]
    for step in steps:
        t0 = time.perf_counter()
        cleaner = _cleaner(step.name)
        if step.scope == "dataset":
            values = cleaner.prepare([rows[i] for i in alive], step.config) if step.prepare else [rows[i] for i in alive]
            _check_count(step, values, alive)
            prepared = [None] * n
            for i, v in zip(alive, values):
                prepared[i] = v
            out.prepared[step.index] = prepared
        else:
            verdicts = cleaner.clean([rows[i] for i in alive], step.config)
            _check_count(step, verdicts, alive)
            still = []
            for i, v in zip(alive, verdicts):
                if v is None:
                    still.append(i)
                    continue
                if i not in hashes:
                    hashes[i] = row_hash(batch.rows[i])
                if isinstance(v, Drop):
                    kept = i in out.forced
                    shown = v.shown if v.shown is not None else rows[i]
                    out.events.append((i, Decision(batch.positions[i], hashes[i], step.name, step.index, "drop", v.reason,
                                                   _plain(v.detail), overridden=kept, excerpt=_excerpt(shown, text_columns, excerpt))))
                    if kept:
                        still.append(i)
                    else:
                        fate[i] = step.index
                        rows[i] = None
                elif isinstance(v, Edit):
                    new = dict(v.row)
                    changed = sorted(set(rows[i]) ^ set(new) | {k for k in new if k in rows[i] and rows[i][k] != new[k]})
                    out.events.append((i, Decision(batch.positions[i], hashes[i], step.name, step.index, "edit", v.reason,
                                                   _plain(v.detail), columns=changed, excerpt=_excerpt(new, text_columns, excerpt))))
                    rows[i] = new
                    still.append(i)
                else:
                    raise PluginError(f"cleaner {step.name!r} returned {type(v).__name__} for a row; a verdict is None, Drop or Edit")
            alive = still
        out.seconds[step.index] += time.perf_counter() - t0
    return out


def _check_count(step: PlannedStep, values: Sequence, alive: Sequence[int]) -> None:
    if len(values) != len(alive):
        raise PluginError(f"cleaner {step.name!r} returned {len(values)} results for {len(alive)} rows; it must return one per row")


def _plain(detail: Optional[Mapping[str, Any]]) -> Optional[dict]:
    return dict(detail) if detail else None


def _excerpt(row: Optional[Mapping[str, Any]], columns: Sequence[str], limit: int) -> Optional[str]:
    """The start of the row's text (its text columns, else its JSON) for reports; None when reports show no text."""
    if limit <= 0 or row is None:
        return None
    parts = [row[c] for c in columns if isinstance(row.get(c), str)]
    text = " / ".join(parts) if parts else json.dumps(row, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- the run


class Run:
    """One run of a pipeline: applies workers' results in order, keeps the counts, spools decisions."""

    def __init__(self, steps: Sequence[PlannedStep], result: CleanResult, spool, text_columns: Sequence[str], excerpt: int) -> None:
        self.steps = steps
        self.result = result
        self.passes = {s.index: _cleaner(s.name).open(s.config) for s in steps if s.scope == "dataset"}
        self.spool = spool
        self.text_columns = text_columns
        self.excerpt = excerpt
        self.matched: set = set()
        result.steps = [StepStats(s.index, s.name, s.scope) for s in steps]

    def apply(self, out: BatchOut) -> list[dict]:
        """Replay one batch through the steps; returns the rows to write."""
        res, n = self.result, len(out.positions)
        res.rows_read += n
        res.malformed += len(out.errors)
        self.matched |= out.matched
        decisions: list[Decision] = [Decision(pos, None, "input", -1, "drop", msg) for pos, msg in out.errors]
        alive = [f != -1 for f in out.fate]
        by_step: dict[int, list[tuple[int, Decision]]] = {}
        for i, d in out.events:
            if d.step_index == -1:
                res.override_drops += 1
                decisions.append(d)
            else:
                by_step.setdefault(d.step_index, []).append((i, d))
        for step in self.steps:
            stats = res.steps[step.index]
            stats.rows_in += sum(alive)
            stats.seconds += out.seconds[step.index]
            if step.scope == "row":
                events = by_step.get(step.index, ())
            else:
                t0 = time.perf_counter()
                idx = [i for i in range(n) if alive[i]]
                prepared = out.prepared[step.index]
                verdicts = self.passes[step.index].clean([out.positions[i] for i in idx], [prepared[i] for i in idx])
                if len(verdicts) != len(idx):
                    raise PluginError(f"cleaner {step.name!r} returned {len(verdicts)} verdicts for {len(idx)} rows; it must return one per row")
                events = []
                for i, v in zip(idx, verdicts):
                    if v is None:
                        continue
                    if not isinstance(v, Drop):
                        raise PluginError(f"dataset cleaner {step.name!r} returned {type(v).__name__}; a dataset step keeps (None) or drops (Drop)")
                    h = out.hashes.get(i)  # hashed in the worker whenever reports or overrides need it
                    events.append((i, Decision(out.positions[i], h, step.name, step.index, "drop", v.reason, _plain(v.detail),
                                               overridden=i in out.forced, excerpt=self._shown(out, i, v))))
                stats.seconds += time.perf_counter() - t0
            for i, d in events:
                if not alive[i]:
                    continue  # a dataset step before this one dropped the row: it never got here
                decisions.append(d)
                if d.overridden:
                    stats.overridden += 1
                elif d.action == "drop":
                    stats.dropped += 1
                    alive[i] = False
                else:
                    stats.edited += 1
        rows = out.rows if out.lines is None else out.lines
        kept = [rows[i] for i in range(n) if alive[i]]
        res.rows_out += len(kept)
        if self.spool is not None and decisions:
            decisions.sort(key=lambda d: (d.position, d.step_index))
            self.spool.write("".join(json.dumps(d.to_dict(), ensure_ascii=False, default=str) + "\n" for d in decisions))
        return kept


    def _shown(self, out: BatchOut, i: int, verdict: Drop) -> Optional[str]:
        """The excerpt a dataset step's drop shows: the verdict's own ``shown``, else the row's (made in the worker when sent as lines)."""
        if verdict.shown is not None or out.rows is not None:
            return _excerpt(verdict.shown if verdict.shown is not None else out.rows[i], self.text_columns, self.excerpt)
        return (out.excerpts or {}).get(i)


def run(loaded: LoadedSpec, name: Optional[str] = None, *, backend: Optional[str] = None, workers: Optional[int] = None,
        reports: Sequence[str] = (), overrides: Optional[str] = None, progress: Optional[Callable[[int], None]] = None,
        on_start: Optional[Callable[[int], None]] = None) -> CleanResult:
    """Run the ``clean`` pipeline ``name`` of a loaded spec (the only one when None).

    ``reports``: paths ending in ``.json`` or ``.html`` (default: the
    pipeline's ``report``). ``overrides``: an overrides file (default: the
    pipeline's ``overrides``). ``on_start(total_rows)`` is called once the
    input is counted, then ``progress(n)`` after each batch of ``n`` rows.
    """
    name, pipe = pipeline(loaded, "clean", name)
    src = loaded.dataset_path(pipe.input)
    dst = loaded.resolve(pipe.output)
    for path in (src, dst):
        data_format(path)  # refuses a format fmhub cannot read or write, before any work
    if not os.path.exists(src):
        raise loaded.error(("clean", name, "input"), f"input {src} does not exist")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise loaded.error(("clean", name, "output"), "output is the input; fmhub clean never modifies its input: write to another path")
    # columns the user may not read, excluded sources, licences: refused before any row is read; rows withheld as read
    reader = governance.pipeline_step(loaded, "clean", name)
    rows = governance.open_rows(reader, src, access.pipeline_columns(loaded, "clean", name), dataset=pipe.input)
    reports = list(reports) or ([loaded.resolve(pipe.report)] if pipe.report else [])
    for r in reports:
        if os.path.splitext(r)[1].lower() not in REPORT_FORMATS:
            raise DataError(f"report {r}: unknown report format; use a path ending in .json or .html")
        if os.path.realpath(r) in (os.path.realpath(src), os.path.realpath(dst)):
            raise DataError(f"report {r} would overwrite the input or the output; choose another path")
    steps = plan_steps(loaded, name, pipe)
    backend_name = backend or pipe.backend
    try:
        engine = host.lookup("data-backend", backend_name)
    except PluginError as exc:
        if backend:
            raise
        raise loaded.error(("clean", name, "backend"), str(exc)) from None
    workers = workers or pipe.workers or os.cpu_count() or 1
    text_columns = tuple(pipe.columns or [loaded.text_column(pipe.input)])
    result = CleanResult(name, src, dst, backend_name, workers)
    ov, ov_info = _overrides(loaded, pipe, overrides, result)
    excerpt = pipe.excerpt if reports else 0

    total = count_rows(src)
    if total == 0:
        raise DataError(f"{src} is empty: there are no rows to clean")
    if on_start:
        on_start(total)
    started = time.time()
    t0 = time.perf_counter()
    in_sha = file_sha256(src) if reports else None
    hash_all = bool(reports) and any(s.scope == "dataset" for s in steps)
    encode = data_format(dst) == "jsonl"
    fn = functools.partial(run_batch, tuple(steps), ov, excerpt, text_columns, hash_all, encode)
    # unparsed lines where no rows: rule needs to see rows here: the workers parse them
    batches = rows.line_batches(pipe.batch_size) or rows.batches(pipe.batch_size)
    with tempfile.TemporaryFile("w+", encoding="utf-8") if reports else contextlib.nullcontext() as spool:
        state = Run(steps, result, spool, text_columns, excerpt)
        with RowWriter(dst) as writer:
            for out in engine.map_batches(fn, batches, workers):
                kept = state.apply(out)
                if encode:
                    writer.write_encoded(kept)
                else:
                    writer.write(kept)
                if progress:
                    progress(len(out.positions) + len(out.errors))
            result.withheld = rows.withheld
            if result.rows_read == 0 and result.malformed == 0 and not result.withheld:
                raise DataError(f"{src} holds no rows (only blank lines): there is nothing to clean")
        result.seconds = time.perf_counter() - t0
        if result.rows_out == 0:
            result.warnings.append(f"every row was dropped: {dst} is empty")
        if ov_info is not None:
            unmatched = [f"{section} {kind} {value}" for section, kind, value in ov.keys() if (section, kind, value) not in state.matched]
            ov_info.update(matched=len(ov) - len(unmatched), unmatched=unmatched)
            if unmatched:
                result.warnings.append(f"{len(unmatched)} override(s) matched no row (first: {unmatched[0]}); the input changed?")
        if reports:
            from fmhub.data.clean import report as clean_report

            header = clean_report.header(result, loaded, pipe, in_sha, file_sha256(dst), started)
            for path in reports:
                spool.seek(0)
                clean_report.write(path, header, _decisions(spool))
                result.reports.append(path)
    governance.record_output(reader, dst, [rows], {"steps": [s.name for s in steps]}, audit_what="clean-pipeline", counts={
        "rows_read": result.rows_read, "malformed": result.malformed, "rows_out": result.rows_out,
        "dropped": sum(s.dropped for s in result.steps), "edited": sum(s.edited for s in result.steps),
        "override_drops": result.override_drops, "withheld": result.withheld, "backend": backend_name})
    return result


def _overrides(loaded: LoadedSpec, pipe: CleanPipeline, path: Optional[str], result: CleanResult) -> tuple[Overrides, Optional[dict]]:
    if path is None and pipe.overrides:
        path = loaded.resolve(pipe.overrides)
        if not os.path.exists(path):  # the usual first run: nobody has reviewed anything yet
            result.overrides = {"path": path, "entries": 0, "matched": 0, "unmatched": [], "missing": True}
            return Overrides(path=path), None
    if path is None:
        return Overrides(), None
    ov = load_overrides(path)
    result.overrides = {"path": path, "entries": len(ov)}
    return ov, result.overrides


def _decisions(spool) -> Iterator[dict]:
    for line in spool:
        yield json.loads(line)

"""``fmhub label``: run a labelling pipeline of ``fmhub.yaml`` from votes to probabilistic labels.

Two passes over the input, which is only ever read:

1. **Votes.** Rows stream in batches (`fmhub.core.rows`) through the pipeline's
   data backend, which runs the labelling functions (`fmhub.data.label.votes`);
   functions that hold a model (``in_driver``) run here, in this process, on
   the same batches, so a model is loaded once and not once per worker. The
   votes go into one int8 matrix, rows × functions (a million rows and ten
   functions: 10 MB).
2. **Labels.** The label model (`fmhub.data.label.model`) is fitted on the matrix,
   anchored by gold labels when the pipeline names a file of them; then the
   input is read again and each row is written out with ``label`` (the most
   probable class, or null where every function abstained) and
   ``label_probs`` (class -> probability), to a file that appears only once
   complete (`fmhub.core.rows.RowWriter`). The report (JSON, or HTML for a
   ``.html`` path) is written the same way, after the output.

An interrupted run leaves no partial output or report behind (at most a
``.fmhub-*.tmp`` beside them, removed on the next error-free exit of Python's
clean-up, or by hand), and running it again starts over from the input.

Rows that are not JSON objects are recorded (position and message) and left
out of the output; a function that raises on a row is recorded for that row
and counted as abstaining; a function that raises on every row stops the run,
naming it.
"""

from __future__ import annotations

import functools
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

from fmhub.governance import access
from fmhub.governance import gate as governance
from fmhub.base.errors import FmhubError
from fmhub.plugin.interfaces import LabelContext
from fmhub.data.label.model import ABSTAIN, LabelModel, LabelModelError
from fmhub.data.label.votes import LFSpec, apply, configure, vote_batch
from fmhub.core.rows import Batch, DataError, RowWriter, count_rows
from fmhub.project.spec import LabelPipeline, LoadedSpec, pipeline

FIRST_ERRORS = 20  # errors kept per function (and malformed rows) in the report
FAIL_FAST_ROWS = 50  # a function that fails on all of the first this-many rows stops the run early

Progress = Callable[[str, int, Optional[int]], None]  # (phase, rows done, rows in all or None) for "votes" and "write"
Tick = Callable[[str, int], None]  # the same without the total, inside a run


class LabelError(FmhubError):
    """A labelling run that cannot go on: a function failing on every row, an empty input, a bad gold file."""


@dataclass
class Prepared:
    """A pipeline resolved against its spec: paths, class names, configured labelling functions."""

    name: str
    pipe: LabelPipeline
    loaded: LoadedSpec
    input: str
    output: str
    report: str
    context: LabelContext
    specs: list[LFSpec]
    key: Optional[str]
    rows: governance.Rows  # the input through the governance gate: both passes skip withheld rows alike
    step: governance.Step

    def batches(self) -> Iterator[Batch]:
        """The input's batches, less the rows the user may not read (their positions stay those of the file)."""
        return self.rows.batches(self.pipe.batch_size)


@dataclass
class Collected:
    """Pass 1's result: each kept row's position and its votes, plus what went wrong on the way."""

    positions: Any  # int64 (n,)
    matrix: Any  # int8 (n, m)
    error_counts: list[int]
    errors: list[list[tuple[int, str]]]
    malformed: int = 0
    malformed_first: list[tuple[int, str]] = field(default_factory=list)
    keys: Optional[list] = None


def prepare(loaded: LoadedSpec, name: Optional[str] = None, report: Optional[str] = None) -> Prepared:
    """Resolve a label pipeline and configure each of its functions once (which checks their options)."""
    name, pipe = pipeline(loaded, "label", name)
    if len(set(pipe.classes)) != len(pipe.classes):
        raise loaded.error(("label", name, "classes"), "class names must be distinct")
    ds = loaded.spec.datasets.get(pipe.input)
    context = LabelContext(tuple(pipe.classes), pipe.column or loaded.text_column(pipe.input), loaded.root)
    inp, out = loaded.dataset_path(pipe.input), loaded.resolve(pipe.output)
    if os.path.realpath(inp) == os.path.realpath(out):
        raise loaded.error(("label", name, "output"), "output is the input file; fmhub never modifies its input: write to a new path")
    # columns the user may not read, excluded sources, licences: refused before any row is read; rows withheld as read
    reader = governance.pipeline_step(loaded, "label", name)
    rows = governance.open_rows(reader, inp, access.pipeline_columns(loaded, "label", name), dataset=pipe.input)
    report_path = loaded.resolve(report or pipe.report) if (report or pipe.report) else os.path.splitext(out)[0] + ".report.json"
    from fmhub.plugin import host

    kinds = host.registry("labeler")
    specs: list[LFSpec] = []
    seen: dict[str, int] = {}
    for i, step in enumerate(pipe.lfs):
        loc = step.loc or ("label", name, "lfs", i)
        options = dict(step.options)
        display = options.pop("name", None)
        if display is not None and not isinstance(display, str):
            raise loaded.error(loc, "name: must be a string")
        if step.name not in kinds:
            raise loaded.error(loc, f"unknown labelling function kind {step.name!r}; installed: {', '.join(sorted(kinds))}")
        try:
            lf = configure(LFSpec(step.name, options, ""), context)
        except (FmhubError, ValueError, TypeError) as exc:
            raise loaded.error(loc, str(exc)) from None
        display = display or str(getattr(lf, "name", step.name))
        seen[display] = seen.get(display, 0) + 1
        if seen[display] > 1:  # two entries with the same words, say: keep names unique in the report
            display = f"{display} #{seen[display]}"
        specs.append(LFSpec(step.name, options, display, bool(getattr(lf, "in_driver", False))))
    return Prepared(name, pipe, loaded, inp, out, report_path, context, specs, pipe.key or (ds.key if ds else None), rows, reader)


def collect_votes(prep: Prepared, backend: Optional[str] = None, workers: Optional[int] = None,
                  progress: Optional[Tick] = None, keep_keys: bool = False) -> Collected:
    """Pass 1: every function's vote on every row (see the module docstring)."""
    import numpy as np

    from fmhub.plugin import host

    pipe, ctx, specs = prep.pipe, prep.context, prep.specs
    m = len(specs)
    remote = [j for j, s in enumerate(specs) if not s.in_driver]
    local = [j for j, s in enumerate(specs) if s.in_driver]
    index = {c: i for i, c in enumerate(ctx.classes)}
    needs_column = any("column" not in s.options for s in specs)
    n_workers = workers or pipe.workers or os.cpu_count() or 1
    if n_workers > 1 and (total_rows(prep) or 0) <= pipe.batch_size:
        n_workers = 1  # one batch: starting worker processes would cost more than it saves
    engine = host.lookup("data-backend", backend or pipe.backend)

    pending: deque[Batch] = deque()
    state = {"checked": False}

    def feed():
        for batch in prep.batches():
            if batch.rows and needs_column and not state["checked"]:
                state["checked"] = True
                if not any(ctx.column in row for row in batch.rows):
                    have = sorted({k for row in batch.rows for k in row})
                    raise DataError(
                        f"{prep.input} has no column {ctx.column!r} (it has: {', '.join(have)}); "
                        f"set 'column:' in label.{prep.name} or 'text:' in its dataset"
                    )
            pending.append(batch)
            yield batch

    if remote:
        fn = functools.partial(vote_batch, tuple(specs[j] for j in remote), ctx)
        results = engine.map_batches(fn, feed(), n_workers)
    else:
        results = (None for _ in feed())

    positions, blocks, keys = [], [], ([] if keep_keys else None)
    counts, errors = [0] * m, [[] for _ in range(m)]
    malformed, malformed_first, seen = 0, [], 0
    for res in results:
        batch = pending.popleft()
        block = np.full((len(batch.rows), m), ABSTAIN, dtype=np.int8)
        if res is not None:
            block[:, remote] = res.matrix
            for jj, j in enumerate(remote):
                counts[j] += res.error_counts[jj]
                errors[j].extend(res.errors[jj][: FIRST_ERRORS - len(errors[j])])
        for j in local:
            col, errs, n_err = apply(configure(specs[j], ctx), batch, index)
            block[:, j] = col
            counts[j] += n_err
            errors[j].extend(errs[: FIRST_ERRORS - len(errors[j])])
        positions.append(np.asarray(batch.positions, dtype=np.int64))
        blocks.append(block)
        if keys is not None and prep.key:
            keys.extend(row.get(prep.key) for row in batch.rows)
        malformed += len(batch.errors)
        malformed_first.extend(batch.errors[: FIRST_ERRORS - len(malformed_first)])
        seen += len(batch.rows)
        if seen - len(batch.rows) < FAIL_FAST_ROWS:  # until the first FAIL_FAST_ROWS rows are in
            _fail_if_always_failing(prep, counts, errors, seen, final=False)
        if progress:
            progress("votes", seen + malformed)
    n = sum(len(p) for p in positions)
    if n == 0:
        raise LabelError(
            f"{prep.input} has no rows to label" + (f" ({malformed} malformed line(s), first: {malformed_first[0][1]})" if malformed else "")
        )
    _fail_if_always_failing(prep, counts, errors, n, final=True)
    return Collected(np.concatenate(positions), np.concatenate(blocks), counts, errors, malformed, malformed_first, keys)


def _fail_if_always_failing(prep: Prepared, counts: list[int], errors: list, rows: int, final: bool) -> None:
    if not final and rows < FAIL_FAST_ROWS:
        return
    for j, spec in enumerate(prep.specs):
        if counts[j] == rows and errors[j]:
            pos, msg = errors[j][0]
            scope = "every row" if final else f"each of the first {rows} rows"
            raise LabelError(f"labelling function {spec.name!r} failed on {scope} (row {pos}: {msg}); fix it or remove it from label.{prep.name}.lfs")


def load_gold(prep: Prepared, collected: Collected) -> tuple[dict[int, int], int]:
    """Gold labels as matrix row -> class index, and how many gold rows matched no input row.

    A gold row names its input row by the pipeline's ``key`` column when it has
    one, else by ``position`` (0-based, as in reports and suggestions).
    """
    import numpy as np

    pipe = prep.pipe
    path = prep.loaded.resolve(pipe.gold)
    index = {c: i for i, c in enumerate(pipe.classes)}
    by_key = {k: i for i, k in enumerate(collected.keys or []) if k is not None} if prep.key else {}
    gold: dict[int, int] = {}
    unmatched = 0
    gold_rows = governance.open_rows(prep.step, path, [pipe.gold_column, *([prep.key] if prep.key else [])], field="gold",
                                     new_version=False)
    for batch in gold_rows.batches(10_000):
        if batch.errors:
            pos, msg = batch.errors[0]
            raise LabelError(f"gold file {path}: {msg}; fix the file")
        for pos, row in zip(batch.positions, batch.rows):
            value = row.get(pipe.gold_column)
            if value not in index:
                raise LabelError(f"gold file {path}, row {pos}: {pipe.gold_column}={value!r} is not a class ({', '.join(pipe.classes)})")
            if prep.key and prep.key in row:
                i = by_key.get(row[prep.key])
            elif isinstance(row.get("position"), int):
                p = row["position"]
                i = int(np.searchsorted(collected.positions, p))
                i = i if i < len(collected.positions) and collected.positions[i] == p else None
            else:
                ident = f"'{prep.key}' or 'position'" if prep.key else "'position'"
                raise LabelError(f"gold file {path}, row {pos}: no {ident} column to say which input row it labels")
            if i is None:
                unmatched += 1
            else:
                gold[i] = index[value]
    gold_rows.record_withheld()
    if not gold:
        raise LabelError(f"gold file {path}: none of its {unmatched} row(s) matches an input row; check the positions or keys")
    return gold, unmatched


MODEL_OPTIONS = ("abstains", "class_balance", "dependencies", "max_iter", "pseudo_count", "redundancy")


def model_from_options(opts: Mapping[str, Any], k: int) -> LabelModel:
    """The label model a pipeline's ``model:`` options describe; with none, exactly `LabelModel`'s API defaults.

    ``dependencies`` is the kappa above which two functions are read as one
    group (false: assume independence). ``redundancy``, the older option, is
    read the same way (a number: that threshold; false: none).
    """
    deps = opts.get("dependencies", opts.get("redundancy", 0.7))
    if deps is not False and not (isinstance(deps, (int, float)) and not isinstance(deps, bool) and 0 < deps <= 1):
        raise ValueError("dependencies must be a number in (0, 1] (how far two functions must agree beyond the class "
                         "to count as one group) or false")
    return LabelModel(k, max_iter=int(opts.get("max_iter", 500)), pseudo_count=float(opts.get("pseudo_count", 1.0)),
                      abstains=str(opts.get("abstains", "auto")), dependencies=None if deps is False else float(deps))


def fit_model(prep: Prepared, collected: Collected, gold: Optional[Mapping[int, int]] = None) -> tuple[LabelModel, list]:
    """The label model fitted on the votes, with the pipeline's ``model:`` options; and the dependent pairs it grouped
    (member, root, kappa)."""
    opts = dict(prep.pipe.model)
    loc = ("label", prep.name, "model")
    k = len(prep.pipe.classes)
    unknown = set(opts) - set(MODEL_OPTIONS)
    if unknown:
        raise prep.loaded.error(loc, f"unknown option(s) {', '.join(sorted(unknown))}; model takes {', '.join(MODEL_OPTIONS)}")
    balance = opts.get("class_balance")
    if isinstance(balance, dict):
        missing = set(prep.pipe.classes) - set(balance)
        if missing or set(balance) - set(prep.pipe.classes):
            raise prep.loaded.error(loc, f"class_balance must give a weight to each class: {', '.join(prep.pipe.classes)}")
        balance = [balance[c] for c in prep.pipe.classes]
    try:
        model = model_from_options(opts, k)
    except (LabelModelError, TypeError, ValueError) as exc:
        raise prep.loaded.error(loc, str(exc)) from None
    try:
        model.fit(collected.matrix, gold=gold or None, class_balance=balance)
    except LabelModelError as exc:
        if "class_balance" in str(exc):
            raise prep.loaded.error(loc, str(exc)) from None
        raise LabelModelError(f"label.{prep.name}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise prep.loaded.error(loc, str(exc)) from None
    return model, model.dependent_pairs()


def run(loaded: LoadedSpec, name: Optional[str] = None, backend: Optional[str] = None, workers: Optional[int] = None,
        report: Optional[str] = None, suggest: Optional[int] = None, progress: Optional[Progress] = None) -> dict[str, Any]:
    """Run a label pipeline end to end; returns the report (also written to its path)."""
    import numpy as np

    from fmhub.data.label.report import build_report, write_report
    from fmhub.data.label.suggest import suggest as pick

    t0 = time.monotonic()
    prep = prepare(loaded, name, report)
    tick: Optional[Tick] = None
    if progress is not None:
        total, outer = total_rows(prep), progress
        tick = lambda phase, done: outer(phase, done, total)  # noqa: E731
    for path in (prep.report, prep.loaded.resolve(prep.pipe.gold) if prep.pipe.gold else None):
        if path and os.path.realpath(path) == os.path.realpath(prep.input):
            raise LabelError(f"{path} is the input file; fmhub never modifies its input")
    collected = collect_votes(prep, backend, workers, tick, keep_keys=bool(prep.pipe.gold and prep.key))
    t1 = time.monotonic()
    gold, unmatched = load_gold(prep, collected) if prep.pipe.gold else ({}, 0)
    model, pairs = fit_model(prep, collected, gold)
    proba = model.predict_proba(collected.matrix)
    n_suggest = prep.pipe.suggest if suggest is None else suggest
    picks = pick(proba, collected.matrix, n_suggest, exclude=gold)
    t2 = time.monotonic()
    labelled = proba.copy()
    if gold:  # a known label is the label
        rows = np.fromiter(gold, dtype=np.int64)
        labelled[rows] = np.eye(len(prep.pipe.classes))[np.fromiter(gold.values(), dtype=np.int64)]
    is_gold = np.zeros(len(labelled), bool)
    is_gold[list(gold)] = True
    preview, replaced = write_output(prep, collected, labelled, is_gold, {int(collected.positions[i]) for i in picks}, tick)
    t3 = time.monotonic()
    rep = build_report(prep, collected, model, proba, labelled, gold, unmatched, pairs, picks, preview, replaced,
                       backend or prep.pipe.backend, {"votes": t1 - t0, "model": t2 - t1, "write": t3 - t2})
    if prep.rows.gate:
        rep["withheld_by_policy"] = prep.rows.withheld  # a count only: withheld rows leave no other trace
    write_report(prep.report, rep)
    governance.record_output(prep.step, prep.output, [prep.rows], {"classes": list(prep.pipe.classes)}, audit_what="label-pipeline",
                             counts={"rows": rep["rows"], "classes": rep["labels"]["counts"], "unlabelled": rep["labels"]["unlabelled"],
                                     "malformed": collected.malformed, "backend": rep["backend"]})
    return rep


def write_output(prep: Prepared, collected: Collected, proba, is_gold, wanted: set[int],
                 progress: Optional[Tick] = None) -> tuple[dict[int, dict], int]:
    """Pass 2: the input's rows plus label and probabilities, to a new file; returns the rows at ``wanted`` positions and how many rows had a label column replaced."""
    import numpy as np

    classes = prep.pipe.classes
    col, probs_col = prep.pipe.label_column, prep.pipe.label_column + "_probs"
    silent = (collected.matrix == ABSTAIN).all(1) & ~is_gold
    best = proba.argmax(1)
    preview: dict[int, dict] = {}
    replaced = 0
    r = done = 0
    with RowWriter(prep.output) as writer:
        for batch in prep.batches():
            n = len(batch.rows)
            if not np.array_equal(np.asarray(batch.positions, dtype=np.int64), collected.positions[r:r + n]):
                raise LabelError(f"{prep.input} changed while it was being labelled; run again")
            out = []
            # the batch's slices as Python values once: indexing numpy row by row cost more than the writing
            for i, (row, quiet, b, probs) in enumerate(zip(batch.rows, silent[r:r + n].tolist(), best[r:r + n].tolist(), proba[r:r + n].tolist())):
                new = dict(row)
                replaced += col in row or probs_col in row
                new[col] = None if quiet else classes[b]
                new[probs_col] = {c: round(p, 6) for c, p in zip(classes, probs)}
                if batch.positions[i] in wanted:
                    preview[batch.positions[i]] = row
                out.append(new)
            writer.write(out)
            r += n
            done += n + len(batch.errors)
            if progress:
                progress("write", done)
    if r != len(collected.positions):
        raise LabelError(f"{prep.input} changed while it was being labelled; run again")
    return preview, replaced


def total_rows(prep: Prepared) -> Optional[int]:
    """Rows (lines, for jsonl) in the input, for progress bars; None if it cannot be counted cheaply."""
    try:
        return count_rows(prep.input)
    except DataError:
        return None

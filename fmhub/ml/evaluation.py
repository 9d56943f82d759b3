"""``fmhub eval``: score a model (and adapter) at a revision row by row, store the predictions, report per slice.

An eval (``eval.NAME`` in ``fmhub.yaml``) names a task (its metric, columns
and classes), the rows to score (default: the task's held-out rows), the
model (a ``models`` name, a directory, or ``PATH@REV``) and an adapter.
`run_eval` writes, into the eval's output directory (docs/monitoring.md):

* ``predictions.jsonl``: one line per row (the row itself, its content key,
  the target, the prediction, whether it was right, its score and the slices
  it is in), a versioned asset: commit it and every model version's
  predictions stay comparable;
* ``report.json``: the metric overall and per slice, flagged slices, and
  with ``compare`` a regression table against another version's predictions;
* ``report.html``, ``slices.png``, ``compare.png``: the same for people;
* ``predictions.jsonl.lineage.json``: which model, adapter and rows.

Scores per row: ``accuracy`` and ``exact_match`` 1.0 or 0.0; ``loss`` the
row's mean NLL per token (lower is better). Predictions are deterministic
(no sampling, no dropout): the same model on the same rows gives the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from fmhub.base import boundedjson
from fmhub.governance import lineage
from fmhub.base.atomic import atomic_write
from fmhub.governance import gate
from fmhub.ml import identity, tasks
from fmhub.ml.tasks import Task, TaskError, TaskRow
from fmhub.base.errors import FmhubError
from fmhub.ml.slices import Sliced, compare, membership, metrics
from fmhub.project.spec import EvalSpec, LoadedSpec, SliceSpec, pipeline

VERSION = 1
PREDICTIONS = "predictions.jsonl"
MAX_PREDICTION_LINE = 16 << 20  # a row's key, score and prediction: far less, unless the file is hostile
REPORT = "report.json"
COMPARE_THRESHOLD = 0.02  # metric units: smaller changes between versions are "same"


class EvalError(FmhubError):
    """An eval that cannot run: an unknown task, model or slice, or predictions that cannot be read."""


@dataclass
class Resolved:
    """A model or adapter as given, and the local directory it is read from."""

    given: str
    dir: str
    rev: Optional[str] = None
    path: Optional[str] = None  # repo-relative, when read at ``rev``

    def lineage_input(self, root: str) -> dict[str, Any]:
        return lineage.describe_input(f"{self.rev}:{self.path}" if self.rev else self.dir, "model", root)


def local_dir(given: str, cwd: str, kind: str = "model", check: bool = True) -> Resolved:
    """A directory for ``PATH`` or ``PATH@REV``: the path itself, or the directory as committed, materialized once.

    ``check`` False takes a work-tree path as it is: ``fmhub run`` plans an
    eval of a model another step has yet to write, and the eval step checks it.

    Materialized copies live in the git dir under ``fmhub/eval-models/<tree id>``,
    so evaluating the same version again reads nothing from the store. The read
    policy is checked every time, a copy reused included: another user of the
    clone may have materialized it.
    """
    from fmhub.core.repo import common_dir
    from fmhub.serving.sources import materialized, parse_source

    src = parse_source(given, cwd)
    if src.rev is None:
        marker = "adapter_config.json" if kind == "adapter" else "config.json"
        if check and not os.path.isfile(os.path.join(src.path, marker)):
            raise EvalError(f"{given}: not a {kind} directory (no {marker})")
        return Resolved(given, os.path.normpath(src.path))
    dest = materialized(src, os.path.join(common_dir(src.repo), "fmhub", "eval-models", src.version))
    return Resolved(given, dest, src.rev, src.path)


@dataclass
class Plan:
    """An eval resolved against its spec."""

    name: str
    task: Task
    data: str  # the scored rows' file (the task's data when they are its held-out split)
    rows: list[TaskRow]
    model: Resolved
    adapter: Optional[Resolved]
    slices: dict[str, SliceSpec]
    output: str
    min_rows: int


def plan(loaded: LoadedSpec, name: Optional[str] = None, model: Optional[str] = None, adapter: Optional[str] = None,
         output: Optional[str] = None, read_rows: bool = True, check: bool = True) -> Plan:
    """Resolve ``eval.NAME`` (``model``/``adapter`` override the spec's, e.g. ``models/base@v1``).

    ``read_rows`` False resolves paths only (``fmhub run`` plans before the
    steps that write the rows have run); ``rows`` is then empty. ``check``
    False does not look into the declared model's directory yet (another step
    may write it; the eval step checks it). The output (default ``evals/NAME``)
    belongs to the declared model: another model's predictions go to
    ``evals/NAME/by-model/SLUG``, so neither overwrites the other.
    """
    name, ev = pipeline(loaded, "eval", name)
    ev: EvalSpec
    if ev.task not in loaded.spec.tasks:
        raise loaded.error(("eval", name, "task"), f"no task {ev.task!r}; tasks: {', '.join(loaded.spec.tasks) or 'none'}")
    task = tasks.task_of(loaded, ev.task)
    data = loaded.dataset_path(ev.data) if ev.data is not None else (task.eval or task.data)
    rows: list[TaskRow] = []
    if read_rows:
        # through the governance gate: columns the user may not read refused before any row is read, withheld rows
        # left out (predictions store their rows)
        step = gate.pipeline_step(loaded, "eval", name)
        try:
            rows = (tasks.read_rows(data, task, step=step) if ev.data is not None
                    else tasks.split(task, step=step, field="data")[1])
        except TaskError as exc:
            raise loaded.error(("eval", name, "data"), str(exc)) from None
    wanted = ev.slices if ev.slices is not None else list(loaded.spec.slices)
    missing = [s for s in wanted if s not in loaded.spec.slices]
    if missing:
        raise loaded.error(("eval", name, "slices"), f"no slice {missing[0]!r}; slices: {', '.join(loaded.spec.slices) or 'none'}")
    try:
        declared, declared_adapter = _declared(loaded, name, ev, check and model is None, check and adapter is None)
    except FmhubError:
        if model is None:
            raise
        declared, declared_adapter = None, None  # a Hub model not in the cache, say: --model is another model anyway
    resolved = declared if model is None else local_dir(model, os.getcwd())
    res_adapter = declared_adapter if adapter is None else local_dir(adapter, os.getcwd(), "adapter")
    out = output or loaded.resolve(ev.output or os.path.join("evals", name))
    if output is None and not (_same(resolved, declared) and _same(res_adapter, declared_adapter)):
        out = os.path.join(out, identity.BY_MODEL, identity.slug(_named(resolved, res_adapter, loaded.root)))
    return Plan(name, task, data, rows, resolved, res_adapter, {s: loaded.spec.slices[s] for s in wanted}, out, ev.min_rows)


def _declared(loaded: LoadedSpec, name: str, ev: EvalSpec, check_model: bool,
              check_adapter: bool) -> tuple[Resolved, Optional[Resolved]]:
    """The model and adapter ``eval.NAME`` declares (a ``models:`` name, a path, ``PATH@REV``)."""
    from fmhub.project.spec import model_dir_of

    given = ev.model
    if given is None:
        if len(loaded.spec.models) != 1:
            raise loaded.error(("eval", name), "name the model: (the spec declares "
                               f"{len(loaded.spec.models)} models)" if loaded.spec.models else "declare a model under models:")
        given = next(iter(loaded.spec.models))
    model = (Resolved(given, model_dir_of(loaded, given)) if given in loaded.spec.models
             else local_dir(loaded.resolve(given), loaded.root, check=check_model))
    model.given = given  # as the spec writes it, for reports
    adapter = local_dir(loaded.resolve(ev.adapter), loaded.root, "adapter", check=check_adapter) if ev.adapter else None
    if adapter is not None:
        adapter.given = ev.adapter
    return model, adapter


def _same(a: Optional[Resolved], b: Optional[Resolved]) -> bool:
    """Whether two resolved models are one name (a symlink to the declared model is another name: its own directory)."""
    if a is None or b is None:
        return a is b
    return a.rev == b.rev and (os.path.abspath(a.dir) == os.path.abspath(b.dir) if a.rev is None else a.path == b.path)


def _named(model: Resolved, adapter: Optional[Resolved], root: str) -> dict[str, Any]:
    """An identity without the weights' hashes: enough to name the model's directory."""
    def one(r: Resolved) -> dict[str, Any]:
        return {"path": r.path if r.rev is not None else identity.place(r.dir, root), "rev": r.rev}

    return {"model": one(model), "adapter": one(adapter) if adapter else None}


# ------------------------------------------------------------------ scoring


def _embed(model: Any, tokenizer: Any, texts: Sequence[str], pad: int, device: Any, batch_size: int, max_length: int) -> Any:
    """Mean of the last hidden states over each text's tokens: the model's own view of the rows, for cluster slices."""
    from fmhub.ml.scoring import embeddings

    if not texts:
        return None
    return embeddings(model, [tasks.encode(tokenizer, t, True)[:max_length] or [pad] for t in texts], pad, batch_size, device).numpy()


def predict(model_dir: str, adapter_dir: Optional[str], task: Task, rows: Sequence[TaskRow], *, batch_size: int = 16,
            max_length: int = 128, embed: bool = False) -> tuple[list[dict[str, Any]], Any]:
    """Each row's target, prediction, correctness and score (see the module docstring); and embeddings when ``embed``."""
    from fmhub.data import texts as datasets_io
    from fmhub.ml import scoring
    from fmhub.models.fisher import load_model

    model = load_model(model_dir)
    vocab = int(model.config.vocab_size)
    tokenizer = datasets_io.load_tokenizer(model_dir, vocab)
    pad = datasets_io.pad_id(tokenizer)
    examples = tasks.examples(task, rows, tokenizer, max_length)
    tasks.check_vocab(examples, vocab, rows)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    device = next(model.parameters()).device
    nll = scoring.row_nll(model, examples, pad, device, batch_size)
    out: list[dict[str, Any]] = []
    if task.metric == "accuracy":
        classes = list(task.classes or ())
        scores = scoring.class_logprobs(model, task, rows, tokenizer, pad, device, batch_size, max_length)
        for row, s, (n, _) in zip(rows, scores.argmax(-1).tolist(), nll):
            target = row.values[task.label]
            out.append({"target": target, "prediction": classes[s], "correct": classes[s] == target,
                        "score": float(classes[s] == target), "nll": n})
    elif task.metric == "exact_match":
        for row, got, (n, _) in zip(rows, scoring.completions(model, task, rows, tokenizer, pad, device, batch_size,
                                                                 max_length, vocab), nll):
            ok = got.strip() == row.values[task.completion].strip()
            out.append({"target": row.values[task.completion], "prediction": got, "correct": ok, "score": float(ok), "nll": n})
    else:
        for row, (n, count) in zip(rows, nll):
            out.append({"target": None, "prediction": None, "correct": None, "score": n / max(count, 1), "nll": n})
    vectors = None
    if embed:
        prompt_col = task.prompt if task.metric == "exact_match" else task.text
        vectors = _embed(model, tokenizer, [r.values[prompt_col] for r in rows], pad, device, batch_size, max_length)
    return out, vectors


def row_key(row: TaskRow) -> str:
    """A row's content key: its line's sha256 prefix, so versions' predictions pair up row by row."""
    return f"{row.key:016x}"


# ------------------------------------------------------------------ the eval


def _text_column(task: Task) -> str:
    return task.prompt if task.metric == "exact_match" else task.text


def slice_rows(p: Plan, rows: Sequence[dict], loaded: Optional[LoadedSpec], embeddings: Any = None,
               fixed: Optional[dict[str, list[list[bool]]]] = None) -> Sliced:
    return membership(p.slices, rows, text_column=_text_column(p.task), classes=p.task.classes or (), loaded=loaded,
                      embeddings=embeddings, fixed=fixed)


def row_keys(rows: Sequence[TaskRow]) -> list[str]:
    """Each row's content key; the n-th copy of a repeated line is ``KEY.n``, pairing with the other version's n-th copy."""
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        key = row_key(row)
        seen[key] = seen.get(key, 0) + 1
        out.append(key if seen[key] == 1 else f"{key}.{seen[key]}")
    return out


def reference_clusters(p: Plan, keys: Sequence[str], old: Sequence[dict]) -> dict[str, list[list[bool]]]:
    """Cluster slices as the reference predictions (the ``--compare`` side) hold them, applied to ``keys``.

    A cluster slice is defined once, on the reference model's embeddings, so
    both sides of a comparison count the same rows; a row the reference did
    not score is in none of its clusters. A slice the reference has no
    clusters of, or clusters of another ``clusters:`` count, is left out
    (this run fits it, and the report says so).
    """
    by_key = {r["key"]: set(r.get("slices") or ()) for r in old}
    out = {}
    for name, s in p.slices.items():
        if s.clusters is None:
            continue
        names = [f"{name}:{k}" for k in range(s.clusters)]
        theirs = {n for held in by_key.values() for n in held if n.startswith(f"{name}:")}
        if theirs and theirs <= set(names):  # a reference of another K is another definition: fitted here instead
            out[name] = [[n in by_key.get(key, ()) for key in keys] for n in names]
    return out


def check_owner(output: str, ident: dict, root: str) -> None:
    """Refuse to write over the predictions of another model (another path, revision or adapter)."""
    pred = os.path.join(output, PREDICTIONS)
    there = identity.recorded(pred) if os.path.isfile(pred) else None
    if there is not None and identity.who(there) != identity.who(ident):
        rel = os.path.relpath(output, root)
        home = os.path.join(rel, identity.BY_MODEL, identity.slug(there))  # where fmhub eval --model puts them now
        raise EvalError(f"{rel} holds the predictions of {identity.describe(there)}, not of {identity.describe(ident)}; "
                        f"move them to {home} (or remove them), or write these elsewhere (--output DIR)")


def run_eval(loaded: LoadedSpec, name: Optional[str] = None, *, model: Optional[str] = None, adapter: Optional[str] = None,
             output: Optional[str] = None, compare_to: Optional[str] = None, plots: bool = True,
             progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run an eval end to end and write its files; returns the report (``report.json``'s contents).

    :param compare_to: a revision (or a predictions file) whose predictions of
        this eval (the declared model's, ``evals/NAME``) the report's regression
        table compares against; cluster slices are taken from them.
    """
    say = progress or (lambda _: None)
    t0 = time.monotonic()
    p = plan(loaded, name, model, adapter, output)
    ident = identity.of(p.model, p.adapter, loaded.root)
    check_owner(p.output, ident, loaded.root)
    keys = row_keys(p.rows)
    old = None
    if compare_to is not None:
        # at a revision, the declared model's output directory holds the committed predictions, wherever this run writes
        old = load_predictions(compare_to, plan(loaded, p.name, read_rows=False, check=False).output, loaded.root)
    fixed = reference_clusters(p, keys, old) if old is not None else {}
    embed = any(s.clusters is not None and n not in fixed for n, s in p.slices.items())
    say(f"eval {p.name}: {len(p.rows)} rows, {identity.describe(ident)}")
    preds, vectors = predict(p.model.dir, p.adapter.dir if p.adapter else None, p.task, p.rows, embed=embed)
    sliced = slice_rows(p, [r.values for r in p.rows], loaded, vectors, fixed)
    records = [{"key": key, "where": _rel_where(row.where, loaded.root), "row": row.values, **pr,
                "slices": [s for s, m in sliced.members.items() if m[i]]}
               for i, (key, row, pr) in enumerate(zip(keys, p.rows, preds))]
    report = build_report(p, records, sliced)
    report["identity"] = ident
    report["clusters"] = {n: {"reference": compare_to if n in fixed else "this run",
                              "rows": sum(any(m[i] for m in fixed[n]) for i in range(len(keys))) if n in fixed else len(keys)}
                          for n, s in p.slices.items() if s.clusters is not None}
    if old is not None:
        report["compare"] = compare_section(old, records, p.task.metric != "loss", old_label=compare_to, new_label="this run",
                                            order=[s["name"] for s in report["slices"]])
    report["seconds"] = time.monotonic() - t0
    write(p, loaded, records, report, plots)
    return report


def _rel_where(where: str, root: str) -> str:
    path, _, line = where.rpartition(":")
    rel = os.path.relpath(os.path.abspath(path), root)
    return f"{path if rel.startswith('..') else rel.replace(os.sep, '/')}:{line}"


def build_report(p: Plan, records: Sequence[dict], sliced: Sliced) -> dict[str, Any]:
    higher = p.task.metric != "loss"
    overall, per_slice = metrics([r["score"] for r in records], sliced, higher, p.min_rows)
    return {"v": VERSION, "eval": p.name, "task": p.task.name, "metric": p.task.metric, "higher_is_better": higher,
            "model": p.model.given, "adapter": p.adapter.given if p.adapter else None, "rev": p.model.rev,
            "rows": len(records), "overall": overall, "slices": per_slice, "compare": None,
            "output": os.path.relpath(p.output)}


def load_predictions(source: str, output_dir: str, root: str) -> list[dict]:
    """Predictions from a file, or this eval's ``predictions.jsonl`` as committed at revision ``source``."""
    if os.path.isfile(source):
        path = source
    else:
        from fmhub.data.revision import materialize

        rel = os.path.relpath(os.path.join(output_dir, PREDICTIONS), root).replace(os.sep, "/")
        try:
            path = materialize(rel, source, root)
        except Exception as exc:  # git's word for a path or revision that does not exist
            raise EvalError(f"no predictions at {source}:{rel} ({str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}); "
                            "commit the eval's output, or give a predictions file") from None
    out = []
    with open(path, "rb") as f:  # a committed eval may come from a clone: bytes, each line bounded and parsed within bounds
        for n, line in enumerate(iter(lambda: f.readline(MAX_PREDICTION_LINE + 1), b""), 1):
            if line.strip():
                try:
                    if len(line) > MAX_PREDICTION_LINE:
                        raise ValueError("a line too long")
                    rec = boundedjson.loads(line, allow_nan=True)  # a NaN score is one fmhub wrote
                    _check_record(rec)
                except (ValueError, KeyError, TypeError):
                    raise EvalError(f"{source}:{n}: not a predictions record (fmhub eval writes them)") from None
                out.append(rec)
    return out


def _check_record(rec: Any) -> None:
    """Raise ValueError unless ``rec`` has what a comparison reads, in the types fmhub writes: a string ``key``, a
    numeric ``score`` and (if any) a list of slice names."""
    slices = rec.get("slices", []) if isinstance(rec, dict) else None
    if (not isinstance(rec, dict) or not isinstance(rec.get("key"), str) or isinstance(rec.get("score"), bool)
            or not isinstance(rec.get("score"), (int, float)) or not isinstance(slices, list)
            or not all(isinstance(x, str) for x in slices)):
        raise ValueError("not a predictions record")


def compare_section(old: Sequence[dict], new: Sequence[dict], higher_is_better: bool, *, old_label: str, new_label: str,
                    threshold: float = COMPARE_THRESHOLD, order: Sequence[str] = ()) -> dict[str, Any]:
    """The regression table between two versions' predictions; slices as the records assign them, ``order`` first."""
    members: dict[str, set[str]] = {name: set() for name in order}
    fresh = {r["key"] for r in new}
    # one membership per row: the new records' (this run's slices, clusters from the reference) where they have the
    # row, the old records' only for rows the new run did not score
    for rec in (*new, *(r for r in old if r["key"] not in fresh)):
        for s in rec.get("slices", []):
            members.setdefault(s, set()).add(rec["key"])
    rows = compare({r["key"]: float(r["score"]) for r in old}, {r["key"]: float(r["score"]) for r in new}, members,
                   higher_is_better, threshold)
    return {"old": {"label": old_label}, "new": {"label": new_label}, "threshold": threshold, "rows": rows}


def write(p: Plan, loaded: LoadedSpec, records: Sequence[dict], report: dict, plots: bool = True) -> None:
    """Predictions, report, plots and lineage, each file renamed into place whole."""
    os.makedirs(p.output, exist_ok=True)
    pred_path = os.path.join(p.output, PREDICTIONS)
    digest = hashlib.sha256()  # recorded with the identity: explain refuses predictions edited or copied in since
    with atomic_write(pred_path, "wb") as f:  # bytes: what is hashed is what is written
        for rec in records:
            line = (json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
            digest.update(line)
            f.write(line)
    if plots:
        from fmhub.ml import eval_report

        report["files"] = {k: os.path.relpath(v, p.output) for k, v in eval_report.write_all(report, p.output).items()}
    with atomic_write(os.path.join(p.output, REPORT), "w") as f:
        json.dump(report, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    inputs = [p.model.lineage_input(loaded.root), lineage.describe_input(p.data, "dataset", loaded.root)]
    if p.adapter:
        inputs.insert(1, p.adapter.lineage_input(loaded.root))
    lineage.record(pred_path, "eval", inputs, {"task": p.task.name, "metric": p.task.metric, "model": p.model.given,
                                               "model_rev": p.model.rev, "adapter": p.adapter.given if p.adapter else None,
                                               "rows": len(records), "overall": report["overall"]["value"],
                                               "identity": report.get("identity"), identity.PREDICTIONS_SHA: digest.hexdigest()},
                   pipeline=p.name, cwd=loaded.root)

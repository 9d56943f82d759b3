"""``fmhub patch``: fix a failing slice through data, at the base model, behind a gate.

A patch (``patch.NAME`` in ``fmhub.yaml``, docs/monitoring.md) runs:

1. **Before.** The eval's model scored on the eval's rows, per slice.
2. **Patch set.** The pool's rows in the failing slice, relabelled by a label
   pipeline's functions and label model (weak supervision; rows every
   function abstains on are left out), multiplied by augmentations (``swap``:
   each row again with one listed word replaced by another), plus ``replay``
   rows per slice row from the task's training data *outside* the slice, so
   training on the patch does not pull the other slices with it. Written to
   ``data_output`` with its lineage.
3. **Patch.** The model fine-tuned on the patch set: a FishMask sparse update
   (``sparsity`` of its entries bit-exact) or a LoRA adapter merged into it;
   either way a full model directory, trained into a temp directory.
4. **Gate.** The candidate scored on the same rows: the slice must improve by
   ``gate.min_gain`` and no other slice with at least the eval's ``min_rows``
   rows, nor all rows, may get worse by more than ``gate.max_regression``.
   Only a candidate that passes is renamed to ``output`` (with
   ``fmhub-patch.json``, the gate table, and a lineage record naming the base
   and the patch set); one that fails is deleted and `PatchRejected` names
   the slices that failed. The output is never half-written.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence

from fmhub.ml import evaluation, identity
from fmhub.governance import gate, lineage
from fmhub.base.atomic import atomic_write
from fmhub.ml.autotune import train_adapter
from fmhub.ml.tasks import Task
from fmhub.base.errors import FmhubError
from fmhub.core.rows import read_batches
from fmhub.ml.slices import ALL, membership, metrics
from fmhub.project.spec import LoadedSpec, PatchSpec, pipeline

PATCH_FILE = "fmhub-patch.json"
AUGMENTS = ("swap",)


class PatchError(FmhubError):
    """A patch that cannot be built: its eval, slice, pool or labels."""


class PatchRejected(FmhubError):
    """The patched model failed the gate; nothing was written to the output."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def _read_all(path: str) -> list[dict]:
    return [row for batch in read_batches(path) for row in batch.rows]


def _read_gated(rows: gate.Rows) -> list[dict]:
    """Every row of an input the governance gate let through, less those withheld (their count recorded)."""
    out = [row for batch in rows.batches() for row in batch.rows]
    rows.record_withheld()
    return out


def _rejoiners(loaded: LoadedSpec, pool_path: str) -> list[Any]:
    """The `fmhub.data.join.Joiner` of each ``join:`` whose output is the pool: its columns describe the text, so an
    augmented row's are recomputed from its new text (a swapped brand is another entity)."""
    from fmhub.data import join

    out = []
    for jn in loaded.spec.join.values():
        if os.path.realpath(loaded.resolve(jn.output)) == os.path.realpath(pool_path):
            table = join.read_table(loaded.resolve(jn.table), jn.key, fold_case=jn.mentions is not None)
            out.append(join.Joiner(table, jn))
    return out


def _rejoin(row: dict, joiners: Sequence[Any], where: str) -> Optional[dict]:
    """``row`` with each join's columns dropped and joined again from its text (None: a ``missing: drop`` join drops it)."""
    for j in joiners:
        row = j.join({k: v for k, v in row.items() if k not in j.added}, where)
        if row is None:
            return None
    return row


def _augment(loaded: LoadedSpec, name: str, ps: PatchSpec, rows: list[dict], column: str, joiners: Sequence[Any] = ()) -> list[dict]:
    """Each augmentation's extra rows (the originals are not repeated), their joined columns recomputed by ``joiners``."""
    out: list[dict] = []
    rng = random.Random(ps.seed)
    for i, step in enumerate(ps.augment):
        loc = ("patch", name, "augment", i)
        if step.name not in AUGMENTS:
            raise loaded.error(loc, f"unknown augmentation {step.name!r}; fmhub has: {', '.join(AUGMENTS)}")
        opts = dict(step.options)
        words, copies = opts.pop("words", None), opts.pop("copies", 1)
        if opts:
            raise loaded.error(loc, f"swap: unknown option {next(iter(opts))!r} (it takes words, copies)")
        if not isinstance(words, list) or len(words) < 2 or not all(isinstance(w, str) and w for w in words):
            raise loaded.error(loc, "swap: words: needs a list of at least two words to swap between")
        if not isinstance(copies, int) or copies < 1:
            raise loaded.error(loc, "swap: copies: must be a whole number >= 1")
        pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b")
        for row in rows:
            text = row.get(column)
            found = pattern.search(text) if isinstance(text, str) else None
            if not found:
                continue
            others = [w for w in words if w != found.group(1)]
            for w in rng.sample(others, min(copies, len(others))):
                new = _rejoin({**row, column: text[: found.start()] + w + text[found.end() :]}, joiners, f"patch {name}: augment")
                if new is not None:
                    out.append(new)
    return out


def _label(loaded: LoadedSpec, label_name: str, rows: list[dict], task: Task, tmp: str) -> tuple[list[dict], dict]:
    """Rows relabelled by the label pipeline's functions and label model; abstained rows dropped."""
    from fmhub.data.label import pipeline as labelling

    lname, pipe = pipeline(loaded, "label", label_name)
    src, dst = os.path.join(tmp, "slice.jsonl"), os.path.join(tmp, "slice.labelled.jsonl")
    with open(src, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k != task.label}, ensure_ascii=False) + "\n" for r in rows)
    pipes = {**loaded.spec.label, lname: pipe.model_copy(update={"input": src, "output": dst, "report": os.path.join(tmp, "r.json"),
                                                                 "gold": None, "suggest": 0, "backend": "serial"})}
    report = labelling.run(replace(loaded, spec=loaded.spec.model_copy(update={"label": pipes})), lname)
    out = []
    for r in _read_all(dst):
        value = r.pop(pipe.label_column, None)
        r.pop(pipe.label_column + "_probs", None)
        if value is not None:
            out.append({**r, task.label: value})
    return out, {"pipeline": lname, "rows": report["rows"], "labelled": len(out)}


def patch_set(loaded: LoadedSpec, name: str, p: evaluation.Plan, ps: PatchSpec, tmp: str) -> tuple[list[dict], dict]:
    """The rows the patch trains on, and counts of where they came from."""
    task = p.task
    column = evaluation._text_column(task)
    spec = {ps.slice: loaded.spec.slices[ps.slice]}
    pool_path = loaded.dataset_path(ps.pool) if ps.pool else task.data
    # through the governance gate: the read policy and excluded sources before any row is read; withheld rows left out
    step = gate.pipeline_step(loaded, "patch", name)
    pool_rows, train_rows = (gate.open_rows(step, source, [column], field=what) for source, what in ((pool_path, "pool"), (task.data, "eval")))
    pool = _read_gated(pool_rows)
    inside = membership(spec, pool, text_column=column, classes=task.classes or (), loaded=loaded).members[ps.slice]
    rows = [r for r, m in zip(pool, inside) if m]
    if not rows:
        raise loaded.error(("patch", name, "pool"), f"{pool_path}: no row is in slice {ps.slice!r}; the patch needs rows of the slice to learn from")
    counts: dict[str, Any] = {"pool": os.path.relpath(pool_path, loaded.root), "slice_rows": len(rows)}
    if ps.label:
        rows, counts["label"] = _label(loaded, ps.label, rows, task, tmp)
        if not rows:
            raise loaded.error(("patch", name, "label"), "the label pipeline abstained on every slice row; add labelling functions that cover them")
    elif any(task.label not in r for r in rows) and task.metric == "accuracy":
        raise loaded.error(("patch", name), f"the pool's rows have no {task.label!r} column; name a label pipeline (label:) to label them")
    counts["labelled"] = len(rows) if ps.label else None  # rows a labelling function voted on (the rest are dropped)
    counts["used"] = len(rows)  # slice rows the patch trains on: replay is sized from these
    extra = _augment(loaded, name, ps, rows, column, _rejoiners(loaded, pool_path))
    counts["augmented"] = len(extra)
    rows = [{**r, "_patch": "slice"} for r in rows] + [{**r, "_patch": "augment"} for r in extra]
    train = _read_gated(train_rows)
    outside = [r for r, m in zip(train, membership(spec, train, text_column=column, classes=task.classes or (),
                                                          loaded=loaded).members[ps.slice]) if not m]
    n = min(len(outside), int(round(ps.replay * counts["used"])))
    replay = random.Random(ps.seed).sample(outside, n) if n else []
    counts["replay"] = len(replay)
    return rows + [{**r, "_patch": "replay"} for r in replay], counts


def _gate(before: dict, after: dict, ps: PatchSpec, higher: bool, min_rows: int) -> tuple[bool, list[dict]]:
    """The gate table: per slice before, after, change (signed so that + is better), and whether it passes."""
    sign = 1 if higher else -1
    table = []
    for name in [ALL, *before["slices"]]:
        b, a = (before["overall"], after["overall"]) if name == ALL else (before["slices"][name], after["slices"][name])
        if b["value"] is None or a["value"] is None:
            continue
        gain = (a["value"] - b["value"]) * sign
        if name == ps.slice:
            ok, need = gain >= ps.gate.min_gain, f">= +{ps.gate.min_gain:g}"
        elif name != ALL and b["n"] < min_rows:
            ok, need = True, f"(n < {min_rows}: not gated)"
        else:
            ok, need = gain >= -ps.gate.max_regression - 1e-12, f">= -{ps.gate.max_regression:g}"
        table.append({"slice": name, "n": b["n"], "before": b["value"], "after": a["value"], "gain": gain, "needs": need, "pass": ok})
    return all(r["pass"] for r in table), table


def _score(p: evaluation.Plan, model_dir: str, loaded: LoadedSpec, sliced: Any = None) -> tuple[dict, Any]:
    """Overall and per-slice metrics of ``model_dir`` on the eval's rows, and the slices used.

    Pass the first model's ``sliced`` when scoring the second, so cluster
    slices (from the first model's embeddings) hold the same rows for both.
    """
    embed = sliced is None and any(s.clusters is not None for s in p.slices.values())
    preds, vectors = evaluation.predict(model_dir, None, p.task, p.rows, embed=embed)
    if sliced is None:
        sliced = evaluation.slice_rows(p, [r.values for r in p.rows], loaded, vectors)
    overall, per = metrics([r["score"] for r in preds], sliced, p.task.metric != "loss", p.min_rows)
    return {"overall": overall, "slices": {s["name"]: s for s in per}}, sliced


def _merge_lora(base_dir: str, adapter_dir: str, out: str) -> None:
    from peft import PeftModel

    from fmhub.models.fisher import load_model
    from fmhub.models.sparse_update import copy_side_files

    merged = PeftModel.from_pretrained(load_model(base_dir), adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    copy_side_files(base_dir, out)


def run_patch(loaded: LoadedSpec, name: Optional[str] = None, *, progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Build, train and gate the patch; write it only if it passes. Returns the patch report.

    :raises PatchRejected: the gate failed (``.report`` holds the table); nothing was written but the patch set.
    :raises PatchError, SpecError: the patch cannot be built (its message says why and where).
    """
    say = progress or (lambda _: None)
    t0 = time.monotonic()
    name, ps = pipeline(loaded, "patch", name)
    ps: PatchSpec
    if ps.eval not in loaded.spec.eval:
        raise loaded.error(("patch", name, "eval"), f"no eval {ps.eval!r}; evals: {', '.join(loaded.spec.eval) or 'none'}")
    if ps.slice not in loaded.spec.slices:
        raise loaded.error(("patch", name, "slice"), f"no slice {ps.slice!r}; slices: {', '.join(loaded.spec.slices) or 'none'}")
    if loaded.spec.slices[ps.slice].clusters is not None:
        raise loaded.error(("patch", name, "slice"), "patch a where:, regex: or lf: slice; a cluster has no definition the pool's rows can be tested against")
    p = evaluation.plan(loaded, ps.eval)
    if p.adapter is not None:
        raise loaded.error(("patch", name, "eval"), f"eval {ps.eval!r} scores an adapter; a patch fixes the base model: "
                           "point it at an eval of the bare model")
    if ps.slice not in p.slices:
        p.slices[ps.slice] = loaded.spec.slices[ps.slice]
    out = loaded.resolve(ps.output)
    if os.path.realpath(out) == os.path.realpath(p.model.dir):
        raise loaded.error(("patch", name, "output"), "output is the model being patched; write the patched model to a new path")
    data_out = loaded.resolve(ps.data_output) if ps.data_output else out.rstrip("/") + ".patch.jsonl"
    higher = p.task.metric != "loss"

    ident = identity.of(p.model, None, loaded.root)  # exactly the weights patched, scored before and gated against
    say(f"patch {name}: scoring {identity.describe(ident)} on {len(p.rows)} rows")
    before, sliced = _score(p, p.model.dir, loaded)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".fmhub-patch-")
    try:
        rows, counts = patch_set(loaded, name, p, ps, tmp)
        with atomic_write(data_out, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        gate.record_output(gate.pipeline_step(loaded, "patch", name), data_out,
                           [("dataset", os.path.join(loaded.root, counts["pool"])), ("dataset", p.task.data)],
                           {"slice": ps.slice, **{k: v for k, v in counts.items() if k != "pool"}}, lineage_step="patch-data")
        labelled = f"{counts['labelled']} labelled, " if counts["labelled"] is not None else ""
        say(f"patch {name}: {len(rows)} rows: {counts['slice_rows']} in slice {ps.slice}, {labelled}{counts['used']} used, "
            f"{counts['augmented']} augmented, {counts['replay']} replayed")

        task = Task(name=f"patch-{name}", data=data_out, metric=p.task.metric, classes=p.task.classes, text=p.task.text,
                    prompt=p.task.prompt, completion=p.task.completion, label=p.task.label)
        cand = os.path.join(tmp, "model")
        train = dict(steps=ps.steps, batch_size=ps.batch_size, lrs=ps.lrs, trial_steps=ps.trial_steps, seed=ps.seed, progress=say,
                     weak_labels=bool(ps.label))
        if ps.method == "fishmask":
            result = train_adapter(p.model.dir, task, cand, sparsity=ps.sparsity, **train)
        else:
            result = train_adapter(p.model.dir, task, os.path.join(tmp, "adapter"), r=ps.r, alpha=ps.alpha,
                                   target_modules=ps.target_modules, **train)
            _merge_lora(p.model.dir, os.path.join(tmp, "adapter"), cand)
        for side in (cand + lineage.SUFFIX, os.path.join(tmp, "adapter") + lineage.SUFFIX):
            if os.path.exists(side):
                os.remove(side)
        after, _ = _score(p, cand, loaded, sliced)
        passed, table = _gate(before, after, ps, higher, p.min_rows)
        report = {"v": 1, "patch": name, "slice": ps.slice, "eval": ps.eval, "metric": p.task.metric, "model": p.model.given,
                  "identity": ident, "clusters_reference": f"{p.model.given} (the model before the patch)",
                  "method": ps.method, "sparsity": ps.sparsity if ps.method == "fishmask" else None, "lr": result.lr,
                  "steps": ps.steps, "data": os.path.relpath(data_out, loaded.root), "counts": counts,
                  "gate": {"min_gain": ps.gate.min_gain, "max_regression": ps.gate.max_regression, "passed": passed, "table": table},
                  "output": os.path.relpath(out, loaded.root) if passed else None}
        if not passed:
            from fmhub.governance import audit

            audit.record("patch", name, "rejected", {"slice": ps.slice, "model": p.model.given, "gate": table}, loaded.root)
            failed = [r for r in table if not r["pass"]]
            what = "; ".join(f"{r['slice']} {r['before']:.3f} -> {r['after']:.3f} (needs {r['needs']})" for r in failed)
            raise PatchRejected(f"patch {name}: the gate failed: {what}. Nothing was written to {ps.output}; "
                                "add or fix the patch's rows (more slice rows, better labelling functions, more replay) or raise steps", report)
        with open(os.path.join(cand, PATCH_FILE), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=True)
            f.write("\n")
        from fmhub.base.atomic import fsync_tree, replace_dir

        fsync_tree(cand)
        replace_dir(cand, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lineage.record(out, "patch", [p.model.lineage_input(loaded.root), lineage.describe_input(data_out, "dataset", loaded.root)],
                   {"slice": ps.slice, "eval": ps.eval, "method": ps.method, "gate": "passed", "identity": ident,
                    "gain": next(r["gain"] for r in table if r["slice"] == ps.slice)}, pipeline=name, cwd=loaded.root)
    from fmhub.governance import audit

    audit.record("patch", name, "ok", {"slice": ps.slice, "model": p.model.given, "output": report["output"],
                                       "data": report["data"], "gate": table}, loaded.root)
    report["seconds"] = time.monotonic() - t0
    say(f"patch {name}: passed the gate; wrote {ps.output} ({report['seconds']:.1f} s)")
    return report


def format_gate(report: dict) -> list[list[str]]:
    """The gate table as rows of strings (slice, n, before, after, change, needs, verdict), for the CLI."""
    out = []
    for r in report["gate"]["table"]:
        out.append([r["slice"], str(r["n"]), f"{r['before']:.3f}", f"{r['after']:.3f}",
                    f"{r['gain']:+.3f}" if math.isfinite(r["gain"]) else "nan", r["needs"], "pass" if r["pass"] else "FAIL"])
    return out

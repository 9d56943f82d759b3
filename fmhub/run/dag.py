"""Steps with content-addressed inputs and outputs, run in dependency order, each only when out of date.

A `Step` names the files (or directories) it reads and writes. A step that
reads what another writes depends on it; a cycle is an error naming the
steps on it. Before a step runs, its *key* is computed: a hash of its id, its
parameters and the content of every input (a file's sha256, a directory's
files' hashes). A step is up to date when the state file holds the same key
for it and every output still has the content recorded when it last ran, so
editing a data file re-runs exactly the steps downstream of it, and a hand
edit of an output re-runs the step that makes it.

The state is written after every step (temp file, fsync, rename): a run that
fails keeps what it completed, and the next run resumes from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError

STATE_VERSION = 1


class DagError(FmhubError):
    """The steps cannot be run as declared: a cycle, a missing input, a failed step."""


@dataclass
class Step:
    id: str  # e.g. "clean:web", "finetune:sentiment"
    inputs: list[str]  # absolute paths
    outputs: list[str]
    params: dict[str, Any]  # JSON-able; part of the key
    run: Callable[[], dict[str, Any]]  # does the work; returns a summary for the report
    where: str = ""  # "fmhub.yaml:12", for messages
    after: list[str] = field(default_factory=list)  # step ids to run first, besides those found through files


@dataclass
class Outcome:
    step: str
    status: str  # "ran", "up to date", "failed", "skipped"
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def content_hash(path: str) -> str | None:
    """sha256 of a file, or of a directory's files (names and contents, dotfiles left out); None if missing."""
    if os.path.isfile(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()
    if os.path.isdir(path):
        h = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(f for f in files if not f.startswith(".")):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode() + b"\0" + (content_hash(full) or "").encode() + b"\n")
        return "dir-" + h.hexdigest()
    return None


def order(steps: list[Step]) -> list[Step]:
    """The steps in dependency order (declaration order among independent ones); `DagError` on a cycle."""
    by_id = {s.id: s for s in steps}
    producer = {}
    for s in steps:
        for out in map(os.path.normpath, s.outputs):  # "models/ft/x" and "models/ft/./x/" are one path
            if out in producer:
                raise DagError(f"{s.where or s.id}: {s.id} and {producer[out].id} both write {out}; give one another output")
            producer[out] = s
    deps = {s.id: [producer[p].id for p in map(os.path.normpath, s.inputs) if p in producer and producer[p] is not s]
            + list(s.after) for s in steps}
    done: list[Step] = []
    state: dict[str, str] = {}

    def visit(sid: str, path: list[str]) -> None:
        if state.get(sid) == "done":
            return
        if state.get(sid) == "visiting":
            cycle = path[path.index(sid):] + [sid]
            raise DagError(f"{by_id[sid].where or sid}: a cycle: {' -> '.join(cycle)}; one of these must not read another's output")
        state[sid] = "visiting"
        for d in deps[sid]:
            if d not in by_id:
                raise DagError(f"{by_id[sid].where or sid}: {sid} runs after {d!r}, which is not a step")
            visit(d, path + [sid])
        state[sid] = "done"
        done.append(by_id[sid])

    for s in steps:
        visit(s.id, [])
    return done


class State:
    """What each step last ran on and produced, kept in one JSON file."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            self.steps: dict[str, dict] = doc.get("steps", {}) if doc.get("version") == STATE_VERSION else {}
        except (OSError, ValueError):
            self.steps = {}

    def save(self) -> None:
        with atomic_write(self.path, "w") as f:
            json.dump({"version": STATE_VERSION, "steps": self.steps}, f, indent=1, sort_keys=True)


def step_key(step: Step) -> tuple[str, list[str]]:
    """The step's key, and the inputs that do not exist (which make it unrunnable)."""
    missing = []
    h = hashlib.sha256(json.dumps({"id": step.id, "params": step.params}, sort_keys=True, default=str).encode())
    for p in step.inputs:
        c = content_hash(p)
        if c is None:
            missing.append(p)
        h.update(f"{p}\0{c}\n".encode())
    return h.hexdigest(), missing


def run(steps: Iterable[Step], state: State, only: set[str] | None = None, dry_run: bool = False,
        on_event: Callable[[str, Step, Outcome | None], None] | None = None) -> list[Outcome]:
    """Run what is out of date, in order; stops at the first failure (raising `DagError` after saving the state).

    ``only``: run just these steps (and nothing downstream unless named).
    ``dry_run``: report what would run without running it.
    """
    outcomes: list[Outcome] = []
    stale: set[str] = set()  # steps that would run in a dry run: their outputs are not final yet
    steps = list(steps)
    makers = {os.path.normpath(o): s.id for s in steps for o in s.outputs}  # for a step named alone whose input is not made yet
    for step in order(steps):
        if only is not None and step.id not in only:
            continue
        key, missing = step_key(step)
        rec = state.steps.get(step.id)
        fresh = (rec is not None and rec.get("key") == key and not missing
                 and all(content_hash(p) == h for p, h in rec.get("outputs", {}).items())
                 and not any(p in stale for p in step.inputs))
        if fresh:
            outcomes.append(Outcome(step.id, "up to date", 0.0, rec.get("summary", {})))
            continue
        if dry_run:
            stale.update(step.outputs)
            outcomes.append(Outcome(step.id, "would run"))
            continue
        if missing:
            maker = makers.get(os.path.normpath(missing[0]))
            raise DagError(f"{step.where or step.id}: {step.id} needs {_shown(missing[0])}, which does not exist "
                           + (f"yet; step {maker} makes it: run it first (or run without naming steps)" if maker
                              else "and no step makes it; check the path"))
        if on_event:
            on_event("start", step, None)
        start = time.monotonic()
        try:
            summary = step.run() or {}
        except FmhubError as exc:
            out = Outcome(step.id, "failed", time.monotonic() - start, error=str(exc))
            outcomes.append(out)
            if on_event:
                on_event("done", step, out)
            raise DagError(f"{step.where or step.id}: step {step.id} failed: {exc}\n"
                           f"(the {sum(1 for o in outcomes if o.status != 'failed')} step(s) before it are kept; "
                           "fix it and run again to resume)") from exc
        outputs = {p: content_hash(p) for p in step.outputs}
        gone = [p for p, h in outputs.items() if h is None]
        if gone:
            raise DagError(f"{step.where or step.id}: step {step.id} finished without writing {gone[0]}")
        state.steps[step.id] = {"key": key, "outputs": outputs, "summary": summary, "finished": time.time()}
        state.save()
        out = Outcome(step.id, "ran", time.monotonic() - start, summary)
        outcomes.append(out)
        if on_event:
            on_event("done", step, out)
    return outcomes


def _shown(path: str) -> str:
    """``path`` relative to the working directory (the repository root, for `fmhub run`) when it is inside it."""
    rel = os.path.relpath(path)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel

"""``fmhub run``, ``fmhub init`` and ``fmhub demo``: building what fmhub.yaml declares (`fmhub.run`), as functions."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from fmhub.base.errors import FmhubError

# on_step(event, step, outcome): "start" before a step runs (outcome None), then "done" (see fmhub.run.dag.run)
OnStep = Callable[[str, Any, Any], None]


@dataclass
class RunResult:
    """What `run` did: the spec (`fmhub.project.spec.LoadedSpec`), one `fmhub.run.dag.Outcome` per step, the commit."""

    loaded: Any
    outcomes: list
    commit: Optional[str] = None
    scores: Optional["Scores"] = None  # when select ran: every candidate on every task (see `scores`)

    def to_json(self) -> dict[str, Any]:
        """The document ``fmhub run --json`` prints (values not JSON-able are for ``default=str``)."""
        return {"steps": [o.__dict__ for o in self.outcomes], "commit": self.commit}


def run(only: Sequence[str] = (), spec: Optional[str] = None, dry_run: bool = False, commit: bool = False,
        on_step: Optional[OnStep] = None) -> RunResult:
    """Build what ``spec`` (default: fmhub.yaml at the top of the work tree) declares, only what is out of date:
    data pipelines, adapters per task, selection, merge, deploy. ``only``: just these steps; ``dry_run``: say what is
    out of date, run nothing; ``commit``: commit what the steps wrote (and their lineage records)."""
    with warnings.catch_warnings():
        # deprecation notices of the libraries the steps call (transformers, peft, ...) are not the user's to act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=_THIRD_PARTY)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=_THIRD_PARTY)
        return _run(only, spec, dry_run, commit, on_step)


_THIRD_PARTY = r"(transformers|peft|accelerate|torch|safetensors|huggingface_hub)(\.|$)"


def _run(only: Sequence[str], spec: Optional[str], dry_run: bool, commit: bool, on_step: Optional[OnStep]) -> RunResult:
    from fmhub.project.spec import load_spec
    from fmhub.run import dag
    from fmhub.run import plan as runner

    loaded = load_spec(spec)
    p = runner.plan(loaded)
    known = {s.id for s in p.steps}
    for name in only or []:
        if name not in known:
            raise FmhubError(f"no step {name!r}; {loaded.path} declares: {', '.join(sorted(known)) or 'none'}")
    outcomes = dag.run(p.steps, dag.State(runner.state_path(loaded)), set(only) if only else None, dry_run, on_step)
    committed = runner.commit(loaded, outcomes, p.steps) if commit and not dry_run else None
    result = RunResult(loaded, outcomes, committed)
    result.scores = scores(result)  # read here: the spec's paths are relative to this working directory
    return result


@dataclass
class Scores:
    """Every candidate's score on every task's held-out rows: the leaderboard ``select`` wrote, plus the merged
    adapter's scores that ``merge`` reported. ``tasks``: (name, metric, higher is better); ``rows``: (name, what it
    is, {task: score}), the bare models first, then the adapters, then the merged adapter; ``kept``: {task: the
    share of the best adapter's gain over the best base model that the merged adapter keeps}."""

    tasks: list
    rows: list
    kept: dict = field(default_factory=dict)


def scores(result: RunResult) -> Optional[Scores]:
    """The `Scores` of a run whose ``select`` step ran (None otherwise, or when its leaderboard is gone)."""
    import json

    loaded = result.loaded
    ran = {o.step: o for o in result.outcomes if o.status == "ran"}
    sel = getattr(loaded.spec, "select", None)
    if "select" not in ran or sel is None or not os.path.isfile(loaded.resolve(sel.output)):
        return None
    with open(loaded.resolve(sel.output), encoding="utf-8") as f:
        board = json.load(f)
    tasks = [(t["name"], t["metric"], t["higher_is_better"]) for t in board.get("tasks", [])]
    rows = sorted(((r["name"], "adapter" if r.get("adapter_dir") else "base model", r.get("scores", {})) for r in board["rows"]),
                  key=lambda r: r[1] == "adapter")
    merged = ran.get("merge")
    if merged is not None and isinstance(merged.summary.get("scores"), dict):
        rows.append((merged.summary.get("output", "merged"), "merged adapter", merged.summary["scores"]))
    return Scores(tasks, rows, _kept(tasks, rows))


def _kept(tasks: list, rows: list) -> dict:
    """{task: (merged − base) / (best adapter − base)} where the merged adapter was scored and an adapter beat the base."""
    kept = {}
    for name, _metric, up in tasks:
        def best(what: str) -> Optional[float]:
            vals = [s[name] for _n, w, s in rows if w == what and isinstance(s.get(name), (int, float))]
            return (max(vals) if up else min(vals)) if vals else None

        base, adapter, merged = best("base model"), best("adapter"), best("merged adapter")
        if None not in (base, adapter, merged) and (adapter - base) * (1 if up else -1) > 0:
            kept[name] = (merged - base) / (adapter - base)
    return kept


@dataclass
class Initialized:
    """What `init` made: the repository, and the run of the example project when there was one."""

    path: str
    example: bool
    run: Optional[RunResult] = None


def init(directory: str = "fmhub-example", example: bool = False, run_it: bool = True,
         on_step: Optional[OnStep] = None, on_created: Optional[Callable[[str], None]] = None) -> Initialized:
    """Start a repository in ``directory`` with fmhub installed and the usual patterns tracked; ``example``: write the
    built-in example project (a tiny model, data, an fmhub.yaml) and, with ``run_it``, run and commit it there.
    ``on_created(path)`` is called once the example is written, before its run."""
    from fmhub.run import example as ex

    if not example:
        return Initialized(ex.create_empty(directory), False)
    path = ex.create(directory)
    if on_created is not None:
        on_created(path)
    if not run_it:
        return Initialized(path, True)
    here = os.getcwd()
    os.chdir(path)  # the steps, their audit and lineage records work in the example's repository
    try:
        return Initialized(path, True, run(commit=True, on_step=on_step))
    finally:
        os.chdir(here)


def demo(directory: Optional[str] = None, console: Any = None) -> str:
    """Build a tiny transformers model, version it with git and fmhub in ``directory`` (default: a temporary one),
    and show what fmhub stores on ``console`` (a `rich.console.Console`; default: stdout); the repository."""
    from fmhub.run import demo as d

    if console is None:
        from rich.console import Console

        console = Console()
    return d.run(directory, console)

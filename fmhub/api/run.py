"""``fmhub run``, ``fmhub init`` and ``fmhub demo``: building what fmhub.yaml declares (`fmhub.run`), as functions."""

from __future__ import annotations

import os
from dataclasses import dataclass
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

    def to_json(self) -> dict[str, Any]:
        """The document ``fmhub run --json`` prints (values not JSON-able are for ``default=str``)."""
        return {"steps": [o.__dict__ for o in self.outcomes], "commit": self.commit}


def run(only: Sequence[str] = (), spec: Optional[str] = None, dry_run: bool = False, commit: bool = False,
        on_step: Optional[OnStep] = None) -> RunResult:
    """Build what ``spec`` (default: fmhub.yaml at the top of the work tree) declares, only what is out of date:
    data pipelines, adapters per task, selection, merge, deploy. ``only``: just these steps; ``dry_run``: say what is
    out of date, run nothing; ``commit``: commit what the steps wrote (and their lineage records)."""
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
    return RunResult(loaded, outcomes, committed)


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

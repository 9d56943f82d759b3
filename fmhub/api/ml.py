"""The ML workflow commands: ``finetune``, ``select``, ``eval``, ``explain`` and ``patch`` (`fmhub.ml`), as functions.

`finetune` records the lineage of what it trains (the base model and the data), and ``patch(commit=True)``
commits through `fmhub.run.plan.commit_paths`, the commit of ``fmhub run --commit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from fmhub.base.errors import FmhubError


def finetune(base: str, data: str, output: str, fisher: Optional[str] = None, keep: Optional[str | float] = None,
             steps: int = 100, lr: float = 1e-3, batch_size: int = 8, seed: int = 0):
    """Fine-tune the causal LM ``base`` on ``data`` into ``output`` (reproducibly); with ``fisher`` and ``keep`` only
    the top ``keep`` entries by Fisher value train, bit-exact elsewhere. Records the lineage of ``output``;
    returns `fmhub.models.sparse_update.FinetuneReport`."""
    from fmhub.api.models import fraction
    from fmhub.governance import lineage
    from fmhub.models.sparse_update import finetune_masked

    if (fisher is None) != (keep is None):
        raise FmhubError("--fisher and --keep go together")
    rep = finetune_masked(base, data, output, fisher_path=fisher, k_fraction=fraction(keep) if keep else None,
                          steps=steps, lr=lr, seed=seed, batch_size=batch_size)
    lineage.record(output, "finetune", [lineage.describe_input(base, "model"), lineage.describe_input(data, "dataset")],
                   {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "keep": keep})
    return rep


@dataclass
class Selection:
    """What `select` made: the leaderboard (`fmhub.ml.selection`), and the router when one was asked for."""

    board: Any
    router: Any = None
    router_path: Optional[str] = None


def select(base: Optional[str] = None, adapters: Sequence[str] = (), tasks: Sequence[str] = (), no_base: bool = False,
           cache: Optional[str] = None, no_cache: bool = False, router: Optional[str] = None, spec: Optional[str] = None,
           on_result: Optional[Callable[[Any, str, Any], None]] = None) -> Selection:
    """Rank the base model (default: every model of fmhub.yaml's models:) and its ``adapters`` on ``tasks`` (default:
    all declared), best first; with ``router``, also train the composition-of-experts router and save it there.
    ``on_result(candidate, task, score)`` follows the scoring."""
    from fmhub.ml.tasks import task_of
    from fmhub.ml.selection import Candidate, default_cache, leaderboard, parse_candidates, router_from_leaderboard
    from fmhub.project.spec import load_spec, model_dir_of
    from fmhub.run.plan import task_texts

    loaded = load_spec(spec)
    names = list(tasks or loaded.spec.tasks)
    unknown = [t for t in names if t not in loaded.spec.tasks]
    if unknown or not names:
        raise FmhubError(f"no task {unknown[0]!r} in {loaded.path}" if unknown else f"{loaded.path} declares no tasks: add a tasks: section")
    if base is not None:
        cands = parse_candidates(base, list(adapters), include_base=not no_base)
    else:
        if not loaded.spec.models:
            raise FmhubError("no --base and no models: section in fmhub.yaml; give --base DIR")
        first = model_dir_of(loaded, next(iter(loaded.spec.models)))
        cands = [] if no_base else [Candidate(m, model_dir_of(loaded, m)) for m in loaded.spec.models]
        cands += parse_candidates(first, list(adapters), include_base=False)
    path = None if no_cache else (cache or default_cache())
    board = leaderboard(cands, [task_of(loaded, t) for t in names], cache=path, on_result=on_result)
    chosen = None
    if router:
        chosen = router_from_leaderboard(board, {t: task_texts(loaded, t) for t in names},
                                         {t: loaded.spec.tasks[t].description for t in names if loaded.spec.tasks[t].description},
                                         served_names={c.name: "base" for c in cands if c.adapter_dir is None})
        chosen.save(router)
    return Selection(board, chosen, router)


EVAL_FAIL_ON = ("flagged", "worse")


@dataclass
class Evaluated:
    """What `evaluate` found: the eval's report (``report.json``'s contents), and whether it fails ``fail_on``: the
    rule and one line per slice that broke it (``failures``)."""

    report: dict[str, Any]
    failed: bool = False
    failures: list[str] = field(default_factory=list)
    rule: Optional[str] = None


def evaluate(name: Optional[str] = None, model: Optional[str] = None, adapter: Optional[str] = None,
             compare_to: Optional[str] = None, output: Optional[str] = None, plots: bool = True, fail_on: Optional[str] = None,
             spec: Optional[str] = None, progress: Optional[Callable[[str], None]] = None) -> Evaluated:
    """Score a model (and adapter) row by row as ``eval: NAME`` declares, store the predictions and report the metric
    per slice, and what changed since ``compare_to`` (`fmhub.ml.evaluation.run_eval`). ``fail_on``: 'flagged' (a slice
    is flagged) or 'worse' (a slice got worse than ``compare_to``) sets ``failed``."""
    from fmhub.ml import evaluation
    from fmhub.project.spec import load_spec

    check_fail_on(fail_on)
    if fail_on == "worse" and compare_to is None:  # a CI gate that could never fail
        raise FmhubError("--fail-on worse needs --compare REV (or a predictions file): without one no slice can get worse")
    rep = evaluation.run_eval(load_spec(spec), name, model=model, adapter=adapter, output=output, compare_to=compare_to,
                              plots=plots, progress=progress)
    failures = eval_failures(rep, fail_on)
    return Evaluated(rep, bool(failures), failures, fail_on)


def check_fail_on(fail_on: Optional[str]) -> None:
    """Refuse a ``--fail-on`` other than 'flagged' or 'worse'."""
    if fail_on not in (None, *EVAL_FAIL_ON):
        raise FmhubError("--fail-on is 'flagged' or 'worse'")


def eval_failed(report: dict[str, Any], fail_on: Optional[str]) -> bool:
    """Whether an eval ``report`` fails the gate ``fail_on``: a slice 'flagged', or (compared) a slice got 'worse'."""
    return bool(eval_failures(report, fail_on))


def eval_failures(report: dict[str, Any], fail_on: Optional[str]) -> list[str]:
    """One line per slice that fails the gate ``fail_on``, saying what the rule saw (empty: it passes)."""
    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    if fail_on == "flagged":
        return [f"{s['name']}: {num(s['value'])} against {num(s.get('rest'))} on the other rows (n={s['n']}): flagged"
                for s in report["slices"] if s["flagged"]]
    if fail_on == "worse" and report.get("compare"):
        return [f"{r['slice']}: {num(r['old'])} -> {num(r['new'])} (n={r['n_new']}): worse than {report['compare']['old']['label']}"
                for r in report["compare"]["rows"] if r["verdict"] == "worse"]
    return []


def explain(name: Optional[str] = None, slice_name: Optional[str] = None, rows: Optional[Sequence[int]] = None, limit: int = 5,
            k: int = 10, method: str = "gradient", train: Optional[Sequence[str]] = None, spec: Optional[str] = None,
            model: Optional[str] = None, adapter: Optional[str] = None) -> dict[str, Any]:
    """For an eval's failing rows, the training rows most responsible for what the model predicted
    (`fmhub.ml.explain.explain_eval`); ``model``/``adapter``: explain the predictions ``fmhub eval --model`` wrote for
    them (refused unless those predictions were made by exactly these weights)."""
    from fmhub.ml import explain as provenance
    from fmhub.project.spec import load_spec

    return provenance.explain_eval(load_spec(spec), name, slice_name=slice_name, rows=list(rows) if rows else None, limit=limit,
                                   k=k, method=method, train=list(train) if train else None, model=model, adapter=adapter)


@dataclass
class Patched:
    """What `patch` did: its report (`fmhub.ml.patch.run_patch`) and the commit made, if any."""

    report: dict[str, Any]
    commit: Optional[str] = None


def patch(name: Optional[str] = None, commit: bool = False, spec: Optional[str] = None,
          progress: Optional[Callable[[str], None]] = None) -> Patched:
    """Fix a failing slice through data: label a patch set, fine-tune the base on it, keep it only if the gate passes;
    ``commit``: commit the patched model, its patch set and their lineage records as a new version.

    :raises fmhub.ml.patch.PatchRejected: the gate failed (``.report`` holds the table); nothing is committed.
    """
    from fmhub.ml import patch as pt
    from fmhub.project.spec import load_spec
    from fmhub.run.plan import commit_paths

    loaded = load_spec(spec)
    rep = pt.run_patch(loaded, name, progress=progress)
    made = None
    if commit:
        made = commit_paths(loaded.root, [rep["output"], rep["data"]],
                            f"fmhub patch {rep['patch']}: slice {rep['slice']} fixed through data", only=True)
    return Patched(rep, made)

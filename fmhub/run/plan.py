"""``fmhub run``: turn ``fmhub.yaml`` into steps and run what is out of date (`fmhub.run.dag`).

The steps, and what each reads and writes:

* ``clean:NAME`` / ``label:NAME``: a declared pipeline (its input, gold file
  and Python labelling-function files) -> its output.
* ``finetune:TASK[@MODEL]``: a candidate model and the task's data -> a PEFT
  adapter (`fmhub.ml.autotune`: a small learning-rate search, then training,
  then the task metric).
* ``select``: every adapter, model and task's data -> a leaderboard and the
  router that sends each request to the best adapter (`fmhub.ml.selection`,
  `fmhub.serving.router`).
* ``merge``: the task adapters -> one merged adapter (`fmhub.models.merge`).
* ``deploy``: the adapters (and router) -> a running server hot-swapped to
  them (``deploy.url``), or a check through a local server.

A task's data may be a pipeline's output, which is how editing a raw data
file re-runs its cleaning, labelling, the adapters trained on it, the
selection and the merge, and nothing else. Every step writes lineage records
(clean, label, finetune, merge do already), and ``--commit`` commits the
outputs as a new version.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from fmhub.ml.tasks import task_of
from fmhub.project.spec import model_dir_of
from fmhub.run import dag
from fmhub.base.errors import FmhubError
from fmhub.project.spec import LoadedSpec, at_line, format_loc


@dataclass
class Plan:
    loaded: LoadedSpec
    steps: list[dag.Step]
    adapters: dict[str, str]  # adapter name -> directory, as the finetune (and merge) steps write them
    base: str | None  # the model the adapters are served on


def _where(loaded: LoadedSpec, loc: tuple) -> str:
    return f"{at_line(loaded.path, loaded.line(loc))}: {format_loc(loc)}"


def _python_files(steps: list) -> list[str]:
    """Files named by ``python: {function: "file.py:name"}`` labelling functions: their code is an input too."""
    out = []
    for st in steps:
        fn = st.options.get("function") if isinstance(st.options, dict) else None
        if isinstance(fn, str) and ":" in fn:
            out.append(fn.rsplit(":", 1)[0])
    return out


def plan(loaded: LoadedSpec, progress: Callable[[str], None] | None = None) -> Plan:
    """The steps ``loaded`` declares, with their inputs and outputs resolved; errors name the spec line."""
    spec, res = loaded.spec, loaded.resolve
    steps: list[dag.Step] = []
    for name, jn in spec.join.items():
        steps.append(dag.Step(f"join:{name}", [loaded.dataset_path(jn.input), res(jn.table)], [res(jn.output)], {"join": _dump(jn)},
                              _join(loaded, name), _where(loaded, ("join", name))))
    for name, pipe in spec.clean.items():
        inputs = [loaded.dataset_path(pipe.input)] + ([res(pipe.overrides)] if getattr(pipe, "overrides", None) else [])
        steps.append(dag.Step(f"clean:{name}", inputs, [res(pipe.output)], {"pipeline": _dump(pipe)},
                              _clean(loaded, name), _where(loaded, ("clean", name))))
    for name, pipe in spec.label.items():
        inputs = [loaded.dataset_path(pipe.input)] + ([res(pipe.gold)] if pipe.gold else []) + [res(p) for p in _python_files(pipe.lfs)]
        steps.append(dag.Step(f"label:{name}", inputs, [res(pipe.output)], {"pipeline": _dump(pipe)},
                              _label(loaded, name), _where(loaded, ("label", name))))
    adapters: dict[str, str] = {}
    tuned: dict[str, str] = {}  # finetune.method fishmask: full models, one per task
    base = None
    ft = spec.finetune
    if spec.tasks and ft is None and not spec.eval:
        raise loaded.error(("tasks",), "tasks are declared but there is no finetune: section saying how to train their adapters")
    if ft is not None:
        if not spec.tasks:
            raise loaded.error(("finetune",), "finetune: needs tasks: to train adapters for")
        if not spec.models:
            raise loaded.error(("finetune",), "finetune: needs models: (candidate base models) to train on")
        names = ft.models or list(spec.models)
        for i, m in enumerate(names):
            if m not in spec.models:
                raise loaded.error(("finetune", "models", i), f"unknown model {m!r}; models: declares {', '.join(spec.models)}")
        base = model_dir_of(loaded, names[0])
        for task_name, task in spec.tasks.items():
            for m in names:
                model_dir = model_dir_of(loaded, m)
                adapter = task_name if len(names) == 1 else f"{task_name}-{m}"
                out = res(os.path.join(ft.output, adapter))
                (adapters if ft.method == "lora" else tuned)[adapter] = out
                data = loaded.dataset_path(task.data)
                inputs = [model_dir, data] + ([loaded.dataset_path(task.eval)] if task.eval else [])
                steps.append(dag.Step(f"finetune:{adapter}", inputs, [out], {"task": _dump(task), "finetune": _dump(ft)},
                                      _finetune(loaded, task_name, model_dir, out), _where(loaded, ("tasks", task_name))))
    if spec.select is not None and (adapters or tuned):
        sel = spec.select
        outputs = [res(sel.output)] + ([res(sel.router)] if sel.router and adapters else [])
        inputs = sorted({*adapters.values(), *tuned.values()}) + sorted({loaded.dataset_path(t.data) for t in spec.tasks.values()})
        steps.append(dag.Step("select", inputs, outputs, {"select": _dump(sel), "tasks": {k: _dump(v) for k, v in spec.tasks.items()}},
                              _select(loaded, adapters, tuned), _where(loaded, ("select",))))
    for section in ("merge", "deploy"):
        if getattr(spec, section) is not None and tuned:
            raise loaded.error((section,), f"{section}: works on LoRA adapters, and finetune.method fishmask makes full models; "
                                           "merge them with `fmhub merge`, serve one with `fmhub serve --base`")
    if spec.merge is not None:
        mg = spec.merge
        chosen = mg.tasks or list(spec.tasks)
        for i, t in enumerate(chosen):
            if t not in adapters:
                raise loaded.error(("merge", "tasks", i), f"no adapter is trained for task {t!r}; tasks: {', '.join(spec.tasks)}")
        if len(chosen) < 2:
            raise loaded.error(("merge",), "merge: needs at least two task adapters")
        out = res(mg.output)
        steps.append(dag.Step("merge", [adapters[t] for t in chosen] + ([base] if mg.into == "base" else []), [out],
                              {"merge": _dump(mg)}, _merge(mg, [adapters[t] for t in chosen], base, out, loaded, chosen),
                              _where(loaded, ("merge",))))
        adapters["merged"] = out
    if spec.deploy is not None:
        if base is None:
            raise loaded.error(("deploy",), "deploy: needs adapters to serve (tasks:, finetune:)")
        after = [s.id for s in steps if s.id in ("select", "merge")]
        steps.append(dag.Step("deploy", [base, *adapters.values()], [], {"deploy": _dump(spec.deploy)},
                              _deploy(loaded, base, adapters), _where(loaded, ("deploy",)), after=after))
    steps += _monitoring_steps(loaded)
    return Plan(loaded, steps, adapters, base)


def _monitoring_steps(loaded: LoadedSpec) -> list[dag.Step]:
    """eval:NAME and patch:NAME steps: their inputs are the model, adapter and rows they read (docs/monitoring.md)."""
    from fmhub.ml import evaluation

    spec, res = loaded.spec, loaded.resolve
    steps = []
    # a patch reads its eval's plan; check=False: a model another step writes (a fine-tune's) is checked when read
    plans = {name: evaluation.plan(loaded, name, read_rows=False, check=False) for name in spec.eval}
    for name, ev in spec.eval.items():
        p = plans[name]
        inputs = [p.model.dir, p.data] + ([p.adapter.dir] if p.adapter else [])
        params = {"eval": _dump(ev), "task": _dump(spec.tasks[ev.task]), "slices": {k: _dump(v) for k, v in p.slices.items()}}
        steps.append(dag.Step(f"eval:{name}", inputs, [os.path.join(p.output, evaluation.PREDICTIONS)], params,
                              _eval(loaded, name), _where(loaded, ("eval", name))))
    for name, ps in spec.patch.items():
        if ps.eval not in spec.eval:
            raise loaded.error(("patch", name, "eval"), f"no eval {ps.eval!r}; evals: {', '.join(spec.eval) or 'none'}")
        p = plans[ps.eval]
        pool = loaded.dataset_path(ps.pool) if ps.pool else p.task.data
        out = res(ps.output)
        data_out = res(ps.data_output) if ps.data_output else out.rstrip("/") + ".patch.jsonl"
        inputs = sorted({p.model.dir, p.data, pool, p.task.data})
        params = {"patch": _dump(ps), "slice": _dump(spec.slices[ps.slice]) if ps.slice in spec.slices else None,
                  "label": _dump(spec.label[ps.label]) if ps.label in spec.label else None}
        steps.append(dag.Step(f"patch:{name}", inputs, [out, data_out], params, _patch(loaded, name), _where(loaded, ("patch", name))))
    return steps


def _join(loaded: LoadedSpec, name: str) -> Callable[[], dict]:
    def go() -> dict:
        from fmhub.data import join

        rep = join.run_join(loaded, name)
        return {k: rep.get(k) for k in ("rows_in", "rows_out", "rows_matched")}

    return go


def _eval(loaded: LoadedSpec, name: str) -> Callable[[], dict]:
    def go() -> dict:
        from fmhub.ml import evaluation

        rep = evaluation.run_eval(loaded, name)
        return {"rows": rep["rows"], rep["metric"]: round(rep["overall"]["value"], 4),
                "flagged": ",".join(s["name"] for s in rep["slices"] if s["flagged"]) or None}

    return go


def _patch(loaded: LoadedSpec, name: str) -> Callable[[], dict]:
    def go() -> dict:
        from fmhub.ml import patch

        rep = patch.run_patch(loaded, name)
        row = next(r for r in rep["gate"]["table"] if r["slice"] == rep["slice"])
        return {"slice": rep["slice"], "before": round(row["before"], 4), "after": round(row["after"], 4), "output": rep["output"]}

    return go


def _dump(model: Any) -> Any:
    return json.loads(json.dumps(model.model_dump(), default=lambda o: getattr(o, "to_dict", lambda: str(o))()))


# -- step bodies: each returns a small summary for the report -----------------------------------

def _clean(loaded: LoadedSpec, name: str) -> Callable[[], dict]:
    def go() -> dict:
        from fmhub.data.clean import pipeline as clean

        res = clean.run(loaded, name)
        return {"rows_in": res.rows_read, "rows_out": res.rows_out, "output": os.path.relpath(res.output, loaded.root)}

    return go


def _label(loaded: LoadedSpec, name: str) -> Callable[[], dict]:
    def go() -> dict:
        from fmhub.data.label import pipeline as labelling

        rep = labelling.run(loaded, name)
        return {"rows": rep["rows"], "labelled": rep["rows"] - rep["labels"]["unlabelled"],
                "output": os.path.relpath(rep["output"], loaded.root)}

    return go


def _finetune(loaded: LoadedSpec, task_name: str, model_dir: str, out: str) -> Callable[[], dict]:
    def go() -> dict:
        from fmhub.ml.autotune import train_adapter

        ft = loaded.spec.finetune
        r = train_adapter(model_dir, task_of(loaded, task_name), out, r=ft.r, alpha=ft.alpha, target_modules=ft.target_modules,
                          steps=ft.steps, batch_size=ft.batch_size, lrs=ft.lrs, trial_steps=ft.trial_steps, seed=ft.seed,
                          sparsity=ft.sparsity if ft.method == "fishmask" else None)
        return {"metric": r.metric, "score": r.score, "lr": r.lr, "eval_loss": r.eval_loss, "trials": len(r.trials)}

    return go


def _select(loaded: LoadedSpec, adapters: dict[str, str], tuned: dict[str, str]) -> Callable[[], dict]:
    def go() -> dict:
        from fmhub.base.atomic import atomic_write
        from fmhub.ml.selection import Candidate, default_cache, leaderboard, router_from_leaderboard

        spec = loaded.spec
        cands = [Candidate(m, model_dir_of(loaded, m), None) for m in spec.models]
        cands += [Candidate(a, _model_of(loaded, a), d) for a, d in adapters.items() if a != "merged"]
        cands += [Candidate(t, d, None) for t, d in tuned.items()]
        board = leaderboard(cands, [task_of(loaded, t) for t in spec.tasks], cache=default_cache(loaded.root))
        out = loaded.resolve(spec.select.output)
        with atomic_write(out, "w") as f:
            json.dump(board.to_json(), f, indent=2, sort_keys=True)
        from fmhub.governance import lineage

        inputs = [lineage.describe_input(c.adapter_dir or c.model_dir, "model", loaded.root) for c in cands]
        inputs += [lineage.describe_input(loaded.dataset_path(t.data), "dataset", loaded.root) for t in spec.tasks.values()]
        lineage.record(out, "select", inputs, {"tasks": sorted(spec.tasks)}, cwd=loaded.root)
        best = {t: board.best_for(t).name for t in spec.tasks}
        if spec.select.router and adapters:  # the router picks among served adapters
            # a bare model that wins a task is served as the server's base model
            router = router_from_leaderboard(board, {t: task_texts(loaded, t) for t in spec.tasks},
                                             {t: spec.tasks[t].description for t in spec.tasks if spec.tasks[t].description},
                                             served_names={c.name: "base" for c in cands if c.adapter_dir is None})
            router.save(loaded.resolve(spec.select.router))
        return {"best": best}

    return go


def _model_of(loaded: LoadedSpec, adapter: str) -> str:
    names = loaded.spec.finetune.models or list(loaded.spec.models)
    for m in names:
        if adapter.endswith(f"-{m}"):
            return model_dir_of(loaded, m)
    return model_dir_of(loaded, names[0])


def task_texts(loaded: LoadedSpec, task_name: str, limit: int = 500) -> list[str]:
    """Up to ``limit`` of a task's input texts, in file order (what the router learns the task from), through the governance gate."""
    from fmhub.ml.tasks import task_texts as texts

    return texts(task_of(loaded, task_name), limit)


def _merge(mg, adapter_dirs: list[str], base: str | None, out: str, loaded: LoadedSpec | None = None,
           task_names: list[str] = ()) -> Callable[[], dict]:
    def go() -> dict:
        from fmhub.models.merge import Recipe, run_recipe

        recipe = Recipe.from_dict({"models": adapter_dirs, "strategy": mg.strategy, "options": dict(mg.options), "into": mg.into,
                                   "base": base if mg.into == "base" else None, "output": out}, "fmhub.yaml: merge")
        report = run_recipe(recipe, out)
        summary: dict[str, Any] = {"output": os.path.basename(out), "tensors": len(report.actions)}
        if loaded is not None and base is not None and mg.into == "adapter" and task_names:
            # how much of each task adapter's gain the merged adapter keeps: its score on every merged task's held-out rows
            from fmhub.ml.scoring import evaluate

            summary["scores"] = {t: round(evaluate(base, out, task_of(loaded, t)), 4) for t in task_names}
        return summary

    return go


def _deploy(loaded: LoadedSpec, base: str, adapters: dict[str, str]) -> Callable[[], dict]:
    def go() -> dict:
        from fmhub.serving.sources import AdapterSpec, Source

        d = loaded.spec.deploy
        specs = [AdapterSpec(n, Source(p, given=p)) for n, p in adapters.items()]
        if d.url:
            from fmhub.serving.backends import backend

            report = backend(loaded.spec.serve.backend if loaded.spec.serve else "local").deploy(
                d.url, specs, d.token or os.environ.get("FMHUB_ADMIN_TOKEN"))
            return {"url": d.url, **report.to_json()}
        return check_local(base, specs, loaded, d.prompt, d.max_tokens)

    return go


def check_local(base: str, specs: list, loaded: LoadedSpec, prompt: str, max_tokens: int) -> dict:
    """Serve the adapters from a local server on a free port and ask each one thing through HTTP.

    The server is the ``local`` serving backend's, found in the plugin registry as ``fmhub serve`` finds it.
    """
    import urllib.request

    from fmhub.serving.backends import backend
    from fmhub.serving.config import ServeConfig
    from fmhub.serving.sources import Source

    router = loaded.resolve(loaded.spec.select.router) if loaded.spec.select and loaded.spec.select.router else None
    config = ServeConfig(Source(base, given=base), specs, port=0, gpu_slots=max(1, len(specs)), cache_dir=None,
                         backend_options={"router": router} if router and os.path.exists(router) else {})
    server = backend("local").serve(config)
    answers = {}
    try:
        for name in [s.name for s in specs] + (["auto"] if config.backend_options else []):
            body = json.dumps({"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
            req = urllib.request.Request(server.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as resp:
                doc = json.loads(resp.read())
            answers[name] = doc.get("fmhub", {}).get("routed_to", name)
    except OSError as exc:
        raise FmhubError(f"the local serving check failed: {exc}") from None
    finally:
        server.stop()
    # the server was stopped: its URL is not part of the result
    return {"served": sorted(answers), "routed": answers.get("auto")}


def state_path(loaded: LoadedSpec) -> str:
    from fmhub.base import gitrun

    proc = gitrun.run(["rev-parse", "--git-common-dir"], cwd=loaded.root, check=False)
    if proc.returncode == 0:
        return os.path.join(os.path.abspath(os.path.join(loaded.root, proc.stdout.strip())), "fmhub", "run-state.json")
    return os.path.join(loaded.root, ".fmhub-run-state.json")


def commit(loaded: LoadedSpec, outcomes: list[dag.Outcome], steps: list[dag.Step], message: str | None = None) -> str | None:
    """``git add`` the outputs (and their lineage records) of the steps that ran, and commit them; the commit id, or None."""
    ran = {o.step for o in outcomes if o.status == "ran"}
    paths = [p for s in steps if s.id in ran for p in s.outputs]
    return commit_paths(loaded.root, paths, message or f"fmhub run: {', '.join(sorted(ran))}")


def commit_paths(root: str, paths: list[str], message: str, only: bool = False) -> str | None:
    """``git add`` ``paths`` and the lineage records next to them, and commit the index in the repository at ``root``
    as a new version (``only``: commit just these paths, leaving anything else staged): the commit id, or None when
    nothing is staged. ``fmhub run --commit`` and ``fmhub patch --commit`` both commit through here."""
    from fmhub.core.repo import git

    staged = []
    for p in paths:
        staged.append(p)
        if os.path.exists(p + ".lineage.json"):
            staged.append(p + ".lineage.json")
    if not staged:
        return None
    rel = [os.path.relpath(p, root) for p in staged]
    git("add", "--", *rel, cwd=root)
    limit = ["--", *rel] if only else []
    if not git("diff", "--cached", "--name-only", *limit, cwd=root).strip():
        return None
    git("commit", "-q", "-m", message, *limit, cwd=root)
    return git("rev-parse", "HEAD", cwd=root).strip()

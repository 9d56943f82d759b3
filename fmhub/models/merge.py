"""Tensor-by-tensor model merging: the engine behind ``git merge`` and ``fmhub merge``.

A `MergePlan` says which strategy (a plugin, see `fmhub.plugin.hookspecs`) combines
which tensors, with which options; rules match tensor names with shell-style
patterns, first match wins. `merge_tensor` merges one tensor from lazily
loaded versions, so peak memory is the base, the sides and the result of one
tensor. `merge_models` merges whole models into a new file, writing it only
when every tensor merged: problems are collected per tensor and reported
together, and nothing is written.

Recipe / plan file (YAML; ``fmhub merge RECIPE`` and ``.fmhub/merge.yaml``)::

    base: base.safetensors          # a file, a shard directory, or REV:PATH
    models:
      - model: task-a/              # same forms
        weight: 1.0
        fisher: fisher-a.safetensors   # optional, for strategy fisher
      - model: main:model.safetensors
        weight: 0.5
    strategy: ties                  # default for every tensor
    options: {density: 0.5, scale: 1.0, seed: 0}
    tensors:                        # per tensor-name rules, first match wins
      - pattern: "*norm*"
        strategy: linear
      - pattern: "lm_head.*"
        strategy: ours              # keep the first model's tensor
        options: {}
    output: merged.safetensors
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from fmhub.governance import audit
from fmhub.plugin import host
from fmhub.core import tensors
from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError, MergeConflict
from fmhub.models.views import CheckpointView, TensorRef

# option name -> parser; options not listed pass through to the strategy unchanged
_OPTION_TYPES: dict[str, Callable[[Any], Any]] = {
    "scale": float,
    "density": float,
    "seed": int,
    "t": float,
}


def parse_options(raw: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        try:
            if key == "weights":
                out[key] = [float(w) for w in value]
            elif key in _OPTION_TYPES:
                out[key] = _OPTION_TYPES[key](value)
            else:
                out[key] = value
        except (TypeError, ValueError):
            raise FmhubError(f"{where}: option {key!r} has a bad value {value!r}") from None
    return out


@dataclass
class Rule:
    pattern: str
    strategy: str | None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergePlan:
    """Which strategy merges which tensor. ``strategy=None``: a tensor needing one is a conflict."""

    strategy: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)

    def for_tensor(self, name: str) -> tuple[str | None, dict[str, Any]]:
        for rule in self.rules:
            if fnmatch.fnmatchcase(name, rule.pattern):
                return rule.strategy, {**self.options, **rule.options}
        return self.strategy, dict(self.options)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "MergePlan":
        unknown = set(data) - {"strategy", "options", "tensors", "base", "models", "output", "fisher", "into"}
        if unknown:
            raise FmhubError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        rules = []
        for i, r in enumerate(data.get("tensors") or []):
            if not isinstance(r, Mapping) or "pattern" not in r:
                raise FmhubError(f"{where}: tensors[{i}] needs a `pattern`")
            rules.append(Rule(str(r["pattern"]), r.get("strategy"), parse_options(r.get("options"), f"{where}: tensors[{i}]")))
        strategy = data.get("strategy")
        return cls(str(strategy) if strategy else None, parse_options(data.get("options"), where), rules)

    def strategy_names(self) -> set[str]:
        return {s for s in [self.strategy, *(r.strategy for r in self.rules)] if s}


def load_plan_file(path: str) -> dict[str, Any]:
    """A merge recipe (YAML), read within a spec's bounds: it may be committed in someone else's repository."""
    from fmhub.base.boundedyaml import load_file
    from fmhub.project.spec import SPEC_LIMITS

    try:
        data = load_file(path, SPEC_LIMITS, FmhubError) or {}
    except FileNotFoundError:
        raise FmhubError(f"{path}: no such recipe file") from None
    except OSError as exc:
        raise FmhubError(f"{path}: cannot read the recipe ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise FmhubError(f"{path}: a recipe is a YAML mapping (base, models, strategy, options, tensors, output)")
    return data


def strategy_named(name: str) -> Any:
    return host.lookup("merge-strategy", name)


def check_compatible(name: str, base: TensorRef | None, sides: Sequence[TensorRef], strategy: Any) -> str | None:
    """Why these versions cannot be merged by ``strategy`` (checked before reading any bytes), or None."""
    first = sides[0]
    for i, s in enumerate(sides[1:], 1):
        if (s.dtype, s.shape) != (first.dtype, first.shape):
            return f"dtype/shape differ between sides: {first.dtype}{list(first.shape)} ({first.path}) vs {s.dtype}{list(s.shape)} ({s.path})"
    if getattr(strategy, "needs_base", False):
        if base is None:
            return f"strategy {strategy.name!r} works on changes from a base, and the base has no tensor {name!r}"
        if (base.dtype, base.shape) != (first.dtype, first.shape):
            return f"the base's version is {base.dtype}{list(base.shape)}, the sides' {first.dtype}{list(first.shape)}"
    return None


def merge_tensor(
    name: str,
    base: TensorRef | None,
    sides: Sequence[TensorRef],
    strategy: Any,
    options: Mapping[str, Any],
    fisher: Sequence[TensorRef | None] | None = None,
) -> int | Any:
    """Side index to keep, or the merged tensor in the sides' dtype; MergeConflict says why not."""
    problem = check_compatible(name, base, sides, strategy)
    if problem:
        raise MergeConflict(problem)
    opts = dict(options)
    if fisher is not None:
        if len(fisher) != len(sides) or any(f is None for f in fisher):
            missing = [i for i, f in enumerate(fisher) if f is None] if len(fisher) == len(sides) else list(range(len(sides)))
            raise MergeConflict(f"no Fisher diagonal for side(s) {missing}")
        for f in fisher:
            if tuple(f.shape) != tuple(sides[0].shape):
                raise MergeConflict(f"Fisher diagonal {f.path} has shape {list(f.shape)}, the tensor {list(sides[0].shape)}")
        opts["fisher"] = lambda i: fisher[i].load()
    result = strategy.merge(name, base.load if base is not None else None, lambda i: sides[i].load(), len(sides), opts)
    if isinstance(result, int) and not isinstance(result, bool):
        if not 0 <= result < len(sides):
            raise MergeConflict(f"strategy {strategy.name!r} chose side {result} of {len(sides)}")
        return result
    import torch

    if not isinstance(result, torch.Tensor):
        raise MergeConflict(f"strategy {strategy.name!r} returned {type(result).__name__}, not a tensor or a side index")
    if tuple(result.shape) != tuple(sides[0].shape):
        raise MergeConflict(f"strategy {strategy.name!r} returned shape {list(result.shape)} for a {list(sides[0].shape)} tensor")
    if sides[0].dtype not in tensors.FLOAT_DTYPES:
        raise MergeConflict(f"{sides[0].dtype} tensors cannot be averaged; give this tensor a rule with strategy ours or theirs")
    out = tensors.cast_like(result, sides[0].dtype)
    if not tensors.all_finite(out):
        raise MergeConflict(f"strategy {strategy.name!r} produced NaN or Inf (from NaN/Inf inputs, or values that overflow {sides[0].dtype})")
    return out


@dataclass
class MergeReport:
    output: str
    actions: list[tuple[str, str]]  # (tensor, what was done)
    bytes_written: int
    carried: list[str] = field(default_factory=list)  # config and tokenizer files written next to it (`_copy_configs`)
    carried_from: str | None = None  # the model (path or REV:PATH) they came from


def merge_models(
    base: CheckpointView | None,
    models: Sequence[CheckpointView],
    plan: MergePlan,
    output: str,
    fisher: Sequence[CheckpointView | None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> MergeReport:
    """Merge ``models`` (and ``base``) into a new safetensors file at ``output``; all or nothing."""
    if not models:
        raise FmhubError("nothing to merge: give at least one model")
    names = list(models[0].tensors)
    for m in models[1:]:
        names += [n for n in m.tensors if n not in set(names)]
    problems: list[str] = []
    strategies: dict[str, Any] = {}
    for sname in plan.strategy_names():
        try:
            strategies[sname] = strategy_named(sname)
        except FmhubError as exc:
            problems.append(str(exc))
    if problems:
        raise MergeConflict("; ".join(problems))

    # everything that can be checked without reading tensor bytes, for every tensor, first
    jobs = []
    without_base: set[str] = set()  # strategies that merge changes from a base, asked to merge without one
    for name in names:
        sides = [m.tensors.get(name) for m in models]
        absent = [models[i].label for i, s in enumerate(sides) if s is None]
        if absent:
            problems.append(f"{name}: missing from {', '.join(absent)}")
            continue
        b = base.tensors.get(name) if base is not None else None
        if _same(sides + ([b] if b is not None else [])):
            jobs.append((name, b, sides, None, {}))
            continue
        sname, opts = plan.for_tensor(name)
        if sname is None:
            problems.append(f"{name}: no merge strategy (set `strategy:` or a `tensors:` rule)")
            continue
        strategy = strategies[sname]
        if base is None and getattr(strategy, "needs_base", False):
            without_base.add(sname)
            continue
        problem = check_compatible(name, b, sides, strategy)
        if problem:
            problems.append(f"{name}: {problem}")
            continue
        jobs.append((name, b, sides, strategy, opts))
    if without_base:
        names_ = ", ".join(sorted(without_base))
        raise MergeConflict(f"strategy {names_} merges each model's changes from a common base: give --base (the model "
                            "they were fine-tuned from; `base:` in a recipe), or use a strategy without one (linear, "
                            "slerp, ours, theirs)")
    if problems:
        raise MergeConflict(_summary(problems), conflicts=len(problems))

    from fmhub.plugin.interfaces import TensorInfo
    from fmhub.core.formats import format_named

    infos = [TensorInfo(n, sides[0].dtype, sides[0].shape, sides[0].size) for n, _, sides, _, _ in jobs]
    header = format_named("safetensors").build_header(infos, models[0].metadata)
    out_dir = os.path.dirname(os.path.abspath(output))
    made_dir = not os.path.isdir(out_dir)
    actions: list[tuple[str, str]] = []
    try:
        with atomic_write(output, prefix=".fmhub-merge-") as f:
            f.write(header)
            for name, b, sides, strategy, opts in jobs:
                if progress:
                    progress(name)
                fisher_refs = [fv.tensors.get(name) if fv is not None else None for fv in fisher] if fisher else None
                what = ""
                try:
                    for data, what in _merge_pieces(name, b, sides, strategy, opts, fisher_refs, models):
                        f.write(data)
                        del data  # one tensor's (or chunk's) buffers at a time
                except MergeConflict as exc:  # keep going to report every tensor; the file is thrown away
                    problems.append(f"{name}: {exc}")
                actions.append((name, what))
            if problems:
                raise MergeConflict(_summary(problems), conflicts=len(problems))
    except BaseException:
        if made_dir:
            try:
                os.rmdir(out_dir)
            except OSError:
                pass
        raise
    return MergeReport(output, actions, len(header) + sum(s[0].size for _, _, s, _, _ in jobs))


CHUNK_ELEMS = 1 << 22  # elements per chunk for elementwise strategies (16 MiB of fp32 per version)


def _merge_pieces(name, base, sides, strategy, opts, fisher_refs, models) -> Iterator[tuple[Any, str]]:
    """One tensor's merged bytes, as (bytes, what was done) pieces; each piece's buffers die with it.

    An elementwise strategy (``strategy.elementwise``) gets big tensors in
    chunks of `CHUNK_ELEMS` flattened elements, so memory stays at a few chunks
    whatever the tensor's size; others get whole tensors.
    """
    if strategy is None:
        yield sides[0].read(), "same in every model"
        return
    refs = [*sides, *([base] if base is not None else []), *(r for r in fisher_refs or () if r is not None)]
    numel = sides[0].numel
    if getattr(strategy, "elementwise", False) and numel > CHUNK_ELEMS and all(r.opener is not None for r in refs):
        for start in range(0, numel, CHUNK_ELEMS):
            stop = min(numel, start + CHUNK_ELEMS)
            cut = lambda r: r.slice(start, stop) if r is not None else None  # noqa: E731
            yield _merge_whole(name, cut(base), [cut(r) for r in sides], strategy, opts,
                               [cut(r) for r in fisher_refs] if fisher_refs else None, models)
        return
    yield _merge_whole(name, base, sides, strategy, opts, fisher_refs, models)


def _merge_whole(name, base, sides, strategy, opts, fisher_refs, models) -> tuple[Any, str]:
    # read each version once; identical everywhere (base included) means nothing to merge
    sides = [_cached(r) for r in sides]
    base = _cached(base) if base is not None else None
    if _same(sides + ([base] if base is not None else []), by_bytes=True):
        return sides[0].read(), "same in every model"
    result = merge_tensor(name, base, sides, strategy, opts, fisher_refs)
    if isinstance(result, int):
        return sides[result].read(), f"{strategy.name}: kept {models[result].label}"
    data = tensors.as_buffer(result)
    if data.nbytes != sides[0].size:
        raise MergeConflict(f"merged tensor has {data.nbytes} bytes, expected {sides[0].size}")
    return data, strategy.name


def _same(refs: Sequence[TensorRef], by_bytes: bool = False) -> bool:
    """All the same tensor: the same object, the same oid, or (``by_bytes``) the same bytes."""
    first = refs[0]
    if all(r is first or (r.oid is not None and r.oid == first.oid) for r in refs):
        return True
    if not by_bytes or any((r.dtype, r.shape) != (first.dtype, first.shape) for r in refs):
        return False
    data = first.read()
    return all(r.read() == data for r in refs[1:])


def _cached(ref: TensorRef) -> TensorRef:
    """``ref`` with its bytes read once and kept, for the few tensors merged at a time."""
    from dataclasses import replace

    data = ref.read()
    return replace(ref, reader=lambda: data, opener=None)


def _summary(problems: list[str]) -> str:
    shown = problems[:20]
    more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
    return f"{len(problems)} tensor(s) cannot be merged, nothing was written:\n  " + "\n  ".join(shown) + more


@dataclass
class Recipe:
    """A parsed ``fmhub merge`` recipe (see the module docstring)."""

    plan: MergePlan
    base: str | None
    models: list[str]
    fisher: list[str | None]
    output: str | None
    into: str | None  # for PEFT adapters: "base" or "adapter"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "Recipe":
        plan = MergePlan.from_dict(data, where)
        models, weights, fisher = [], [], []
        for i, m in enumerate(data.get("models") or []):
            if isinstance(m, str):
                m = {"model": m}
            if not isinstance(m, Mapping) or "model" not in m:
                raise FmhubError(f"{where}: models[{i}] needs a `model` (a path or REV:PATH)")
            models.append(str(m["model"]))
            weights.append(m.get("weight"))
            fisher.append(str(m["fisher"]) if m.get("fisher") else None)
        if any(w is not None for w in weights):
            if "weights" in plan.options:
                raise FmhubError(f"{where}: give weights either per model or in options, not both")
            plan.options["weights"] = parse_options({"weights": [1.0 if w is None else w for w in weights]}, where)["weights"]
        into = data.get("into")
        if into not in (None, "base", "adapter"):
            raise FmhubError(f"{where}: `into` is `base` or `adapter`, not {into!r}")
        base = data.get("base")
        return cls(plan, str(base) if base else None, models, fisher, data.get("output"), into)


def run_recipe(recipe: Recipe, output: str | None = None, progress: Callable[[str], None] | None = None) -> MergeReport:
    """Open every model the recipe names and merge them; PEFT adapter directories go through `fmhub.models.lora`."""
    sides = {"models": recipe.models, "base": recipe.base, "strategy": recipe.plan.strategy, "into": recipe.into}
    from fmhub.governance import licences

    licences.check_merge([*recipe.models, *([recipe.base] if recipe.base else [])])  # before any tensor is read
    with audit.operation("merge", output or recipe.output or "", sides) as facts:
        report = _run_recipe(recipe, output, progress)
        facts.update(tensors=len(report.actions), bytes=report.bytes_written, conflicts=0)
    from fmhub.governance import lineage

    # the parents (and base) are the inputs: `fmhub lineage` follows their own records back to their data
    lineage.record(output or recipe.output or "", "merge", [*recipe.models, *([recipe.base] if recipe.base else [])],
                   {"strategy": recipe.plan.strategy, "base": recipe.base, "into": recipe.into})
    return report


def _run_recipe(recipe: Recipe, output: str | None, progress: Callable[[str], None] | None) -> MergeReport:
    from fmhub.models import lora
    from fmhub.models.views import open_view

    out = output or recipe.output
    if not out:
        raise FmhubError("no output: give `output:` in the recipe or -o PATH")
    if not recipe.models:
        raise FmhubError("no models to merge: list them under `models:` or give them as arguments")
    if any(lora.is_adapter_dir(m) for m in recipe.models):
        if (recipe.into or ("base" if recipe.base else "adapter")) == "adapter":
            return _merge_adapters(recipe, out, progress)
        report = _merge_adapters(recipe, _output_file(out), progress)
        report.carried_from, report.carried = _copy_configs(out, [recipe.base])
        return report
    if recipe.into:
        raise FmhubError("`into` applies to PEFT adapter directories only")
    base = open_view(recipe.base) if recipe.base else None
    models = [open_view(m) for m in recipe.models]
    fisher = _fisher_views(recipe, models) if _uses(recipe.plan, "fisher") else None
    report = merge_models(base, models, recipe.plan, _output_file(out), fisher, progress)
    report.carried_from, report.carried = _copy_configs(out, [recipe.models[0], recipe.base])
    return report


def _merge_adapters(recipe: Recipe, output: str, progress: Callable[[str], None] | None = None) -> MergeReport:
    """Run a recipe whose models are PEFT adapter directories (see `fmhub.models.lora`)."""
    from fmhub.models import lora
    from fmhub.models.views import open_view

    not_adapters = [m for m in recipe.models if not lora.is_adapter_dir(m)]
    if not_adapters:
        raise FmhubError(f"cannot mix adapter directories and full models in one merge: {', '.join(not_adapters)}")
    adapters = [lora.load_adapter(m) for m in recipe.models]
    into = recipe.into or ("base" if recipe.base else "adapter")
    if into == "adapter":
        names = lora.concatenate(adapters, recipe.plan.options.get("weights"), output, recipe.plan.strategy)
        actions = [(n, f"concatenated {len(adapters)} adapters") for n in names]
        return MergeReport(output, actions, os.path.getsize(os.path.join(output, lora.WEIGHTS)))
    if not recipe.base:
        raise FmhubError("merging adapters into the base needs `base:` (the base model's path or REV:PATH)")
    base = open_view(recipe.base)
    plan = recipe.plan
    if plan.strategy is None:
        plan.strategy = "task-arithmetic"
    return merge_models(base, [lora.patched_view(base, a) for a in adapters], plan, output, None, progress)


def _uses(plan: MergePlan, strategy: str) -> bool:
    return strategy in plan.strategy_names()


def _fisher_views(recipe: Recipe, models: Sequence[CheckpointView]) -> list[CheckpointView]:
    """Per model: its ``fisher:`` file, or a view that asks the ``fmhub_fisher_diagonal`` hook per tensor."""
    from fmhub.models.views import open_view

    views = []
    for spec, fisher_spec, model in zip(recipe.models, recipe.fisher, models):
        views.append(open_view(fisher_spec) if fisher_spec else _hook_fisher_view(spec, model))
    return views


def _hook_fisher_view(spec: str, model: CheckpointView) -> CheckpointView:
    def ref(t: TensorRef) -> TensorRef:
        def read() -> bytes:
            import torch

            got = host.plugin_manager().hook.fmhub_fisher_diagonal(model=spec, tensor=t.name)
            if got is None:
                raise MergeConflict(f"no Fisher diagonal for {spec}: give `fisher:` for it in the recipe, or install a plugin implementing fmhub_fisher_diagonal")
            got = torch.as_tensor(got, dtype=torch.float32)
            if tuple(got.shape) != tuple(t.shape):
                raise MergeConflict(f"the Fisher diagonal computed for {spec} has shape {list(got.shape)}, the tensor {list(t.shape)}")
            return tensors.to_bytes(got)

        return t.computed(read, f"fmhub_fisher_diagonal({spec})", dtype="F32")

    return CheckpointView({t.name: ref(t) for t in model}, None, f"fisher of {spec}")


CONFIG_FILES = ("config.json", "generation_config.json")
# what a merged model directory gets from the model it came from, besides the weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
CARRIED_FILES = CONFIG_FILES + TOKENIZER_FILES
MAX_CARRIED_BYTES = 256 << 20


def _output_file(out: str) -> str:
    """``out`` itself for a ``.safetensors`` path; ``out/model.safetensors`` for a directory."""
    if out.endswith(".safetensors") and not os.path.isdir(out):
        return out
    return os.path.join(out, "model.safetensors")


def _copy_configs(out: str, sources: Sequence[str | None]) -> tuple[str | None, list[str]]:
    """Next to a merged model written into a directory, the config and tokenizer files (`CARRIED_FILES`) of the
    first of ``sources`` (directories on disk or ``REV:PATH`` directories in git) that has any, so
    `transformers.AutoModel.from_pretrained(out)` loads it. (that source, the names written)."""
    if not os.path.isdir(out):
        return None, []
    for src in sources:
        files = _carried_files(src) if src else {}
        if not files:
            continue
        for name, read in files.items():
            with atomic_write(os.path.join(out, name), prefix=".fmhub-merge-") as f:
                f.write(read())
        return src, sorted(files)
    return None, []


def _carried_files(spec: str) -> dict[str, Callable[[], bytes]]:
    """The `CARRIED_FILES` of a model directory: on disk, or ``REV:PATH`` read from git as committed (name -> reader)."""
    if os.path.isdir(spec):
        def reader(path: str) -> Callable[[], bytes]:
            def read() -> bytes:
                with open(path, "rb") as f:
                    return f.read()

            return read

        return {n: reader(os.path.join(spec, n)) for n in CARRIED_FILES if os.path.isfile(os.path.join(spec, n))}
    if os.path.exists(spec) or ":" not in spec:
        return {}
    from fmhub.core.manifest import is_manifest
    from fmhub.core.repo import blob_at, git

    rev, _, path = spec.partition(":")
    path = path.strip("/")
    # the directory's entries, named from the top (as REV:PATH is); a file PATH lists nothing
    listing = git("ls-tree", "-z", "--full-tree", rev, "--", f"{path}/" if path else ".", check=False)
    found: dict[str, Callable[[], bytes]] = {}
    for entry in listing.split("\0"):
        meta, _, name = entry.partition("\t")
        if meta.split(" ")[1:2] != ["blob"] or os.path.basename(name) not in CARRIED_FILES:
            continue
        data = blob_at(rev, name, limit=MAX_CARRIED_BYTES)
        if is_manifest(data) or data.startswith(b"version https://git-lfs"):
            continue  # stored as a pointer, not as the file: not a config transformers could read
        found[os.path.basename(name)] = lambda data=data: data
    return found

"""The model commands: ``diff``, ``merge``, ``extract``, ``fisher``, ``sparsify``, ``commit`` (sparse), ``rebase`` and
``adapter add|ls|merge`` (`fmhub.models`, `fmhub.ml.rebase`), as functions.

`sparsify` writes the lineage record that leads ``fmhub lineage`` from its output to the fine-tune's data, as the
command does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from fmhub.base.errors import FmhubError


def fraction(value: str | float) -> float:
    """``1%``, ``"0.01"`` or ``0.01`` -> 0.01; anything outside 0..1 is an error."""
    text = str(value).strip()
    try:
        result = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise FmhubError(f"{text!r} is not a fraction; write e.g. 1% or 0.01") from None
    if not 0 <= result <= 1:
        raise FmhubError(f"{text!r} is outside 0%..100%")
    return result


# -- diff ------------------------------------------------------------------------------------------------------


@dataclass
class Diff:
    """What `diff` found: per tensor (`fmhub.models.diff.TensorChange`), per dataset and per PEFT adapter."""

    old_label: str
    new_label: str
    changes: list
    datasets: list
    adapters: list
    top: str = ""

    def to_json(self) -> dict[str, Any]:
        """The document ``fmhub diff --json`` prints."""
        from dataclasses import asdict

        from fmhub.models import difftext

        out = difftext.to_json(self.changes) | {"old": self.old_label, "new": self.new_label, "adapters": [asdict(a) for a in self.adapters]}
        out["datasets"] = [d.to_dict() for d in self.datasets]
        return out


def diff(args: Sequence[str] = (), paths_from: Optional[int] = None) -> Diff:
    """What changed: HEAD vs the work tree, REV vs the work tree, or REV1 vs REV2, in ``[REV1] [REV2] [PATH...]``.

    ``paths_from``: the index in ``args`` where the paths given after ``--`` start (see `fmhub.api.git.split_revs_paths`).
    """
    from fmhub.api.git import split_revs_paths
    from fmhub.data.rowdiff import diff_data_sides
    from fmhub.models.adapters import diff_adapters
    from fmhub.models.diffsides import diff_sides, load_sides

    revs, paths = split_revs_paths(args, paths_from)
    top, old_side, new_side = load_sides(revs, paths)
    changes = diff_sides(old_side, new_side)
    datasets = diff_data_sides(old_side, new_side, top)
    adapters = diff_adapters(old_side.files, new_side.files, revs[0] if revs else "HEAD", revs[1] if len(revs) == 2 else None, top)
    return Diff(old_side.label, new_side.label, changes, datasets, adapters, top)


# -- merge, extract --------------------------------------------------------------------------------------------


def merge(inputs: Sequence[str], output: Optional[str] = None, base: Optional[str] = None, strategy: Optional[str] = None,
          weights: Sequence[float] = (), options: Sequence[str] | dict[str, Any] = (), into: Optional[str] = None,
          progress: Optional[Callable[[str], None]] = None):
    """Merge N models (and a base) tensor by tensor: ``inputs`` is one recipe file (.yaml) or the models.

    ``options``: ``KEY=VALUE`` strings (values read as YAML) or a dict; they, ``base``, ``strategy`` and ``into``
    override the recipe's. Returns `fmhub.models.merge.MergeReport`.
    """
    from fmhub.base.boundedyaml import safe_load
    from fmhub.models import merge as mg
    from fmhub.project.spec import SPEC_LIMITS

    inputs = list(inputs)
    if len(inputs) == 1 and inputs[0].endswith((".yaml", ".yml")):
        data, where = mg.load_plan_file(inputs[0]), inputs[0]
    else:
        data, where = {"models": inputs}, "command line"
    for key, value in (("base", base), ("strategy", strategy), ("into", into)):
        if value is not None:
            data[key] = value
    if options:
        opts = dict(data.get("options") or {})
        if isinstance(options, dict):
            opts.update(options)
        else:
            for item in options:
                key, eq, value = item.partition("=")
                if not eq:
                    raise FmhubError(f"--option {item!r}: write KEY=VALUE")
                opts[key.strip()] = safe_load(value, f"--option {key.strip()}", SPEC_LIMITS, FmhubError)  # `a=[` is one line
        data["options"] = opts
    recipe = mg.Recipe.from_dict(data, where)
    if weights:
        if len(weights) != len(recipe.models):
            raise FmhubError(f"{len(weights)} --weight values for {len(recipe.models)} models")
        recipe.plan.options["weights"] = list(weights)
    return mg.run_recipe(recipe, output, progress=progress)


def extract(source: str, tensors: Sequence[str], output: str):
    """Write only the tensors of ``source`` (a checkpoint, or REV:PATH) matching ``tensors`` to ``output``,
    reading and downloading only their objects."""
    from fmhub.models import extract as ex
    from fmhub.models.views import open_view

    return ex.extract(open_view(source), list(tensors), output, before_read=fetch_missing)


def fetch_missing(refs) -> None:
    """Download the objects of ``refs`` the local store lacks (only those), when a remote is set up."""
    oids = [obj for r in refs for obj in (r.storage or ([(r.oid, r.size)] if r.oid is not None else []))]
    if oids:
        from fmhub.git import sync

        sync.ensure_objects(oids)


# -- Fisher, sparse updates, fine-tunes ------------------------------------------------------------------------


def fisher(model: str, data: str, output: str, batch_size: int = 8, max_examples: Optional[int] = None,
           max_length: int = 128, seed: int = 0):
    """The empirical diagonal Fisher of ``model`` on ``data``, written to ``output`` (`fmhub.models.fisher`)."""
    from fmhub.models.fisher import compute_fisher

    return compute_fisher(model, data, output, batch_size=batch_size, max_examples=max_examples, max_length=max_length, seed=seed)


@dataclass
class Sparsified:
    """What `sparsify` did: `fmhub.models.sparse_update.SparseReport`, and eval losses when data was given."""

    report: Any
    losses: dict[str, float] = field(default_factory=dict)


def sparsify(base: str, finetuned: str, fisher: str, keep: str | float, output: str, data: Optional[str] = None) -> Sparsified:
    """Keep only the ``keep`` fraction (``"1%"``) most important entries of a fine-tune's update (FishMask); the rest
    get the base's exact bits. Records the lineage of ``output``; with ``data``, the loss of each of the three models."""
    from fmhub.governance import lineage
    from fmhub.models import sparse_update as su

    rep = su.sparse_update(base, finetuned, fisher, output, fraction(keep))
    # the fine-tune's own record leads `fmhub lineage` on to its data
    lineage.record(output, "sparsify", [lineage.describe_input(base, "model"), lineage.describe_input(finetuned, "model")],
                   {"keep": keep, "fisher": fisher})
    losses = {}
    if data:
        losses = {name: su.eval_loss(path, data) for name, path in (("base", base), ("fine-tune", finetuned), ("sparse", output))}
    return Sparsified(rep, losses)


def commit_sparse(path: str, message: str, keep: Optional[str | float] = None, fisher: Optional[str] = None,
                  data: Optional[str] = None, base: str = "HEAD"):
    """Commit a fine-tune as a FishMask sparse update of its base committed at ``base``; ``keep`` and ``fisher``
    default to git config fmhub.sparse.keep / fmhub.sparse.fisher. `fmhub.models.sparse_commit.CommitReport`."""
    from fmhub.core.repo import git
    from fmhub.models.sparse_commit import sparse_commit

    keep = keep or git("config", "--get", "fmhub.sparse.keep", check=False).strip()
    fisher = fisher or git("config", "--get", "fmhub.sparse.fisher", check=False).strip()
    if not keep or not fisher:
        raise FmhubError("give --sparse K% and --fisher FILE (or git config fmhub.sparse.keep / fmhub.sparse.fisher); "
                         "for a plain commit use git commit")
    return sparse_commit(path, message, fisher, fraction(keep), data, base)


# -- adapters, rebase ------------------------------------------------------------------------------------------


def adapter_add(adapter_dir: str, base: str, rev: str = "HEAD"):
    """Check a PEFT adapter fits ``base`` at ``rev``, record that base in fmhub-adapter.json, and stage the adapter."""
    from fmhub.models import adapters

    return adapters.add(adapter_dir, base, rev)


def adapter_list(rev: Optional[str] = None) -> list:
    """The adapters recorded in the work tree (or at ``rev``), with their base and whether it has changed since."""
    from fmhub.models import adapters

    return adapters.list_adapters(rev)


def adapter_merge(adapter_dir: str, tolerance: str | float = "0"):
    """Merge a recorded adapter into its base in the work tree and stage it, each changed weight a low-rank delta
    within ``tolerance`` per element (0: bit-exact); `fmhub.models.adapters.MergeIntoReport`."""
    from fmhub.core.deltas import parse_tolerance
    from fmhub.models import adapters

    return adapters.merge_into_base(adapter_dir, parse_tolerance(str(tolerance), "--tolerance"))


def rebase(sources: Sequence[str], onto: str, old: str, output: Optional[str] = None, strategy: str = "task-arithmetic",
           check: Optional[str] = None, max_regression: float = 0.02, retune: int = 0, lr: Optional[float] = None,
           spec: Optional[str] = None) -> list[tuple[str, Any]]:
    """Move adapters and fine-tunes of ``old`` onto ``onto``; ``check`` names a task of fmhub.yaml scored before and
    after (a regression refuses). (source, `fmhub.ml.rebase.Rebased`) per source."""
    from fmhub.ml import rebase as rb

    if output and len(sources) > 1:
        raise FmhubError("--output takes one source; without it each source is rebased in place")
    task = None
    if check:
        from fmhub.ml.tasks import task_of
        from fmhub.project.spec import load_spec

        loaded = load_spec(spec)
        if check not in loaded.spec.tasks:
            raise FmhubError(f"no task {check!r} in {loaded.path}")
        task = task_of(loaded, check)
    if retune and task is None:
        raise FmhubError("--retune trains on the --check task: name one")
    return [(src, rb.rebase(src, old, onto, output, strategy=strategy, check=task, max_regression=max_regression,
                            retune=retune, lr=lr)) for src in sources]

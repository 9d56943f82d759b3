"""``fmhub rebase``: move models built on a base onto a new version of it (say, a patched base).

The model analogue of rebasing a branch: what a downstream model changed
relative to the old base is replayed on the new base.

* A **PEFT adapter** is already just its change: it is copied to the output
  with ``adapter_config.json``'s ``base_model_name_or_path`` pointing at the
  new base. The adapter must fit the new base (every targeted weight, same
  shape), or nothing is written.
* A **full model** (a fine-tune of the old base) is merged three ways with
  `fmhub.models.merge`: ``new_base + (model - old_base)`` by task arithmetic (or
  another strategy: ``ties`` resolves entries both changed), tensor by tensor.

With a ``check`` task, the rebased model is scored before it is kept: it may
not score worse than the original on the old base by more than
``max_regression`` (the same gate as `fmhub.ml.patch`). Either way the output
appears whole (temp directory, rename) with a lineage record naming the
original, the old base and the new base.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from fmhub.base import boundedjson
from fmhub.governance import lineage
from fmhub.base.errors import FmhubError, MergeConflict


RETUNE_LR_DIVISORS = (3, 10)  # continued training from trained weights wants a smaller step than training from scratch: searched


class RebaseError(FmhubError):
    """A model that cannot be moved onto the new base."""


@dataclass
class Rebased:
    source: str
    output: str
    kind: str  # "adapter" or "model"
    score_before: Optional[float] = None
    score_after: Optional[float] = None
    tensors: int = 0
    retuned: int = 0  # retune steps it took


def _regressed(r: Rebased, check: Any, max_regression: float) -> bool:
    sign = -1 if check.metric == "loss" else 1
    return (r.score_after - r.score_before) * sign < -max_regression


def _trained_lr(adapter_dir: str) -> float:
    from fmhub.ml.autotune import TRAIN_FILE

    try:
        with open(os.path.join(adapter_dir, TRAIN_FILE), "rb") as f:  # a clone's record: bounded, cut is not JSON
            return float(boundedjson.loads(f.read(lineage.MAX_RECORD_BYTES + 1), allow_nan=True)["lr"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1e-3


def _retune(adapter_dir: str, new_base: str, check: Any, steps: int, lrs: list[float]) -> float:
    """Continue training the re-pointed adapter in ``adapter_dir`` on the new base; replaces it there; returns its score."""
    from fmhub.ml.autotune import train_adapter

    out = adapter_dir + ".retuned"
    res = train_adapter(new_base, check, out, steps=steps, lrs=lrs, init_adapter=adapter_dir)
    os.remove(out + lineage.SUFFIX)  # the rebase records the output's lineage
    for name in os.listdir(out):
        shutil.copy2(os.path.join(out, name), os.path.join(adapter_dir, name))
    shutil.rmtree(out, ignore_errors=True)
    _point_at(adapter_dir, new_base)  # save_pretrained wrote the path the base was loaded from
    return res.score


def _point_at(adapter_dir: str, new_base: str) -> None:
    """Set the adapter's ``base_model_name_or_path`` to ``new_base``, so peft loads it on the new base."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = os.path.abspath(new_base)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def _is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _check_fits(adapter_dir: str, base_dir: str) -> None:
    from fmhub.models import lora
    from fmhub.models.lora import check_fits as fits
    from fmhub.models.views import from_path

    try:
        fits(lora.load_adapter(adapter_dir), from_path(base_dir), f"the new base {base_dir}")
    except MergeConflict as exc:
        raise RebaseError(str(exc)) from None


def _adapter(source: str, new_base: str, tmp: str) -> int:
    from fmhub.models.adapters import SIDECAR

    _check_fits(source, new_base)
    for name in sorted(os.listdir(source)):
        if os.path.isfile(os.path.join(source, name)) and name != SIDECAR:  # the sidecar pins the old base's commit
            shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
    _point_at(tmp, new_base)
    return len([n for n in os.listdir(tmp) if n.endswith(".safetensors")])


def _model(source: str, old_base: str, new_base: str, tmp: str, strategy: str, options: dict) -> int:
    from fmhub.models.merge import Recipe, run_recipe

    recipe = Recipe.from_dict({"base": old_base, "models": [source, new_base], "strategy": strategy, "options": options},
                              "fmhub rebase")
    report = run_recipe(recipe, tmp)
    os.remove(tmp.rstrip("/") + lineage.SUFFIX)  # recorded below, for the output's real path
    return len(report.actions)


def rebase(source: str, old_base: str, new_base: str, output: Optional[str] = None, *, strategy: str = "task-arithmetic",
           options: Optional[dict[str, Any]] = None, check: Any = None, max_regression: float = 0.02,
           retune: int = 0, lr: Optional[float] = None) -> Rebased:
    """Rebase ``source`` (an adapter or a fine-tune of ``old_base``) onto ``new_base``; see the module docstring.

    :param output: where the rebased model goes (default: replace ``source``).
    :param check: an `fmhub.ml.tasks.Task` to score before and after; the rebase is refused if it regresses.
    :param retune: for an adapter that regresses on the new base: continue training it this many steps on the
        check task's training rows, from its own weights, then check again (the conflict resolution of a rebase).
    :param lr: the retune's learning rate (default: the better by held-out loss of a third and a tenth of the
        one in the adapter's ``fmhub-train.json``, else of 1e-3).
    :raises RebaseError: the adapter does not fit the new base, a merge conflict, or the check failed (nothing written).
    """
    from fmhub.base.atomic import fsync_tree, replace_dir
    from fmhub.ml.scoring import evaluate

    for what, path in (("source", source), ("old base", old_base), ("new base", new_base)):
        if not os.path.isdir(path):
            raise RebaseError(f"{what} {path}: no such directory")
    output = os.path.normpath(output or source)
    kind = "adapter" if _is_adapter(source) else "model"
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".fmhub-rebase-")
    result = Rebased(source, output, kind)
    previous = lineage.read(os.path.abspath(source))
    try:
        if kind == "adapter":
            result.tensors = _adapter(source, new_base, tmp)
        else:
            try:
                result.tensors = _model(source, old_base, new_base, tmp, strategy, dict(options or {}))
            except MergeConflict as exc:
                raise RebaseError(f"{source}: cannot be merged onto {new_base}: {exc}") from None
        if check is not None:
            result.score_before = evaluate(old_base, source, check) if kind == "adapter" else evaluate(source, None, check)
            result.score_after = evaluate(new_base, tmp, check) if kind == "adapter" else evaluate(tmp, None, check)
            if _regressed(result, check, max_regression) and retune > 0:
                if kind != "adapter":
                    raise RebaseError(f"{source}: --retune continues a LoRA adapter's training; {source} is a full model")
                result.score_after = _retune(tmp, new_base, check, retune, [lr] if lr is not None else [_trained_lr(source) / d for d in RETUNE_LR_DIVISORS])
                result.retuned = retune
            if _regressed(result, check, max_regression):
                raise RebaseError(f"{source} on {new_base} scores {result.score_after:.4f} on task {check.name!r}, "
                                  f"{result.score_before:.4f} on the old base (more than {max_regression:g} worse"
                                  f"{f', after {retune} retune steps' if result.retuned else ''}); nothing was written: "
                                  f"{'retune it longer (--retune STEPS)' if kind == 'adapter' else 'retrain it on the new base'}")
        fsync_tree(tmp)
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    inputs = [lineage.describe_input(old_base, "model"), lineage.describe_input(new_base, "model")]
    if os.path.abspath(output) != os.path.abspath(source):
        inputs.insert(0, lineage.describe_input(source, "model"))
    elif previous:  # rebased in place: keep what it was trained on, or its trail back to the data ends here
        base_path = lineage.describe_input(old_base, "model")["path"]
        inputs += [i for i in previous.get("inputs", []) if i.get("path") != base_path]
    lineage.record(output, "rebase", inputs,
                   {"kind": kind, "strategy": None if kind == "adapter" else strategy, "score_before": result.score_before,
                    "score_after": result.score_after, "retune_steps": result.retuned})
    return result

"""git merge driver (``merge.fmhub.driver``): three-way merge of manifests, tensor by tensor.

git calls ``fmhub merge-driver %O %A %B %P`` with the manifests of the merge
base, ours and theirs; the result goes into %A. A tensor changed on one side
takes that side; identical changes are kept; a tensor changed differently on
both sides goes to the merge strategy chosen for the path, and without one it
is a conflict: %A is left as ours, every conflicting tensor is named, and git
records the path as conflicted (``git merge --abort`` restores everything).
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any, TextIO

from fmhub.governance import audit
from fmhub.core import tensors
from fmhub.core.formats import format_named
from fmhub.base.errors import FmhubError, MergeConflict, one_line
from fmhub.plugin.interfaces import TensorInfo
from fmhub.core.manifest import Manifest, TensorEntry, is_manifest
from fmhub.models.merge import MergePlan, load_plan_file, merge_tensor, strategy_named
from fmhub.core.repo import git, open_store, toplevel
from fmhub.git import merge_notes
from fmhub.core.store import ObjectStore
from fmhub.models.views import CheckpointView, entry_ref, from_path

_Key = tuple[str, tuple[int, ...], str]  # what makes two versions of a tensor the same


def _key(t: TensorEntry | None) -> _Key | None:
    return None if t is None else (t.dtype, t.shape, t.oid)


def _three_way(base: Any, ours: Any, theirs: Any) -> tuple[bool, Any]:
    """(resolved, value) for one item under the usual three-way rule."""
    if ours == theirs:
        return True, ours
    if ours == base:
        return True, theirs
    if theirs == base:
        return True, ours
    return False, None


def merge_manifests(
    base: Manifest | None,
    ours: Manifest,
    theirs: Manifest,
    store: ObjectStore,
    plan: MergePlan | None = None,
    path: str = "<file>",
    fisher: list[CheckpointView] | None = None,
    used: dict[str, int] | None = None,
) -> Manifest:
    """The merged manifest; raises MergeConflict naming every tensor that could not be merged.

    ``used``: counts, per strategy, the tensors it merged (changed on both sides; see `fmhub.git.merge_notes`)."""
    if ours.format != theirs.format:
        raise MergeConflict(f"{path}: cannot merge a {ours.format} file with a {theirs.format} file")
    if ours.is_data or theirs.is_data:
        return _merge_data(base, ours, theirs, path)
    b_t = base.by_name() if base else {}
    o_t, t_t = ours.by_name(), theirs.by_name()
    names = list(o_t) + [n for n in t_t if n not in o_t]
    merged: list[TensorEntry] = []
    problems: list[str] = []
    for name in names:
        ok, key = _three_way(_key(b_t.get(name)), _key(o_t.get(name)), _key(t_t.get(name)))
        if ok:
            if key is not None:
                merged.append(o_t[name] if _key(o_t.get(name)) == key else t_t[name])
            continue
        resolved = _resolve(name, b_t.get(name), o_t.get(name), t_t.get(name), store, plan, fisher, problems, path)
        if resolved is not None:
            merged.append(resolved)
            if used is not None:
                sname = plan.for_tensor(name)[0] if plan is not None else None
                used[sname or "?"] = used.get(sname or "?", 0) + 1
    ok, metadata = _three_way(
        base.metadata if base else None, ours.metadata, theirs.metadata
    )
    if not ok:
        problems.append("__metadata__: changed differently on both sides")
    if problems:
        # one conflict per line: each escaped, so a tensor name holding a newline cannot forge a line of its own
        shown = "\n  ".join(map(one_line, problems[:20])) + (f"\n  and {len(problems) - 20} more" if len(problems) > 20 else "")
        p = shlex.quote(one_line(path))  # a path with spaces still pastes into a shell
        how = (
            "to merge them, either\n"
            "  `git merge --abort`, choose a strategy for these tensors (a `tensors:` rule in .fmhub/merge.yaml, "
            "`fmhub-merge=NAME` in .gitattributes or `git config fmhub.merge.strategy NAME`; `fmhub plugins` lists them; "
            "`ours`/`theirs` keep one side's version of just those tensors) and merge again, or\n"
            f"  `fmhub merge HEAD:{p} MERGE_HEAD:{p} --base $(git merge-base HEAD MERGE_HEAD):{p} -s NAME -o {p}`, "
            f"then `git add {p}`\n"
            "(`git checkout --ours/--theirs` would keep one side's whole file, dropping the other side's changes to "
            "every other tensor of it)"
        )
        raise MergeConflict(f"{one_line(path)}: {len(problems)} tensor(s) could not be merged:\n  {shown}\n{how}", conflicts=len(problems))
    for side in (ours, theirs):
        if merged == side.tensors and metadata == side.metadata:
            return side  # reuse that side's header object: byte-identical to it
    fmt = format_named(ours.format)
    header = fmt.build_header([TensorInfo(t.name, t.dtype, t.shape, t.size) for t in merged], metadata)
    header_oid = store.write_bytes(header)
    store.flush()
    size = len(header) + sum(t.size for t in merged)
    return Manifest(ours.format, size, header_oid, len(header), merged, metadata)


def _merge_data(base: Manifest | None, ours: Manifest, theirs: Manifest, path: str) -> Manifest:
    """Datasets merge as whole files: a side that changed wins; chunks are byte ranges, not rows, so never mixed."""
    ok, sha = _three_way(base.sha256 if base else None, ours.sha256, theirs.sha256)
    if not ok:
        raise MergeConflict(
            f"{path}: the dataset changed on both sides; fmhub merges datasets as whole files. Keep one side with "
            "`git checkout --ours/--theirs` (or combine the rows yourself) and `git add` it"
        )
    return ours if sha == ours.sha256 else theirs


def _resolve(name, base, ours, theirs, store: ObjectStore, plan: MergePlan | None, fisher, problems: list[str],
             path: str = "<file>") -> TensorEntry | None:
    """Merge one tensor changed on both sides; None (with the reason in ``problems``) when it cannot be.

    A strategy reads the tensor's values, so checkout's read rule applies first: a tensor the user may not
    read is a conflict (its values are neither read nor mixed into a new object)."""
    sname, options = plan.for_tensor(name) if plan is not None else (None, {})
    if sname is None:
        problems.append(f"{name}: changed differently on both sides")
        return None
    if ours is None or theirs is None:
        problems.append(f"{name}: deleted on one side, changed on the other")
        return None
    from fmhub.governance.access import read_denials

    denied = read_denials(path, [name], via="git merge").get(name)
    if denied is not None:
        problems.append(f"{name}: {denied}")
        return None
    sides = [entry_ref(ours, store, "ours"), entry_ref(theirs, store, "theirs")]
    base_ref = entry_ref(base, store, "base") if base is not None else None
    try:
        fisher_refs = [fv.tensors.get(name) for fv in fisher] if fisher else None
        result = merge_tensor(name, base_ref, sides, strategy_named(sname), options, fisher_refs)
    except FmhubError as exc:
        problems.append(f"{name}: {exc}")
        return None
    if isinstance(result, int):
        return (ours, theirs)[result]
    data = tensors.to_bytes(result)
    return TensorEntry(name, ours.dtype, ours.shape, len(data), store.write_bytes(data))


PLAN_FILE = os.path.join(".fmhub", "merge.yaml")


def plan_for(path: str, cwd: str | None = None) -> tuple[MergePlan | None, list[CheckpointView] | None]:
    """The merge plan for ``path``: `.fmhub/merge.yaml`, the ``fmhub-merge`` attribute, ``fmhub.merge.strategy``.

    Tensor rules in the plan file win; then the attribute; then the file's
    default strategy; then git config. The plan file's ``fisher: [OURS, THEIRS]``
    names Fisher-diagonal files (work-tree paths) for the ``fisher`` strategy.
    """
    root = toplevel(cwd)
    plan_path = os.path.join(root, PLAN_FILE)
    data = load_plan_file(plan_path) if os.path.isfile(plan_path) else {}
    plan = MergePlan.from_dict(data, PLAN_FILE)
    out = git("check-attr", "fmhub-merge", "--", path, cwd=cwd, check=False).strip()
    attr = out.rsplit(": ", 1)[-1] if out else ""
    if attr not in ("", "unspecified", "unset", "set"):
        plan.strategy = attr
    if plan.strategy is None:
        plan.strategy = git("config", "--get", "fmhub.merge.strategy", cwd=cwd, check=False).strip() or None
    fisher = None
    if data.get("fisher"):
        files = data["fisher"]
        if not isinstance(files, list) or len(files) != 2:
            raise FmhubError(f"{PLAN_FILE}: `fisher` must list two files: ours, theirs")
        fisher = [from_path(f if os.path.isabs(f) else os.path.join(root, f)) for f in files]
    return plan, fisher


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def run(base_path: str, ours_path: str, theirs_path: str, pathname: str, stderr: TextIO = sys.stderr) -> int:
    """Entry point for git; returns git's merge-driver exit code (0 merged, 1 conflict)."""
    facts: dict = {}
    try:
        base_b, ours_b, theirs_b = _read(base_path), _read(ours_path), _read(theirs_path)
        facts.update(base=audit.manifest_facts(base_b)["blob"], ours=audit.manifest_facts(ours_b)["blob"], theirs=audit.manifest_facts(theirs_b)["blob"])
        for label, data in (("ours", ours_b), ("theirs", theirs_b)):
            if not is_manifest(data):
                raise MergeConflict(f"{pathname}: {label} is not an fmhub-stored checkpoint, so it cannot be merged tensor by tensor")
        base = Manifest.from_bytes(base_b, pathname) if is_manifest(base_b) else None
        ours = Manifest.from_bytes(ours_b, pathname)
        theirs = Manifest.from_bytes(theirs_b, pathname)
        plan, fisher = plan_for(pathname)
        facts["strategy"] = plan.strategy if plan is not None else None
        store = open_store()
        used: dict[str, int] = {}
        try:
            result = merge_manifests(base, ours, theirs, store, plan, pathname, fisher, used)
        finally:
            store.close()
    except FmhubError as exc:
        stderr.write(f"fmhub: merge conflict: {exc}\n" if isinstance(exc, MergeConflict) else f"fmhub: {one_line(str(exc))}\n")
        audit.record("merge", pathname, "conflict" if isinstance(exc, MergeConflict) else "error", {**facts, **audit.failure(exc)})
        return 1
    merged = result.to_bytes()
    with open(ours_path, "wb") as f:
        f.write(merged)
    audit.record("merge", pathname, "ok", {**facts, "conflicts": 0, "result": audit.manifest_facts(merged)["blob"]})
    try:
        merge_notes.record(pathname, ours_path, used)  # the line the merge commit's message gets
    except (FmhubError, OSError) as exc:
        stderr.write(f"fmhub: the merge commit's message will not say which strategies merged {one_line(pathname)}: "
                     f"{one_line(str(exc))}\n")
    return 0

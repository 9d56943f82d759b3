"""git merge driver (``merge.fmhub.driver``): three-way merge of manifests, tensor by tensor.

git calls ``fmhub merge-driver %O %A %B %P`` with the manifests of the merge
base, ours and theirs; the result goes into %A. A tensor changed on one side
takes that side; identical changes are kept; a tensor changed differently on
both sides goes to the merge strategy chosen for the path, and without one it
is a conflict: %A is left as ours, every conflicting tensor is named, and git
records the path as conflicted (``git merge --abort`` restores everything).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from fmhub import host
from fmhub.checkpoint import format_named
from fmhub.errors import FmhubError, MergeConflict
from fmhub.interfaces import TensorInfo
from fmhub.manifest import Manifest, TensorEntry, is_manifest
from fmhub.repo import git, open_store
from fmhub.store import ObjectStore

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
    strategy: Any = None,
    path: str = "<file>",
) -> Manifest:
    """The merged manifest; raises MergeConflict naming every tensor that could not be merged."""
    if ours.format != theirs.format:
        raise MergeConflict(f"{path}: cannot merge a {ours.format} file with a {theirs.format} file")
    b_t = base.by_name() if base else {}
    o_t, t_t = ours.by_name(), theirs.by_name()
    names = list(o_t) + [n for n in t_t if n not in o_t]
    merged: list[TensorEntry] = []
    conflicts: list[str] = []
    for name in names:
        ok, key = _three_way(_key(b_t.get(name)), _key(o_t.get(name)), _key(t_t.get(name)))
        if ok:
            if key is not None:
                merged.append(o_t[name] if _key(o_t.get(name)) == key else t_t[name])
            continue
        resolved = _resolve(name, b_t.get(name), o_t.get(name), t_t.get(name), store, strategy)
        if resolved is None:
            conflicts.append(name)
        else:
            merged.append(resolved)
    ok, metadata = _three_way(
        base.metadata if base else None, ours.metadata, theirs.metadata
    )
    if not ok:
        conflicts.append("__metadata__")
    if conflicts:
        shown = ", ".join(conflicts[:10]) + (f" and {len(conflicts) - 10} more" if len(conflicts) > 10 else "")
        how = (
            "set a merge strategy (`fmhub-merge=NAME` in .gitattributes or `git config fmhub.merge.strategy NAME`; "
            "`fmhub plugins` lists them), or keep one side with `git checkout --ours/--theirs` and `git add`"
        )
        if strategy is not None:
            how = f"strategy {strategy.name!r} could not combine them (a tensor deleted on one side, or dtype/shape differ); " + how
        raise MergeConflict(f"{path}: {len(conflicts)} tensor(s) changed differently on both sides: {shown}; {how}")
    for side in (ours, theirs):
        if merged == side.tensors and metadata == side.metadata:
            return side  # reuse that side's header object: byte-identical to it
    fmt = format_named(ours.format)
    header = fmt.build_header([TensorInfo(t.name, t.dtype, t.shape, t.size) for t in merged], metadata)
    header_oid = store.write_bytes(header)
    store.flush()
    size = len(header) + sum(t.size for t in merged)
    return Manifest(ours.format, size, header_oid, len(header), merged, metadata)


def _resolve(name, base, ours, theirs, store: ObjectStore, strategy) -> TensorEntry | None:
    if strategy is None or ours is None or theirs is None:
        return None
    if (ours.dtype, ours.shape) != (theirs.dtype, theirs.shape):
        return None
    sides = [ours, theirs]
    load = lambda i: _load_tensor(store, sides[i])  # noqa: E731
    load_base = (lambda: _load_tensor(store, base)) if base is not None else None
    result = strategy.merge(name, load_base, load, 2, {})
    if isinstance(result, int):
        return sides[result]
    data = _tensor_bytes(result, ours)
    oid = store.write_bytes(data)
    return TensorEntry(name, ours.dtype, ours.shape, len(data), oid)


def _load_tensor(store: ObjectStore, entry: TensorEntry):
    import torch
    from safetensors.torch import _TYPES

    data = bytearray(store.read_bytes(entry.oid))
    return torch.frombuffer(data, dtype=_TYPES[entry.dtype]).reshape(entry.shape) if data else torch.empty(entry.shape, dtype=_TYPES[entry.dtype])


def _tensor_bytes(tensor, like: TensorEntry) -> bytes:
    if tuple(tensor.shape) != like.shape:
        raise FmhubError(f"merge strategy returned shape {tuple(tensor.shape)} for a {like.shape} tensor")
    import torch

    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def strategy_for(path: str, cwd: str | None = None) -> Any:
    out = git("check-attr", "fmhub-merge", "--", path, cwd=cwd, check=False).strip()
    name = out.rsplit(": ", 1)[-1] if out else ""
    if name in ("", "unspecified", "unset", "set"):
        name = git("config", "--get", "fmhub.merge.strategy", cwd=cwd, check=False).strip()
    return host.lookup("merge-strategy", name) if name else None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def run(base_path: str, ours_path: str, theirs_path: str, pathname: str, stderr: TextIO = sys.stderr) -> int:
    """Entry point for git; returns git's merge-driver exit code (0 merged, 1 conflict)."""
    try:
        base_b, ours_b, theirs_b = _read(base_path), _read(ours_path), _read(theirs_path)
        for label, data in (("ours", ours_b), ("theirs", theirs_b)):
            if not is_manifest(data):
                raise MergeConflict(f"{pathname}: {label} is not an fmhub-stored checkpoint, so it cannot be merged tensor by tensor")
        base = Manifest.from_bytes(base_b, pathname) if is_manifest(base_b) else None
        ours = Manifest.from_bytes(ours_b, pathname)
        theirs = Manifest.from_bytes(theirs_b, pathname)
        store = open_store()
        try:
            result = merge_manifests(base, ours, theirs, store, strategy_for(pathname), pathname)
        finally:
            store.close()
    except FmhubError as exc:
        stderr.write(f"fmhub: merge conflict: {exc}\n" if isinstance(exc, MergeConflict) else f"fmhub: {exc}\n")
        return 1
    with open(ours_path, "wb") as f:
        f.write(result.to_bytes())
    return 0

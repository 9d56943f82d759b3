"""Checkpoints in the work tree and at revisions: describe them, materialize manifests left in place."""

from __future__ import annotations

import hashlib
import os

from fmhub.base.atomic import atomic_write
from fmhub.base.errors import CorruptCheckpoint, FmhubError
from fmhub.core import checkpoint
from fmhub.core.formats import SNIFF_BYTES
from fmhub.base.gitrun import run
from fmhub.core.manifest import MAX_MANIFEST_BYTES, Manifest, TensorEntry, is_manifest
from fmhub.core.repo import blob_at, git, open_store, toplevel
from fmhub.governance.access import check_smudge


def describe(path: str, rev: str | None = None) -> Manifest:
    """The manifest of a checkpoint: committed at ``rev``, or in the work tree (read, not stored)."""
    if rev is not None:
        data = blob_at(rev, path)
        if not is_manifest(data):
            raise FmhubError(f"{path} at {rev} is not stored by fmhub (is it tracked? see `fmhub track`)")
        return Manifest.from_bytes(data, path)
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        if is_manifest(head):
            return Manifest.from_bytes(head + f.read(MAX_MANIFEST_BYTES), path)
        try:
            fmt, layout = checkpoint.file_layout(f, path)
        except CorruptCheckpoint as exc:
            raise FmhubError(str(exc)) from None
    size = os.path.getsize(path)
    tensors = [TensorEntry(t.name, t.dtype, t.shape, t.size, "") for t in layout.tensors]
    return Manifest(fmt.name, size, "", len(layout.header), tensors, layout.metadata)


def tracked_files(cwd: str | None = None) -> list[str]:
    """Files in the index whose filter attribute is fmhub."""
    top = toplevel(cwd)
    files = git("ls-files", "-z", cwd=top).split("\0")
    files = [f for f in files if f]
    if not files:
        return []
    out = run(("check-attr", "-z", "--stdin", "filter"), cwd=top, input="\0".join(files) + "\0").stdout.split("\0")
    return [out[i] for i in range(0, len(out) - 2, 3) if out[i + 2] == "fmhub"]


def materialize(paths: list[str] | None = None, cwd: str | None = None) -> list[str]:
    """Replace work-tree files that hold a manifest with the checkpoint it describes; returns those paths.

    Checkout's read rule applies, from the policy at the top of *this* work
    tree (``cwd``'s: a new clone's own, `fmhub hub clone`), not the current
    directory's: a denied file raises `fmhub.governance.access.AccessDenied`; a
    placeholder keeps its manifest text, as checkout would write it.
    """
    top = toplevel(cwd)
    candidates = paths if paths is not None else tracked_files(top)
    store = open_store(top)
    done: list[str] = []
    blob_ids: dict[str, str] = {}
    for rel in candidates:
        full = rel if os.path.isabs(rel) else os.path.join(top, rel)
        if not os.path.isfile(full):  # `git clone --no-checkout`, or a deleted file: git writes it, not fmhub
            raise FmhubError(f"{rel}: not in the work tree; `git checkout -- {rel}` writes it (the filter checks it out)")
        with open(full, "rb") as f:
            data = f.read(len(b"fmhub manifest "))
            if not is_manifest(data):
                continue
            data += f.read(MAX_MANIFEST_BYTES)  # more is refused by from_bytes, unread
        with atomic_write(full) as out:  # the policy at ``top`` decides, as checkout in that tree would
            placeholder = checkpoint.smudge(data, store, out, _relative(full, top), root=top,
                                              access=check_smudge)
        if placeholder:
            continue  # the manifest text is what checkout writes, and it was there already
        blob_ids[rel] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        done.append(rel)
    if done:
        # git trusts a changed file size over content, so it would call these files modified;
        # re-index the ones whose manifest is what the index already holds (the content is unchanged).
        staged = {line.split("\t", 1)[1]: line.split()[1] for line in git("ls-files", "-s", "--", *done, cwd=top).splitlines()}
        same = [p for p in done if staged.get(p) == blob_ids.get(p)]
        if same:
            git("update-index", "-q", "--", *same, cwd=top)
    return done


def _relative(full: str, top: str) -> str:
    """``full``'s path in the repository at ``top``, as policy rules match it (a path outside it is refused)."""
    real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(full))), os.path.basename(full))
    rel = os.path.relpath(real, os.path.realpath(top)).replace(os.sep, "/")
    if rel.startswith("../"):
        raise FmhubError(f"{full}: is outside the repository at {top}")
    return rel




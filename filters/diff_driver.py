"""git diff driver (``diff.fmhub.command`` and ``diff.fmhub.textconv``): semantic checkpoint diffs.

``git diff`` (and ``git log -p --ext-diff`` / ``git show --ext-diff``) run
``fmhub diff-driver`` with git's seven arguments::

    PATH OLD-FILE OLD-HEX OLD-MODE NEW-FILE NEW-HEX NEW-MODE [NEW-PATH XFRM-MSG]

git hands over each side as a temp file it has already smudged, i.e. the whole
checkpoint. The driver ignores that file whenever the side's blob is a manifest
it can read from the repository by its hex: then tensors are matched by oid
and only changed tensors are read, from the object store. A work-tree side that
differs from the index comes with an all-zero hex; that one is read from the
file itself (bytes by offset). A missing side (``/dev/null``) is empty.

``git log -p`` and ``git show`` (without ``--ext-diff``) use the textconv
instead: ``fmhub textconv FILE`` prints one line per tensor (name, dtype,
shape, short sha256, norm, mean, std), so a changed tensor shows as a -/+ pair;
``diff.fmhub.cachetextconv`` keeps git from recomputing it per blob.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence, TextIO

from fmhub.errors import FmhubError
from fmhub.manifest import Manifest, is_manifest

_NULL_HEXES = {"", ".", "0" * 40, "0" * 64}


def _side(filename: str, hexid: str, path: str, blobs, store_opener):
    """One side as a CheckpointView (empty when the file does not exist on that side)."""
    from fmhub.diff import CheckpointView

    if filename == "/dev/null" or (hexid == "." and not os.path.exists(filename)):
        return CheckpointView.empty(path)
    if hexid not in _NULL_HEXES:
        data = blobs().get(hexid)
        if data is not None and is_manifest(data):
            return CheckpointView.from_manifest(Manifest.from_bytes(data, path), store_opener(), path)
    return CheckpointView.from_file(filename, path, store_opener())


def diff(args: Sequence[str], out: TextIO) -> None:
    from fmhub.diff import GitBlobs, diff_views, format_text
    from fmhub.repo import open_store

    path = args[0]
    if len(args) < 7:  # git passes only the path for an unmerged entry
        out.write(f"diff --fmhub a/{path} b/{path}\n* unmerged: resolve the conflict, then diff again\n")
        return
    old_file, old_hex, _old_mode, new_file, new_hex, _new_mode = args[1:7]
    new_path = args[7] if len(args) >= 9 else path
    cache: dict[str, object] = {}

    def blobs():
        if "blobs" not in cache:
            cache["blobs"] = GitBlobs()
        return cache["blobs"]

    def store():
        if "store" not in cache:
            cache["store"] = open_store(create=False)
        return cache["store"]

    try:
        old = _side(old_file, old_hex, path, blobs, store)
        new = _side(new_file, new_hex, new_path, blobs, store)
    finally:
        if "blobs" in cache:
            cache["blobs"].close()
    out.write(f"diff --fmhub a/{path} b/{new_path}\n")
    out.write(format_text(diff_views(old, new), new_path, metadata=(old.metadata, new.metadata)))


def run(args: Sequence[str], out: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """Entry point for git. Always 0 after printing: git stops the whole diff when a driver fails, so an
    error is reported in the output (and on stderr) for this file only."""
    try:
        diff(args, out)
    except (FmhubError, OSError) as exc:
        path = args[0] if args else "?"
        out.write(f"diff --fmhub a/{path} b/{path}\n! fmhub could not diff this file: {exc}\n")
        stderr.write(f"fmhub: {exc}\n")
    out.flush()
    return 0


def textconv(filename: str, out: TextIO = sys.stdout) -> int:
    """``diff.fmhub.textconv``: a per-tensor summary of one side."""
    from fmhub.diff import textconv as lines
    from fmhub.repo import open_store

    def store():
        try:
            return open_store(create=False)
        except FmhubError:
            return None

    try:
        for line in lines(filename, store):
            out.write(line + "\n")
    except FmhubError as exc:
        sys.stderr.write(f"fmhub: {exc}\n")
        return 1
    out.flush()
    return 0

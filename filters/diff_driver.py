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
a side that is a Git LFS pointer (committed before ``fmhub track`` replaced
``filter=lfs``) is read through its LFS object, so it compares by content;
``diff.fmhub.cachetextconv`` keeps git from recomputing it per blob.

Datasets (jsonl, parquet: `fmhub.core.datafile`) are diffed by rows instead
(`fmhub.data.rowdiff`): counts of rows added, removed and changed, and a few
sample rows; their textconv lists one line per row.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence, TextIO

from fmhub.base.errors import FmhubError, one_line
from fmhub.core.manifest import Manifest, is_manifest

_NULL_HEXES = {"", ".", "0" * 40, "0" * 64}


GIT_DIFF = "git diff"  # the reader, in the audit log's records of read decisions


def _side(filename: str, hexid: str, path: str, blobs, store_opener):
    """One side as a CheckpointView (empty when the file does not exist on that side); tensors the read policy
    denies the user are withheld (`fmhub.models.views.guard`: git runs the driver at the top of the work tree)."""
    from fmhub.models.views import CheckpointView, guard, lfs_object, lfs_pointer_in

    if filename == "/dev/null" or (hexid == "." and not os.path.exists(filename)):
        return CheckpointView.empty(path)
    if hexid not in _NULL_HEXES:
        data = blobs().get(hexid)
        if data is not None and is_manifest(data):
            return guard(CheckpointView.from_manifest(Manifest.from_bytes(data, path), store_opener(), path), path, via=GIT_DIFF)
        pointer = lfs_pointer_in(data) if data is not None else None
        if pointer is not None:  # committed while git-lfs stored it: read through its LFS object, by content
            return CheckpointView.from_file(lfs_object(pointer, store_opener(), path), path)
    return guard(CheckpointView.from_file(filename, path, store_opener()), path, via=GIT_DIFF)


_ABSENT = "absent"


def _data_side(filename: str, hexid: str, path: str, blobs, store_opener):
    """One side as a `fmhub.core.datafile.DataSide` when it is a dataset; _ABSENT when the file does not exist on
    that side; None when it is something else (a checkpoint). Rows are read from git's smudged temp file;
    a manifest in the repository supplies the sha256, so equal versions are not read at all."""
    from fmhub.core.datafile import side_from_file

    if filename == "/dev/null" or (hexid == "." and not os.path.exists(filename)):
        return _ABSENT
    manifest = None
    if hexid not in _NULL_HEXES:
        data = blobs().get(hexid)
        if data is not None and is_manifest(data):
            manifest = Manifest.from_bytes(data, path)
            if not manifest.is_data:
                return None
    side = side_from_file(filename, path, store_opener)
    if side is not None and manifest is not None:
        side.sha256, side.chunk_oids = manifest.sha256, tuple(t.oid for t in manifest.tensors)
    from fmhub.models.diffsides import guard_data

    return guard_data(side, path, via=GIT_DIFF)


def _diff_data(path: str, new_path: str, old, new, out: TextIO) -> None:
    from fmhub.data.rowdiff import diff_data, format_data_text, key_attribute

    change = diff_data(old if old is not _ABSENT else None, new if new is not _ABSENT else None, key_attribute(new_path), new_path)
    out.write(f"diff --fmhub a/{path} b/{new_path}\n")
    out.write(format_data_text(change))


def diff(args: Sequence[str], out: TextIO) -> None:
    from fmhub.models.diff import diff_views
    from fmhub.models.diffsides import GitBlobs
    from fmhub.models.difftext import format_text
    from fmhub.core.repo import open_store

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
        old_data = _data_side(old_file, old_hex, path, blobs, store)
        new_data = _data_side(new_file, new_hex, new_path, blobs, store)
        if any(s is not None and s is not _ABSENT for s in (old_data, new_data)):
            return _diff_data(path, new_path, old_data, new_data, out)
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
        out.write(f"diff --fmhub a/{path} b/{path}\n! fmhub could not diff this file: {one_line(str(exc))}\n")
        stderr.write(f"fmhub: {one_line(str(exc))}\n")
    out.flush()
    return 0


def textconv(filename: str, out: TextIO = sys.stdout) -> int:
    """``diff.fmhub.textconv``: a per-tensor summary of one side (one line per row for a dataset)."""
    from fmhub.core.datafile import side_from_file
    from fmhub.models.textconv import textconv as lines
    from fmhub.core.repo import open_store

    def store():
        try:
            return open_store(create=False)
        except FmhubError:
            return None

    try:
        # git names its temp file after the path (…_data.jsonl), so a dataset is recognised by its name too
        data = side_from_file(filename, filename, store)
        if data is not None:
            from fmhub.data.rowdiff import textconv_lines
            from fmhub.models.diffsides import withhold_rows
            from fmhub.models.textconv import textconv_withheld

            note = textconv_withheld("rows")
            if note is not None:  # the file or its manifest alike (the manifest's sha256 is the file's): git shares it
                from dataclasses import replace

                from fmhub.core.store import file_sha256

                data = withhold_rows(replace(data, sha256=data.sha256 or file_sha256(filename)), note)

            for line in textconv_lines(data):
                out.write(line + "\n")
            out.flush()
            return 0
        for line in lines(filename, store):
            out.write(line + "\n")
    except FmhubError as exc:
        sys.stderr.write(f"fmhub: {one_line(str(exc))}\n")
        return 1
    out.flush()
    return 0

"""The two sides of ``fmhub diff``, read out of git: at a revision, in the index, or in the work tree.

A `Side` holds the fmhub-tracked files under some paths: checkpoints as views
(`fmhub.models.views.CheckpointView`), datasets as `fmhub.core.datafile.DataSide`.
Committed and staged manifests are read by blob id through one `GitBlobs`
(``git cat-file`` processes started once); a work-tree file git says is
unmodified is read from its staged manifest, any other from disk. Tensors and
rows the read policy denies the user are withheld (`fmhub.models.views.guard`,
`guard_data`), as checkout would. `diff_sides` compares the checkpoints of two
sides directory by directory (`fmhub.models.diff`); `load_sides` and
`diff_revisions` are what the command runs.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from fmhub.base import gitrun
from fmhub.base.errors import FmhubError
from fmhub.core.formats import data_format_for
from fmhub.core.manifest import MAX_MANIFEST_BYTES, Manifest, is_manifest
from fmhub.core.store import ObjectStore
from fmhub.models.diff import TensorChange, diff_views, withheld_note
from fmhub.models.tensorstats import CHUNK_ELEMS
from fmhub.models.views import CheckpointView, guard, lfs_object, lfs_pointer_in


class GitBlobs:
    """Blobs by id through ``git cat-file`` processes started once (sizes first, so a big blob is never read)."""

    def __init__(self, cwd: str | None = None) -> None:
        self._cwd = cwd
        self._procs: dict[str, subprocess.Popen] = {}

    def _proc(self, mode: str) -> subprocess.Popen:
        if mode not in self._procs:
            self._procs[mode] = gitrun.start(["cat-file", mode], cwd=self._cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL)
        return self._procs[mode]

    def _ask(self, mode: str, spec: str) -> list[bytes]:
        proc = self._proc(mode)
        proc.stdin.write(spec.encode() + b"\n")
        proc.stdin.flush()
        return proc.stdout.readline().split()

    def get(self, spec: str, limit: int = MAX_MANIFEST_BYTES) -> bytes | None:
        """The blob's bytes; None when it is missing, not a blob, or over ``limit`` bytes (a raw checkpoint
        committed before tracking is not read)."""
        head = self._ask("--batch-check", spec)
        if len(head) != 3 or head[1] != b"blob" or int(head[2]) > limit:  # "<spec> missing", a tree, too big
            return None
        head = self._ask("--batch", head[0].decode())
        if len(head) != 3:
            return None
        n = int(head[2])
        out = self._proc("--batch").stdout
        parts, got = [], 0
        while got < n:
            part = out.read(min(n - got, 1 << 20))
            if not part:
                raise FmhubError("git cat-file stopped early")
            parts.append(part)
            got += len(part)
        out.read(1)  # the newline after the contents
        return b"".join(parts)

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait()
        self._procs.clear()

    def __enter__(self) -> "GitBlobs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _git(args: Sequence[str], cwd: str, input: str | None = None) -> str:
    return gitrun.run(args, cwd=cwd, input=input).stdout


def _fmhub_paths(paths: list[str], top: str) -> list[str]:
    """The paths (relative to ``top``) whose ``filter`` attribute is fmhub."""
    if not paths:
        return []
    out = _git(["check-attr", "-z", "--stdin", "filter"], top, "\0".join(paths) + "\0").split("\0")
    return [out[i] for i in range(0, len(out) - 2, 3) if out[i + 2] == "fmhub"]


def _zsplit(text: str) -> list[str]:
    return [p for p in text.split("\0") if p]


DIFF_VIA = "fmhub diff"  # the reader, in the audit log's records of read decisions


def guard_data(side: Any, path: str, root: str | None = None, via: str = DIFF_VIA) -> Any:
    """A dataset side (`fmhub.core.datafile.DataSide`) read from the store, its rows withheld when the read policy
    denies the user the file (checkout would); a file on disk (no chunk oids) is the user's already."""
    if side is None or not getattr(side, "chunk_oids", ()):
        return side
    from fmhub.governance.access import read_denials

    denied = read_denials(path, (), root, via)
    return withhold_rows(side, denied[""]) if denied else side


def withhold_rows(side: Any, why: Exception | str) -> Any:
    """``side`` whose rows cannot be read: diffs and textconv then show sizes and hashes, and the note why
    (``why``: the denial, or the note itself)."""
    from dataclasses import replace

    from fmhub.base.errors import UnreadableRows

    note = why if isinstance(why, str) else withheld_note(why, "rows")

    def refuse():
        raise UnreadableRows(note)

    return replace(side, opener=refuse)


@dataclass
class Side:
    """The fmhub-tracked files of one side of `fmhub diff`: checkpoints as views, datasets as `DataSide`, by path."""

    label: str
    files: dict[str, CheckpointView]
    data: dict[str, Any] = field(default_factory=dict)  # path -> fmhub.core.datafile.DataSide


def resolve_rev(rev: str, top: str) -> str:
    proc = gitrun.run(["rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=top, check=False)
    if proc.returncode != 0:
        raise FmhubError(f"unknown revision {rev!r}")
    return proc.stdout.strip()


def side_at_rev(rev: str, pathspecs: list[str], top: str, store: ObjectStore, blobs: GitBlobs) -> Side:
    """Checkpoints committed at ``rev`` under ``pathspecs`` (attributes as in the work tree)."""
    sha = resolve_rev(rev, top)
    entries = {}
    for rec in _zsplit(_git(["ls-tree", "-r", "-z", "--full-tree", sha, "--", *pathspecs], top)):
        meta, _, path = rec.partition("\t")
        mode, kind, oid = meta.split()
        if kind == "blob":
            entries[path] = oid
    files, datasets = {}, {}
    for path in _fmhub_paths(list(entries), top):
        data = blobs.get(entries[path])
        if data is not None and is_manifest(data):
            m = Manifest.from_bytes(data, f"{rev}:{path}")
            if m.is_data:
                from fmhub.core.datafile import DataSide

                datasets[path] = guard_data(DataSide.from_manifest(m, store, path), path, top)
            else:
                files[path] = guard(CheckpointView.from_manifest(m, store, path), path, top, DIFF_VIA)
        elif data is not None and (pointer := lfs_pointer_in(data)) is not None and data_format_for(path, b"") is None:
            # a checkpoint committed while git-lfs stored it: read through its LFS object, by content
            files[path] = CheckpointView.from_file(lfs_object(pointer, store, f"{rev}:{path}"), path)
    return Side(rev, files, datasets)


def side_in_worktree(pathspecs: list[str], top: str, store: ObjectStore, blobs: GitBlobs) -> Side:
    """Checkpoints in the work tree under ``pathspecs``: a file git's index says is unmodified is read from
    its staged manifest (no file read); any other is read from disk."""
    listed = _zsplit(_git(["ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *pathspecs], top))
    staged: dict[str, str] = {}
    for rec in _zsplit(_git(["ls-files", "-s", "-z", "--", *pathspecs], top)):
        meta, _, path = rec.partition("\t")
        mode, oid, stage = meta.split()
        if stage == "0":
            staged[path] = oid
    dirty = set(_zsplit(_git(["diff-files", "-z", "--name-only", "--", *pathspecs], top)))
    from fmhub.core.datafile import DataSide, side_from_file

    files, datasets = {}, {}
    for path in _fmhub_paths(sorted(set(listed)), top):
        full = os.path.join(top, path)
        if not os.path.isfile(full):
            continue
        if path in staged and path not in dirty:
            data = blobs.get(staged[path])
            if data is not None and is_manifest(data):
                m = Manifest.from_bytes(data, path)
                if m.is_data:
                    datasets[path] = guard_data(DataSide.from_manifest(m, store, path), path, top)
                else:
                    files[path] = guard(CheckpointView.from_manifest(m, store, path), path, top, DIFF_VIA)
                continue
        side = side_from_file(full, path, lambda: store)
        if side is not None:
            datasets[path] = guard_data(side, path, top)  # a file still holding a manifest is read from the store
        else:
            files[path] = guard(CheckpointView.from_file(full, path, store), path, top, DIFF_VIA)
    return Side("work tree", files, datasets)


def group_by_checkpoint(files: Mapping[str, CheckpointView]) -> dict[str, CheckpointView]:
    """Files of one directory are one checkpoint (shards, or a model next to its adapter): tensors by name."""
    groups: dict[str, list[CheckpointView]] = {}
    for path in sorted(files):
        groups.setdefault(os.path.dirname(path), []).append(files[path])
    out = {}
    for d, views in groups.items():
        label = d or "."
        if len(views) == 1:
            v = views[0]
            out[d] = CheckpointView(v.tensors, v.metadata, v.path)
        else:
            out[d] = CheckpointView.combine(views, label + "/")
    return out


def diff_sides(old: Side, new: Side, chunk_elems: int = CHUNK_ELEMS) -> list[TensorChange]:
    """Tensor changes of every checkpoint (directory) on either side; shards matched by tensor name."""
    og, ng = group_by_checkpoint(old.files), group_by_checkpoint(new.files)
    changes: list[TensorChange] = []
    for d in sorted(set(og) | set(ng)):
        changes += diff_views(og.get(d, CheckpointView.empty()), ng.get(d, CheckpointView.empty()), chunk_elems)
    return changes


def diff_revisions(
    revs: Sequence[str], paths: Sequence[str] = (), cwd: str | None = None, chunk_elems: int = CHUNK_ELEMS
) -> tuple[str, str, list[TensorChange]]:
    """`fmhub diff`: no rev, HEAD vs the work tree; one rev, REV vs the work tree; two, REV1 vs REV2.

    ``paths`` are relative to ``cwd``, as on git's command line. Returns (old label, new label, changes).
    """
    _top, old, new = load_sides(revs, paths, cwd)
    return old.label, new.label, diff_sides(old, new, chunk_elems)


def load_sides(revs: Sequence[str], paths: Sequence[str] = (), cwd: str | None = None) -> tuple[str, Side, Side]:
    """The two sides `diff_revisions` compares, and the repository's top directory."""
    from fmhub.core.repo import open_store, toplevel

    if len(revs) > 2:
        raise FmhubError("give at most two revisions")
    cwd = os.path.abspath(cwd or os.getcwd())
    top = toplevel(cwd)
    pathspecs = [os.path.relpath(os.path.abspath(os.path.join(cwd, p)), top) for p in paths]
    if any(p == ".." or p.startswith(".." + os.sep) for p in pathspecs):
        raise FmhubError("a path is outside the repository")
    pathspecs = [p.replace(os.sep, "/") for p in pathspecs] or ["."]
    store = open_store(top, create=False)
    with GitBlobs(top) as blobs:
        old = side_at_rev(revs[0] if revs else "HEAD", pathspecs, top, store, blobs)
        new = side_at_rev(revs[1], pathspecs, top, store, blobs) if len(revs) == 2 else side_in_worktree(pathspecs, top, store, blobs)
    if paths and not (old.files or old.data or new.files or new.data):
        for path, spec in zip(paths, pathspecs):
            if not _matches_anything(spec, revs, top):
                raise FmhubError(f"{path}: matches no file at {old.label} or {new.label} (check the path)")
    return top, old, new


def _matches_anything(spec: str, revs: Sequence[str], top: str) -> bool:
    """Whether a pathspec names something in the work tree, the index, or the tree of one of ``revs`` (default HEAD)."""
    if os.path.exists(os.path.join(top, spec)) or _git(["ls-files", "-z", "--", spec], top):
        return True
    return any(_git(["ls-tree", "-r", "-z", "--name-only", "--full-tree", rev, "--", spec], top) for rev in (revs or ["HEAD"]))

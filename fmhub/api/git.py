"""The repository commands: ``install``, ``uninstall``, ``track``, ``untrack``, ``fetch``, ``push-objects``, ``ls``,
``checkout``, ``fsck``, ``gc`` and ``repack`` (`fmhub.git`), as functions."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from fmhub.base.errors import FmhubError


@dataclass
class Installed:
    """What `install` wrote: the git config entries and, for a repository, the pre-push and pre-commit hooks."""

    config: dict[str, str]
    pre_push_hook: Optional[str]
    pre_commit_hook: Optional[str] = None
    command: str = ""  # how git starts fmhub: each command entry is it and a subcommand


def install(global_: bool = False, command: Optional[str] = None) -> Installed:
    """Register fmhub's filter, diff and merge drivers with git (this repository's config, or the user's)."""
    from fmhub.git import install as inst

    command = command or inst.default_command()
    cfg = inst.install(global_, command)
    if global_:
        return Installed(cfg, None, None, command)
    return Installed(cfg, inst.pre_push_path(), inst.pre_commit_path(), command)


def uninstall(global_: bool = False) -> None:
    """Remove fmhub's drivers from git config (objects and .gitattributes stay)."""
    from fmhub.git import install as inst

    inst.uninstall(global_)


def tracked_patterns() -> list[str]:
    """The patterns .gitattributes routes through fmhub."""
    from fmhub.git import install as inst

    return list(inst.tracked_patterns())


@dataclass
class Tracked:
    """What `track` did: the .gitattributes lines it replaced; why it installed fmhub's filter first (None: it was
    in place; "missing": not installed, so `git add` would have stored the files raw; "stale": the recorded Python is
    gone); the files already staged raw at the tracked paths (`git add --renormalize` stores them through fmhub)."""

    replaced: list[str]
    installed: Optional[str] = None
    raw_staged: list[str] = field(default_factory=list)


def track(patterns: Sequence[str]) -> Tracked:
    """Route files matching ``patterns`` through fmhub (writes .gitattributes), installing fmhub's filter in this
    repository first when it is not (as `install` does): without it, `git add` would commit the raw checkpoints."""
    from fmhub.git import fsck as fsck_mod, install as inst

    installed = inst.ensure_installed()
    replaced = list(inst.track(list(patterns)))
    return Tracked(replaced, installed, fsck_mod.staged_raw_checkpoints())


def untrack(patterns: Sequence[str]) -> list[str]:
    """Stop routing ``patterns`` through fmhub; the patterns dropped."""
    from fmhub.git import install as inst

    return list(inst.untrack(list(patterns)))


def remote_and_revs(args: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """[REMOTE] [REV...]: the first word is a remote when one of that name is configured (as `git lfs fetch` reads it)."""
    from fmhub.git import sync

    args = list(args)
    if args and args[0] in sync.remote_names():
        return args[0], args[1:]
    return None, args


def fetch(args: Sequence[str] = ()):
    """Download every tensor object the checkpoints committed at the REVs of ``[REMOTE] [REV...]`` (default HEAD) need."""
    from fmhub.git import sync

    remote, revs = remote_and_revs(args)
    return sync.fetch(remote, revs or ["HEAD"])


def push_objects(args: Sequence[str] = (), all_: bool = False):
    """Upload the tensor objects of ``[REMOTE] [REV...]``'s history (default HEAD; ``all_``: every branch and tag)
    that the server lacks."""
    from fmhub.git import sync

    remote, revs = remote_and_revs(args)
    return sync.push_objects(remote or sync.default_remote(), (["--all"] if all_ else []) + (revs or ([] if all_ else ["HEAD"])))


def describe(path: str, rev: Optional[str] = None):
    """The tensors of a checkpoint in the work tree, or as committed at ``rev`` (`fmhub.git.worktree.describe`)."""
    from fmhub.git import worktree

    try:
        return worktree.describe(path, rev)
    except OSError as exc:  # a missing file, a directory, no permission: one line, not a traceback
        why = "no such file" if isinstance(exc, FileNotFoundError) else (exc.strerror or type(exc).__name__).lower()
        raise FmhubError(f"{path}: {why}") from None


@dataclass
class CheckedOut:
    """What `checkout` wrote, and why it installed fmhub's filter first (None: it was in place; see `Tracked`)."""

    paths: list[str]
    installed: Optional[str] = None


def checkout(paths: Sequence[str] = ()) -> CheckedOut:
    """Turn work-tree files that are still manifests into checkpoints, downloading only what the store lacks,
    installing fmhub's filter first when it is not (a clone made without fmhub: else `git add` would commit the
    checkpoints raw, and git would see them as modified)."""
    from fmhub.base.errors import MissingObject
    from fmhub.git import install as inst, sync, worktree

    installed = inst.ensure_installed() if worktree.tracked_files() else None
    reason = None
    try:
        reason = sync.prefetch_index(tuple(paths))
        return CheckedOut(list(worktree.materialize(list(paths) or None)), installed)
    except MissingObject as exc:
        if reason:
            raise MissingObject(f"{exc}; downloading them failed: {reason}") from None
        raise


def fsck(rev: str = "HEAD"):
    """Verify the object store: every object's hash, and the objects ``rev`` needs (problems are in the report)."""
    from fmhub.git import fsck as fsck_mod

    return fsck_mod.fsck(rev)


def gc(grace: float = 3600.0, dry_run: bool = False):
    """Delete store objects that no commit and no staged file refers to (younger than ``grace`` seconds stay)."""
    from fmhub.git import gc as collect

    return collect.gc(grace_s=grace, dry_run=dry_run)


def repack(dry_run: bool = False):
    """Store old tensor versions as deltas against newer ones."""
    from fmhub.git import repack as packer

    return packer.repack(dry_run=dry_run)


def split_revs_paths(args: Sequence[str], paths_from: Optional[int] = None) -> tuple[list[str], list[str]]:
    """``[REV1] [REV2] [PATH...]`` -> (revisions, paths).

    ``paths_from``: where the words given after ``--`` start (all of them are paths); otherwise leading words
    that name commits are revisions (two at most) and the rest must be paths in the work tree.
    """
    from fmhub.core.repo import git

    args = list(args)
    if paths_from is not None and 0 <= paths_from <= len(args):
        return args[:paths_from], args[paths_from:]
    revs: list[str] = []
    for a in args:
        if len(revs) == 2 or not git("rev-parse", "--verify", "--quiet", f"{a}^{{commit}}", check=False).strip():
            break
        revs.append(a)
    for p in args[len(revs):]:
        if not os.path.exists(p):
            raise FmhubError(f"{p!r} is neither a revision nor a path in the work tree; put paths after '--'")
    return revs, args[len(revs):]

"""`fmhub gc`: delete store objects that nothing in the repository refers to any more.

An object is kept when any manifest or git-lfs pointer refers to it in: any
commit reachable from a ref or a reflog entry (branches, tags, stash, remote
branches, and what `git reflog` can still bring back), or the index (staged,
not yet committed). For a manifest "refers to" means every object it needs:
header, whole tensors, and every root and delta of a chain (`Manifest.oids`).
The object store is shared with git-lfs, hence its pointers count too.
A packed object (`fmhub repack`) that is kept keeps the objects it is a
delta against, down to the whole object at the end of its chain, even when
nothing else refers to them.

Objects younger than the grace period are kept whatever refers to them: a
clean filter running right now may have written objects its manifest has not
yet been staged for. Like `git gc`, this cannot know about other clones that
borrow from this store (`fmhub.core.repo.local_remote_stores`); run it where no
clone borrows, or fetch in those clones first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from fmhub.base.errors import CorruptObject, FmhubError, ManifestError
from fmhub.core.manifest import Manifest, is_manifest
from fmhub.core.repo import open_store, toplevel


@dataclass
class GcReport:
    kept: int = 0
    removed: list[tuple[str, int]] = field(default_factory=list)  # (oid, bytes)
    young: int = 0  # unreferenced but inside the grace period
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.removed)


def referenced(cwd: str | None = None) -> set[str]:
    """Every object a manifest or git-lfs pointer in any reachable commit, reflog entry or the index needs."""
    from fmhub.git.history import blobs_in_history, lfs_pointer, manifest_or_pointer, read_blobs

    top = toplevel(cwd)
    blobs = blobs_in_history(["--all", "--reflog", "--indexed-objects"], top)
    oids: set[str] = set()
    for path, data in read_blobs(blobs, top, wanted=manifest_or_pointer):
        if is_manifest(data):
            try:
                oids.update(oid for oid, _ in Manifest.from_bytes(data, path).oids())
            except ManifestError as exc:
                raise FmhubError(f"{exc}; gc stopped without deleting anything (fix or remove that file's history first)") from None
        elif (pointer := lfs_pointer(data)) is not None:
            oids.add(pointer.oid)
    return oids


def gc(cwd: str | None = None, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport:
    """Remove unreferenced objects older than ``grace_s`` seconds (or only list them with ``dry_run``).

    Whole and packed (`fmhub repack`) objects alike; an object some kept
    packed object is a delta against is kept with it, down its whole chain.
    """
    keep = referenced(cwd)
    store = open_store(cwd)
    report = GcReport(dry_run=dry_run)
    now = time.time()
    try:
        files = _store_files(store)
        bases = _packed_bases(store)
        needed = _with_bases(keep, bases)
        # a young packed object is kept by the grace period, so its chain must stay readable too
        young_packed = {oid for oid, path, packed in files if packed and now - _mtime(path, now) < grace_s}
        protected = _with_bases(young_packed, bases)
        for oid, path, _packed in files:
            if oid in needed:
                report.kept += 1
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if now - st.st_mtime < grace_s or oid in protected:
                report.young += 1
                continue
            if not dry_run:
                os.unlink(path)
            report.removed.append((oid, st.st_size))
        if not dry_run:
            store.remove_stale_temp()
    finally:
        store.close()
    return report


def _store_files(store) -> list[tuple[str, str, bool]]:
    """(oid, file, is packed) of every object file in the store: whole ones, then packed ones."""
    whole = [(oid, store.object_path(oid), False) for oid in store.iter_oids()]
    return whole + [(oid, store.packed_path(oid), True) for oid in store.iter_packed()]


def _packed_bases(store) -> dict[str, str]:
    """packed oid -> the oid it is a delta against (a packed file whose header is unreadable has none: fsck reports it)."""
    bases = {}
    for oid in store.iter_packed():
        try:
            base = store.packed_base(oid)
        except CorruptObject:
            continue
        if base is not None:
            bases[oid] = base
    return bases


def _with_bases(oids: set[str], bases: dict[str, str]) -> set[str]:
    """``oids`` and, for each of them that is packed, its base, its base's base, and so on."""
    out = set(oids)
    todo = [oid for oid in oids if oid in bases]
    while todo:
        base = bases[todo.pop()]
        if base not in out:
            out.add(base)
            if base in bases:
                todo.append(base)
    return out


def _mtime(path: str, default: float) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return default

"""`fmhub gc`: delete store objects that nothing in the repository refers to any more.

An object is kept when any manifest or git-lfs pointer refers to it in: any
commit reachable from a ref or a reflog entry (branches, tags, stash, remote
branches, and what `git reflog` can still bring back), or the index (staged,
not yet committed). For a manifest "refers to" means every object it needs:
header, whole tensors, and every root and delta of a chain (`Manifest.oids`).
The object store is shared with git-lfs, hence its pointers count too.

Objects younger than the grace period are kept whatever refers to them: a
clean filter running right now may have written objects its manifest has not
yet been staged for. Like `git gc`, this cannot know about other clones that
borrow from this store (`fmhub.repo.local_remote_stores`); run it where no
clone borrows, or fetch in those clones first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from dulwich.lfs import LFSPointer

from fmhub.errors import FmhubError, ManifestError
from fmhub.manifest import Manifest, is_manifest
from fmhub.repo import open_store, toplevel



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
    from fmhub.sync import blobs_in_history, manifest_or_pointer, read_blobs

    top = toplevel(cwd)
    blobs = blobs_in_history(["--all", "--reflog", "--indexed-objects"], top)
    oids: set[str] = set()
    for path, data in read_blobs(blobs, top, wanted=manifest_or_pointer):
        if is_manifest(data):
            try:
                oids.update(oid for oid, _ in Manifest.from_bytes(data, path).oids())
            except ManifestError as exc:
                raise FmhubError(f"{exc}; gc stopped without deleting anything (fix or remove that file's history first)") from None
        else:
            pointer = LFSPointer.from_bytes(data)
            if pointer is not None and pointer.is_valid_oid():
                oids.add(pointer.oid)
    return oids


def gc(cwd: str | None = None, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport:
    """Remove unreferenced objects older than ``grace_s`` seconds (or only list them with ``dry_run``)."""
    keep = referenced(cwd)
    store = open_store(cwd)
    report = GcReport(dry_run=dry_run)
    now = time.time()
    try:
        for oid in list(store.iter_oids()):
            if oid in keep:
                report.kept += 1
                continue
            path = store.object_path(oid)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if now - st.st_mtime < grace_s:
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

"""Consistency check of the object store against what a revision needs.

Every whole object is re-hashed and every packed object (`fmhub repack`) is
rebuilt from its chain and hashed; a packed object whose base is gone is
reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dulwich.objects import Blob
from dulwich.repo import Repo

from fmhub.core.checkpoint import missing_objects, size_mismatches
from fmhub.base.errors import FmhubError, ManifestError, MissingObject
from fmhub.core.manifest import Manifest, is_manifest
from fmhub.core.repo import git, open_store, toplevel
from fmhub.core.store import ObjectStore


@dataclass
class Report:
    objects: int = 0
    stale_temp: int = 0
    problems: list[str] = field(default_factory=list)


def manifests_at(repo: Repo, rev: str):
    """Yield (path, manifest bytes) for every manifest committed in ``rev``'s tree."""
    sha = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", cwd=repo.path, check=False).strip()
    if not sha:
        raise FmhubError(f"unknown revision {rev!r}")
    commit = repo[sha.encode()]
    for entry in repo.object_store.iter_tree_contents(commit.tree):
        obj = repo.object_store[entry.sha]
        if isinstance(obj, Blob):
            data = obj.as_raw_string()
            if is_manifest(data):
                yield entry.path.decode("utf-8", "replace"), data


def _packed_problem(store: ObjectStore, oid: str) -> str | None:
    """What is wrong with a packed object (`fmhub repack`), rebuilt from its packed file and hashed; None if nothing."""
    try:
        store.check_packed(oid)
    except MissingObject as exc:  # its base, or one further down its chain, is gone
        return str(exc)
    except FmhubError as exc:  # corrupt, or its codec's plugin is not installed
        return f"{exc} (file {store.packed_path(oid)})"
    return None


def fsck(rev: str = "HEAD", cwd: str | None = None) -> Report:
    top = toplevel(cwd)
    store = open_store(top)
    report = Report(stale_temp=store.remove_stale_temp())
    for oid in store.iter_oids():
        report.objects += 1
        if not store.verify(oid):
            report.problems.append(f"object sha256:{oid} is corrupt (its bytes do not hash to its name); delete it and re-add or re-fetch the file")
    for oid in store.iter_packed():
        report.objects += 1
        problem = _packed_problem(store, oid)
        if problem:
            report.problems.append(problem)
    repo = Repo(top)
    if rev == "HEAD" and not git("rev-parse", "--verify", "--quiet", "HEAD", cwd=top, check=False).strip():
        return report  # no commits yet
    for path, data in manifests_at(repo, rev):
        try:
            m = Manifest.from_bytes(data, path)
        except ManifestError as exc:
            report.problems.append(str(exc))
            continue
        missing = missing_objects(m, store)
        if missing:
            report.problems.append(f"{path} at {rev}: {len(missing)} object(s) missing: {', '.join(missing[:5])}")
        sizes = _size_problems(m, store, f"{path} at {rev}")
        report.problems += sizes
        if not missing and not sizes:
            report.problems += _rebuild_problems(m, store, f"{path} at {rev}")
    return report


def _rebuild_problems(m: Manifest, store: ObjectStore, where: str) -> list[str]:
    """What checkout would refuse in objects that each hash right: a header that disagrees with its manifest, a
    delta chain that does not decode to its tensor (the chain is rebuilt and hashed, as checkout would)."""
    from fmhub.core.checkpoint import checked_header
    from fmhub.core.tensorio import stream_tensor

    out = []
    try:
        if m.header_oid is not None:
            checked_header(m, store, where)
    except FmhubError as exc:
        out.append(str(exc))
    for t in m.tensors:
        if t.root is not None and not store.has(t.oid):
            try:
                for _ in stream_tensor(store, t):
                    pass
            except FmhubError as exc:
                out.append(f"{where}: {exc}")
    return out


def _size_problems(m: Manifest, store: ObjectStore, where: str) -> list[str]:
    """Objects whose size is not the one the manifest declares (a manifest that lies, or the wrong object)."""
    return [f"{where}: object sha256:{oid} is {actual} bytes but the manifest declares {size}"
            for _what, oid, actual, size in size_mismatches(m, store)]

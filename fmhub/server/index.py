"""What a bare repository's refs name: objects at protected branches (with path and tensor), objects anywhere, policies.

An `IndexState` is one snapshot of the refs; `RepoIndex.state()` rebuilds it
when the refs move, walking the history of every ref with each (tree,
prefix) visited once per rebuild. Manifests are parsed once per blob ever
(they never change), so a rebuild costs a walk of trees, not re-parsing.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from fmhub.base.errors import FmhubError
from fmhub.server.repos import protected_branches

POLICY_PATH = ".fmhub/policy.yaml"
Owner = tuple[bytes, str, Optional[str]]  # (protected ref, path, tensor or None)


@dataclass
class IndexState:
    refs: dict
    protected: list[bytes]  # protected ref names, primary first, whether or not they exist
    tips: dict[bytes, bytes]  # protected ref -> its commit
    owners: dict[str, set[Owner]] = field(default_factory=dict)  # oid -> where protected branches name it
    named: set[str] = field(default_factory=set)  # every oid any ref names
    reader: Callable[[Optional[bytes]], Callable[[str], Optional[bytes]]] = lambda ref: (lambda path: None)

    @property
    def primary(self) -> Optional[bytes]:
        return self.protected[0] if self.protected else None

    def primary_exists(self) -> bool:
        return self.primary is not None and self.primary in self.tips


class RepoIndex:
    def __init__(self, repo_path: str) -> None:
        self.repo_path = repo_path
        self._lock = threading.Lock()
        self._state: Optional[IndexState] = None
        self._manifests: dict[bytes, list[tuple[str, Optional[str]]]] = {}  # blob -> [(oid, tensor)]
        self._files: dict[tuple[bytes, str], Optional[bytes]] = {}
        self._checked = float("-inf")

    def invalidate(self) -> None:
        with self._lock:
            self._checked = float("-inf")

    def state(self, max_age: float = 1.0) -> IndexState:
        """The refs' snapshot, checked against the repository at most ``max_age`` seconds ago.

        Pushes through the server call `invalidate` once their refs moved, so
        the age only delays seeing refs changed behind the server's back (git
        run on the server's disk); push checks ask with ``max_age=0``.
        """
        from dulwich.repo import Repo

        with self._lock:
            if self._state is not None and time.monotonic() - self._checked < max_age:
                return self._state
            self._checked = time.monotonic()
            repo = Repo(self.repo_path)
            try:
                refs = dict(repo.get_refs())
                protected = protected_branches(repo)
                if self._state is not None and self._state.refs == refs and self._state.protected == protected:
                    return self._state
                self._state = self._build(repo, refs, protected)
                return self._state
            finally:
                repo.close()

    def _build(self, repo, refs: dict, protected: list[bytes]) -> IndexState:
        store = repo.object_store
        tips = {ref: sha for ref in protected if (sha := commit_of(store, refs.get(ref))) is not None}
        state = IndexState(refs, protected, tips)
        for ref, tip in tips.items():
            for path, blob in _paths(repo, [tip]):
                for oid, tensor in self._manifest(store, blob, path):
                    state.owners.setdefault(oid, set()).add((ref, path, tensor))
        # what protected history names is in owners already: walk only the commits no protected branch reaches
        state.named.update(state.owners)
        others = [c for sha in set(refs.values()) if (c := commit_of(store, sha)) is not None]
        for path, blob in _paths(repo, others, exclude=list(tips.values())):
            state.named.update(oid for oid, _t in self._manifest(store, blob, path))
        files = {(ref, POLICY_PATH): file_at(store, tip, POLICY_PATH) for ref, tip in tips.items()}
        state.reader = lambda ref: (lambda path: files[(ref, path)] if (ref, path) in files else self._read(tips.get(ref), path))
        return state

    def _read(self, commit: Optional[bytes], path: str) -> Optional[bytes]:
        """A file other than the policy at a protected tip, for policies that read more (cached: commits never change)."""
        from dulwich.repo import Repo

        key = (commit or b"", path)
        if key not in self._files:
            repo = Repo(self.repo_path)
            try:
                self._files[key] = file_at(repo.object_store, commit, path)
            finally:
                repo.close()
        return self._files[key]

    def _manifest(self, store, blob: bytes, path: str) -> list[tuple[str, Optional[str]]]:
        hit = self._manifests.get(blob)
        if hit is None:
            hit = self._manifests[blob] = manifest_oids(store, blob, path)
        return hit


def manifest_oids(store, blob: bytes, path: str) -> list[tuple[str, Optional[str]]]:
    """(oid, tensor name or None) for every object a manifest blob names; [] for a blob that is not a manifest."""
    from dulwich.objects import Blob

    from fmhub.core.manifest import MAX_MANIFEST_BYTES, Manifest, is_manifest

    try:
        obj = store[blob]
    except KeyError:
        return []
    if not isinstance(obj, Blob) or obj.raw_length() > MAX_MANIFEST_BYTES:
        return []
    data = obj.as_raw_string()
    if not is_manifest(data):
        return []
    try:
        m = Manifest.from_bytes(data, path)
    except FmhubError:
        return []
    out: dict[str, Optional[str]] = {oid: None for oid, _size in m.oids()}
    for t in m.tensors:
        for oid, _size in t.storage():
            out[oid] = None if m.is_data else t.name
    return list(out.items())


def commit_of(store, sha: Optional[bytes]) -> Optional[bytes]:
    from dulwich.objects import Commit, Tag

    try:
        obj = store[sha] if sha else None
        while isinstance(obj, Tag):
            obj = store[obj.object[1]]
    except KeyError:
        return None
    return obj.id if isinstance(obj, Commit) else None


def _paths(repo, heads: Iterable[bytes], exclude: Iterable[bytes] = ()) -> set[tuple[str, bytes]]:
    """(path, blob) of every regular file in every commit reachable from ``heads`` and not from ``exclude``."""
    from dulwich.objects import Tree

    store, out, seen = repo.object_store, set(), set()

    def walk(tree_id: bytes, prefix: str) -> None:
        if (tree_id, prefix) in seen:
            return
        seen.add((tree_id, prefix))
        tree = store[tree_id]
        if not isinstance(tree, Tree):
            return
        for entry in tree.items():
            name = prefix + entry.path.decode("utf-8", "surrogateescape")
            if entry.mode & 0o170000 == 0o040000:
                walk(entry.sha, name + "/")
            elif entry.mode & 0o170000 == 0o100000:
                out.add((name, entry.sha))

    heads = list(heads)
    if heads:
        for w in repo.get_walker(include=heads, exclude=list(exclude)):
            walk(w.commit.tree, "")
    return out


def file_at(store, commit: Optional[bytes], path: str) -> Optional[bytes]:
    """The bytes of ``path`` in ``commit``'s tree; None when absent (or no commit)."""
    from dulwich.objects import Blob, Tree

    if commit is None:
        return None
    try:
        obj = store[store[commit].tree]
        for part in path.encode("utf-8").split(b"/"):
            if not isinstance(obj, Tree):
                return None
            _mode, sha = obj[part]
            obj = store[sha]
    except KeyError:
        return None
    return obj.as_raw_string() if isinstance(obj, Blob) else None

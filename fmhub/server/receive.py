"""The checks a push must pass before its refs move (the server's pre-receive step).

Run by `fmhub.server.git_http` for each ref a push updates, after git has
received the pack and before the ref moves; a refusal leaves the ref where
it was and reaches the pusher as ``! [remote rejected] REF (MESSAGE)``.

* Admins may push anything, except a policy that does not parse onto a
  protected branch.
* Protected branches: creating or deleting one, rewriting its history (a
  non-fast-forward push), or changing its ``.fmhub/policy.yaml``, needs an admin.
* Every ref must point at an object the repository has.
* Every branch: when the primary branch's policy cannot be read (no such
  branch, a broken policy) only admins may push (fail closed). Otherwise
  each new commit's changes (paths that differ from every parent) are
  checked against the governing policy's ``write`` rules, tensor by tensor
  for checkpoints; each object a changed manifest newly names must be one
  its pusher uploaded or may read, and be on the server (asked in that
  order, so a refusal does not tell whether it is stored), so a
  hand-written manifest cannot borrow objects its writer could not read.
  On a protected branch "new" means every commit the push brings onto it,
  also those another ref (someone else's branch, a tag) already holds.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from fmhub.plugin.records import AccessRequest
from fmhub.server.guard import RepoGuard
from fmhub.server.index import POLICY_PATH, IndexState, commit_of, file_at, manifest_oids
from fmhub.server.tokens import Principal

ZERO = b"0" * 40
HasObject = Callable[[str], bool]


def check_update(guard: RepoGuard, principal: Principal, ref: bytes, old: bytes, new: bytes, has_object: HasObject) -> Optional[str]:
    """None when ``principal`` may move ``ref`` from ``old`` to ``new``, else the one-line reason; recorded either way."""
    from dulwich.repo import Repo

    repo = Repo(guard.path)
    try:
        reason = _refusal(guard, principal, repo, ref, old, new, has_object)
    finally:
        repo.close()
    details = {"action": "push", "old": old.decode(), "new": new.decode()}
    guard.record(principal.user, ref.decode("utf-8", "replace"), "deny" if reason else "allow",
                 {**details, **({"reason": reason} if reason else {})}, what="push")
    return reason


def _refusal(guard: RepoGuard, principal: Principal, repo, ref: bytes, old: bytes, new: bytes, has_object: HasObject) -> Optional[str]:
    state = guard.index.state(max_age=0)
    protected = ref in state.protected
    admin = guard.is_admin(principal, state)
    name = ref.decode("utf-8", "replace")
    if not ref.startswith((b"refs/heads/", b"refs/tags/")) and not admin:
        return f"only an admin may push {name} (outside refs/heads and refs/tags)"
    if new != ZERO and new not in repo.object_store:
        # dulwich would write the ref anyway, and a ref to a missing object breaks `git fsck`, `gc` and `for-each-ref` there
        return f"{name} would point at {new.decode()}, an object neither in the repository nor in this push"
    if new == ZERO:
        return f"only an admin may delete the protected branch {name}" if protected and not admin else None
    if protected:
        reason = _policy_change(repo, name, old, new, admin)
        if reason or admin:
            return reason
    if admin:
        return None
    problem = guard.policy_problem(state)
    if problem:
        return f"{problem}, so only an admin may push"
    if protected and old == ZERO:
        return f"only an admin may create the protected branch {name}"
    if protected and not _fast_forward(repo, old, new):
        return f"only an admin may rewrite the history of the protected branch {name} (a non-fast-forward push)"
    reader = state.reader(ref if ref in state.tips else state.primary)
    # a protected branch decides reads: every commit the push brings onto it is checked against this pusher, also those
    # another ref already holds (checked then against *their* pusher), or a reader could fast-forward it onto a branch
    # that names secret objects at paths they may read; elsewhere, the commits new to the repository
    commits = _brought(repo, old, new) if protected else _new_commits(repo, new, state)
    for commit in commits:
        reason = _check_commit(guard, principal, repo, state, commit, reader, has_object)
        if reason:
            return f"{reason} (commit {commit.id.decode()[:12]})"
    return None


def _fast_forward(repo, old: bytes, new: bytes) -> bool:
    from dulwich.graph import can_fast_forward

    store = repo.object_store
    old_c, new_c = commit_of(store, old), commit_of(store, new)
    return old_c is not None and new_c is not None and can_fast_forward(repo, old_c, new_c)


def _policy_change(repo, name: str, old: bytes, new: bytes, admin: bool) -> Optional[str]:
    from fmhub.governance.policy import parse_policy_bytes

    store = repo.object_store
    before = file_at(store, commit_of(store, old), POLICY_PATH) if old != ZERO else None
    after = file_at(store, commit_of(store, new), POLICY_PATH)
    if before == after:
        return None
    if not admin:
        return f"only an admin may change {POLICY_PATH} on the protected branch {name}"
    parsed = parse_policy_bytes(after, POLICY_PATH) if after is not None else None
    if isinstance(parsed, Exception):
        return f"the new {POLICY_PATH} is broken, and a broken policy locks everyone out: {parsed}"
    return None


def _brought(repo, old: bytes, new: bytes) -> Iterator:
    """Commits reachable from ``new`` and not from ``old`` (both commits: a fast-forward of a protected branch)."""
    store = repo.object_store
    return (w.commit for w in repo.get_walker(include=[commit_of(store, new)], exclude=[commit_of(store, old)]))


def _new_commits(repo, new: bytes, state: IndexState) -> Iterator:
    """Commits reachable from ``new`` that no ref of the repository reaches yet (the ones this push brings)."""
    store = repo.object_store
    tip = commit_of(store, new)
    if tip is None:
        return iter(())
    known = [c for sha in set(state.refs.values()) if (c := commit_of(store, sha)) is not None]
    return (w.commit for w in repo.get_walker(include=[tip], exclude=known))


def _changes(store, commit) -> dict[str, tuple[list[bytes], Optional[bytes]]]:
    """path -> (its blobs in the parents, its blob here or None) for the paths that differ from every parent."""
    from dulwich.diff_tree import tree_changes

    per_parent = []
    for parent in commit.parents or [None]:
        old_tree = store[parent].tree if parent is not None else None
        found = {}
        for ch in tree_changes(store, old_tree, commit.tree):
            old, new = getattr(ch.old, "sha", None), getattr(ch.new, "sha", None)
            path = (getattr(ch.new, "path", None) or ch.old.path).decode("utf-8", "surrogateescape")
            found[path] = (old, new)
        per_parent.append(found)
    common = set(per_parent[0]).intersection(*per_parent[1:])
    return {p: ([f[p][0] for f in per_parent if f[p][0] is not None], per_parent[0][p][1]) for p in common}


def _check_commit(guard: RepoGuard, principal: Principal, repo, state: IndexState, commit, reader, has_object: HasObject) -> Optional[str]:
    from fmhub.governance import access

    store = repo.object_store
    for path, (olds, new) in sorted(_changes(store, commit).items()):
        before = [e for b in olds for e in manifest_oids(store, b, path)]
        after = manifest_oids(store, new, path) if new is not None else []
        tensors = _changed_tensors(before, after)
        for tensor in [None] + sorted(tensors):
            d, _governed = access.decide(AccessRequest(principal.user, "write", guard.name, path, tensor=tensor, read_file=reader))
            if not d.allowed:
                return access.denial_message(AccessRequest(principal.user, "write", guard.name, path, tensor=tensor), d)
        for oid in sorted({o for o, _t in after} - {o for o, _t in before}):
            # may they read it first: the answer must not depend on whether it is stored (no existence oracle)
            if guard.read_denial(principal, oid, state)[0] is not None:
                return f"{path} names object {oid}, which {principal.user} neither uploaded nor may read (push its LFS objects first)"
            if not has_object(oid):
                return f"{path} names object {oid}, which is not on the server: push its LFS objects first"
    return None


def _changed_tensors(before: list, after: list) -> set[str]:
    def by_tensor(entries: list) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for oid, tensor in entries:
            if tensor is not None:
                out.setdefault(tensor, set()).add(oid)
        return out

    old, new = by_tensor(before), by_tensor(after)
    return {t for t in set(old) | set(new) if old.get(t) != new.get(t)}

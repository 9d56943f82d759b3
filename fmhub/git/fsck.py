"""Consistency check of the object store against what a revision needs.

Every whole object is re-hashed and every packed object (`fmhub repack`) is
rebuilt from its chain and hashed; a packed object whose base is gone is
reported as such.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from fmhub.core.checkpoint import missing_objects, size_mismatches
from fmhub.base.errors import FmhubError, ManifestError, MissingObject
from fmhub.core.manifest import Manifest, is_manifest
from fmhub.core.repo import git, open_store, toplevel
from fmhub.core.store import ObjectStore

TYPE_CHECKING = False
if TYPE_CHECKING:
    from dulwich.repo import Repo


@dataclass
class Report:
    objects: int = 0
    stale_temp: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong: the check still passes


def manifests_at(repo: Repo, rev: str):
    """Yield (path, manifest bytes) for every manifest committed in ``rev``'s tree."""
    from dulwich.objects import Blob

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
    report.problems += setup_problems(top)
    report.notes += worktree_notes(top)
    from dulwich.repo import Repo

    repo = Repo(top)
    if rev == "HEAD" and not git("rev-parse", "--verify", "--quiet", "HEAD", cwd=top, check=False).strip():
        return report  # no commits yet
    raw = history_raw_checkpoints(rev, top)
    at_rev = tree_blobs(rev, sorted({path for path, _, _ in raw}), top) if raw else {}
    report.problems += [raw_problem(path, commit) for path, commit, blob in raw if at_rev.get(path) == blob]
    old = sorted({(path, commit) for path, commit, blob in raw if at_rev.get(path) != blob})
    if old:
        shown = ", ".join(f"{p} at {c[:12]}" for p, c in old[:5]) + (f" and {len(old) - 5} more" if len(old) > 5 else "")
        report.notes.append(f"{rev}'s history holds {len(old)} raw checkpoint(s) committed without fmhub's filter, "
                            f"replaced since ({shown}): they stay in git's history until it is rewritten")
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


# -- checkpoints that went around the filter ----------------------------------------------------------------------

FIX = "fmhub install && git add --renormalize {path} && git commit"
TRACKED = f":(attr:filter={'fmhub'})"  # git's pathspec for the files .gitattributes routes through fmhub


def raw_problem(path: str, commit: str) -> str:
    return (f"{path} at commit {commit[:12]} is a raw checkpoint in git, not an fmhub manifest (added without "
            f"fmhub's filter installed); store it through fmhub: `{FIX.format(path=path)}` "
            "(the commit keeps its copy in history)")


def blob_heads(shas: list[str], cwd: str, n: int = 16) -> dict[str, bytes]:
    """The first ``n`` bytes of each blob (one ``git cat-file --batch``; the rest of each is read and dropped)."""
    import subprocess

    out: dict[str, bytes] = {}
    if not shas:
        return out
    proc = subprocess.Popen(["git", "cat-file", "--batch"], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        for sha in dict.fromkeys(shas):
            proc.stdin.write(sha.encode() + b"\n")
            proc.stdin.flush()
            header = proc.stdout.readline().split()
            if len(header) != 3:  # "<sha> missing"
                continue
            size = int(header[2])
            head = proc.stdout.read(min(n, size))
            left = size - len(head)
            while left > 0:
                chunk = proc.stdout.read(min(left, 1 << 20))
                if not chunk:
                    raise FmhubError(f"git cat-file stopped in the middle of blob {sha}")
                left -= len(chunk)
            proc.stdout.read(1)  # the newline after the contents
            out[sha] = head
    finally:
        proc.stdin.close()
        proc.stdout.close()
        proc.wait()
    return out


def is_raw_checkpoint(head: bytes) -> bool:
    """Bytes a checkpoint format claims (not a manifest, not a git-lfs pointer, not other text)."""
    from fmhub.core.formats import sniff_format

    return bool(head) and not is_manifest(head) and sniff_format(head) is not None


def tree_blobs(rev: str, paths: list[str], cwd: str) -> dict[str, str]:
    """path -> blob at ``rev`` of those of ``paths`` it holds (paths from the top of the work tree ``cwd``)."""
    out = git("ls-tree", "-r", "-z", "--full-tree", rev, "--", *paths, cwd=cwd)
    blobs = {}
    for entry in filter(None, out.split("\0")):
        meta, _, path = entry.partition("\t")
        blobs[path] = meta.split()[2]
    return blobs


def history_raw_checkpoints(rev: str, cwd: str) -> list[tuple[str, str, str]]:
    """(path, commit, blob) of each raw checkpoint committed in ``rev``'s history at a path .gitattributes (today's)
    routes through fmhub, with the commit that added it."""
    out = git("log", "--format=%H", "--raw", "--no-renames", "--no-abbrev", "-z", rev, "--", TRACKED, cwd=cwd)
    first: dict[tuple[str, str], str] = {}  # (blob, path) -> the oldest commit that wrote it
    commit, tokens = "", iter(out.split("\0"))
    for token in tokens:
        token = token.lstrip("\n")
        if token.startswith(":"):
            path = next(tokens, "")
            _old_mode, new_mode, _old, new, status = token[1:].split()[:5]
            if status[:1] in ("A", "M", "T") and new_mode.startswith("100"):
                first[(new, path)] = commit
        elif token:
            commit = token
    heads = blob_heads([blob for blob, _ in first], cwd)
    return sorted((path, c, blob) for (blob, path), c in first.items() if is_raw_checkpoint(heads.get(blob, b"")))


def staged_raw_checkpoints(cwd: str | None = None) -> list[str]:
    """Paths whose staged blob is a raw checkpoint where .gitattributes (as staged) routes them through fmhub:
    what `git commit` would put into history for good."""
    top = toplevel(cwd)
    out = git("ls-files", "-s", "-z", "--", TRACKED, cwd=top)
    staged: dict[str, str] = {}
    for entry in filter(None, out.split("\0")):
        meta, _, path = entry.partition("\t")
        mode, blob, _stage = meta.split()
        if mode.startswith("100"):
            staged[path] = blob
    heads = blob_heads(list(staged.values()), top)
    return sorted(p for p, blob in staged.items() if is_raw_checkpoint(heads.get(blob, b"")))


def setup_problems(top: str) -> list[str]:
    """What keeps fmhub's filter from running here, when .gitattributes routes files through it."""
    from fmhub.git.install import install_state, tracked_patterns

    if not tracked_patterns(top):
        return []
    state = install_state(top)
    if state == "missing":
        return ["fmhub's filter is not installed in this repository (cloned without fmhub?): `git add` would "
                "commit raw checkpoints and the work tree may hold text manifests; run `fmhub install && fmhub checkout`"]
    if state == "stale":
        return ["the Python or fmhub that `fmhub install` recorded in git config is gone (a moved or deleted "
                "environment): git cannot run fmhub's filter; run `fmhub install` again"]
    return []


def worktree_manifests(top: str) -> list[str]:
    """Tracked files in the work tree that hold a manifest, not the checkpoint (checked out without the filter)."""
    from fmhub.git.worktree import tracked_files

    out = []
    for rel in tracked_files(top):
        try:
            with open(os.path.join(top, rel), "rb") as f:
                if is_manifest(f.read(len(b"fmhub manifest "))):
                    out.append(rel)
        except OSError:
            continue
    return out


def worktree_notes(top: str) -> list[str]:
    found = worktree_manifests(top)
    if not found:
        return []
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return [f"{len(found)} tracked file(s) in the work tree hold a manifest, not the checkpoint ({shown}): a clone "
            "made before `fmhub install`? `fmhub checkout` writes the checkpoints (files an access policy keeps "
            "as placeholders stay manifests)"]

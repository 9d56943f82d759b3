"""``fmhub migrate``: rewrite a branch's history so that checkpoints stored by git-lfs (or as raw blobs) become fmhub
manifests, as ``git lfs migrate import`` does the other way.

Commits are walked oldest first (``git rev-list --reverse --topo-order``). In each, the blobs whose paths match the
patterns (git's own matching: ``git check-attr`` over a temporary attributes file) are converted once per blob id:

* a Git LFS pointer: its object (``.git/lfs/objects``, where fmhub's store lives too) is cleaned into the store
  (`fmhub.core.checkpoint.clean`, streaming from the file); an object that is not local is refused, naming its oid
  and ``git lfs fetch``;
* a raw blob: streamed from ``git cat-file blob`` into clean;
* an fmhub manifest (or an empty file): kept.

The ``.gitattributes`` lines for the patterns become fmhub's (`fmhub.git.install.ATTRIBUTES`, what ``fmhub track``
writes). A changed tree is written through a temporary index (``read-tree``, ``update-index --index-info``,
``write-tree``); the commit object is copied with its new tree and parents (author, committer, dates, message and
encoding kept; a signature, no longer valid, dropped), so a commit with nothing to convert keeps its id. Each branch's
old tip is kept as ``refs/fmhub/pre-migrate/BRANCH``; when the checked-out branch moved, the work tree is checked out
again (clean refuses to start on a dirty one), so it holds the same checkpoints and ``git status`` is clean.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import BinaryIO, Sequence

from fmhub.base import gitrun
from fmhub.base.errors import FmhubError
from fmhub.core.manifest import Manifest, is_manifest
from fmhub.core.repo import toplevel

DEFAULT_PATTERNS = ("*.safetensors",)
BACKUP_PREFIX = "refs/fmhub/pre-migrate/"
_MARK = "fmhub-migrate"  # the attribute the temporary attributes file sets on the patterns
POINTER_MAX = 1024  # a git-lfs pointer is at most this long
_DROPPED_HEADERS = (b"gpgsig", b"gpgsig-sha256")


@dataclass
class Migrated:
    """What `migrate` did: per ref (old tip, new tip), the commits rewritten and the files converted."""

    patterns: list[str]
    refs: dict[str, tuple[str, str]] = field(default_factory=dict)  # ref -> (old, new)
    commits: int = 0  # commits written anew
    converted: int = 0  # distinct blobs turned into manifests
    checked_out: bool = False


def _git(args: Sequence[str], cwd: str, input: str | bytes | None = None, env=None) -> str:
    out = gitrun.run(args, cwd=cwd, input=input, text=not isinstance(input, bytes), env=env).stdout
    return out.decode() if isinstance(out, bytes) else out


def _lines(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode()
    return [line for line in text.splitlines() if line]


class _Matcher:
    """Which paths the patterns match, by git's own rules (``check-attr`` with a temporary core.attributesFile)."""

    def __init__(self, patterns: Sequence[str], top: str, tmpdir: str) -> None:
        self.top = top
        self.file = os.path.join(tmpdir, "attributes")
        with open(self.file, "w", encoding="utf-8") as f:
            f.writelines(f"{p} {_MARK}\n" for p in patterns)
        self._known: dict[str, bool] = {}

    def matching(self, paths: Sequence[str]) -> set[str]:
        new = [p for p in paths if p not in self._known]
        if new:
            out = gitrun.run(["-c", f"core.attributesFile={self.file}", "check-attr", "-z", "--stdin", _MARK], cwd=self.top,
                             input="\0".join(new) + "\0").stdout.split("\0")
            for i in range(0, len(out) - 2, 3):
                self._known[out[i]] = out[i + 2] == "set"
        return {p for p in paths if self._known.get(p)}


def rewrite_attributes(data: bytes, patterns: Sequence[str], add: bool) -> bytes:
    """``.gitattributes`` bytes with each line for one of ``patterns`` replaced by fmhub's (as ``fmhub track`` does);
    with ``add``, patterns no line names are appended."""
    from fmhub.git.install import ATTRIBUTES

    wanted = list(dict.fromkeys(patterns))
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out, done = [], set()
    for line in lines:
        fields = line.split()
        pattern = fields[0].decode("utf-8", "surrogateescape") if fields and not line.lstrip().startswith(b"#") else None
        if pattern in wanted:
            if pattern not in done:
                out.append(f"{pattern} {ATTRIBUTES}".encode())
                done.add(pattern)
            continue
        out.append(line)
    if add:
        out += [f"{p} {ATTRIBUTES}".encode() for p in wanted if p not in done]
    return b"\n".join(out) + b"\n" if out else b""


class _Reader:
    """``head`` then the rest of a stream: what clean reads."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head, self._rest = head, rest

    def read(self, n: int) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._rest.read(n)


class _Converter:
    """Blob id -> blob id of its fmhub form (cached: a blob is converted once, whatever commits share it)."""

    def __init__(self, top: str) -> None:
        from fmhub.core.deltas import policy_from_config
        from fmhub.core.repo import fmhub_config, open_store

        self.top = top
        self.store = open_store(top)
        self.policy = policy_from_config(fmhub_config(top))
        self.done: dict[str, str] = {}
        self.previous: dict[str, Manifest] = {}  # path -> its last manifest: clean stores less against it
        self.converted = 0

    def close(self) -> None:
        self.store.close()

    def _access(self, path: str, tensors=(), root: str | None = None, action: str = "write") -> bool:
        from fmhub.governance.access import check_smudge

        return check_smudge(path, tensors, root=self.top, action=action)

    def convert(self, blob: str, path: str, commit: str) -> str:
        if blob in self.done:
            return self.done[blob]
        from fmhub.core.checkpoint import clean
        from fmhub.git.history import LFS_HEAD, lfs_pointer

        proc = gitrun.start(["cat-file", "blob", blob], cwd=self.top, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            head = proc.stdout.read(POINTER_MAX + 1)
            pointer = lfs_pointer(head) if head.startswith(LFS_HEAD) and len(head) <= POINTER_MAX else None
            if not head or is_manifest(head):
                self.done[blob] = blob  # empty, or stored by fmhub already
                return blob
            where = f"{path} at {commit[:12]}"
            if pointer is not None:
                obj = self.store.object_path(pointer.oid)
                if not os.path.isfile(obj) or os.path.getsize(obj) != pointer.size:
                    raise FmhubError(f"{where}: the Git LFS object sha256:{pointer.oid} is not local; fetch it with "
                                     f"`git lfs fetch --all` (or `git lfs fetch REMOTE {commit[:12]}`), then run `fmhub migrate` again")
                with open(obj, "rb") as f:
                    data = clean(f, self.store, path, self.previous.get(path), self.policy, access=self._access)
            else:
                data = clean(_Reader(head, proc.stdout), self.store, path, self.previous.get(path), self.policy, access=self._access)
        finally:
            proc.stdout.close()
            proc.wait()
        if is_manifest(data):
            self.previous[path] = Manifest.from_bytes(data, path)
        new = _git(["hash-object", "-w", "--no-filters", "--stdin"], self.top, input=data).strip()
        self.done[blob] = new
        self.converted += 1
        return new


def _tree_entries(commit: str, top: str) -> list[tuple[str, str, str]]:
    """(mode, blob id, path) of every blob in the commit's tree."""
    out = gitrun.run(["ls-tree", "-r", "-z", "--full-tree", commit], cwd=top).stdout
    entries = []
    for rec in out.split("\0"):
        if not rec:
            continue
        meta, _, path = rec.partition("\t")
        mode, kind, oid = meta.split()
        if kind == "blob" and mode in ("100644", "100755"):
            entries.append((mode, oid, path))
    return entries


def _blob(oid: str, top: str) -> bytes:
    return gitrun.run(["cat-file", "blob", oid], cwd=top, text=False).stdout


def _new_commit(raw: bytes, tree: str, parents: list[str]) -> bytes:
    """The commit object ``raw`` with ``tree`` and ``parents`` (its signature dropped: it signed the old one)."""
    head, sep, message = raw.partition(b"\n\n")
    out, skipping = [], False
    for line in head.split(b"\n"):
        if line.startswith(b" ") and skipping:
            continue
        key = line.split(b" ", 1)[0]
        skipping = key in _DROPPED_HEADERS
        if skipping or key in (b"tree", b"parent"):
            continue
        out.append(line)
    lines = [b"tree " + tree.encode()] + [b"parent " + p.encode() for p in parents] + out
    return b"\n".join(lines) + sep + message


def _refs(branches: Sequence[str], everything: bool, top: str) -> tuple[list[str], list[str]]:
    """The refs to rewrite, and the commits to leave as they are (``A..B``: A)."""
    if everything:
        if branches:
            raise FmhubError("give branches or --everything, not both")
        refs = _lines(_git(["for-each-ref", "--format=%(refname)", "refs/heads/"], top))
        if not refs:
            raise FmhubError("no branches to migrate")
        return refs, []
    if not branches:
        head = gitrun.run(["symbolic-ref", "-q", "HEAD"], cwd=top, check=False).stdout.strip()
        if not head.startswith("refs/heads/"):
            raise FmhubError("HEAD is not on a branch; name the branch to migrate (or --everything)")
        if gitrun.run(["rev-parse", "--verify", "--quiet", "HEAD"], cwd=top, check=False).returncode != 0:
            raise FmhubError(f"{head.removeprefix('refs/heads/')} has no commits to migrate")
        return [head], []
    refs, exclude = [], []
    for arg in branches:
        base, dots, tip = arg.partition("..")
        if not dots:
            base, tip = "", arg
        if base:
            if gitrun.run(["rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"], cwd=top, check=False).returncode != 0:
                raise FmhubError(f"unknown revision {base!r}")
            exclude.append(base)
        full = gitrun.run(["rev-parse", "--symbolic-full-name", tip or "HEAD"], cwd=top, check=False).stdout.strip()
        if not full.startswith("refs/heads/"):
            raise FmhubError(f"{tip or 'HEAD'!r} is not a local branch; `fmhub migrate` rewrites branches")
        refs.append(full)
    return list(dict.fromkeys(refs)), exclude


def _refuse_dirty(top: str) -> None:
    if not gitrun.run(["config", "--get", "filter.fmhub.process"], cwd=top, check=False).stdout.strip():
        raise FmhubError("fmhub's filter is not installed in this repository; run `fmhub install` first")
    dirty = gitrun.run(["status", "--porcelain", "--untracked-files=no"], cwd=top).stdout
    if dirty.strip():
        raise FmhubError("the work tree has changes; commit or stash them first (`fmhub migrate` checks out the new history)")


def migrate(branches: Sequence[str] = (), include: Sequence[str] = (), everything: bool = False,
            cwd: str | None = None) -> Migrated:
    """Rewrite ``branches`` (default: the current one; ``A..B``: only B's commits not in A; ``everything``: every local
    branch) so that files matching ``include`` (default: the patterns .gitattributes routes through fmhub, else
    ``*.safetensors``) are fmhub manifests. Returns what changed."""
    from fmhub.git.install import tracked_patterns

    top = toplevel(cwd)
    patterns = list(dict.fromkeys(include or tracked_patterns(top) or DEFAULT_PATTERNS))
    for p in patterns:
        if not p or any(c.isspace() for c in p):
            raise FmhubError(f"pattern {p!r} contains whitespace, which .gitattributes cannot express")
    _refuse_dirty(top)
    refs, exclude = _refs(branches, everything, top)
    tips = {ref: _git(["rev-parse", "--verify", f"{ref}^{{commit}}"], top).strip() for ref in refs}
    for ref in refs:
        if gitrun.run(["rev-parse", "--verify", "--quiet", BACKUP_PREFIX + ref.removeprefix("refs/heads/")], cwd=top,
                      check=False).returncode == 0:
            raise FmhubError(f"{BACKUP_PREFIX}{ref.removeprefix('refs/heads/')} exists from an earlier migration; delete it "
                             f"(`git update-ref -d {BACKUP_PREFIX}{ref.removeprefix('refs/heads/')}`) to migrate again")
    commits = _lines(_git(["rev-list", "--reverse", "--topo-order", *tips.values(), *[f"^{e}" for e in exclude], "--"], top))
    result = Migrated(patterns)
    mapping: dict[str, str] = {}
    attrs_done: dict[tuple[str, bool], str] = {}
    with tempfile.TemporaryDirectory(prefix="fmhub-migrate-") as tmp:
        matcher = _Matcher(patterns, top, tmp)
        converter = _Converter(top)
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(tmp, "index"))
        try:
            for commit in commits:
                raw = gitrun.run(["cat-file", "commit", commit], cwd=top, text=False).stdout
                old_parents = [line.split()[1].decode() for line in raw.partition(b"\n\n")[0].split(b"\n") if line.startswith(b"parent ")]
                parents = [mapping.get(p, p) for p in old_parents]
                entries = _tree_entries(commit, top)
                matched = matcher.matching([path for _m, _o, path in entries])
                updates = []
                for mode, oid, path in entries:
                    if path in matched:
                        new = converter.convert(oid, path, commit)
                        if new != oid:
                            updates.append((mode, new, path))
                any_match = bool(matched)
                for mode, oid, path in entries:
                    if path == ".gitattributes" or path.endswith("/.gitattributes"):
                        add = any_match and path == ".gitattributes"
                        if (oid, add) not in attrs_done:
                            text = rewrite_attributes(_blob(oid, top), patterns, add)
                            attrs_done[(oid, add)] = _git(["hash-object", "-w", "--no-filters", "--stdin"], top, input=text).strip()
                        if attrs_done[(oid, add)] != oid:
                            updates.append((mode, attrs_done[(oid, add)], path))
                if any_match and ".gitattributes" not in {p for _m, _o, p in entries}:
                    text = rewrite_attributes(b"", patterns, True)
                    updates.append(("100644", _git(["hash-object", "-w", "--no-filters", "--stdin"], top, input=text).strip(), ".gitattributes"))
                tree = _git(["rev-parse", f"{commit}^{{tree}}"], top).strip()
                if updates:
                    gitrun.run(["read-tree", tree], cwd=top, env=env)
                    info = "".join(f"{mode} {oid}\t{path}\0" for mode, oid, path in updates)
                    gitrun.run(["update-index", "-z", "--index-info"], cwd=top, input=info, env=env)
                    tree = gitrun.run(["write-tree"], cwd=top, env=env).stdout.strip()
                if not updates and parents == old_parents:
                    mapping[commit] = commit
                    continue
                new = _git(["hash-object", "-t", "commit", "-w", "--stdin"], top, input=_new_commit(raw, tree, parents)).strip()
                mapping[commit] = new
                result.commits += 1
        finally:
            converter.close()
        result.converted = converter.converted
    head = gitrun.run(["symbolic-ref", "-q", "HEAD"], cwd=top, check=False).stdout.strip()
    for ref, old in tips.items():
        new = mapping.get(old, old)
        result.refs[ref] = (old, new)
        if new == old:
            continue
        name = ref.removeprefix("refs/heads/")
        gitrun.run(["update-ref", "-m", "fmhub migrate: before", BACKUP_PREFIX + name, old], cwd=top)
        gitrun.run(["update-ref", "-m", f"fmhub migrate: {', '.join(patterns)}", ref, new, old], cwd=top)
        if ref == head:
            gitrun.run(["reset", "-q", "--hard", new], cwd=top)  # the work tree was clean: smudge the new tip's files
            result.checked_out = True
    return result

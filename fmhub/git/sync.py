"""Which tensor objects a push or a checkout needs, and moving them with the LFS transfer layer.

git moves the manifests; the objects they name travel separately, through any
Git LFS server (`fmhub.git.transfer`). This module is the git side of that:

- **push** (the pre-push hook): the commits being pushed are those reachable
  from the pushed shas and not from the remote's refs (what git-lfs does too);
  every manifest blob in their trees names objects, and the ones the server
  lacks are uploaded before git sends a single commit. An object that neither
  the local store nor the server has fails the push, naming the file and the
  tensor: a manifest must never reach a remote without its objects.
- **fetch** (`fmhub fetch`, and smudge via `LazyFetcher`): the manifests in
  the trees of some revisions, and the objects of theirs the store lacks.

Manifests are found with git's own plumbing (`fmhub.git.history`), so a
history with large raw files is listed, not read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence
from urllib.parse import urlparse

from fmhub.base.errors import FmhubError, ManifestError, RemoteUnavailable
from fmhub.base.gitrun import run
from fmhub.core.manifest import MAGIC, MAX_MANIFEST_BYTES, Manifest, is_manifest
from fmhub.core.repo import git, open_store, store_dir, toplevel
from fmhub.core.store import ObjectStore
from fmhub.git.history import blobs_in_history, blobs_in_trees, read_blobs
from fmhub.governance import audit


@dataclass(frozen=True)
class Needed:
    """One object a pushed or checked-out file needs, and where it is used (for messages)."""

    oid: str
    size: int
    path: str
    tensor: str  # a tensor name, or "<header>"

    @property
    def where(self) -> str:
        return f"{self.path}: {'the header' if self.tensor == '<header>' else f'tensor {self.tensor!r}'}"


@dataclass
class Summary:
    """What a push or fetch did: objects and bytes moved, and how many were needed in all."""

    count: int = 0
    bytes: int = 0
    needed: int = 0
    destination: str = ""


# -- finding manifests -----------------------------------------------------------


def _is_zero(sha: str) -> bool:
    return not sha.strip("0")


def _commit_exists(sha: str, cwd: str | None) -> bool:
    return bool(git("rev-parse", "--verify", "--quiet", f"{sha}^{{commit}}", cwd=cwd, check=False).strip())


def _needed(blobs: Iterable[tuple[str, bytes]]) -> dict[str, Needed]:
    """oid -> Needed for every object named by the manifests among ``blobs``."""
    needed: dict[str, Needed] = {}
    for path, data in blobs:
        if not is_manifest(data):
            continue
        try:
            m = Manifest.from_bytes(data, path)
        except ManifestError as exc:
            raise ManifestError(f"{exc}; its objects cannot be known (push with --no-verify to skip fmhub's check)") from None
        if m.header_oid is not None:  # a data file (manifest version 3) has no header, only chunks
            needed.setdefault(m.header_oid, Needed(m.header_oid, m.header_size, path, "<header>"))
        for t in m.tensors:
            for oid, size in t.storage():  # a delta chain needs its root and deltas, not the full object
                needed.setdefault(oid, Needed(oid, size, path, t.name))
    return needed


def push_rev_args(lines: Iterable[str], remote: str, cwd: str | None = None) -> list[str]:
    """`git rev-list` arguments for the commits a push sends: pushed shas, minus what the remote has.

    ``lines`` are the pre-push hook's stdin: ``<local ref> <local sha> <remote ref> <remote sha>``.
    Deletions (local sha all zeros) send nothing; a remote sha this repository
    does not have (someone else pushed it) cannot be excluded and is skipped.
    """
    include, exclude = [], []
    for line in lines:
        fields = line.split()
        if len(fields) != 4 or _is_zero(fields[1]):
            continue
        include.append(fields[1])
        if not _is_zero(fields[3]) and _commit_exists(fields[3], cwd):
            exclude.append(fields[3])
    if not include:
        return []
    return [*include, "--not", *exclude, f"--remotes={remote}"]


def needed_for_push(lines: Iterable[str], remote: str, cwd: str | None = None) -> dict[str, Needed]:
    args = push_rev_args(lines, remote, cwd)
    return _needed(read_blobs(blobs_in_history(args, cwd), cwd)) if args else {}


def needed_at(revs: Sequence[str], paths: Sequence[str] = (), cwd: str | None = None) -> dict[str, Needed]:
    return _needed(read_blobs(blobs_in_trees(revs, paths, cwd), cwd))


def objects_at(revs: Sequence[str], paths: Sequence[str] = (), cwd: str | None = None) -> list[tuple[str, int]]:
    """(oid, size) of every object the checkpoints committed at ``revs`` (under ``paths``) need."""
    return [(n.oid, n.size) for n in needed_at(revs, paths, cwd).values()]


def objects_in_index(paths: Sequence[str] = (), cwd: str | None = None) -> list[tuple[str, int]]:
    """(oid, size) of every object the manifests staged in git's index (under ``paths``) need.

    What `fmhub checkout` is about to materialize: the work tree of a clone made
    before `fmhub install` holds the same manifests as its index.
    """
    top = toplevel(cwd)
    out = git("ls-files", "-s", "-z", "--", *paths, cwd=cwd if paths else top)  # paths are relative to cwd
    shas = {}
    for entry in out.split("\0"):
        meta, _, path = entry.partition("\t")
        fields = meta.split()
        if len(fields) == 3 and fields[0] != "160000":
            shas.setdefault(fields[1], path)
    check = run(("cat-file", "--batch-check=%(objectname) %(objectsize)"), cwd=top, check=False,
                input="".join(f"{sha}\n" for sha in shas))
    blobs = []
    for line in check.stdout.splitlines():
        sha, _, size = line.partition(" ")
        if size.isascii() and size.isdigit() and len(MAGIC) <= int(size) <= MAX_MANIFEST_BYTES:
            blobs.append((sha, shas[sha]))
    return [(n.oid, n.size) for n in _needed(read_blobs(blobs, top)).values()]


def needed_in_history(revs: Sequence[str], cwd: str | None = None) -> dict[str, Needed]:
    """Every object named anywhere in the history of ``revs`` (`fmhub push-objects`)."""
    return _needed(read_blobs(blobs_in_history(list(revs), cwd), cwd))


# -- remotes ---------------------------------------------------------------------


def remote_names(cwd: str | None = None) -> list[str]:
    return git("remote", cwd=cwd, check=False).split()


def default_remote(cwd: str | None = None) -> str:
    """The remote objects come from: `fmhub.remote`, else the only remote, else ``origin``."""
    configured = git("config", "--get", "fmhub.remote", cwd=cwd, check=False).strip()
    if configured:
        return configured
    names = remote_names(cwd)
    return names[0] if len(names) == 1 else "origin"


def _remote_url(remote: str, cwd: str | None) -> str:
    return git("remote", "get-url", remote, cwd=cwd, check=False).strip() or remote


def _local_repo_store(url: str, cwd: str | None) -> ObjectStore | None:
    """The object store of a remote that is a repository on this machine (a path or file:// URL), else None."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = parsed.path
    elif parsed.scheme == "" and url and not (":" in url.split("/", 1)[0] and not os.path.exists(url.split("/", 1)[0])):
        path = url if os.path.isabs(url) else os.path.join(toplevel(cwd), url)
    else:
        return None
    for candidate in (os.path.join(path, ".git"), path):
        if os.path.isdir(os.path.join(candidate, "objects")):
            return ObjectStore.create(store_dir(candidate))
    return None


class _LocalDestination:
    """A remote repository on this machine without an LFS server: objects go into its own store.

    A later clone of that repository borrows from its store (`fmhub.core.repo.local_remote_stores`).
    """

    def __init__(self, store: ObjectStore, source: ObjectStore) -> None:
        self.store, self.source = store, source
        self.url = store.path

    def missing_on_server(self, objects):
        return [(oid, size) for oid, size in objects if not self.store.has(oid)]

    def upload(self, objects):
        count = nbytes = 0
        for oid, size in self.missing_on_server(objects):
            with self.source.open_object(oid) as f:  # imported from an alternate, or rebuilt if packed (`fmhub repack`)
                self.store.import_file(f, oid, os.fstat(f.fileno()).st_size, self.source.path)  # verified, atomic
            count, nbytes = count + 1, nbytes + size
        return Summary(count, nbytes)

    def close(self) -> None:
        self.store.close()


def _transfer(remote: str, store: ObjectStore, cwd: str | None, operation: str, url: str | None = None, progress=None):
    """A Transfer to ``remote``'s LFS endpoint; for a local remote without one (pushes only), its object store."""
    from fmhub.git import endpoint as rmt
    from fmhub.git import transfer as tr

    try:
        endpoint = rmt.endpoint_for(remote, cwd, operation=operation)
    except FmhubError:
        local = _local_repo_store(url or _remote_url(remote, cwd), cwd) if operation == "upload" else None
        if local is None:
            raise
        return _LocalDestination(local, store)
    return tr.Transfer(endpoint, store, progress=progress, **_transfer_settings(cwd))


def _transfer_settings(cwd: str | None) -> dict[str, int]:
    """git-lfs's own knobs, so one config tunes both tools: ``lfs.concurrenttransfers``, ``lfs.transfer.maxretries``."""
    settings = {}
    for key, name in (("lfs.concurrenttransfers", "concurrency"), ("lfs.transfer.maxretries", "retries")):
        value = git("config", "--get", key, cwd=cwd, check=False).strip()
        if value:
            try:
                settings[name] = int(value)
            except ValueError:
                raise FmhubError(f"git config {key} is {value!r}; it should be a whole number") from None
    return settings


def _destination(t) -> str:
    endpoint = getattr(t, "endpoint", None)
    return getattr(endpoint, "url", None) or getattr(t, "url", "") or str(endpoint or "")


# -- push and fetch --------------------------------------------------------------


def upload_needed(remote: str, needed: dict[str, Needed], cwd: str | None = None, url: str | None = None, progress=None) -> Summary:
    """Upload what the server lacks of ``needed``; fail, naming file and tensor, if an object is nowhere to be had."""
    if not needed:
        return Summary()
    store = open_store(cwd)
    t = None
    try:
        t = _transfer(remote, store, cwd, "upload", url, progress)
        absent = [n for n in needed.values() if not store.ensure(n.oid)]
        if absent:
            lost = {oid for oid, _ in t.missing_on_server([(n.oid, n.size) for n in absent])}
            lost_needed = [n for n in absent if n.oid in lost]
            if lost_needed:
                first = lost_needed[0]
                more = f" (and {len(lost_needed) - 1} more object(s))" if len(lost_needed) > 1 else ""
                raise FmhubError(
                    f"cannot push {first.where}: object sha256:{first.oid} is neither in the local store {store.path} "
                    f"nor on {_destination(t)}{more}; fetch it from a repository that has it (`fmhub fetch REMOTE REV`) "
                    "and push again, or push from the repository that committed it"
                )
        absent_oids = {n.oid for n in absent}
        present = [(n.oid, n.size) for n in needed.values() if n.oid not in absent_oids]
        report = t.upload(present)
    finally:
        if t is not None:
            t.close()
        store.close()
    return Summary(report.count, report.bytes, len(needed), _destination(t))


def push(remote: str, lines: list[str], url: str | None = None, cwd: str | None = None, progress=None) -> Summary:
    """The pre-push hook: upload every object the pushed commits need and the server lacks."""
    with audit.operation("push", remote, {"refs": [line.split(" ")[2] for line in lines if line.count(" ") >= 3]}, cwd) as facts:
        return _audited(facts, upload_needed(remote, needed_for_push(lines, remote, cwd), cwd, url, progress))


def push_objects(remote: str, revs: Sequence[str], cwd: str | None = None, progress=None) -> Summary:
    """Upload the objects of the whole history of ``revs`` that the server lacks (for pushes made before `fmhub install`)."""
    with audit.operation("push", remote, {"revs": list(revs)}, cwd) as facts:
        return _audited(facts, upload_needed(remote, needed_in_history(revs, cwd), cwd, progress=progress))


def _audited(facts: dict, summary: Summary) -> Summary:
    """Put a transfer's counts into its audit entry (the destination without credentials)."""
    facts.update(objects=summary.count, bytes=summary.bytes, needed=summary.needed, destination=audit.redact_url(summary.destination))
    return summary


def download_needed(remote: str, needed: Iterable[tuple[str, int]], store: ObjectStore, cwd: str | None = None, progress=None) -> Summary:
    """Download the objects of ``needed`` the store lacks (alternates first: a local origin's store is cheaper)."""
    need = [(oid, size) for oid, size in dict(needed).items() if not store.ensure(oid)]
    if not need:
        return Summary(needed=len(dict(needed)))
    t = _transfer(remote, store, cwd, "download", progress=progress)
    try:
        report = t.download(need)
    finally:
        t.close()
    return Summary(report.count, report.bytes, len(need), _destination(t))


def fetch(remote: str | None = None, revs: Sequence[str] = ("HEAD",), paths: Sequence[str] = (), cwd: str | None = None, progress=None) -> Summary:
    """Download every object the checkpoints committed at ``revs`` need, so later checkouts work offline."""
    remote = remote or default_remote(cwd)
    with audit.operation("fetch", remote, {"revs": list(revs) or ["HEAD"]}, cwd) as facts:
        needed = objects_at(list(revs) or ["HEAD"], paths, cwd)
        store = open_store(cwd)
        try:
            return _audited(facts, download_needed(remote, needed, store, cwd, progress))
        finally:
            store.close()


class LazyFetcher:
    """Downloads the objects one smudge lacks, from the default remote's LFS endpoint.

    One per filter process: the endpoint is resolved once; a server that could
    not be reached (or no endpoint at all) is remembered, so a checkout of many
    files fails fast instead of retrying the same dead server for each.
    """

    def __init__(self, store: ObjectStore, cwd: str | None = None) -> None:
        self.store, self.cwd = store, cwd
        self._transfer = None
        self._dead: str | None = None

    def __call__(self, objects: list[tuple[str, int]]) -> None:
        if self._dead is not None:
            raise FmhubError(self._dead)
        try:
            if self._transfer is None:
                remote = default_remote(self.cwd)
                self._transfer = _transfer(remote, self.store, self.cwd, "download")
            self._transfer.download(objects)
        except RemoteUnavailable as exc:
            self._dead = str(exc)
            raise
        except FmhubError as exc:
            if self._transfer is None:
                self._dead = str(exc)
            raise


def ensure_objects(objects: Iterable[tuple[str, int]], cwd: str | None = None, remote: str | None = None) -> Summary:
    """Download those of ``objects`` the local store lacks from ``remote`` (default: `default_remote`).

    For readers that need some objects before reading (`fmhub extract`):
    nothing touches the network when every object is already here.
    """
    store = open_store(cwd)
    try:
        need = [(oid, size) for oid, size in dict(objects).items() if not store.ensure(oid)]
        if not need:
            return Summary()
        remote = remote or default_remote(cwd)
        try:
            return download_needed(remote, need, store, cwd)
        except FmhubError as exc:
            raise type(exc)(f"{len(need)} object(s) are not in the store {store.path} and downloading them from {remote!r} failed: {exc}") from None
    finally:
        store.close()


def prefetch_index(paths: Sequence[str] = (), cwd: str | None = None) -> str | None:
    """Download what the manifests staged under ``paths`` lack (`fmhub checkout`); the reason it failed, or None.

    A failure is returned, not raised: the caller's own missing-object error
    names the file and tensor, and this reason says why downloading did not help.
    """
    try:
        ensure_objects(objects_in_index(paths, cwd), cwd)
    except FmhubError as exc:
        return str(exc)
    return None

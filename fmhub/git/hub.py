"""Hugging Face Hub repositories through `huggingface_hub`: `fmhub hub push` and `fmhub hub clone`.

For people who work with Hub repos rather than git remotes. The layout on the
Hub is written down in ``docs/hub.md`` (version 1):

- every checkpoint fmhub tracks is stored at its own path as its *manifest*;
- every object the manifests name is a file ``.fmhub/objects/OID[0:2]/OID[2:4]/OID``,
  an ordinary LFS (or Xet) file to the Hub, so the Hub keeps it because a
  commit references it, and a version that changed k tensors adds k files;
- ``.fmhub/hub.json`` records the layout version, the git commit pushed and
  the files pushed (so the next push can delete the ones that went away);
- every other file of the revision (config.json, tokenizer, README.md) as is.

Cloning a plain Hub repo (one fmhub did not push) imports it: its
``*.safetensors`` are tracked by fmhub from the first commit, so the clone
can be pushed back (to the same or another repo) in fmhub's layout.

A push is one Hub commit holding the manifests *and* their objects, so the Hub
never shows a manifest whose objects are missing; objects the Hub already has
are not sent again. A clone downloads the manifests and the other files, then
only the objects those manifests name, verifies each (sha256) into the store,
commits the revision to a fresh git repository and materializes the
checkpoints: the directory then loads with ``AutoModel.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from fmhub.base import boundedjson
from fmhub.base.errors import CorruptDownload, FmhubError, MissingObject, RemoteAuthError, RemoteUnavailable, TransferError
from fmhub.base.gitrun import run
from fmhub.core.manifest import MAX_MANIFEST_BYTES, Manifest, is_manifest
from fmhub.core.repo import git, open_store, toplevel
from fmhub.core.storewrite import IncomingMismatch
from fmhub.core.streams import copy_object

LAYOUT_VERSION = 1
OBJECTS_DIR = ".fmhub/objects"
HUB_JSON = ".fmhub/hub.json"
HUB_README = ".fmhub/README.md"
OBJECTS_ATTRIBUTES = f"{OBJECTS_DIR}/** filter=lfs diff=lfs merge=lfs -text"
RAW_IN_MEMORY = 64 << 20  # a plain file bigger than this is uploaded from a temp file, not from memory
DOWNLOAD_WORKERS = 8
MAX_HUB_TEXT = 16 << 20  # .gitattributes or .fmhub/hub.json read from a Hub repo: real ones take KiB

_README_TEXT = """\
# Stored by fmhub

The `*.safetensors` files of this repository are fmhub manifests: small text
files listing each tensor and the sha256 of its bytes. The bytes are the files
under `.fmhub/objects/`, one per tensor version, so a new version that changes
a few tensors adds only those. To get loadable checkpoints:

    pip install fmhub
    fmhub hub clone {repo_id} DIR        # add --revision REV for an older version
    python -c "from transformers import AutoModel; AutoModel.from_pretrained('DIR')"

Layout: https://github.com/fmhub/fmhub/blob/main/docs/hub.md (version {version}).
"""


def object_path(oid: str) -> str:
    """Where an object lives in a Hub repository (git-lfs's layout under ``.fmhub/objects``)."""
    return f"{OBJECTS_DIR}/{oid[:2]}/{oid[2:4]}/{oid}"


@dataclass
class PushResult:
    repo_id: str
    commit: str  # the Hub commit made (or the Hub head when nothing changed)
    url: str
    objects_sent: int = 0
    bytes_sent: int = 0
    objects_present: int = 0  # named by the manifests and already on the Hub
    files: int = 0  # files of the revision (manifests and others)
    deleted: list[str] = field(default_factory=list)
    changed: bool = True  # False: the Hub already held exactly these files, no commit was made


@dataclass
class CloneResult:
    repo_id: str
    revision: str  # the Hub commit cloned
    directory: str
    checkpoints: list[str]
    objects: int = 0
    bytes: int = 0
    imported: list[str] = field(default_factory=list)  # plain checkpoints of a repo fmhub did not push, now stored by fmhub


# -- errors ---------------------------------------------------------------------------


@contextlib.contextmanager
def hub_errors(repo_id: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub's and the HTTP stack's exceptions into fmhub errors that say what to do."""
    from huggingface_hub import errors as hf

    try:
        yield
    except FmhubError:
        raise
    except hf.RevisionNotFoundError as exc:
        raise FmhubError(f"{repo_id} on {endpoint} has no such revision: {_first_line(exc)}") from None
    except hf.RepositoryNotFoundError:
        raise RemoteAuthError(
            f"{repo_id} was not found on {endpoint}, or it is private and the token does not give access; "
            "check the id, and set HF_TOKEN (or run `hf auth login`) with a token that can read it"
        ) from None
    except hf.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise RemoteAuthError(
                f"{endpoint} refused the request for {repo_id} (HTTP {status}): {_first_line(exc)}; "
                "set HF_TOKEN (or run `hf auth login`) with a token that has write access"
            ) from None
        if status == 412:
            raise TransferError(
                f"{repo_id} changed on {endpoint} while pushing (someone else pushed); nothing was committed: run the push again"
            ) from None
        if status is not None and status >= 500:
            raise RemoteUnavailable(f"{endpoint} failed (HTTP {status}) for {repo_id}; nothing was committed: try again later") from None
        raise TransferError(f"{endpoint} answered for {repo_id}: {_first_line(exc)}") from None
    except hf.LocalTokenNotFoundError:
        raise RemoteAuthError("no Hugging Face token found: set HF_TOKEN or run `hf auth login`") from None
    except Exception as exc:
        if _is_connection_error(exc):
            raise RemoteUnavailable(
                f"cannot reach {endpoint} ({type(exc).__name__}: {_first_line(exc)}); check HF_ENDPOINT and the network, then retry"
            ) from None
        cause = exc.__cause__
        if isinstance(exc, RuntimeError) and cause is not None:
            # huggingface_hub wraps a failed LFS upload: "Error while uploading 'PATH' to the Hub."
            try:
                with hub_errors(repo_id, endpoint):
                    raise cause
            except FmhubError as inner:
                raise type(inner)(f"{' '.join(str(exc).split()).rstrip('.')}: {inner}; nothing was committed, run the push again") from None
        raise


def _is_connection_error(exc: BaseException) -> bool:
    module = type(exc).__module__.split(".")[0]
    return isinstance(exc, (ConnectionError, TimeoutError)) or module in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _api(endpoint: str | None, token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


def endpoint_of(api) -> str:
    from huggingface_hub import constants

    return (api.endpoint or constants.ENDPOINT).rstrip("/")


@contextlib.contextmanager
def _quiet_hf(show_bars: bool) -> Iterator[None]:
    """huggingface_hub's tqdm bars only on a terminal, and none of its warnings: fmhub reports what happened itself."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import logging as hf_logging

    was_disabled = are_progress_bars_disabled()
    level = hf_logging.get_verbosity()
    if not show_bars:
        disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if not was_disabled:
            enable_progress_bars()


# -- what a revision holds ------------------------------------------------------------


@dataclass
class _File:
    path: str
    sha: str  # git blob sha
    size: int
    manifest: Manifest | None = None
    raw: bytes | None = None  # the manifest's bytes, as git holds them
    lfs_oid: str | None = None  # a git-lfs pointer: the content is that LFS object


def revision_files(rev: str, cwd: str | None = None) -> tuple[str, list[_File]]:
    """(commit sha, regular files) of ``rev``; manifests parsed, git-lfs pointers recognised."""
    from fmhub.git.history import lfs_pointer, manifest_or_pointer, read_blobs

    top = toplevel(cwd)
    sha = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", cwd=top, check=False).strip()
    if not sha:
        raise FmhubError(f"unknown revision {rev!r}")
    files = []
    for entry in git("ls-tree", "-r", "-z", "-l", "--full-tree", sha, cwd=top).split("\0"):
        meta, _, path = entry.partition("\t")
        fields = meta.split()
        if len(fields) != 4 or fields[1] != "blob" or path.startswith(".fmhub/"):
            continue
        if fields[0] == "120000":
            raise FmhubError(f"{path} is a symbolic link at {rev}; the Hub stores files only: replace it with a copy")
        files.append(_File(path, fields[2], int(fields[3])))
    # one `git cat-file --batch` reads the manifests and pointers; other blobs are only sniffed here
    by_path = {f.path: f for f in files}
    small = [(f.sha, f.path) for f in files if f.size <= MAX_MANIFEST_BYTES]
    for path, data in read_blobs(small, top, wanted=manifest_or_pointer):
        f = by_path[path]
        if is_manifest(data):
            f.manifest, f.raw = Manifest.from_bytes(data, path), data
        elif (pointer := lfs_pointer(data)) is not None:
            f.lfs_oid, f.size = pointer.oid, pointer.size
    return sha, files


def _blob(sha: str, cwd: str, size: int) -> bytes:
    """The blob ``sha`` (``size`` bytes, as its tree says; no more is read)."""
    return run(("cat-file", "blob", sha), cwd=cwd, text=False, limit=size).stdout


def _gitattributes(hub_text: str | None, local_text: str | None) -> str:
    """The Hub's .gitattributes with fmhub's patterns routed as in the repository, and the objects dir as LFS.

    A Hub line for a pattern fmhub tracks (``*.safetensors filter=lfs`` by
    default) would make the Hub store manifests as LFS files; it is replaced.
    """
    from fmhub.git.install import ATTRIBUTES, DRIVER

    local_lines = (local_text or "").splitlines()
    ours = [ln for ln in local_lines if f"filter={DRIVER}" in ln.split()[1:]]
    patterns = {ln.split()[0] for ln in ours}
    kept = [ln for ln in (hub_text or "").splitlines() if not (ln.split() and ln.split()[0] in patterns | {f"{OBJECTS_DIR}/**"})]
    if not ours and not kept:
        ours = [f"*.safetensors {ATTRIBUTES}"]
    return "\n".join([*kept, *ours, OBJECTS_ATTRIBUTES]) + "\n"


# -- push -----------------------------------------------------------------------------


def _check_readable(files: list, top: str) -> None:
    """A push copies every object out of the store: checkout's read rule applies to each file (one line, nothing pushed)."""
    from fmhub.governance.access import require_readable

    for f in files:
        if f.manifest is not None:
            names = [] if f.manifest.is_data else [t.name for t in f.manifest.tensors]
            require_readable(f.path, names, top, via="fmhub hub push", outcome="nothing was pushed")


def push(
    repo_id: str,
    rev: str = "HEAD",
    branch: str = "main",
    message: str | None = None,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    cwd: str | None = None,
    progress: bool = False,
) -> PushResult:
    """Make the Hub branch hold ``rev``'s files in fmhub's layout, sending only objects the Hub lacks."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    top = toplevel(cwd)
    commit_sha, files = revision_files(rev, top)
    _check_readable(files, top)
    api = _api(endpoint, token)
    where = endpoint_of(api)
    store = open_store(top)
    tmpdir = tempfile.mkdtemp(prefix="fmhub-hub-push-")
    try:
        with hub_errors(repo_id, where), _quiet_hf(progress):
            api.create_repo(repo_id, private=private, exist_ok=True)
            head = _branch_head(api, repo_id, branch)
            present = _objects_on_hub(api, repo_id, head)
            previous = _read_json(api, repo_id, HUB_JSON, head)

            needed: dict[str, int] = {}
            for f in files:
                if f.manifest is not None:
                    needed.update(dict(f.manifest.oids()))
            missing = [oid for oid in needed if oid not in present and not store.ensure(oid)]
            if missing:
                users = [f.path for f in files if f.manifest and any(o in missing for o, _ in f.manifest.oids())]
                raise MissingObject(
                    f"{len(missing)} object(s) of {', '.join(users)} at {rev} are not in the local store {store.path} "
                    "(nor on the Hub); run `fmhub fetch` to download them from your git remote, then push again"
                )

            hub_attrs = _read_text(api, repo_id, ".gitattributes", head)
            local_attrs = next((_blob(f.sha, top, f.size).decode() for f in files if f.path == ".gitattributes"), None)
            attrs = _gitattributes(hub_attrs, local_attrs)
            if attrs != hub_attrs:
                # its own commit first: the Hub decides LFS vs. plain storage from the .gitattributes it already has
                info = api.create_commit(
                    repo_id, [CommitOperationAdd(".gitattributes", attrs.encode())], revision=branch,
                    commit_message="fmhub: store manifests as text and objects under .fmhub/objects as LFS",
                    parent_commit=head,
                )
                head = info.oid

            ops = []
            sent = 0
            for oid, size in needed.items():
                if oid not in present:
                    ops.append(CommitOperationAdd(object_path(oid), _object_file(store, oid, tmpdir)))
                    sent += size
            for f in files:
                if f.path == ".gitattributes":
                    continue
                ops.append(CommitOperationAdd(f.path, _content(f, store, top, tmpdir)))
            pushed = sorted(f.path for f in files)
            gone = sorted(set((previous or {}).get("files", [])) - set(pushed) - {".gitattributes"})
            ops += [CommitOperationDelete(p) for p in gone]
            record = {"layout": LAYOUT_VERSION, "source_commit": commit_sha, "files": pushed}
            ops.append(CommitOperationAdd(HUB_JSON, (json.dumps(record, indent=1) + "\n").encode()))
            ops.append(CommitOperationAdd(HUB_README, _README_TEXT.format(repo_id=repo_id, version=LAYOUT_VERSION).encode()))
            info = api.create_commit(
                repo_id, ops, revision=branch, parent_commit=head,
                commit_message=message or f"fmhub push of {commit_sha[:12]}: {_subject(commit_sha, top)}",
                commit_description=f"git commit {commit_sha}",
            )
    finally:
        store.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
    if not git("config", "--get", "fmhub.hub.repo", cwd=top, check=False).strip():
        git("config", "fmhub.hub.repo", repo_id, cwd=top)
    new = len([o for o in needed if o not in present])
    return PushResult(repo_id, info.oid, info.commit_url, new, sent, len(needed) - new, len(files), gone, changed=info.oid != head)


def _branch_head(api, repo_id: str, branch: str) -> str | None:
    """The commit the branch points at, or None for a branch the Hub does not have yet (it is created)."""
    from huggingface_hub import errors as hf

    try:
        return api.repo_info(repo_id, revision=branch).sha
    except hf.RevisionNotFoundError:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
        return api.repo_info(repo_id, revision=branch).sha


def _objects_on_hub(api, repo_id: str, revision: str | None) -> set[str]:
    from huggingface_hub import errors as hf

    try:
        entries = api.list_repo_tree(repo_id, path_in_repo=OBJECTS_DIR, recursive=True, revision=revision)
        return {e.path.rsplit("/", 1)[1] for e in entries if getattr(e, "size", None) is not None and "/" in e.path}
    except hf.EntryNotFoundError:
        return set()


def _read_text(api, repo_id: str, path: str, revision: str | None) -> str | None:
    """A small file of the Hub repo at ``revision``, or None when it has none; one over `MAX_HUB_TEXT` is refused."""
    from huggingface_hub import errors as hf

    with tempfile.TemporaryDirectory(prefix="fmhub-hub-") as d:
        try:
            local = api.hf_hub_download(repo_id, path, revision=revision, local_dir=d)
        except hf.EntryNotFoundError:
            return None
        with open(local, "rb") as f:
            data = f.read(MAX_HUB_TEXT + 1)  # the Hub repo is not ours: never read a file of it whole
    if len(data) > MAX_HUB_TEXT:
        raise TransferError(f"{path} in {repo_id} is over {MAX_HUB_TEXT >> 20} MiB, far more than it ever holds; "
                            "nothing was pushed: fix or delete it on the Hub, then push again")
    return data.decode("utf-8", "replace")


def _read_json(api, repo_id: str, path: str, revision: str | None) -> dict | None:
    """``.fmhub/hub.json`` as a dict whose ``files`` (when present) is a list of paths, else None."""
    text = _read_text(api, repo_id, path, revision)
    try:
        record = boundedjson.loads(text) if text else None  # json.loads: deep nesting raised RecursionError
    except ValueError:
        return None  # someone edited it by hand: treat as absent, the push rewrites it
    if not isinstance(record, dict):
        return None
    files = record.get("files")
    if not (isinstance(files, list) and all(isinstance(p, str) for p in files)):
        record.pop("files", None)  # then no file is deleted as "gone"; the push rewrites the record
    return record


def _object_file(store, oid: str, tmpdir: str) -> str:
    """A file holding an object's bytes: its own, or, when `fmhub repack` packed it, a rebuilt copy in ``tmpdir``."""
    if os.path.isfile(store.object_path(oid)):
        return store.object_path(oid)
    dest = os.path.join(tmpdir, oid)
    with open(dest, "wb") as out:
        copy_object(store, oid, out)  # verified; MissingObject if it is gone
    return dest


def _content(f: _File, store, top: str, tmpdir: str):
    """What to upload for a file: bytes when small, else a path (huggingface_hub streams paths)."""
    if f.raw is not None:
        return f.raw
    if f.lfs_oid is not None:
        if not store.ensure(f.lfs_oid):
            raise MissingObject(f"{f.path} is a git-lfs file whose object is not here; run `git lfs fetch` and push again")
        return store.object_path(f.lfs_oid)
    if f.size <= RAW_IN_MEMORY:
        return _blob(f.sha, top, f.size)
    dest = os.path.join(tmpdir, f.sha)
    with open(dest, "wb") as out:
        run(("cat-file", "blob", f.sha), cwd=top, stdout=out)
    return dest


def _subject(sha: str, cwd: str) -> str:
    return git("log", "-1", "--format=%s", sha, cwd=cwd, check=False).strip()


# -- clone ----------------------------------------------------------------------------


def clone(
    repo_id: str,
    directory: str,
    revision: str | None = None,
    checkout: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
    progress: bool = False,
) -> CloneResult:
    """A new git repository in ``directory`` holding the Hub revision, checkpoints materialized (unless ``checkout`` is False)."""
    from fmhub.git import install
    from fmhub.git import worktree

    api = _api(endpoint, token)
    where = endpoint_of(api)
    if os.path.exists(directory) and os.listdir(directory):
        raise FmhubError(f"{directory} exists and is not empty; clone into a new directory")
    created = not os.path.exists(directory)
    os.makedirs(directory, exist_ok=True)
    ok = False
    try:
        git("init", "-q", "-b", "main", cwd=directory)
        install.install(cwd=directory)
        with hub_errors(repo_id, where), _quiet_hf(progress):
            sha = api.repo_info(repo_id, revision=revision).sha
            staging = os.path.join(toplevel(directory), ".git", "fmhub-hub-download")
            api.snapshot_download(repo_id, revision=sha, local_dir=staging, ignore_patterns=[f"{OBJECTS_DIR}/*", HUB_JSON, HUB_README])
            checkpoints = _move_into(staging, directory)
            if not install.tracked_patterns(directory):
                # a plain Hub repo (not pushed by fmhub): route its checkpoints through fmhub from the first commit
                install.track(["*.safetensors"], cwd=directory)
            needed: dict[str, int] = {}
            for rel in checkpoints:
                with open(os.path.join(directory, rel), "rb") as f:  # bounded: from_bytes refuses one over the limit
                    needed.update(dict(Manifest.from_bytes(f.read(MAX_MANIFEST_BYTES + 1), rel).oids()))
            got, nbytes = (0, 0)
            if checkout:
                got, nbytes = download_objects(api, repo_id, sha, needed, directory)
        git("config", "fmhub.hub.repo", repo_id, cwd=directory)
        git("config", "fmhub.hub.revision", revision or "main", cwd=directory)
        # lazy downloads later (`--no-checkout`, `fmhub extract`) go through the Hub's LFS batch API
        git("config", "lfs.url", f"{where}/{repo_id}.git/info/lfs", cwd=directory)
        git("add", "-A", cwd=directory)
        _commit(directory, f"{repo_id}@{sha[:12]} from {where}", f"Hub commit {sha}")
        if checkout:
            worktree.materialize(None, cwd=directory)
        imported = [p for p in worktree.tracked_files(directory) if p not in checkpoints]
        ok = True
    finally:
        if not ok:
            if created:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                for name in os.listdir(directory):
                    p = os.path.join(directory, name)
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
    return CloneResult(repo_id, sha, directory, checkpoints, got, nbytes, imported)


def _move_into(staging: str, directory: str) -> list[str]:
    """Move downloaded files into the work tree (not huggingface_hub's ``.cache``); returns the manifests among them."""
    manifests = []
    for root, dirs, names in os.walk(staging):
        rel_root = os.path.relpath(root, staging)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if d != ".cache"]
        for name in names:
            rel = os.path.normpath(os.path.join(rel_root, name))
            dest = os.path.join(directory, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(os.path.join(root, name), dest)
            with open(dest, "rb") as f:
                if is_manifest(f.read(len(b"fmhub manifest "))):
                    manifests.append(rel)
    shutil.rmtree(staging, ignore_errors=True)
    return sorted(manifests)


def download_objects(api, repo_id: str, revision: str, needed: dict[str, int], cwd: str) -> tuple[int, int]:
    """Download the objects of ``needed`` the store lacks, verifying each before it enters the store."""
    store = open_store(cwd)
    want = [(oid, size) for oid, size in needed.items() if not store.ensure(oid)]
    tmp = tempfile.mkdtemp(dir=store.tmp_dir(), prefix="hub-")
    try:
        def one(item: tuple[str, int]) -> int:
            oid, size = item
            local = api.hf_hub_download(repo_id, object_path(oid), revision=revision, local_dir=tmp)
            try:
                store.adopt(local, oid, size)
            except IncomingMismatch as exc:
                raise CorruptDownload(
                    f"the Hub sent {object_path(oid)} but {exc}, not the object the manifest names; it was discarded: "
                    "retry, and tell the repository's owner if it persists"
                ) from None
            return size

        with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS) as pool:
            nbytes = sum(pool.map(one, want))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        store.close()
    return len(want), nbytes


def _commit(directory: str, subject: str, body: str) -> None:
    """Commit the index; an identity is supplied only when git has none configured."""
    ident = []
    if not git("config", "user.email", cwd=directory, check=False).strip():
        ident = ["-c", "user.name=fmhub", "-c", "user.email=fmhub@localhost"]
    git(*ident, "commit", "-q", "--allow-empty", "-m", subject, "-m", body, cwd=directory)


def default_repo_id(cwd: str | None = None) -> str | None:
    return git("config", "--get", "fmhub.hub.repo", cwd=cwd, check=False).strip() or None

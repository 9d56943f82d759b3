"""A small but real Hugging Face Hub API server for tests: git repositories, LFS storage, the real client.

`running_hub_server` starts it on 127.0.0.1, on a free port, in a thread, and
yields a `HubTestServer`. The real ``huggingface_hub`` client talks to it when
pointed at ``server.url``:

* in this process: ``HfApi(endpoint=server.url, token=False)``, and
  ``hf_hub_download(..., endpoint=server.url)`` / ``snapshot_download(...)``;
  or `use_hub_server` (monkeypatches env vars *and* the values
  ``huggingface_hub.constants`` read at import, so code that calls ``HfApi()``
  with no endpoint lands here too);
* in a subprocess: the variables of ``server.client_env()`` (``HF_ENDPOINT``,
  ``HF_HUB_DISABLE_XET=1``, ...).

``HF_HUB_DISABLE_XET`` is required: with ``hf_xet`` installed the client
uploads and downloads through Xet, which this server does not speak; disabled,
uploads take the legacy path (preupload, LFS batch API, PUT, commit).

Storage. Each repo is a real bare git repository (dulwich) under
``<root>/repos/<type>s/<namespace>/<name>.git`` whose branch ``main`` starts
with the Hub's default ``.gitattributes``. LFS files are stored in git as
standard pointer blobs, their content in one `dulwich.lfs.LFSStore` per server
at ``<root>/lfs`` (the layout git-lfs uses), so ``git clone`` of the bare repo
plus ``git lfs pull`` against ``server.lfs_url(repo_id)`` gives back the files.

Endpoints (``{repo}`` is ``namespace/name``; dataset and space repos work too,
under ``/api/datasets/...`` and ``/datasets/{repo}/...``):

===========================================================  ============================
``POST /api/repos/create``, ``DELETE /api/repos/delete``      create (409 if it exists) / delete
``GET /api/whoami-v2``                                        the one user, ``server.username``
``GET /api/models/{repo}[/revision/{rev}]``                   model info (``?blobs=1`` sizes, lfs)
``GET /api/models/{repo}/tree/{rev}[/{path}]``                ``?recursive=1&expand=1``
``POST /api/models/{repo}/paths-info/{rev}``                  form ``paths=...&expand=...``
``POST /api/models/{repo}/preupload/{rev}``                   lfs/regular per file, existing oid
``POST /api/models/{repo}/commit/{branch}``                   NDJSON commit (``parentCommit``: 412)
``GET /api/models/{repo}/commits/{rev}``, ``.../refs``        history, branches and tags
``POST|DELETE /api/models/{repo}/branch/{name}``              create (``startingPoint``) / delete
``POST /api/models/{repo}/tag/{rev}``                         lightweight tag ``{"tag": ...}``
``POST /{repo}.git/info/lfs/objects/batch``                   LFS batch API, upload and download
``PUT|GET /{repo}.git/info/lfs/objects/[{sig}/]{oid}``        basic transfer; ``POST .../verify``
``HEAD|GET /{repo}/resolve/{rev}/{path}``                     downloads, with Range
===========================================================  ============================

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``) and ``X-Error-Message`` headers and a ``{"error": ...}``
body, which is what ``huggingface_hub.utils.hf_raise_for_status`` turns into
``RepositoryNotFoundError`` and friends.

Not implemented: Xet (a client with it enabled gets 501 from
``.../xet-write-token``), pull requests (``create_pr``: 400), ``.gitignore``
handling in preupload (``shouldIgnore`` is always false), multipart and
chunked (no Content-Length) LFS uploads, pagination (every listing is one
page), git's smart HTTP protocol, access control per repo (``private`` is a
flag; `HubTestServer.require_token` guards everything).

The request log (``server.requests``, `HubRequest`) and the fault switches
(``fail_next``, ``corrupt``, ``cut_next_downloads``) work as in lfs_server.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping
from urllib.parse import parse_qs, quote, unquote, urlsplit

from dulwich.attrs import GitAttributes, compile_gitattributes_patterns, parse_git_attributes
from dulwich.errors import NotTreeError
from dulwich.index import commit_tree
from dulwich.lfs import LFSPointer, LFSStore
from dulwich.lfs_server import _is_valid_oid
from dulwich.object_store import iter_tree_contents
from dulwich.objects import Blob, Commit, Tree
from dulwich.refs import check_ref_format
from dulwich.repo import Repo

from tests.helpers.lfs_server import CHUNK, FaultSwitches, _Handler, _Server

# The .gitattributes the Hub writes into a new model repo (its first commit).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
).encode()

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # bigger files go to LFS whatever .gitattributes says, like on the Hub
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}  # URL segment -> repo_type
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}  # repo_type -> web URL prefix
# Words that follow a repo id in API paths: a one-segment repo id ("gpt2") is told apart by them.
_API_WORDS = {"revision", "tree", "paths-info", "preupload", "commit", "commits", "refs", "branch", "tag"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_SIGNATURE = re.compile(r"^[0-9a-f]{32}$")  # what _HubServer.sign makes: never a 64-hex oid
_FILE_MODE = 0o100644


class HubError(Exception):
    """An error answer: HTTP status, the Hub's ``X-Error-Code`` (if any), a message, extra headers/JSON."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


@dataclass
class HubRequest:
    """A request the server saw, in arrival order.

    ``method``, ``path`` (as sent, query included) and ``headers`` (a
    case-insensitive ``Message``) match `lfs_server.Request`; ``body`` is the
    body of API calls (JSON, NDJSON, forms; None for object transfers),
    ``body_size`` how many body bytes the server read (for an LFS upload PUT:
    the object bytes received), ``status`` the status answered.
    """

    method: str
    path: str
    headers: Message
    body: bytes | None = None
    body_size: int = 0
    status: int | None = None


class _CountingReader:
    """Wraps the request stream to count the body bytes read into the request's log record."""

    def __init__(self, raw: BinaryIO, record: HubRequest) -> None:
        self._raw = raw
        self._record = record

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._record.body_size += len(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        data = self._raw.readline(limit)
        self._record.body_size += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


@dataclass(frozen=True)
class _LFSRoute:
    """An LFS API path: its repo, ``oid`` ("batch" for the batch endpoint), verify or not, its href signature."""

    repo_type: str
    repo_id: str
    oid: str
    verify: bool
    signature: str | None


@dataclass(frozen=True)
class _BlobInfo:
    """What the API says about a git blob: its size, and the LFS pointer it holds (if it is one)."""

    size: int
    pointer: LFSPointer | None


def _iso(ts: int) -> str:
    """A git timestamp the way the Hub writes dates (``parse_datetime`` reads this)."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _clean_path(path: Any) -> str:
    """A path in a repo as the Hub accepts it (relative, no ``..``, nothing under ``.git``), else 400."""
    if not isinstance(path, str):
        raise HubError(400, f"invalid path {path!r}")
    parts = path.strip("/").split("/")
    if not path.strip("/") or any(p in ("", ".", "..", ".git") or "\0" in p for p in parts):
        raise HubError(400, f"invalid path in repo: {path!r}")
    return "/".join(parts)


def _config_value(config: Any, name: bytes) -> bytes | None:
    """A ``hub.<name>`` value of a repo's git config (where the server keeps repo metadata), or None."""
    try:
        return config.get((b"hub",), name)
    except KeyError:
        return None


def _split_title(message: bytes) -> tuple[str, str]:
    """A commit message's title (first line) and body (the rest), as the commits API lists them."""
    text = message.decode("utf-8", "replace")
    title, _, rest = text.partition("\n")
    return title.strip(), rest.strip()


class _RepoStore:
    """The git side: one bare repository per Hub repo, read per request, written under one lock.

    Readers open a fresh dulwich ``Repo`` per request (dulwich objects are not
    shared between threads); writers (create, commit, branch, tag) serialise
    on ``lock`` and move refs with compare-and-swap.
    """

    def __init__(self, root: Path, lfs: LFSStore, username: str) -> None:
        self.root = root
        self.lfs = lfs
        self.username = username
        self.lock = threading.Lock()
        self._blob_cache: dict[bytes, _BlobInfo] = {}  # by blob sha: blobs never change

    # -- repos -------------------------------------------------------------------------------

    def path(self, repo_type: str, repo_id: str) -> Path:
        """Where the bare repository of ``repo_id`` lives (whether or not it exists)."""
        parts = repo_id.split("/")
        if not 1 <= len(parts) <= 2 or not all(_NAME.match(p) and ".." not in p for p in parts):
            raise HubError(404, f"Repository {repo_id!r} not found (not a valid repo id)", "RepoNotFound")
        return self.root / f"{repo_type}s" / f"{repo_id}.git"

    @contextlib.contextmanager
    def open(self, repo_type: str, repo_id: str) -> Iterator[Repo]:
        """The dulwich ``Repo`` of ``repo_id``, closed afterwards; 404 ``RepoNotFound`` if there is none."""
        path = self.path(repo_type, repo_id)
        if not (path / "HEAD").is_file():
            raise HubError(404, f"Repository Not Found: {repo_type} {repo_id!r} does not exist", "RepoNotFound")
        repo = Repo(str(path))
        try:
            yield repo
        finally:
            repo.close()

    def create(self, repo_type: str, repo_id: str, private: bool = False) -> bool:
        """Create ``repo_id`` with an initial commit on ``main``; False if it already exists."""
        path = self.path(repo_type, repo_id)
        with self.lock:
            if (path / "HEAD").is_file():
                return False
            path.mkdir(parents=True)
            repo = Repo.init_bare(str(path), default_branch=b"main")
            try:
                config = repo.get_config()
                config.set((b"hub",), b"private", b"true" if private else b"false")
                config.set((b"hub",), b"createdAt", str(int(time.time())).encode())
                config.write_to_path()
                blob = Blob.from_string(DEFAULT_GITATTRIBUTES)
                repo.object_store.add_object(blob)
                tree = commit_tree(repo.object_store, [(b".gitattributes", blob.id, _FILE_MODE)])
                commit = self._new_commit(tree, [], "initial commit")
                repo.object_store.add_object(commit)
                repo.refs[b"refs/heads/main"] = commit.id
                repo.refs.set_symbolic_ref(b"HEAD", b"refs/heads/main")
            finally:
                repo.close()
            return True

    def delete(self, repo_type: str, repo_id: str) -> None:
        path = self.path(repo_type, repo_id)
        with self.lock:
            if not (path / "HEAD").is_file():
                raise HubError(404, f"Repository Not Found: {repo_id!r}", "RepoNotFound")
            shutil.rmtree(path)

    def _new_commit(self, tree: bytes, parents: list[bytes], message: str) -> Commit:
        commit = Commit()
        commit.tree = tree
        commit.parents = parents
        commit.author = commit.committer = f"{self.username} <{self.username}@users.noreply.hub.test>".encode()
        commit.author_time = commit.commit_time = int(time.time())
        commit.author_timezone = commit.commit_timezone = 0
        commit.encoding = b"UTF-8"
        commit.message = message.encode() if message.endswith("\n") else (message + "\n").encode()
        return commit

    # -- reading -----------------------------------------------------------------------------

    @staticmethod
    def resolve(repo: Repo, revision: str) -> bytes:
        """The commit sha a revision names (branch, tag, full ref, or full commit sha); else 404."""
        revision = revision or "main"
        if _HEX40.match(revision.lower()):
            sha = revision.lower().encode()
            if sha in repo.object_store and isinstance(repo.object_store[sha], Commit):
                return sha
        for ref in (revision, f"refs/heads/{revision}", f"refs/tags/{revision}"):
            name = ref.encode()
            if ref.startswith("refs/") and check_ref_format(name) and name in repo.refs:
                sha = repo.get_peeled(name)  # through annotated tags to the commit
                if isinstance(repo.object_store[sha], Commit):
                    return sha
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    @staticmethod
    def branch_ref(repo: Repo, revision: str) -> bytes:
        """The ref of the branch ``revision`` names (commits go to branches only); else 404."""
        name = revision if revision.startswith("refs/heads/") else f"refs/heads/{revision}"
        ref = name.encode()
        if not check_ref_format(ref) or ref not in repo.refs:
            raise HubError(404, f"Invalid rev id: {revision} is not a branch", "RevisionNotFound")
        return ref

    def blob_info(self, repo: Repo, sha: bytes) -> _BlobInfo:
        """Size and LFS pointer of a blob (pointers are small: only small blobs are parsed)."""
        info = self._blob_cache.get(sha)
        if info is None:
            data = repo.object_store[sha].as_raw_string()
            pointer = LFSPointer.from_bytes(data) if len(data) < 1024 else None
            if pointer is not None and not pointer.is_valid_oid():
                pointer = None
            info = _BlobInfo(len(data), pointer)
            self._blob_cache[sha] = info
        return info

    @staticmethod
    def lookup(repo: Repo, commit_sha: bytes, path: str) -> tuple[int, bytes] | None:
        """(mode, sha) of ``path`` in a commit's tree; None if there is no such path."""
        tree = repo.object_store[repo.object_store[commit_sha].tree]
        try:
            return tree.lookup_path(repo.object_store.__getitem__, path.encode())
        except (KeyError, NotTreeError):
            return None

    def entry(self, repo: Repo, path: str, mode: int, sha: bytes, last_commit_from: bytes | None = None) -> dict:
        """One entry of a tree listing, in the Hub's JSON shape (what ``RepoFile``/``RepoFolder`` parse)."""
        if stat.S_ISDIR(mode):
            out: dict[str, Any] = {"type": "directory", "oid": sha.decode(), "size": 0, "path": path}
        else:
            info = self.blob_info(repo, sha)
            out = {"type": "file", "oid": sha.decode(), "size": info.size, "path": path}
            if info.pointer is not None:
                out["size"] = info.pointer.size
                out["lfs"] = {"oid": info.pointer.oid, "size": info.pointer.size, "pointerSize": info.size}
        if last_commit_from is not None:
            for walk_entry in repo.get_walker(include=[last_commit_from], paths=[path.encode()], max_entries=1):
                commit = walk_entry.commit
                out["lastCommit"] = {"id": commit.id.decode(), "title": _split_title(commit.message)[0],
                                     "date": _iso(commit.commit_time)}
        return out

    def tree(self, repo: Repo, commit_sha: bytes, path: str, recursive: bool, expand: bool) -> list[dict]:
        """The entries under ``path`` (a folder), depth first; 404 ``EntryNotFound`` if it is not a folder."""
        if path:
            found = self.lookup(repo, commit_sha, path)
            if found is None or not stat.S_ISDIR(found[0]):
                what = "does not exist" if found is None else "is a file, not a folder"
                raise HubError(404, f"Entry not found: {path!r} {what}", "EntryNotFound",
                               {"X-Repo-Commit": commit_sha.decode()})
            tree_sha = found[1]
        else:
            tree_sha = repo.object_store[commit_sha].tree
        out: list[dict] = []

        def walk(sha: bytes, prefix: str) -> None:
            tree = repo.object_store[sha]
            assert isinstance(tree, Tree)
            for item in tree.iteritems():
                item_path = prefix + item.path.decode("utf-8", "replace")
                out.append(self.entry(repo, item_path, item.mode, item.sha, commit_sha if expand else None))
                if recursive and stat.S_ISDIR(item.mode):
                    walk(item.sha, item_path + "/")

        walk(tree_sha, f"{path}/" if path else "")
        return out

    def files(self, repo: Repo, commit_sha: bytes) -> dict[str, tuple[int, bytes]]:
        """path -> (mode, blob sha) of every file in a commit."""
        tree = repo.object_store[commit_sha].tree
        return {e.path.decode(): (e.mode, e.sha) for e in iter_tree_contents(repo.object_store, tree)}

    def attributes(self, repo: Repo, commit_sha: bytes) -> GitAttributes:
        """The gitattributes of a commit: root ``.gitattributes`` plus those of subfolders, git's precedence."""

        def load(dirpath: bytes) -> list:
            path = (dirpath + b"/.gitattributes" if dirpath else b".gitattributes").decode()
            found = self.lookup(repo, commit_sha, path)
            if found is None or stat.S_ISDIR(found[0]):
                return []
            data = repo.object_store[found[1]].as_raw_string()
            return compile_gitattributes_patterns(parse_git_attributes(io.BytesIO(data)), path, base=dirpath)

        return GitAttributes(load(b""), directory_loader=load)

    # -- writing -----------------------------------------------------------------------------

    def commit(self, repo_type: str, repo_id: str, revision: str, lines: list[dict]) -> bytes:
        """Apply the NDJSON operations of a ``/commit`` call on branch ``revision``; the new commit's sha."""
        if not lines or lines[0].get("key") != "header" or not isinstance(lines[0].get("value"), dict):
            raise HubError(400, "commit payload must start with a {'key': 'header', ...} line")
        header = lines[0]["value"]
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HubError(400, "commit summary must be a non-empty string")
        description = header.get("description") or ""
        message = summary.strip() + (f"\n\n{description.strip()}" if description.strip() else "")
        with self.lock, self.open(repo_type, repo_id) as repo:
            ref = self.branch_ref(repo, revision)
            head = repo.refs[ref]
            parent = header.get("parentCommit")
            if parent is not None and not (isinstance(parent, str) and len(parent) >= 5
                                           and head.decode().startswith(parent.lower())):
                raise HubError(412, f"A commit has happened since {parent}: {revision} is now at {head.decode()}."
                                    " Please refresh and try again.")
            files = self.files(repo, head)
            for line in lines[1:]:
                self._apply(repo, files, line)
            self._check_no_file_folder_clash(files)
            tree = commit_tree(repo.object_store, [(p.encode(), sha, mode) for p, (mode, sha) in files.items()])
            commit = self._new_commit(tree, [head], message)
            repo.object_store.add_object(commit)
            if not repo.refs.set_if_equals(ref, head, commit.id):
                raise HubError(412, f"{revision} moved while committing; please refresh and try again.")
            return commit.id

    def _apply(self, repo: Repo, files: dict[str, tuple[int, bytes]], line: dict) -> None:
        """Apply one operation line to the flat ``files`` map (blobs are written to the object store)."""
        key, value = line.get("key"), line.get("value")
        if not isinstance(value, dict):
            raise HubError(400, f"malformed commit line: {line!r}")
        path = _clean_path(value.get("path")) if key != "deletedFolder" else value.get("path")
        if not isinstance(path, str):
            raise HubError(400, f"malformed commit line, no path: {line!r}")
        if key == "file":
            content = value.get("content", "")
            try:
                data = (base64.b64decode(content, validate=True) if value.get("encoding") == "base64"
                        else str(content).encode())
            except (binascii.Error, ValueError) as e:
                raise HubError(400, f"{path}: content is not valid base64 ({e})") from None
            blob = Blob.from_string(data)
            repo.object_store.add_object(blob)
            files[path] = (_FILE_MODE, blob.id)
        elif key == "lfsFile":
            oid = value.get("oid")
            if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not _is_valid_oid(oid):
                raise HubError(400, f"{path}: lfsFile needs algo 'sha256' and a 64-hex oid, got {oid!r}")
            stored = self.lfs._sha_path(oid)
            if not os.path.isfile(stored):
                raise HubError(400, f"Your push was rejected because an LFS pointer pointed to a file that does not"
                                    f" exist: {path} (oid {oid}); upload it through the LFS batch API first")
            size = os.path.getsize(stored)
            if value.get("size") is not None and value["size"] != size:
                raise HubError(400, f"{path}: LFS object {oid} has size {size}, not {value['size']}")
            blob = Blob.from_string(LFSPointer(oid, size).to_bytes())
            repo.object_store.add_object(blob)
            files[path] = (_FILE_MODE, blob.id)
        elif key == "deletedFile":
            if path not in files:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del files[path]
        elif key == "deletedFolder":
            folder = path.strip("/")
            prefix = f"{_clean_path(folder)}/" if folder else ""
            doomed = [p for p in files if p.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"unknown commit operation {key!r}")

    @staticmethod
    def _check_no_file_folder_clash(files: dict[str, tuple[int, bytes]]) -> None:
        """A path cannot be both a file and a folder (git would store a broken tree)."""
        for path in files:
            parts = path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in files:
                    raise HubError(400, f"{path}: {'/'.join(parts[:i])} is a file, it cannot be a folder too")

    def set_ref(self, repo_type: str, repo_id: str, ref: bytes, starting_point: str | None) -> bytes:
        """Create ``ref`` at ``starting_point`` (default: main); 409 if it exists. Returns its commit."""
        if not check_ref_format(ref):
            raise HubError(400, f"invalid ref name {ref.decode()!r}")
        with self.lock, self.open(repo_type, repo_id) as repo:
            sha = self.resolve(repo, starting_point or "main")
            if not repo.refs.add_if_new(ref, sha):
                raise HubError(409, f"Reference already exists: {ref.decode()}")
            return sha

    def delete_ref(self, repo_type: str, repo_id: str, ref: bytes) -> None:
        with self.lock, self.open(repo_type, repo_id) as repo:
            if not check_ref_format(ref) or ref not in repo.refs:
                raise HubError(404, f"Invalid rev id: {ref.decode()}", "RevisionNotFound")
            if ref == b"refs/heads/main":
                raise HubError(403, "cannot delete the main branch")
            repo.refs.remove_if_equals(ref, None)


class _HubHandler(_Handler):
    """Routes Hub API, LFS and download requests; object transfers reuse lfs_server's streaming handler."""

    server: "_HubServer"

    def setup(self) -> None:
        super().setup()
        self._raw_rfile = self.rfile
        self._record: HubRequest | None = None
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def send_response(self, code: int, message: str | None = None) -> None:
        if self._record is not None:
            self._record.status = code
        super().send_response(code, message)

    # -- plumbing ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Log, apply injected faults, check the token, then route; a `HubError` becomes an error answer."""
        record = HubRequest(self.command, self.path, self.headers)
        self._record = record
        self.server.log.append(record)
        self.rfile = _CountingReader(self._raw_rfile, record)
        try:
            url = urlsplit(self.path)
            segs = [unquote(s) for s in url.path.split("/")[1:]]
            while segs and segs[-1] == "":
                segs.pop()
            query = parse_qs(url.query)
            if self._injected_failure():
                return
            lfs = self._lfs_route(segs)
            presigned = lfs is not None and lfs.signature is not None and hmac.compare_digest(
                lfs.signature, self.server.sign(lfs.oid))
            self._check_token(presigned)
            if lfs is not None and lfs.oid != "batch":
                self._lfs_transfer(lfs.oid, lfs.verify)
                return
            body = self._read_body()
            record.body = body
            self._route(segs, query, body, lfs)
        except HubError as e:
            self._read_body(keep=False)  # whatever is left of it, so the connection stays usable
            self._send_error(e)
        except Exception as e:  # a bug here: answer 500 with the traceback in the server's stderr
            traceback.print_exc(file=sys.stderr)
            self._send_error(HubError(500, f"test hub server error: {type(e).__name__}: {e}"))
        finally:
            self.rfile = self._raw_rfile

    def _read_body(self, keep: bool = True) -> bytes:
        """The (rest of the) request body, Content-Length or chunked; ``keep=False`` drops it chunk by chunk."""
        assert self._record is not None
        out = bytearray()
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            if getattr(self, "_chunked_done", None) is self._record:
                return b""
            self._chunked_done = self._record
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                while size > 0:
                    chunk = self.rfile.read(min(CHUNK, size))
                    if not chunk:
                        return bytes(out)
                    size -= len(chunk)
                    if keep:
                        out += chunk
                self.rfile.readline()  # the CRLF after the chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(out)
        left = int(self.headers.get("Content-Length") or 0) - self._record.body_size
        while left > 0:
            chunk = self.rfile.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            if keep:
                out += chunk
        return bytes(out)

    def _injected_failure(self) -> bool:
        """Answer with an injected failure (`HubTestServer.fail_next`); True if one was due."""
        with self.server.lock:
            faults = self.server.faults
            failing = faults.fail_left > 0 and faults.fail_method in (None, self.command)
            if failing:
                faults.fail_left -= 1
        if failing:
            self._read_body(keep=False)
            extra = {"Retry-After": faults.retry_after} if faults.retry_after is not None else {}
            self._send_error(HubError(faults.fail_status, "injected failure", headers=extra))
        return failing

    def _check_token(self, presigned: bool) -> None:
        """401 unless the right bearer token is sent, or the URL is a validly signed LFS transfer href.

        LFS transfer hrefs are signed, like the Hub's presigned storage URLs,
        because the client sends no Authorization header with the PUT.
        """
        want = self.server.token
        if want is None or presigned:
            return
        sent = self.headers.get("Authorization")
        if sent is not None and hmac.compare_digest(sent.encode(), f"Bearer {want}".encode()):
            return
        if self.command == "PUT":
            self._read_body(keep=False)
        if sent is None:
            raise HubError(401, "Authentication required: send 'Authorization: Bearer <token>' (this test Hub"
                                " has a required token)", headers={"WWW-Authenticate": 'Bearer realm="hub tests"'})
        # This exact message keeps the client from reading the 401 as "repo not found".
        raise HubError(401, "Invalid credentials in Authorization header",
                       headers={"WWW-Authenticate": 'Bearer realm="hub tests"'})

    def _send_json(self, status: int, data: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, e: HubError) -> None:
        """An error the way the Hub sends them: X-Error-Code / X-Error-Message headers and a JSON body."""
        headers = {"X-Error-Message": e.message.replace("\r", " ").replace("\n", " ").encode("ascii", "replace").decode()}
        if e.code:
            headers["X-Error-Code"] = e.code
        headers.update(e.headers)
        # "error" is what huggingface_hub reads, "message" what git-lfs reads.
        self._send_json(e.status, {"error": e.message, "message": e.message, **e.extra}, headers)

    def _base(self) -> str:
        """The URL the client used to reach us (so hrefs work through localhost vs 127.0.0.1)."""
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.base_url

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except ValueError as e:
            raise HubError(400, f"invalid JSON body: {e}") from None

    # -- routing -----------------------------------------------------------------------------

    @staticmethod
    def _repo_type_prefix(segs: list[str]) -> tuple[str, list[str]]:
        """("dataset", rest) for ``/datasets/...`` web paths, ("model", segs) otherwise."""
        if len(segs) > 1 and segs[0] in ("datasets", "spaces"):
            return REPO_TYPES[segs[0]], segs[1:]
        return "model", segs

    def _lfs_route(self, segs: list[str]) -> _LFSRoute | None:
        """What ``/{repo}.git/info/lfs/objects/...`` names; None for other paths.

        ``objects/batch``; ``objects/{oid}[/verify]`` (token needed if one is
        required); ``objects/{signature}/{oid}[/verify]`` (the hrefs the batch
        API hands out: the oid stays the last segment before ``verify``).
        """
        for i, seg in enumerate(segs):
            if seg.endswith(".git") and segs[i + 1:i + 3] == ["info", "lfs"]:
                repo_type, repo_segs = self._repo_type_prefix(segs[:i] + [seg[:-4]])
                repo_id, rest = "/".join(repo_segs), segs[i + 3:]
                if rest == ["objects", "batch"]:
                    return _LFSRoute(repo_type, repo_id, "batch", False, None)
                signature = rest[1] if len(rest) > 2 and _SIGNATURE.match(rest[1]) else None
                if signature is not None:
                    del rest[1]
                if rest[:1] == ["objects"] and len(rest) in (2, 3) and _is_valid_oid(rest[1]) \
                        and rest[2:] in ([], ["verify"]):
                    return _LFSRoute(repo_type, repo_id, rest[1], len(rest) == 3, signature)
                raise HubError(404, f"no such LFS endpoint: {'/'.join(segs[i + 3:])}")
        return None

    def _route(self, segs: list[str], query: dict[str, list[str]], body: bytes, lfs: _LFSRoute | None) -> None:
        method = self.command
        if lfs is not None:  # the batch endpoint (transfers were handled before the body was read)
            if method != "POST":
                raise HubError(405, "the LFS batch API takes POST")
            self._lfs_batch(lfs.repo_type, lfs.repo_id, self._json(body))
            return
        if segs[:1] == ["api"]:
            rest = segs[1:]
            if rest == ["repos", "create"] and method == "POST":
                self._create_repo(self._json(body))
            elif rest == ["repos", "delete"] and method == "DELETE":
                data = self._json(body)
                namespace = data.get("organization") or self.server.username
                self.server.repos.delete(data.get("type") or "model", f"{namespace}/{data.get('name')}")
                self._send_json(200, {})
            elif rest == ["whoami-v2"] and method == "GET":
                self._whoami()
            elif len(rest) >= 2 and rest[0] in REPO_TYPES:
                self._repo_api(REPO_TYPES[rest[0]], rest[1:], query, body)
            else:
                raise HubError(404, f"no such API endpoint: {method} /{'/'.join(segs)}")
            return
        repo_type, web = self._repo_type_prefix(segs)
        for n in (1, 2):  # /{repo_id}/resolve/{revision}/{path}, repo_id of one or two segments
            if len(web) > n + 2 and web[n] == "resolve" and method in ("GET", "HEAD"):
                self._resolve(repo_type, "/".join(web[:n]), web[n + 1], "/".join(web[n + 2:]))
                return
        raise HubError(404, f"Not Found: {method} {self.path}")

    def _repo_api(self, repo_type: str, segs: list[str], query: dict[str, list[str]], body: bytes) -> None:
        """``/api/{type}s/{repo_id}/...``: split the repo id from the action and dispatch."""
        if len(segs) >= 2 and segs[1] not in _API_WORDS:
            repo_id, rest = f"{segs[0]}/{segs[1]}", segs[2:]
        else:
            repo_id, rest = segs[0], segs[1:]
        method = self.command
        store = self.server.repos
        action = rest[0] if rest else ""
        flag = lambda name: (query.get(name, ["0"])[0].lower() in ("1", "true"))  # noqa: E731
        if action in ("preupload", "commit") and flag("create_pr"):
            raise HubError(400, "pull requests (create_pr) are not supported by the test hub")
        if not rest and method == "GET":
            self._info(repo_type, repo_id, "main", flag("blobs"))
        elif action == "revision" and len(rest) == 2 and method == "GET":
            self._info(repo_type, repo_id, rest[1], flag("blobs"))
        elif action == "tree" and len(rest) >= 2 and method == "GET":
            with store.open(repo_type, repo_id) as repo:
                sha = store.resolve(repo, rest[1])
                entries = store.tree(repo, sha, "/".join(rest[2:]).strip("/"), flag("recursive"), flag("expand"))
            self._send_json(200, entries)
        elif action == "paths-info" and len(rest) == 2 and method == "POST":
            form = parse_qs(body.decode())
            expand = form.get("expand", ["False"])[0].lower() in ("1", "true")
            with store.open(repo_type, repo_id) as repo:
                sha = store.resolve(repo, rest[1])
                out = []
                for path in form.get("paths", []):
                    path = path.strip("/")
                    found = store.lookup(repo, sha, path) if path else None
                    if found is not None:
                        out.append(store.entry(repo, path, found[0], found[1], sha if expand else None))
            self._send_json(200, out)
        elif action == "preupload" and len(rest) == 2 and method == "POST":
            self._preupload(repo_type, repo_id, rest[1], self._json(body))
        elif action == "commit" and len(rest) == 2 and method == "POST":
            self._commit(repo_type, repo_id, rest[1], body)
        elif action == "commits" and len(rest) == 2 and method == "GET":
            self._commits(repo_type, repo_id, rest[1], "formatted" in query.get("expand[]", []))
        elif action == "refs" and len(rest) == 1 and method == "GET":
            self._refs(repo_type, repo_id, flag("include_prs"))
        elif action == "branch" and len(rest) == 2 and method == "POST":
            ref = f"refs/heads/{rest[1]}".encode()
            sha = store.set_ref(repo_type, repo_id, ref, self._json(body).get("startingPoint"))
            self._send_json(200, {"name": rest[1], "ref": ref.decode(), "targetCommit": sha.decode()})
        elif action == "branch" and len(rest) == 2 and method == "DELETE":
            store.delete_ref(repo_type, repo_id, f"refs/heads/{rest[1]}".encode())
            self._send_json(200, {})
        elif action.startswith("xet-"):
            # What a client with hf_xet installed asks first: say plainly what to do instead.
            raise HubError(501, "Xet storage is not supported by this test Hub: set HF_HUB_DISABLE_XET=1 (and, if"
                                " huggingface_hub is already imported, huggingface_hub.constants.HF_HUB_DISABLE_XET)")
        elif action == "tag" and len(rest) == 2 and method == "POST":
            tag = self._json(body).get("tag")
            if not isinstance(tag, str) or not tag:
                raise HubError(400, "tag name required: {'tag': ...}")
            sha = store.set_ref(repo_type, repo_id, f"refs/tags/{tag}".encode(), rest[1])
            self._send_json(200, {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": sha.decode()})
        else:
            raise HubError(404, f"no such API endpoint: {method} {self.path}")

    # -- endpoints ---------------------------------------------------------------------------

    def _create_repo(self, data: dict) -> None:
        repo_type = data.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"unsupported repo type {repo_type!r}")
        name, org = data.get("name"), data.get("organization") or self.server.username
        if not isinstance(name, str) or not _NAME.match(name) or not _NAME.match(str(org)):
            raise HubError(400, f"invalid repo name {org}/{name}")
        repo_id = f"{org}/{name}"
        private = bool(data.get("private")) or data.get("visibility") == "private"
        url = f"{self._base()}/{URL_PREFIXES[repo_type]}{repo_id}"
        if not self.server.repos.create(repo_type, repo_id, private):
            # The client reads "url" from the 409 too (create_repo(exist_ok=True)).
            raise HubError(409, f"You already created this {repo_type} repo: {repo_id}", extra={"url": url})
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _whoami(self) -> None:
        if self.headers.get("Authorization") is None:
            raise HubError(401, "Authentication required: whoami needs a token")
        name = self.server.username
        self._send_json(200, {"type": "user", "id": name, "name": name, "fullname": "Hub Test User",
                              "email": f"{name}@users.noreply.hub.test", "orgs": [],
                              "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}}})

    def _info(self, repo_type: str, repo_id: str, revision: str, blobs: bool) -> None:
        """Model (dataset, space) info at a revision, in the shape ``ModelInfo(**data)`` accepts."""
        store = self.server.repos
        with store.open(repo_type, repo_id) as repo:
            sha = store.resolve(repo, revision)
            commit = repo.object_store[sha]
            siblings = []
            for path, (_, blob) in store.files(repo, sha).items():
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    info = store.blob_info(repo, blob)
                    sibling.update(size=info.pointer.size if info.pointer else info.size, blobId=blob.decode())
                    if info.pointer is not None:
                        sibling["lfs"] = {"size": info.pointer.size, "sha256": info.pointer.oid, "pointerSize": info.size}
                siblings.append(sibling)
            config = repo.get_config()
            private = _config_value(config, b"private") == b"true"
            created = int(_config_value(config, b"createdAt") or commit.commit_time)
        data = {"_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24], "id": repo_id,
                "author": repo_id.split("/")[0] if "/" in repo_id else None, "sha": sha.decode(),
                "lastModified": _iso(commit.commit_time), "createdAt": _iso(created), "private": private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
                "siblings": siblings, "spaces": []}
        if repo_type == "model":
            data["modelId"] = repo_id
        self._send_json(200, data)

    def _preupload(self, repo_type: str, repo_id: str, revision: str, data: dict) -> None:
        """Say, per file, "lfs" or "regular" the way the Hub decides, and the oid of what is there now.

        LFS when the path has ``filter=lfs`` in the ``.gitattributes`` at that
        revision, or the file is over `LFS_SIZE_THRESHOLD`, or its sample (the
        first 512 bytes) has a NUL byte. The oid of an existing file is its
        sha256 for an LFS file, its git blob sha otherwise: the client compares
        it with its own to skip unchanged files.
        """
        files = data.get("files")
        if not isinstance(files, list):
            raise HubError(400, "preupload needs {'files': [{'path', 'sample', 'size'}, ...]}")
        store = self.server.repos
        out = []
        with store.open(repo_type, repo_id) as repo:
            sha = store.resolve(repo, revision)
            attrs = store.attributes(repo, sha)
            for f in files:
                path = _clean_path(f.get("path"))
                try:
                    sample = base64.b64decode(f.get("sample") or "")
                except (binascii.Error, ValueError):
                    raise HubError(400, f"{path}: sample is not base64") from None
                size = int(f.get("size") or 0)
                lfs = (attrs.match_path(path.encode()).get(b"filter") == b"lfs"
                       or size > LFS_SIZE_THRESHOLD or b"\0" in sample)
                answer: dict[str, Any] = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                                          "shouldIgnore": False}
                found = store.lookup(repo, sha, path)
                if found is not None and not stat.S_ISDIR(found[0]):
                    pointer = store.blob_info(repo, found[1]).pointer
                    answer["oid"] = pointer.oid if pointer is not None else found[1].decode()
                out.append(answer)
        self._send_json(200, {"files": out, "commitOid": sha.decode()})

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        """``POST .../commit/{branch}``: NDJSON operations -> a git commit (see `_RepoStore.commit`)."""
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"commit body is not NDJSON: {e}") from None
        if not all(isinstance(line, dict) for line in lines):
            raise HubError(400, "commit body: every NDJSON line must be an object")
        sha = self.server.repos.commit(repo_type, repo_id, revision, lines).decode()
        url = f"{self._base()}/{URL_PREFIXES[repo_type]}{repo_id}/commit/{sha}"
        self._send_json(200, {"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None})

    def _commits(self, repo_type: str, repo_id: str, revision: str, formatted: bool) -> None:
        store = self.server.repos
        out = []
        with store.open(repo_type, repo_id) as repo:
            sha = store.resolve(repo, revision)
            for walk_entry in repo.get_walker(include=[sha]):
                commit = walk_entry.commit
                title, message = _split_title(commit.message)
                author = commit.author.decode("utf-8", "replace").split(" <")[0]
                item: dict[str, Any] = {"id": commit.id.decode(), "title": title, "message": message,
                                        "authors": [{"user": author, "avatar": None}], "date": _iso(commit.commit_time)}
                if formatted:
                    item["formatted"] = {"title": title, "message": message}
                out.append(item)
        self._send_json(200, out)

    def _refs(self, repo_type: str, repo_id: str, include_prs: bool) -> None:
        with self.server.repos.open(repo_type, repo_id) as repo:
            def listed(prefix: bytes) -> list[dict]:
                return [{"name": name.decode(), "ref": (prefix + b"/" + name).decode(),
                         "targetCommit": repo.get_peeled(prefix + b"/" + name).decode()}
                        for name in sorted(repo.refs.as_dict(prefix))]
            data = {"branches": listed(b"refs/heads"), "converts": [], "tags": listed(b"refs/tags")}
        if include_prs:
            data["pullRequests"] = []
        self._send_json(200, data)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        """``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: the file, with the headers hf_hub_download reads.

        ``X-Repo-Commit`` (the commit), ``ETag`` (git blob sha; sha256 for LFS
        files), ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, and
        ``Content-Length``; a ``Range`` gets a 206. LFS content is served here
        directly (the Hub redirects to a CDN; the client accepts either).
        """
        store = self.server.repos
        with store.open(repo_type, repo_id) as repo:
            sha = store.resolve(repo, revision)
            commit = sha.decode()
            found = store.lookup(repo, sha, path.strip("/")) if path.strip("/") else None
            if found is None or stat.S_ISDIR(found[0]):
                raise HubError(404, f"Entry not found: {path} at {commit}", "EntryNotFound", {"X-Repo-Commit": commit})
            info = store.blob_info(repo, found[1])
            headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if info.pointer is None:
                content: bytes | None = repo.object_store[found[1]].as_raw_string()
                size, oid = info.size, None
                headers["ETag"] = f'"{found[1].decode()}"'
            else:
                content, size, oid = None, info.pointer.size, info.pointer.oid
                if not os.path.isfile(store.lfs._sha_path(oid)):
                    raise HubError(404, f"LFS object {oid} of {path} is missing on the server", "EntryNotFound",
                                   {"X-Repo-Commit": commit})
                headers.update({"ETag": f'"{oid}"', "X-Linked-Etag": f'"{oid}"', "X-Linked-Size": str(size)})
        start, end = self._range(size)
        status = 206 if (start, end) != (0, size) else 200
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        if content is not None:
            self._stream(io.BytesIO(content), start, end, None)
        else:
            with open(store.lfs._sha_path(oid), "rb") as f:
                self._stream(f, start, end, oid)

    def _range(self, size: int) -> tuple[int, int]:
        """[start, end) the ``Range`` header asks for (whole file without one); 416 if unsatisfiable."""
        header = self.headers.get("Range")
        if not header:
            return 0, size
        m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
        if not m or (not m.group(1) and not m.group(2)):
            raise HubError(416, f"unsupported Range {header!r}", headers={"Content-Range": f"bytes */{size}"})
        if not m.group(1):  # suffix: the last N bytes
            if int(m.group(2)) == 0 or size == 0:
                raise HubError(416, f"Range {header!r} is empty", headers={"Content-Range": f"bytes */{size}"})
            return max(size - int(m.group(2)), 0), size
        start = int(m.group(1))
        end = min(int(m.group(2)) + 1, size) if m.group(2) else size
        if start >= size or start >= end:
            raise HubError(416, f"Range {header!r} outside a {size}-byte file", headers={"Content-Range": f"bytes */{size}"})
        return start, end

    def _stream(self, f: BinaryIO, start: int, end: int, oid: str | None) -> None:
        """Send bytes [start, end) of ``f`` in chunks, honouring the corrupt/cut fault switches for LFS objects."""
        with self.server.lock:
            faults = self.server.faults
            corrupt = oid is not None and oid in faults.corrupt
            cut = oid is not None and faults.cut_left > 0
            if cut:
                faults.cut_left -= 1
        f.seek(start)
        left = end - start
        if cut:  # half the body, then hang up: a connection lost mid-download
            left //= 2
        pos = start
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            if corrupt and pos == 0:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]  # same length, wrong bytes
            self.wfile.write(chunk)
            pos += len(chunk)
            left -= len(chunk)
        if cut:
            self.close_connection = True

    # -- LFS ---------------------------------------------------------------------------------

    def _lfs_batch(self, repo_type: str, repo_id: str, data: dict) -> None:
        """The LFS batch API: upload actions for objects the store lacks, download actions for those it has."""
        with self.server.repos.open(repo_type, repo_id):
            pass  # 404 RepoNotFound for unknown repos, like the Hub
        operation = data.get("operation")
        if operation not in ("upload", "download"):
            raise HubError(400, f"invalid operation {operation!r}")
        if data.get("transfers") and "basic" not in data["transfers"]:
            raise HubError(422, "only the 'basic' transfer adapter is supported")
        store = self.server.lfs_store
        base = f"{self._base()}/{URL_PREFIXES[repo_type]}{quote(repo_id)}.git/info/lfs/objects"
        out = []
        for obj in data.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            answer: dict[str, Any] = {"oid": oid, "size": size}
            path = store._sha_path(oid) if isinstance(oid, str) and _is_valid_oid(oid) else None
            if path is None or not isinstance(size, int) or size < 0:
                answer["error"] = {"code": 422, "message": "invalid oid or size"}
            elif os.path.isfile(path) and os.path.getsize(path) != size:
                answer["error"] = {"code": 422, "message": f"size mismatch: the server's {oid} has {os.path.getsize(path)} bytes"}
            elif operation == "download":
                if os.path.isfile(path):
                    answer["authenticated"] = True
                    answer["actions"] = {"download": {"href": f"{base}/{self.server.sign(oid)}/{oid}"}}
                else:
                    answer["error"] = {"code": 404, "message": "Object does not exist"}
            elif not os.path.isfile(path):  # an object the server has gets no actions: nothing to send
                answer["authenticated"] = True
                answer["actions"] = {
                    "upload": {"href": f"{base}/{self.server.sign(oid)}/{oid}",
                               "header": {"Content-Type": "application/octet-stream"}},
                    "verify": {"href": f"{base}/{self.server.sign(oid)}/{oid}/verify"},
                }
            out.append(answer)
        self.send_json_response(200, {"objects": out})

    def _lfs_transfer(self, oid: str, verify: bool) -> None:
        """PUT/GET an object, or verify it: lfs_server's streaming, sha-checking handlers."""
        self.path = f"/objects/{oid}/verify" if verify else f"/objects/{oid}"
        if verify and self.command == "POST":
            self.handle_verify()
        elif not verify and self.command == "PUT":
            self.handle_upload()
        elif not verify and self.command == "GET":
            self.handle_download()
        else:
            raise HubError(405, f"{self.command} not allowed on an LFS object URL")


class _HubServer(_Server):
    """lfs_server's server (LFS store, request log, fault switches) plus the repos, the token and open connections."""

    def __init__(self, address: tuple[str, int], root: Path, username: str) -> None:
        super().__init__(address, LFSStore.create(str(root / "lfs")))
        self.RequestHandlerClass = _HubHandler
        host, port = self.server_address[:2]
        self.base_url = f"http://{host}:{port}"
        self.username = username
        self.repos = _RepoStore(root / "repos", self.lfs_store, username)
        self.token: str | None = None
        self._secret = secrets.token_bytes(16)
        self._connections: set[socket.socket] = set()

    def sign(self, oid: str) -> str:
        """The signature that lets an LFS transfer href through without a token (a presigned URL)."""
        return hmac.new(self._secret, oid.encode(), hashlib.sha256).hexdigest()[:32]

    def track(self, conn: socket.socket, is_open: bool) -> None:
        with self.lock:
            (self._connections.add if is_open else self._connections.discard)(conn)

    def close_connections(self) -> None:
        """Hang up on keep-alive connections, so their handler threads end with the server."""
        with self.lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class HubTestServer(FaultSwitches):
    """Handle on a running test Hub: where it is, what it holds, what it saw, and switches.

    Attributes: ``url`` (the endpoint: ``HfApi(endpoint=url)``, ``HF_ENDPOINT``),
    ``root`` (its directory), ``username`` (the namespace of repos created
    without one; what ``whoami`` answers).
    """

    def __init__(self, server: _HubServer, thread: threading.Thread, root: Path) -> None:
        self._server = server
        self._thread = thread
        self.url = server.base_url
        self.root = root
        self.username = server.username
        self._stopped = False

    # -- what it saw -------------------------------------------------------------------------

    @property
    def requests(self) -> list[HubRequest]:
        """A snapshot of every request seen so far, in arrival order."""
        return list(self._server.log)

    def clear_log(self) -> None:
        self._server.log.clear()

    def uploads(self) -> list[HubRequest]:
        """The LFS object PUTs seen so far (``body_size`` = bytes received, ``status`` = the answer)."""
        return [r for r in self.requests if r.method == "PUT" and "/info/lfs/objects/" in r.path]

    # -- what it holds -----------------------------------------------------------------------

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> str:
        """Create a repo directly (no HTTP), with its initial commit; returns the head commit of main."""
        if "/" not in repo_id:
            repo_id = f"{self.username}/{repo_id}"
        if not self._server.repos.create(repo_type, repo_id, private):
            raise FileExistsError(repo_id)
        return self.head(repo_id, repo_type=repo_type)

    def git_repo(self, repo_id: str, repo_type: str = "model") -> Path:
        """Path of the bare git repository of ``repo_id`` (``git clone`` it, or ``dulwich.repo.Repo`` it)."""
        path = self._server.repos.path(repo_type, repo_id)
        if not (path / "HEAD").is_file():
            raise KeyError(f"no {repo_type} repo {repo_id!r}")
        return path

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """The commit sha ``revision`` (branch, tag, sha) resolves to; KeyError if there is no such repo or revision."""
        try:
            with self._server.repos.open(repo_type, repo_id) as repo:
                return _RepoStore.resolve(repo, revision).decode()
        except HubError as e:
            raise KeyError(e.message) from None

    def lfs_objects(self) -> dict[str, int]:
        """oid -> size of every LFS object the server holds."""
        root = Path(self._server.lfs_store.path) / "objects"
        return {p.name: p.stat().st_size for p in root.rglob("*") if p.is_file()}

    def lfs_object_path(self, oid: str) -> Path:
        return Path(self._server.lfs_store._sha_path(oid))

    def lfs_object_bytes(self, oid: str) -> bytes:
        return self.lfs_object_path(oid).read_bytes()

    def lfs_url(self, repo_id: str, repo_type: str = "model") -> str:
        """The LFS API base of a repo, for git-lfs's ``lfs.url`` (``<url>/<repo>.git/info/lfs``)."""
        return f"{self.url}/{URL_PREFIXES[repo_type]}{repo_id}.git/info/lfs"

    # -- switches ----------------------------------------------------------------------------

    def require_token(self, token: str | None) -> None:
        """From now on answer 401 to requests without ``Authorization: Bearer <token>`` (None: open again).

        Signed LFS transfer hrefs from the batch API go through without it, as
        the Hub's presigned storage URLs do.
        """
        self._server.token = token

    # -- clients -----------------------------------------------------------------------------

    def client_env(self, token: str | None = None) -> dict[str, str]:
        """Environment variables that point a ``huggingface_hub`` client in a *new process* here.

        ``HF_HUB_DISABLE_XET`` forces the LFS upload path; telemetry off stops
        the client's one-off fetch of ``/api/agent-harnesses``.
        """
        env = {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def stop(self) -> None:
        """Stop serving and hang up open connections (idempotent); the files stay."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(5)


@contextlib.contextmanager
def running_hub_server(root_dir: Path | str | None = None, username: str = "user") -> Iterator[HubTestServer]:
    """Start a test Hub on 127.0.0.1 in a thread, storing under ``root_dir`` (a temp dir if None, then removed)."""
    own = root_dir is None
    root = Path(tempfile.mkdtemp(prefix="hub-server-") if own else root_dir)
    root.mkdir(parents=True, exist_ok=True)
    server = _HubServer(("127.0.0.1", 0), root, username)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name="hub-test-server")
    thread.start()
    hub = HubTestServer(server, thread, root)
    try:
        yield hub
    finally:
        hub.stop()
        if own:
            shutil.rmtree(root, ignore_errors=True)


def use_hub_server(monkeypatch: Any, server: HubTestServer, hf_home: Path | str, token: str | None = None) -> None:
    """Point the ``huggingface_hub`` *already imported in this process* at ``server``, via pytest's monkeypatch.

    The client reads ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET``, ``HF_HOME`` and
    friends once, at import, into ``huggingface_hub.constants``: setting the
    environment alone is too late. This sets both (the environment also
    reaches subprocesses), so ``HfApi()`` and ``hf_hub_download(...)`` work
    with no ``endpoint=``. ``token`` becomes ``HF_TOKEN``; otherwise none is
    sent (and no token file from the user's home is read).
    """
    from huggingface_hub import constants

    hf_home = Path(hf_home)
    env = server.client_env(token)
    env.update(HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    for key, value in {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
    }.items():
        monkeypatch.setattr(constants, key, value, raising=False)

"""Access policies on the LFS server: authentication and per-object checks, so enforcement does not rely on the client.

Two layers, usable apart:

* `PolicyGate`, independent of any HTTP framework: ``authenticate`` maps an
  ``Authorization`` header (``Bearer TOKEN``, or HTTP Basic with the token as
  password) to a `Principal` through a tokens file; ``check_repo`` refuses a
  token for another repository; ``check_object`` decides one object download
  (``read``) or upload (``write``) with every installed `fmhub.interfaces.AccessPolicy`, knowing which path
  (and tensor) the object belongs to from an `OidIndex` of the bare
  repository's manifests; ``filter_batch`` splits a batch request into the
  objects to pass on and per-object 403 errors, per the LFS batch API.
* `policy_handler(Handler)`: wraps a ``http.server`` handler class that
  speaks the LFS API (dulwich's ``LFSRequestHandler`` and subclasses, like
  the test server's) with the gate: 401 for a missing or unknown token, 403
  for a token for another repository, per-object ``{"error": {"code": 403}}``
  in batch answers, 403 for direct GETs of denied objects. The server object
  must carry the gate as ``policy_gate``.

The tokens file (YAML or JSON)::

    tokens:
      "s3cr3t-token": {user: alice@example.com, repos: [models]}
      "sha256:9f86d08...": {user: bob@example.com, repos: [models, data]}  # the token's sha256, not the token

The policy is the repository's ``.fmhub/policy.yaml`` at its default branch
(``HEAD``). The index covers every manifest reachable from any ref and is
rebuilt when the refs change. An object no manifest names is decided by the
policy's ``default``. Denials name the rule's ``file:line`` and the role to
ask for, never a path the requester did not name nor another user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import yaml

from fmhub.errors import FmhubError
from fmhub.interfaces import AccessRequest, Decision

POLICY_PATHS = (".fmhub/policy.yaml",)


class GateError(FmhubError):
    """A request refused as a whole: ``status`` is 401 (who are you?) or 403 (not this repository)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Principal:
    user: Optional[str]
    repos: frozenset[str]


# -- tokens ---------------------------------------------------------------------------------


class Tokens:
    """token -> Principal, from a tokens file (plain tokens, or ``sha256:HEX`` of tokens)."""

    def __init__(self, entries: Mapping[str, Principal]) -> None:
        self._entries = dict(entries)

    @classmethod
    def load(cls, path: str) -> "Tokens":
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise FmhubError(f"{path}: cannot read the tokens file ({getattr(exc, 'strerror', None) or 'not valid YAML'})") from None
        return cls.from_mapping(data.get("tokens", data) if isinstance(data, dict) else {}, path)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "tokens") -> "Tokens":
        entries = {}
        for token, info in data.items():
            if not isinstance(info, dict) or not isinstance(info.get("repos", []), list):
                raise FmhubError(f"{where}: each token maps to {{user: NAME, repos: [REPO, ...]}}")
            entries[str(token)] = Principal(info.get("user") or None, frozenset(str(r) for r in info.get("repos", [])))
        return cls(entries)

    def lookup(self, token: str) -> Optional[Principal]:
        digest = "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()
        found = None
        for key, principal in self._entries.items():  # compare every key in constant time: no early exit
            if hmac.compare_digest(key.encode("utf-8"), token.encode("utf-8")) or hmac.compare_digest(key.encode("utf-8"), digest.encode()):
                found = principal
        return found


def token_of(authorization: Optional[str]) -> Optional[str]:
    """The token in an Authorization header: ``Bearer TOKEN``, or the password of HTTP Basic."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            _user, _, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return password or None
    return None


# -- which path and tensor an object belongs to -------------------------------------------------


class OidIndex:
    """oid -> {(path, tensor or None)} over every manifest reachable from a bare repository's refs; the policy at HEAD."""

    def __init__(self, repo_path: str) -> None:
        self.repo_path = repo_path
        self._lock = threading.Lock()
        self._refs: Optional[dict] = None
        self._owners: dict[str, set[tuple[str, Optional[str]]]] = {}
        self._files: dict[str, Optional[bytes]] = {}

    def refresh(self) -> None:
        from dulwich.repo import Repo

        with self._lock:
            repo = Repo(self.repo_path)
            try:
                refs = dict(repo.get_refs())
                if refs == self._refs:
                    return
                self._owners, self._files = self._build(repo, refs), {}
                for p in POLICY_PATHS:
                    self._files[p] = _file_at_head(repo, p)
                self._refs = refs
            finally:
                repo.close()

    def _build(self, repo, refs: Mapping[bytes, bytes]) -> dict[str, set[tuple[str, Optional[str]]]]:
        from dulwich.objects import Blob, Commit, Tag, Tree

        from fmhub.manifest import MAX_MANIFEST_BYTES, Manifest, is_manifest

        store = repo.object_store
        heads = []
        for sha in set(refs.values()):
            try:
                obj = store[sha]
                while isinstance(obj, Tag):
                    obj = store[obj.object[1]]
            except KeyError:
                continue
            if isinstance(obj, Commit):
                heads.append(obj.id)
        blob_paths: dict[bytes, set[str]] = {}
        seen_trees: set[tuple[bytes, str]] = set()

        def walk(tree_id: bytes, prefix: str) -> None:
            if (tree_id, prefix) in seen_trees:
                return
            seen_trees.add((tree_id, prefix))
            tree = store[tree_id]
            if not isinstance(tree, Tree):
                return
            for entry in tree.items():
                name = prefix + entry.path.decode("utf-8", "surrogateescape")
                if entry.mode & 0o170000 == 0o040000:
                    walk(entry.sha, name + "/")
                elif entry.mode & 0o170000 == 0o100000:
                    blob_paths.setdefault(entry.sha, set()).add(name)

        if heads:
            for w in repo.get_walker(include=heads):
                walk(w.commit.tree, "")
        owners: dict[str, set[tuple[str, Optional[str]]]] = {}
        for sha, paths in blob_paths.items():
            blob = store[sha]
            if not isinstance(blob, Blob) or blob.raw_length() > MAX_MANIFEST_BYTES:
                continue
            data = blob.as_raw_string()
            if not is_manifest(data):
                continue
            for path in paths:
                try:
                    m = Manifest.from_bytes(data, path)
                except FmhubError:
                    continue
                for oid, _size in m.oids():
                    owners.setdefault(oid, set())
                for t in m.tensors:
                    for oid, _size in t.storage():
                        owners.setdefault(oid, set()).add((path, None if m.is_data else t.name))
                if m.header_oid is not None:
                    owners[m.header_oid].add((path, None))
        return owners

    def owners(self, oid: str) -> set[tuple[str, Optional[str]]]:
        with self._lock:
            return set(self._owners.get(oid, ()))

    def read_file(self, path: str) -> Optional[bytes]:
        with self._lock:
            return self._files.get(path)


def _file_at_head(repo, path: str) -> Optional[bytes]:
    from dulwich.objects import Tree

    try:
        tree = repo[repo[b"HEAD"].tree]
        for part in path.encode("utf-8").split(b"/"):
            if not isinstance(tree, Tree):
                return None
            _mode, sha = tree[part]
            tree = repo[sha]
        return tree.as_raw_string()
    except KeyError:
        return None


# -- the gate ---------------------------------------------------------------------------------


@dataclass
class PolicyGate:
    """Authentication and access checks for an LFS server serving ``repos`` (name -> bare repository path)."""

    repos: Mapping[str, str]
    tokens: Tokens
    record: bool = True
    _indexes: dict = field(default_factory=dict, repr=False)

    def index(self, repo: str, refresh: bool = True) -> OidIndex:
        """The repository's index, brought up to date with its refs (a batch refreshes once, not per object)."""
        idx = self._indexes.get(repo)
        if idx is None:
            idx = self._indexes[repo] = OidIndex(self.repos[repo])
            refresh = True
        if refresh:
            idx.refresh()
        return idx

    def authenticate(self, authorization: Optional[str]) -> Principal:
        token = token_of(authorization)
        principal = self.tokens.lookup(token) if token else None
        if principal is None:
            self._record_refusal(None, "", "unknown or missing token", 401)
            raise GateError(401, "credentials needed: send a valid token (Authorization: Bearer TOKEN)")
        return principal

    def check_repo(self, principal: Principal, repo: Optional[str], action: str = "read") -> list[str]:
        """The repositories this request may touch: ``[repo]``, or the token's (for URLs that name none); 403 otherwise."""
        if repo is None:
            mine = sorted(r for r in principal.repos if r in self.repos)
            if not mine:
                self._record_refusal(principal, "", "token for no repository on this server", 403)
                raise GateError(403, "access denied: this token is for no repository on this server")
            return mine
        if repo not in principal.repos or repo not in self.repos:
            self._record_refusal(principal, repo, "token for another repository", 403)
            raise GateError(403, f"access denied: this token does not grant access to repository {repo!r}")
        return [repo]

    def check_object(self, principal: Principal, repos: Iterable[str], oid: str, action: str = "read",
                     refresh: bool = True) -> Optional[str]:
        """None when the object may be downloaded (``read``) or uploaded (``write``), else the one-line reason to send (recorded)."""
        from fmhub import access

        repos = list(repos)
        known = {repo: self.index(repo, refresh).owners(oid) for repo in repos}
        if action == "read" and not any(known.values()) and any(self.index(r, refresh).owners(oid) for r in self.repos if r not in known):
            # one LFS store may serve several repositories: an object of another one is not this token's to fetch
            req = AccessRequest(principal.user, action, ",".join(repos), None, oid=oid)
            d = Decision(False, "the object belongs to a repository this token does not grant", policy="lfs-server")
            if self.record and repos:
                access.record(req, d, {"via": "lfs-server"}, cwd=self.repos[repos[0]])
            return f"access denied: this token may not {action} object {oid}"
        first: Optional[tuple[AccessRequest, Decision]] = None
        allowed: Optional[tuple[AccessRequest, Decision]] = None
        for repo in repos:
            idx = self.index(repo, refresh=False)
            if any(known.values()) and not known[repo]:
                continue  # decided by the repositories that hold it
            owners = known[repo] or {(None, None)}
            for path, tensor in sorted(owners, key=lambda o: (o[0] or "", o[1] or "")):
                req = AccessRequest(principal.user, action, repo, path, tensor=tensor, oid=oid, read_file=idx.read_file)
                d, governed = access.decide(req)
                if d.allowed:
                    if action == "read":  # reading: any place that allows it will do (the bytes are the same)
                        if governed and self.record:
                            access.record(req, d, {"via": "lfs-server"}, cwd=self.repos[repo])
                        return None
                    allowed = allowed or ((req, d) if governed else None)
                    continue
                first = first or (req, d)
        if first is None and action == "write" and repos:
            # writing: every place the object is known at must allow it (one denied tensor is enough to refuse)
            if allowed is not None and self.record:
                access.record(*allowed, {"via": "lfs-server"}, cwd=self.repos[allowed[0].repo])
            return None
        if first is None:
            return "access denied: no repository"
        req, d = first
        if self.record:
            access.record(req, d, {"via": "lfs-server"}, cwd=self.repos[req.repo])
        who = principal.user or "an unknown user"
        msg = f"access denied: {who} may not {action} object {oid}: {d.reason or 'restricted by the access policy'}"
        if d.where:
            msg += f" ({d.where})"
        if d.roles:
            msg += f"; ask a maintainer for role {' or '.join(repr(r) for r in d.roles)}"
        return msg

    def filter_batch(self, principal: Principal, repos: list[str], batch: Mapping[str, Any]) -> tuple[dict, list[dict]]:
        """(the batch to pass on, with denied objects removed; response entries for the denied ones).

        A download needs ``read`` on some place the object is stored. An upload
        needs ``write``: where the object is already indexed, on those
        paths/tensors; a new object's path is unknown until its ref is pushed,
        so it is decided as the repository as a whole (``default``, rules
        without ``paths`` or over ``*``/``**``).
        """
        operation = batch.get("operation")
        if operation not in ("download", "upload"):
            return dict(batch), []
        action = "read" if operation == "download" else "write"
        keep, denied = [], []
        for repo in self.repos:
            self.index(repo)  # once per batch
        for obj in batch.get("objects") or []:
            oid = obj.get("oid") if isinstance(obj, dict) else None
            if not isinstance(oid, str):
                keep.append(obj)
                continue
            reason = self.check_object(principal, repos, oid, action, refresh=False)
            if reason is None:
                keep.append(obj)
            else:
                denied.append({"oid": oid, "size": obj.get("size"), "error": {"code": 403, "message": reason}})
        return {**batch, "objects": keep}, denied

    def _record_refusal(self, principal: Optional[Principal], repo: str, why: str, status: int) -> None:
        if not self.record:
            return
        from fmhub import access

        req = AccessRequest(principal.user if principal else None, "read", repo or "", None)
        for name, path in self.repos.items():
            if not repo or name == repo:
                access.record(req, Decision(False, why, policy="lfs-server"), {"status": status, "via": "lfs-server"}, cwd=path)
                break


# -- the HTTP wrapper ---------------------------------------------------------------------------


def repo_of(path: str) -> Optional[str]:
    """``/models.git/info/lfs/objects/batch`` -> ``models``; None for URLs that name no repository (``/objects/OID``)."""
    marker = path.find("/info/lfs")
    if marker <= 0:
        return None
    name = path[:marker].strip("/")
    return name[:-4] if name.endswith(".git") else name


def policy_handler(base: type) -> type:
    """A subclass of the LFS handler class ``base`` that enforces the server's ``policy_gate`` (a `PolicyGate`)."""

    class PolicyHandler(base):  # type: ignore[misc, valid-type]
        _denied: list = []

        def _gate(self) -> PolicyGate:
            return self.server.policy_gate

        def _refuse(self, status: int, message: str) -> None:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                chunk = self.rfile.read(min(1 << 20, left))
                if not chunk:
                    break
                left -= len(chunk)
            body = json.dumps({"message": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.git-lfs+json")
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("LFS-Authenticate", 'Basic realm="fmhub"')
                self.send_header("WWW-Authenticate", 'Basic realm="fmhub"')
            self.end_headers()
            self.wfile.write(body)

        def _admit(self, action: str) -> Optional[tuple[Principal, list[str]]]:
            try:
                principal = self._gate().authenticate(self.headers.get("Authorization"))
                return principal, self._gate().check_repo(principal, repo_of(self.path), action)
            except GateError as exc:
                self._refuse(exc.status, str(exc))
                return None

        def do_POST(self) -> None:
            admitted = self._admit("read")
            if admitted is None:
                return
            if not self.path.rstrip("/").endswith("/objects/batch"):
                return super().do_POST()
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                batch = json.loads(body)
            except ValueError:
                batch = None
            denied: list = []
            if isinstance(batch, dict):
                batch, denied = self._gate().filter_batch(*admitted, batch)
                body = json.dumps(batch).encode()
            saved = self.rfile
            self.rfile = io.BufferedReader(io.BytesIO(body))  # type: ignore[assignment]
            del self.headers["Content-Length"]
            self.headers["Content-Length"] = str(len(body))
            self._denied = denied
            try:
                super().do_POST()
            finally:
                self.rfile, self._denied = saved, []

        def send_json_response(self, status_code, data) -> None:
            if self._denied and isinstance(data, dict) and "objects" in data:
                data = {**data, "objects": list(data["objects"]) + self._denied}
            super().send_json_response(status_code, data)

        def do_GET(self) -> None:
            admitted = self._admit("read")
            if admitted is None:
                return
            oid = self.path.rstrip("/").rsplit("/", 1)[-1]
            if "/objects/" in self.path and len(oid) == 64:
                reason = self._gate().check_object(admitted[0], admitted[1], oid)
                if reason is not None:
                    return self._refuse(403, reason)
            super().do_GET()

        def do_PUT(self) -> None:
            admitted = self._admit("write")
            if admitted is None:
                return
            oid = self.path.rstrip("/").rsplit("/", 1)[-1]
            if "/objects/" in self.path and len(oid) == 64:  # a direct PUT must not skip the batch's write check
                reason = self._gate().check_object(admitted[0], admitted[1], oid, "write")
                if reason is not None:
                    return self._refuse(403, reason)
            super().do_PUT()

    PolicyHandler.__name__ = PolicyHandler.__qualname__ = f"Policy{base.__name__}"
    return PolicyHandler

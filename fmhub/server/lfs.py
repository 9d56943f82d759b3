"""The Git LFS API: giftless (a WSGI Git LFS server with pluggable storage) wired to fmhub's decisions.

What fmhub adds around giftless:

* `FmhubIdentity`: giftless asks it before every download, verify and
  upload; downloads and verifies are decided by `RepoGuard` (audited),
  uploads are open to everyone the repository's tokens name, because an
  upload is only bytes until a push names them (checked then).
* `VerifiedStorage`: wraps giftless's local or S3 storage. An upload is
  streamed to a temp file under a size bound while its sha256 is computed,
  and stored only when the hash is the oid (fsync, then rename, or an S3
  upload of the checked file), so nobody can replace an object by other
  bytes. Objects the requester may not read look absent to the batch
  answer, so an upload batch tells nobody what exists.
* `handle_batch`: the batch request is parsed and checked here (400 with a
  JSON message when malformed), denied objects answered with per-object
  403s, the rest passed to giftless.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import tempfile
from typing import Any, Callable, Iterable, Optional

from fmhub.base import boundedjson
from fmhub.server.guard import RepoGuard
from fmhub.base.units import parse_uint
from fmhub.server.tokens import Principal

ORG = "_"  # giftless routes /<organization>/<repo>.git/info/lfs/...; fmhub's URLs are /<repo>.git/info/lfs/...
OID_RE = re.compile(r"[0-9a-f]{64}\Z")
MAX_BATCH_BYTES = 4 << 20
MAX_BATCH_OBJECTS = 10_000
MAX_VERIFY_BYTES = 1 << 16
JSON_TYPE = "application/vnd.git-lfs+json"


class BadRequest(Exception):
    """A request that is not what the API takes: answered 400 with ``{"message": ...}``."""


# -- giftless's view of who is asking ---------------------------------------------------


@functools.lru_cache(maxsize=1)
def identity_class():
    from giftless.auth.identity import Identity, Permission
    from giftless.exc import Forbidden

    class FmhubIdentity(Identity):
        def __init__(self, principal: Principal, guard: RepoGuard) -> None:
            super().__init__(name=principal.user, id=principal.user, email=principal.user)
            self.principal, self.guard = principal, guard

        def is_authorized(self, organization: str, repo: str, permission, oid: Optional[str] = None) -> bool:
            if organization != ORG or repo != self.guard.name:
                return False
            if permission == Permission.WRITE:
                return True  # decided when a push names the object (fmhub.server.receive)
            if oid is None:  # handle_batch decided each object, and says so in the environ it passes giftless
                return bool(_environ().get("fmhub.batch_checked"))
            denied = self.guard.check_read(self.principal, oid, via="download" if permission == Permission.READ else "verify")
            if denied:
                raise Forbidden(denied)
            return True

    return FmhubIdentity


def authenticate(request) -> Any:
    """giftless's authenticator: the identity `fmhub.server.app` put in the request."""
    return request.environ.get("fmhub.identity")


def authenticator_factory() -> Callable:
    return authenticate


# -- storage that checks what it stores ---------------------------------------------------


class VerifiedStorage:
    """A giftless StreamingStorage that stores an upload only when its bytes hash to its oid."""

    def __init__(self, inner, staging: str, max_size: int, local_root: Optional[str] = None) -> None:
        self.inner, self.staging, self.max_size, self.local_root = inner, staging, max_size, local_root
        os.makedirs(staging, exist_ok=True)

    # giftless asks these
    def exists(self, prefix: str, oid: str) -> bool:
        if oid in _environ().get("fmhub.hidden", ()):
            return False  # the requester may not read it: answer as for any object that is not here
        return self.inner.exists(prefix, oid)

    def get_size(self, prefix: str, oid: str) -> int:
        return self.inner.get_size(prefix, oid)

    def get_mime_type(self, prefix: str, oid: str) -> str:
        return "application/octet-stream"

    def verify_object(self, prefix: str, oid: str, size: int) -> bool:
        return self.inner.exists(prefix, oid) and self.inner.get_size(prefix, oid) == size

    def get(self, prefix: str, oid: str) -> Iterable[bytes]:
        if self.local_root is not None:
            f = open(self._local_path(prefix, oid), "rb")
            wrapper = _environ().get("wsgi.file_wrapper")
            return wrapper(f, 1 << 20) if wrapper else iter(lambda: f.read(1 << 20), b"")
        body = self.inner.get(prefix, oid)
        read = getattr(body, "read", None)
        return iter(lambda: read(1 << 20), b"") if read else body

    def put(self, prefix: str, oid: str, data_stream) -> int:
        from giftless.exc import InvalidPayload
        from werkzeug.exceptions import RequestEntityTooLarge

        if not OID_RE.match(oid):
            raise InvalidPayload("an object id is 64 lowercase hex digits (its sha256)")
        declared = _environ().get("CONTENT_LENGTH")
        if (parse_uint(declared or "") or 0) > self.max_size:  # not a number: _receive still stops at the limit
            raise RequestEntityTooLarge(f"objects on this server are at most {self.max_size} bytes")
        fd, tmp = tempfile.mkstemp(dir=self.staging, prefix="upload-", suffix=".tmp")
        try:
            size = self._receive(fd, data_stream, oid)
            self._store(prefix, oid, tmp)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        identity = _environ().get("fmhub.identity")
        if identity is not None:
            identity.guard.uploads.add(oid, identity.principal.user)
            identity.guard.record(identity.principal.user, oid, "allow", {"action": "upload", "size": size}, what="upload")
        return size

    def _receive(self, fd: int, stream, oid: str) -> int:
        from giftless.exc import InvalidPayload
        from werkzeug.exceptions import RequestEntityTooLarge

        h, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if size > self.max_size:
                    raise RequestEntityTooLarge(f"objects on this server are at most {self.max_size} bytes")
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != oid:
            raise InvalidPayload(f"the uploaded bytes do not hash to {oid}; nothing was stored")
        return size

    def _store(self, prefix: str, oid: str, tmp: str) -> None:
        if self.local_root is None:
            with open(tmp, "rb") as f:
                self.inner.put(prefix, oid, f)
            return
        final = self._local_path(prefix, oid)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(tmp, final)
        dfd = os.open(os.path.dirname(final), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _local_path(self, prefix: str, oid: str) -> str:
        return os.path.join(self.local_root, prefix, oid)

    def stored(self, repo: str, oid: str) -> bool:
        """Whether the object is stored for ``repo`` (the server's own question: no requester, nothing hidden)."""
        return self.inner.exists(f"{ORG}/{repo}", oid)


def _environ() -> dict:
    from flask import has_request_context, request

    return request.environ if has_request_context() else {}


def make_storage(root: str, storage_dir: Optional[str], s3: Optional[dict], max_size: int) -> VerifiedStorage:
    """Local storage under ``storage_dir`` (default ``ROOT/.fmhub/lfs``), or giftless's S3 storage when ``s3`` is given."""
    import giftless.transfer  # noqa: F401  (first: giftless's modules import each other in this order only)

    if s3:
        from giftless.storage.amazon_s3 import AmazonS3Storage

        return VerifiedStorage(AmazonS3Storage(**s3), os.path.join(root, ".fmhub", "tmp"), max_size)
    from giftless.storage.local_storage import LocalStorage

    path = os.path.abspath(storage_dir or os.path.join(root, ".fmhub", "lfs"))
    # staged beside the objects: a rename into place cannot cross filesystems (--storage on another disk)
    return VerifiedStorage(LocalStorage(path=path), os.path.join(path, ".tmp"), max_size, local_root=path)


def make_lfs_app(storage: VerifiedStorage):
    """giftless's Flask application, with fmhub's authenticator and storage; no anonymous access, no legacy URLs."""
    from giftless.app import init_app

    config = {
        "LEGACY_ENDPOINTS": False,
        "AUTH_PROVIDERS": [{"factory": "fmhub.server.lfs:authenticator_factory"}],
        "PRE_AUTHORIZED_ACTION_PROVIDER": None,
        "TRANSFER_ADAPTERS": {"basic": {"factory": "fmhub.server.lfs:_transfer_factory", "options": {"storage": storage}}},
    }
    # giftless keeps its transfer adapters in a module-level registry: one server application per process
    return init_app(additional_config=config)


def _transfer_factory(storage: VerifiedStorage, **_giftless_defaults):
    from giftless.transfer.basic_streaming import BasicStreamingTransferAdapter

    return BasicStreamingTransferAdapter(storage, action_lifetime=900)


# -- the batch request -----------------------------------------------------------------------


def parse_batch(body: bytes) -> dict:
    """The batch request, checked; `BadRequest` naming what is wrong."""
    try:
        req = boundedjson.loads(body)  # json.loads: a body of 1,000 "[" raised RecursionError, a 500
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the batch request is not JSON") from None
    if not isinstance(req, dict):
        raise BadRequest("the batch request is a JSON object")
    if req.get("operation") not in ("download", "upload"):
        raise BadRequest('"operation" is "download" or "upload"')
    objects = req.get("objects")
    if not isinstance(objects, list) or not 0 < len(objects) <= MAX_BATCH_OBJECTS:
        raise BadRequest(f'"objects" is a list of 1 to {MAX_BATCH_OBJECTS} objects')
    for i, obj in enumerate(objects):
        check_object(obj, f"objects[{i}]")
    transfers = req.get("transfers", ["basic"])
    if not isinstance(transfers, list) or not all(isinstance(t, str) for t in transfers):
        raise BadRequest('"transfers" is a list of names')
    if req.get("hash_algo", "sha256") != "sha256":
        raise BadRequest('this server stores objects by sha256 ("hash_algo": "sha256")')
    return req


def check_object(obj: Any, what: str) -> None:
    """``{"oid": HEX64, "size": N}`` (more keys allowed), else `BadRequest` saying what ``what`` needs."""
    if not isinstance(obj, dict) or not isinstance(obj.get("oid"), str) or not OID_RE.match(obj["oid"]):
        raise BadRequest(f'{what} needs "oid": 64 lowercase hex digits')
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest(f'{what} needs "size": a whole number of bytes')


def check_verify(environ: dict) -> None:
    """A verify body is {"oid": HEX64, "size": N}; 400 otherwise (and the body is put back for giftless)."""
    body = read_body(environ, MAX_VERIFY_BYTES)
    try:
        req = boundedjson.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the verify request is not JSON") from None
    check_object(req, "the verify request")
    environ.update({"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json"})


def handle_batch(environ: dict, lfs_app, guard: RepoGuard, principal: Principal, max_size: int) -> tuple[str, bytes]:
    """(status, JSON body) for a batch request whose body is ``environ["wsgi.input"]``."""
    req = parse_batch(read_body(environ, MAX_BATCH_BYTES))
    objects = req["objects"]
    answers: dict[str, dict] = {}
    hidden: set[str] = set()
    if req["operation"] == "download":
        for oid, msg in guard.check_reads(principal, (o["oid"] for o in objects), via="batch").items():
            answers[oid] = {"code": 403, "message": msg}
    else:
        state = guard.index.state()
        hidden = {o["oid"] for o in objects if guard.read_denial(principal, o["oid"], state)[0] is not None}
        for o in objects:
            if o["size"] > max_size:
                answers[o["oid"]] = {"code": 422, "message": f"objects on this server are at most {max_size} bytes"}
        guard.record(principal.user, "batch", "allow", {"action": "upload", "via": "batch", "objects": [o["oid"] for o in objects]})
    forward = [o for o in objects if o["oid"] not in answers]
    passed = _giftless_batch(environ, lfs_app, {**req, "objects": forward}, hidden) if forward else {}
    out = []
    for o in objects:
        if o["oid"] in answers:
            out.append({"oid": o["oid"], "size": o["size"], "error": answers[o["oid"]]})
        else:
            out.append(passed.get(o["oid"]) or {"oid": o["oid"], "size": o["size"], "error": {"code": 500, "message": "no answer"}})
    return "200 OK", json.dumps({"transfer": "basic", "objects": out, "hash_algo": "sha256"}).encode()


def _giftless_batch(environ: dict, lfs_app, req: dict, hidden: set[str]) -> dict[str, dict]:
    """giftless's answer for each object of ``req`` (its whole-request errors turned into per-object ones)."""
    body = json.dumps(req).encode()
    env = dict(environ)
    env.update({"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": JSON_TYPE,
                "fmhub.hidden": hidden, "fmhub.batch_checked": True})
    status, data = call_wsgi(lfs_app, env)
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {}
    if status.startswith("200") and isinstance(answer.get("objects"), list):
        return {o.get("oid"): o for o in answer["objects"] if isinstance(o, dict)}
    code = int(status.split()[0])
    message = answer.get("message") if isinstance(answer, dict) else None
    return {o["oid"]: {"oid": o["oid"], "size": o["size"], "error": {"code": code, "message": message or status}} for o in req["objects"]}


def call_wsgi(app, environ: dict) -> tuple[str, bytes]:
    """Run a WSGI app to completion: (status line, body)."""
    got: dict[str, str] = {}

    def start_response(status, headers, exc_info=None):
        got["status"] = status
        return lambda _data: None

    result = app(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close:
            close()
    return got.get("status", "500 Internal Server Error"), data


def read_body(environ: dict, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (`BadRequest` beyond, or when the length is not a number)."""
    length = parse_uint(environ.get("CONTENT_LENGTH") or "0")
    if length is None:
        raise BadRequest("Content-Length is not a number")
    if length > limit:
        raise BadRequest(f"the request body is larger than {limit} bytes")
    return environ["wsgi.input"].read(length)

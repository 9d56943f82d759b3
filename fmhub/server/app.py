"""The server's WSGI application: authenticate, find the repository, route to git or Git LFS.

URLs (what ``git clone http://HOST:PORT/NAME.git`` and git-lfs derive by themselves):

* ``/NAME.git/info/refs?service=git-upload-pack|git-receive-pack``,
  ``/NAME.git/git-upload-pack``, ``/NAME.git/git-receive-pack``: git;
* ``/NAME.git/info/lfs/objects/batch``: the Git LFS batch API; the
  transfer URLs it hands out are ``/_/NAME.git/info/lfs/objects/storage/OID``
  and ``…/objects/storage/verify`` (giftless's routes).

Every request needs a token of the repository (401 otherwise); a
repository that does not exist and one the token does not reach get the
same 404. Anything else gets a one-line error: JSON for LFS URLs, text for git.

A request with a body is first admitted by `ServerApp.admit` as soon as its
headers are in (`fmhub.server.gate`): without a token, or over its route's
body limit, its body is never read and the app answers the refusal that
gate puts in ``environ["fmhub.refused"]``, after the same checks as always.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional

from fmhub.server import repos
from fmhub.server.guard import ADMIN_ROLE, RepoGuard
from fmhub.server.packguard import MAX_GIT_OBJECT
from fmhub.server.git_http import MAX_NEGOTIATION_REQUEST
from fmhub.server.lfs import (JSON_TYPE, MAX_BATCH_BYTES, MAX_VERIFY_BYTES, OID_RE, BadRequest, check_verify, handle_batch,
                              identity_class, make_lfs_app, make_storage)
from fmhub.server.receive import check_update
from fmhub.server.tokens import TOKENS_FILE, Principal, Tokens, token_of

log = logging.getLogger("fmhub.server")
_URL = re.compile(r"/(?P<lfsprefix>_/)?(?P<name>[^/]+)\.git(?P<rest>/[^?]*)\Z")
_GIT_ROUTES = {("GET", "/info/refs"), ("POST", "/git-upload-pack"), ("POST", "/git-receive-pack")}
_STORAGE_PATH = re.compile(r"/info/lfs/objects/storage/(?P<oid>[^/]+)\Z")
_SERVICES = {"git-upload-pack", "git-receive-pack"}
GIB = 1 << 30
SMALL_BODY = 1 << 16  # a route that takes no body may still be sent this much (git-lfs's locks/verify gets its 404 after it)


@dataclass
class ServerConfig:
    root: str
    storage_dir: Optional[str] = None
    s3: Optional[dict] = None
    max_object_size: int = 64 * GIB
    max_git_request: int = 1 * GIB
    max_git_object: int = MAX_GIT_OBJECT  # the largest git object (or delta result) a push may hold
    admin_role: str = ADMIN_ROLE
    audit_key: Optional[bytes] = None
    tokens_file: Optional[str] = None


class HTTPError(Exception):
    def __init__(self, status: str, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status, self.headers = status, list(headers)


class ServerApp:
    """The WSGI application ``fmhub server`` serves."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.root = os.path.abspath(config.root)
        self.tokens_file = config.tokens_file or os.path.join(self.root, TOKENS_FILE)
        self.storage = make_storage(self.root, config.storage_dir, config.s3, config.max_object_size)
        self.lfs_app = make_lfs_app(self.storage)
        self._guards: dict[str, RepoGuard] = {}
        self._lock = threading.Lock()
        self._tokens: tuple[Optional[float], Tokens] = (None, Tokens({}))

    # -- WSGI ---------------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable):
        lfs = "/info/lfs/" in environ.get("PATH_INFO", "")
        try:
            return self._route(environ, start_response)
        except HTTPError as exc:
            return _error(start_response, exc.status, str(exc), lfs, exc.headers)
        except BadRequest as exc:
            return _error(start_response, "400 Bad Request", str(exc), lfs)
        except Exception:  # one line to the client; the traceback goes to the server's log
            log.exception("fmhub server: internal error on %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return _error(start_response, "500 Internal Server Error", "internal server error (see the server's log)", lfs)

    def _route(self, environ: dict, start_response: Callable):
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        m = _URL.match(path)
        lfs = m is not None and m["rest"].startswith("/info/lfs/")
        if m is None or (m["lfsprefix"] and not lfs):
            raise HTTPError("404 Not Found", "not found")
        name = m["name"]
        principal = self._authenticate(environ, name, lfs)
        guard = self._guard(name, principal)
        refused = environ.get("fmhub.refused")
        if refused is not None:  # decided before the body was read: over the route's limit (or the tokens changed since)
            raise refused
        if lfs:
            return self._lfs(environ, start_response, guard, principal, method, m["rest"])
        return self._git(environ, start_response, guard, principal, method, m["rest"])

    # -- who, and which repository ----------------------------------------------------------

    def _authenticate(self, environ: dict, name: str, lfs: bool) -> Principal:
        principal = self.tokens().lookup(token_of(environ.get("HTTP_AUTHORIZATION")))
        if principal is None:
            guard = self._guard_if_exists(name)
            if guard is not None:
                guard.record("", name, "deny", {"action": "authenticate", "reason": "missing or unknown token"})
            raise _unauthorized(lfs)
        return principal

    def tokens(self) -> Tokens:
        """The tokens file, re-read when it changes (``fmhub server token add`` works without a restart)."""
        try:
            mtime = os.stat(self.tokens_file).st_mtime_ns
        except FileNotFoundError:
            mtime = None
        with self._lock:
            if self._tokens[0] != mtime:
                self._tokens = (mtime, Tokens.load(self.tokens_file))
            return self._tokens[1]

    def _guard_if_exists(self, name: str) -> Optional[RepoGuard]:
        path = repos.repo_path(self.root, name)
        if path is None:
            return None
        with self._lock:
            if name not in self._guards:
                self._guards[name] = RepoGuard(name, path, self.config.audit_key, self.config.admin_role)
            return self._guards[name]

    def _guard(self, name: str, principal: Principal) -> RepoGuard:
        guard = self._guard_if_exists(name)
        if guard is not None and not principal.may_use(name):
            guard.record(principal.user, name, "deny", {"action": "open", "reason": "token for another repository"})
        if guard is None or not principal.may_use(name):
            raise _not_found(name)
        return guard

    # -- before the body: on waitress's I/O thread, so it decides and writes nothing (no audit) ---------------

    def admit(self, method: str, path: str, headers: Mapping[str, str]) -> tuple[Optional[HTTPError], int]:
        """(the refusal a request gets before its body is read, or None; the most body bytes its route takes).

        ``headers`` are waitress's (``AUTHORIZATION``). The app makes the same
        checks again when it answers, and audits them.
        """
        m = _URL.match(path)
        lfs = m is not None and m["rest"].startswith("/info/lfs/")
        if m is None or (m["lfsprefix"] and not lfs):
            return HTTPError("404 Not Found", "not found"), 0
        principal = self.tokens().lookup(token_of(headers.get("AUTHORIZATION")))
        if principal is None:
            return _unauthorized(lfs), 0
        if not principal.may_use(m["name"]) or repos.repo_path(self.root, m["name"]) is None:
            return _not_found(m["name"]), 0
        return None, self.body_limit(method, m["rest"])

    def body_limit(self, method: str, rest: str) -> int:
        """The most body bytes a route takes: objects up to --max-object-size, pushes up to max_git_request, JSON a little."""
        storage = _STORAGE_PATH.match(rest)
        if method == "PUT" and storage and OID_RE.match(storage["oid"]):
            return self.config.max_object_size
        if method != "POST":
            return SMALL_BODY
        return {"/info/lfs/objects/batch": MAX_BATCH_BYTES, "/info/lfs/objects/storage/verify": MAX_VERIFY_BYTES,
                "/git-receive-pack": self.config.max_git_request,
                "/git-upload-pack": min(self.config.max_git_request, MAX_NEGOTIATION_REQUEST)}.get(rest, SMALL_BODY)

    def too_large(self, path: str, limit: int) -> HTTPError:
        m = _URL.match(path)
        storage = m is not None and _STORAGE_PATH.match(m["rest"]) is not None
        what = "objects on this server are" if storage else "request bodies to this URL are"
        return HTTPError("413 Payload Too Large", f"{what} at most {limit} bytes")

    # -- git ------------------------------------------------------------------------------------

    def _git(self, environ: dict, start_response: Callable, guard: RepoGuard, principal: Principal, method: str, rest: str):
        from urllib.parse import parse_qs

        if (method, rest) not in _GIT_ROUTES:
            raise HTTPError("404 Not Found", "not found (this server speaks git's smart HTTP protocol only)")
        service = parse_qs(environ.get("QUERY_STRING", "")).get("service", [rest.lstrip("/")])[0]
        if service not in _SERVICES:
            raise HTTPError("403 Forbidden", "git's dumb HTTP protocol is not served: use git 1.6.6 or newer")
        if rest == "/git-upload-pack":
            guard.record(principal.user, guard.name, "allow", {"action": "fetch"})

        def check(ref: bytes, old: bytes, new: bytes) -> Optional[str]:
            return check_update(guard, principal, ref, old, new, lambda oid: self.storage.stored(guard.name, oid))

        from fmhub.server.git_http import git_app

        limit = self.config.max_git_request if rest == "/git-receive-pack" else min(self.config.max_git_request, MAX_NEGOTIATION_REQUEST)
        app = git_app(f"/{guard.name}.git", guard.path, check, limit, self.config.max_git_object)
        if rest != "/git-receive-pack":
            return app(environ, start_response)
        return _then(app(environ, start_response), guard.index.invalidate)

    # -- Git LFS ----------------------------------------------------------------------------------

    def _lfs(self, environ: dict, start_response: Callable, guard: RepoGuard, principal: Principal, method: str, rest: str):
        environ["fmhub.identity"] = identity_class()(principal, guard)
        environ["PATH_INFO"] = f"/_/{guard.name}.git{rest}"
        # git-lfs sends no query; giftless would copy ?disposition= into a download's headers, and a CR/LF there made werkzeug fail (500)
        environ["QUERY_STRING"] = ""
        if rest == "/info/lfs/objects/batch" and method == "POST":
            status, body = handle_batch(environ, self.lfs_app, guard, principal, self.config.max_object_size)
            start_response(status, [("Content-Type", JSON_TYPE), ("Content-Length", str(len(body)))])
            return [body]
        if rest == "/info/lfs/objects/storage/verify" and method == "POST":
            check_verify(environ)
            return self.lfs_app(environ, start_response)
        m = _STORAGE_PATH.match(rest)
        if m and method in ("GET", "PUT"):
            if not OID_RE.match(m["oid"]):
                raise BadRequest("an object id is 64 lowercase hex digits (its sha256)")
            return self.lfs_app(environ, start_response)
        raise HTTPError("404 Not Found", "not found (this server serves the Git LFS batch API and basic transfers; no locking API)")


def _then(body: Iterable[bytes], done: Callable[[], None]) -> Iterator[bytes]:
    """``body``, then ``done()``: dulwich moves a push's refs while its response is iterated."""
    try:
        yield from body
    finally:
        close = getattr(body, "close", None)
        if close:
            close()
        done()


def _unauthorized(lfs: bool) -> HTTPError:
    headers = [("WWW-Authenticate", 'Basic realm="fmhub"')] + ([("LFS-Authenticate", 'Basic realm="fmhub"')] if lfs else [])
    return HTTPError("401 Unauthorized", "credentials needed: send a token of this server (HTTP Basic password or Bearer)", headers)


def _not_found(name: str) -> HTTPError:
    return HTTPError("404 Not Found", f"repository {name}.git not found (or this token does not reach it)")


def _error(start_response: Callable, status: str, message: str, lfs: bool, headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    if lfs:
        body, ctype = json.dumps({"message": message}).encode(), JSON_TYPE
    else:
        body, ctype = (message + "\n").encode("utf-8"), "text/plain; charset=utf-8"
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))), *headers])
    return [body]

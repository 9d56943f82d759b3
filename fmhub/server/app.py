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
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

from fmhub.server import repos
from fmhub.server.guard import ADMIN_ROLE, RepoGuard
from fmhub.server.packguard import MAX_GIT_OBJECT
from fmhub.server.lfs import JSON_TYPE, OID_RE, BadRequest, check_verify, handle_batch, identity_class, make_lfs_app, make_storage
from fmhub.server.receive import check_update
from fmhub.server.tokens import TOKENS_FILE, Principal, Tokens, token_of

log = logging.getLogger("fmhub.server")
_URL = re.compile(r"/(?P<lfsprefix>_/)?(?P<name>[^/]+)\.git(?P<rest>/[^?]*)\Z")
_GIT_ROUTES = {("GET", "/info/refs"), ("POST", "/git-upload-pack"), ("POST", "/git-receive-pack")}
_STORAGE_PATH = re.compile(r"/info/lfs/objects/storage/(?P<oid>[^/]+)\Z")
_SERVICES = {"git-upload-pack", "git-receive-pack"}
GIB = 1 << 30


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
            headers = [("WWW-Authenticate", 'Basic realm="fmhub"')] + ([("LFS-Authenticate", 'Basic realm="fmhub"')] if lfs else [])
            raise HTTPError("401 Unauthorized", "credentials needed: send a token of this server (HTTP Basic password or Bearer)", headers)
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
            raise HTTPError("404 Not Found", f"repository {name}.git not found (or this token does not reach it)")
        return guard

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

        from fmhub.server.git_http import MAX_NEGOTIATION_REQUEST, git_app

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


def _error(start_response: Callable, status: str, message: str, lfs: bool, headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    if lfs:
        body, ctype = json.dumps({"message": message}).encode(), JSON_TYPE
    else:
        body, ctype = (message + "\n").encode("utf-8"), "text/plain; charset=utf-8"
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))), *headers])
    return [body]

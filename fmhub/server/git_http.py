"""git's smart HTTP protocol for one repository: dulwich's WSGI application, with fmhub's push checks.

Only the smart protocol is served (``info/refs?service=…``,
``git-upload-pack``, ``git-receive-pack``); the dumb one would hand out
files of the repository directory. Each ref a push updates goes through
`fmhub.server.receive.check_update` after the pack is received and before
the ref moves (dulwich's ``update`` hook point).

dulwich does its work while the response body is iterated, so a request
that does not follow the protocol fails there, after the WSGI application
returned: `git_app` turns those failures into 400s (waitress would answer
500 and log a traceback). Request bodies are bounded before and after
gzip; git-upload-pack bodies (wants and haves, no objects) at
`MAX_NEGOTIATION_REQUEST`, as git's own http-backend bounds them. dulwich
inflates each object of a pushed pack in memory, so `PackSizeGuard` reads
the sizes the pack declares as it streams in and stops it at an object
over ``max_object`` (large files belong in Git LFS).
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Optional

from fmhub.server.packguard import MAX_GIT_OBJECT, PackSizeGuard

log = logging.getLogger("fmhub.server")
# git http-backend buffers at most 10 MB of a git-upload-pack request (GIT_HTTP_MAX_REQUEST_BUFFER); dulwich spends
# ~50 us and ~100 bytes per "want" line, so a 1 GiB limit let a 3 MB gzip bomb of wants hold a thread for minutes and GiBs
MAX_NEGOTIATION_REQUEST = 10 << 20


def git_app(repo_url: str, repo_path: str, check: Callable[[bytes, bytes, bytes], Optional[str]], max_request: int,
            max_object: int = MAX_GIT_OBJECT):
    """A WSGI app serving ``repo_path`` at ``repo_url`` (``/NAME.git``); ``check(ref, old, new)`` vets each ref update."""
    from dulwich.errors import NotGitRepository
    from dulwich.file import FileLocked
    from dulwich.repo import Repo
    from dulwich.server import Backend, ReceivePackHandler, UploadPackHandler
    from dulwich.web import GunzipFilter, HTTPGitApplication, LimitedInputFilter

    class OneRepo(Backend):
        def open_repository(self, path):
            if (path.decode("utf-8", "replace") if isinstance(path, bytes) else path).rstrip("/") != repo_url:
                raise NotGitRepository(path)
            return Repo(repo_path)

    class CheckedReceivePack(ReceivePackHandler):
        def _on_update(self, ref_name, old_sha, new_sha):
            try:
                reason = check(ref_name, old_sha, new_sha)
            except Exception:  # fail closed: a check that cannot finish refuses the ref
                log.exception("fmhub server: the push check of %r failed", ref_name)
                reason = "the server could not check this push (see its log); the ref was not moved"
            if reason:
                return " ".join(reason.split()).encode("utf-8", "replace")
            return super()._on_update(ref_name, old_sha, new_sha)

        def _apply_pack(self, refs):
            # dulwich ignores the False that set_if_equals/remove_if_equals return when the ref moved since the client
            # read it (a concurrent push), and reports "ok" for a ref it did not update: note those, report them failed
            container, moved = self.repo.refs, set()

            def checked(method):
                def call(name, *args, **kwargs):
                    try:
                        done = method(name, *args, **kwargs)
                    except FileLocked:  # another push holds the ref's lock right now: it moves under this one
                        done = False
                    if not done:
                        moved.add(name)
                    return done
                return call

            container.set_if_equals = checked(container.set_if_equals)  # this request's own Repo: nobody else sees it
            container.remove_if_equals = checked(container.remove_if_equals)
            self.repo.object_store.add_thin_pack = _same_pack_once(self.repo.object_store.add_thin_pack)
            # every byte dulwich reads from here on is the pack: let the guard see it first (this request's own proto)
            guard, read, recv = PackSizeGuard(max_object), self.proto.read, getattr(self.proto, "recv", None)
            self.proto.read = lambda size: guard.feed(read(size))
            if recv is not None:
                self.proto.recv = lambda size: guard.feed(recv(size))
            for ref, status in super()._apply_pack(refs):
                yield (ref, b"failed to update: it moved during this push (fetch, then push again)") \
                    if status == b"ok" and ref in moved else (ref, status)

    handlers = {b"git-upload-pack": UploadPackHandler, b"git-receive-pack": CheckedReceivePack}
    app = HTTPGitApplication(OneRepo(), dumb=False, handlers=handlers)
    # limit the bytes read after gunzip as well as before, so a small gzip bomb cannot grow without bound
    return _bad_requests_get_400(LimitedInputFilter(GunzipFilter(LimitedInputFilter(app, max_request)), max_request))


def _same_pack_once(add_thin_pack):
    """dulwich's ``add_thin_pack``, for two pushes that send the very same pack at once (the same commits, to two refs).

    Both name it by its checksum, so the second finds the first's lock on the
    pack's index: that pack, with every object this one holds, is being
    stored; wait for it rather than fail. A ref whose objects are then still
    missing is refused by the push checks.
    """
    import os
    import time

    from dulwich.file import FileLocked

    def add(*args, **kwargs):
        try:
            return add_thin_pack(*args, **kwargs)
        except FileLocked as exc:
            lock = exc.lockfilename
            deadline = time.monotonic() + 60
            while os.path.exists(lock) and time.monotonic() < deadline:
                time.sleep(0.05)
            return None

    return add


def _bad_requests_get_400(app):
    """``app``, with a request body that breaks the protocol (or gzip, or is cut at the limit) answered 400, not 500."""
    import gzip
    import zlib

    from dulwich.errors import GitProtocolError

    def wrapped(environ, start_response):
        try:
            yield from app(environ, start_response)
        except (GitProtocolError, gzip.BadGzipFile, EOFError, zlib.error, AssertionError) as exc:  # dulwich asserts on some input
            why = " ".join(str(exc).split()) or type(exc).__name__
            body = f"bad git request: {why}\n".encode("utf-8", "replace")
            try:  # allowed while nothing was sent
                start_response("400 Bad Request", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
                               sys.exc_info())
            except Exception:  # the response had started: end it there (git reports the cut stream)
                log.warning("fmhub server: %s %s: bad git request: %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), why)
                return
            yield body

    return wrapped

"""git's smart HTTP protocol for one repository: dulwich's WSGI application, with fmhub's push checks.

Only the smart protocol is served (``info/refs?service=…``,
``git-upload-pack``, ``git-receive-pack``); the dumb one would hand out
files of the repository directory. Each ref a push updates goes through
`fmhub.server.receive.check_update` after the pack is received and before
the ref moves (dulwich's ``update`` hook point).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

log = logging.getLogger("fmhub.server")


def git_app(repo_url: str, repo_path: str, check: Callable[[bytes, bytes, bytes], Optional[str]], max_request: int):
    """A WSGI app serving ``repo_path`` at ``repo_url`` (``/NAME.git``); ``check(ref, old, new)`` vets each ref update."""
    from dulwich.errors import NotGitRepository
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

    handlers = {b"git-upload-pack": UploadPackHandler, b"git-receive-pack": CheckedReceivePack}
    app = HTTPGitApplication(OneRepo(), dumb=False, handlers=handlers)
    # limit the bytes read after gunzip as well as before, so a small gzip bomb cannot grow without bound
    return LimitedInputFilter(GunzipFilter(LimitedInputFilter(app, max_request)), max_request)

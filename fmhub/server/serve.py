"""``fmhub server``: waitress serving `fmhub.server.app.ServerApp` to concurrent clients."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

from fmhub.base.errors import FmhubError
from fmhub.server import repos
from fmhub.server.app import ServerApp, ServerConfig
from fmhub.server.lfs import MAX_BATCH_BYTES


@dataclass(frozen=True)
class Limits:
    """What a client may make the server wait for, and how many may (fmhub.server.gate enforces them)."""

    header_timeout: float = 10.0  # seconds for a request line and headers, in all, from their first byte
    idle_timeout: int = 60  # seconds a keep-alive connection may sit idle (waitress's channel_timeout)
    grace: float = 10.0  # seconds a body or a response may take before min_rate applies
    min_rate: int = 4 << 10  # bytes per second a body must arrive at, and a response be read at, on average
    linger: float = 2.0  # seconds a refused request's unread body is read and dropped after the answer
    linger_bytes: int = 16 << 20  # ... and at most this many bytes of it
    # connections open at once (waitress's connection_limit): clients fetch several objects at once each, so 16 clones
    # can hold over 100; at the limit, one waiting on its client for a head, or idle, is closed for a new one
    max_connections: int = 1000


def startup_warnings(root: str) -> list[str]:
    """One line per repository whose protected branch is missing while other branches exist (nothing there is readable)."""
    from dulwich.repo import Repo

    out = []
    for name in repos.list_repos(root):
        repo = Repo(os.path.join(root, name + ".git"))
        try:
            refs = repo.get_refs()
            missing = [r for r in repos.protected_branches(repo) if r not in refs]
            branches = sorted(r.decode() for r in refs if r.startswith(b"refs/heads/"))
        finally:
            repo.close()
        if missing and branches:
            out.append(f"{name}.git: protected branch {missing[0].decode()} does not exist (branches: {', '.join(branches)}); "
                       f"only admins can read or push until it does: `git -C {root}/{name}.git symbolic-ref HEAD refs/heads/BRANCH` "
                       "or `git config fmhub.protect BRANCH` there")
    return out


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8080, threads: int = 32,
          ready: Optional[Callable[[str], None]] = None, limits: Limits = Limits()) -> None:
    """Serve until interrupted. ``ready(url)`` is called once the socket listens."""
    try:
        import giftless  # noqa: F401
        import waitress  # noqa: F401
    except ImportError as exc:
        raise FmhubError(f"fmhub server needs {exc.name}: pip install 'fmhub[server]'") from None
    if not os.path.isdir(config.root):
        raise FmhubError(f"{config.root}: no such directory (make it with `fmhub server init NAME --root {config.root}`)")
    from fmhub.server.gate import make_server

    app = ServerApp(config)
    # 16 clients fetching at once queue requests for a moment: waitress warns of each, which floods the log
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # a backstop only: each route's own limit is checked before its body is read (fmhub.server.gate)
    largest = max(config.max_object_size, config.max_git_request, MAX_BATCH_BYTES)
    server = make_server(app, app, limits, host=host, port=port, threads=threads, ident="fmhub",
                         max_request_body_size=largest + (1 << 20), max_request_header_size=64 << 10,
                         clear_untrusted_proxy_headers=True,
                         # poll() rather than select(), which stops at fd 1024
                         asyncore_use_poll=True)
    url = f"http://{host}:{server.effective_port}"
    if ready:
        ready(url)
    server.run()

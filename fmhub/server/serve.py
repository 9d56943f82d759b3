"""``fmhub server``: waitress serving `fmhub.server.app.ServerApp` to concurrent clients."""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from fmhub.errors import FmhubError
from fmhub.server import repos
from fmhub.server.app import ServerApp, ServerConfig
from fmhub.server.lfs import MAX_BATCH_BYTES


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
          ready: Optional[Callable[[str], None]] = None) -> None:
    """Serve until interrupted. ``ready(url)`` is called once the socket listens."""
    try:
        import giftless  # noqa: F401
        import waitress
    except ImportError as exc:
        raise FmhubError(f"fmhub server needs {exc.name}: pip install 'fmhub[server]'") from None
    if not os.path.isdir(config.root):
        raise FmhubError(f"{config.root}: no such directory (make it with `fmhub server init NAME --root {config.root}`)")
    app = ServerApp(config)
    _larger_sends(waitress)
    # 16 clients fetching at once queue requests for a moment: waitress warns of each, which floods the log
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # the largest body any route takes: an object, a git push (its pack), a batch request (a small --max-object-size cut both)
    largest = max(config.max_object_size, config.max_git_request, MAX_BATCH_BYTES)
    server = waitress.create_server(app, host=host, port=port, threads=threads, ident="fmhub",
                                    max_request_body_size=largest + (1 << 20),
                                    channel_timeout=300, clear_untrusted_proxy_headers=True,
                                    # clients fetch several objects at once each: 16 clones can hold over 100 connections
                                    # (waitress's default limit); poll() rather than select(), which stops at fd 1024
                                    connection_limit=1000, asyncore_use_poll=True)
    url = f"http://{host}:{server.effective_port}"
    if ready:
        ready(url)
    server.run()


def _larger_sends(waitress) -> None:
    """Let waitress hand the kernel up to 256 KiB per send() (it asks for the socket's initial SO_SNDBUF, 16 KiB on Linux).

    Its one I/O thread streams every download in chunks of that size, so at
    16 KiB a GiB costs ~65 000 Python-level send loops; the kernel autotunes
    the buffer above that on a busy connection and takes what fits. Not
    more: what a send does not take is read from the file again next time.
    Setting SO_SNDBUF instead would switch that autotuning off.
    """
    from waitress.channel import HTTPChannel
    from waitress.server import TcpWSGIServer

    class Channel(HTTPChannel):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.sendbuf_len = max(self.sendbuf_len, 256 << 10)

    TcpWSGIServer.channel_class = Channel

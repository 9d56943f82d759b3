"""``fmhub server``: a git + Git LFS server that enforces each repository's access policy (`fmhub.server`), as
functions: `serve`, `init`, `add_token`."""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from fmhub.base.errors import FmhubError


def serve(root: str = ".", host: str = "127.0.0.1", port: int = 8080, threads: int = 32, storage: Optional[str] = None,
          s3_bucket: Optional[str] = None, s3_endpoint: Optional[str] = None, s3_prefix: Optional[str] = None,
          max_object_size: int = 64 << 30, admin_role: str = "admin", header_timeout: float = 10.0, idle_timeout: int = 60,
          max_connections: int = 1000, ready: Optional[Callable[[str, list[str]], None]] = None) -> None:
    """Serve every bare repository under ``root`` over git's smart HTTP and the Git LFS API until stopped.

    ``ready(url, warnings)`` is called once it listens, with the start-up warnings about ``root``. LFS objects go to
    ``storage`` (default ROOT/.fmhub/lfs) or the S3 bucket ``s3_bucket``.
    """
    from fmhub.governance import audit
    from fmhub.server.app import ServerConfig
    from fmhub.server.serve import Limits, startup_warnings
    from fmhub.server.serve import serve as run_server

    s3 = {"bucket_name": s3_bucket, "path_prefix": s3_prefix, "endpoint": s3_endpoint} if s3_bucket else None
    config = ServerConfig(os.path.abspath(root), storage, s3, max_object_size, admin_role=admin_role, audit_key=audit.env_key())

    def listening(url: str) -> None:
        if ready is not None:
            ready(url, startup_warnings(config.root))

    try:
        run_server(config, host, port, threads, listening, Limits(header_timeout, idle_timeout, max_connections=max_connections))
    except OSError as exc:
        raise FmhubError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def init(name: str, root: str = ".", branch: str = "main") -> str:
    """Create the bare repository ROOT/NAME.git with HEAD on ``branch``; its path."""
    from fmhub.server.repos import init_repo

    return init_repo(os.path.abspath(root), name, branch)


def add_token(user: str, repos: Sequence[str] = (), admin: Sequence[str] = (), root: str = ".") -> str:
    """Make a token acting as ``user`` for ``repos`` (and administering ``admin``): returned once, only its sha256 is
    stored in ROOT/.fmhub/tokens.yaml."""
    from fmhub.server.tokens import add_token as add

    if not repos and not admin:
        raise FmhubError("name at least one --repo or --admin repository")
    return add(os.path.abspath(root), user, list(repos), list(admin))

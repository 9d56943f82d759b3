"""``fmhub server``, ``fmhub server init`` and ``fmhub server token`` (`fmhub.api.server`; docs/server.md)."""

from __future__ import annotations

from typing import Optional

import typer

from fmhub.cli.common import err, say

app = typer.Typer()
server_app = typer.Typer(help="A git + Git LFS server that enforces the access policy (docs/server.md).")
app.add_typer(server_app, name="server")
_ROOT_OPTION = typer.Option(".", "--root", envvar="FMHUB_SERVER_ROOT", help="The directory holding the bare repositories (NAME.git).")


@server_app.callback(invoke_without_command=True)
def server(
    ctx: typer.Context,
    root: str = _ROOT_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port)."),
    threads: int = typer.Option(32, "--threads", min=1, help="Requests served at once."),
    storage: Optional[str] = typer.Option(None, "--storage", help="LFS objects directory (default ROOT/.fmhub/lfs)."),
    s3_bucket: Optional[str] = typer.Option(None, "--s3-bucket", help="Store LFS objects in this S3 bucket instead (credentials from the AWS environment)."),
    s3_endpoint: Optional[str] = typer.Option(None, "--s3-endpoint", help="An S3-compatible endpoint URL (MinIO, Ceph, ...)."),
    s3_prefix: Optional[str] = typer.Option(None, "--s3-prefix", help="Key prefix inside the bucket."),
    max_object_size: int = typer.Option(64 << 30, "--max-object-size", min=1, help="Largest object accepted, in bytes."),
    admin_role: str = typer.Option("admin", "--admin-role", help="The policy role whose members administer a repository."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.5, help="Seconds a request's line and headers may take, in all."),
    idle_timeout: int = typer.Option(60, "--idle-timeout", min=1, help="Seconds a keep-alive connection may sit idle."),
    max_connections: int = typer.Option(1000, "--max-connections", min=8, help="Connections open at once."),
) -> None:
    """Serve every bare repository under --root over git's smart HTTP and the Git LFS API, enforcing each one's policy."""
    if ctx.invoked_subcommand is not None:
        return
    import os

    from fmhub.api import server as srv

    def ready(url: str, warnings: list[str]) -> None:
        for line in warnings:
            err.print(f"[yellow]fmhub server: warning:[/yellow] {line}", highlight=False, soft_wrap=True)
        err.print(f"fmhub server: serving {os.path.abspath(root)} at {url} (Ctrl-C stops)", highlight=False, soft_wrap=True)

    srv.serve(root, host, port, threads, storage, s3_bucket, s3_endpoint, s3_prefix, max_object_size, admin_role,
              header_timeout, idle_timeout, max_connections, ready=ready)


@server_app.command("init")
def server_init(
    name: str = typer.Argument(..., help="The repository's name: clients clone http://HOST:PORT/NAME.git."),
    root: str = _ROOT_OPTION,
    branch: str = typer.Option("main", "--branch", help="The default (protected) branch."),
) -> None:
    """Create the bare repository ROOT/NAME.git with HEAD on --branch."""
    from fmhub.api import server as srv

    path = srv.init(name, root, branch)
    say(f"created {path} (default branch {branch}); give it tokens with `fmhub server token add USER --repo {name}`")


@server_app.command("token")
def server_token(
    user: str = typer.Argument(..., help="The user the token acts as (what the policy's roles name)."),
    repo: list[str] = typer.Option([], "--repo", help="A repository the token may use (repeatable)."),
    admin: list[str] = typer.Option([], "--admin", help="A repository the token administers (repeatable)."),
    root: str = _ROOT_OPTION,
) -> None:
    """Make a token: print it once, store only its sha256 in ROOT/.fmhub/tokens.yaml."""
    from fmhub.api import server as srv

    print(srv.add_token(user, repo, admin, root))

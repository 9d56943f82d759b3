"""``fmhub migrate`` (`fmhub.git.migrate`) as a function: a branch's history from git-lfs pointers (or raw blobs) to
fmhub manifests."""

from __future__ import annotations

from typing import Sequence


def migrate(branches: Sequence[str] = (), include: Sequence[str] = (), everything: bool = False, cwd: str | None = None):
    """Rewrite ``branches`` (default: the current one; ``A..B``: B's commits not in A; ``everything``: every local branch)
    so files matching ``include`` (default: the patterns .gitattributes routes through fmhub, else ``*.safetensors``)
    are fmhub manifests; the old tips stay as ``refs/fmhub/pre-migrate/BRANCH``. Returns `fmhub.git.migrate.Migrated`."""
    from fmhub.git.migrate import migrate as run

    return run(list(branches), list(include), everything, cwd)

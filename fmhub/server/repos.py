"""The repositories a server root holds (``ROOT/NAME.git``, bare) and the branches each protects.

A repository's protected branches are ``git config fmhub.protect BRANCH``
(repeatable) in the bare repository, else its default branch (what
``HEAD`` points at). Only protected branches decide who may read an object
(docs/server.md); the first one is the *primary* branch, whose policy also
governs pushes to unprotected branches.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from fmhub.base.errors import FmhubError
from fmhub.base.gitrun import run

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")


def valid_name(name: str) -> bool:
    """A repository name: letters, digits, ``._-``, not starting with one of ``._-``, not ending in ``.git``."""
    return bool(NAME_RE.match(name)) and not name.endswith(".git") and ".." not in name


def repo_path(root: str, name: str) -> Optional[str]:
    """The bare repository ``ROOT/NAME.git``, or None when the name is not valid or no such repository exists."""
    if not valid_name(name):
        return None
    path = os.path.join(root, name + ".git")
    if os.path.islink(path) or not all(os.path.exists(os.path.join(path, p)) for p in ("HEAD", "objects", "refs")):
        return None
    return path


def list_repos(root: str) -> list[str]:
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return []
    return [e[:-4] for e in entries if e.endswith(".git") and repo_path(root, e[:-4])]


def init_repo(root: str, name: str, branch: str = "main") -> str:
    """Create the bare repository ``ROOT/NAME.git`` with HEAD on ``branch``; refuse an invalid or existing name."""
    if not valid_name(name):
        raise FmhubError(f"{name!r} is not a repository name: use letters, digits and ._- (not first), without .git")
    path = os.path.join(root, name + ".git")
    if os.path.exists(path):
        raise FmhubError(f"{path} already exists")
    os.makedirs(root, exist_ok=True)
    run(("init", "--bare", "--quiet", f"--initial-branch={branch}", path))
    return path


def protected_branches(repo) -> list[bytes]:
    """Full ref names (``refs/heads/main``) of a dulwich repository's protected branches, primary first."""
    config = repo.get_config()
    try:
        named = list(config.get_multivar((b"fmhub",), b"protect"))
    except KeyError:
        named = []
    refs = [n if n.startswith(b"refs/") else b"refs/heads/" + n for n in named if n.strip()]
    if refs:
        return refs
    head = repo.refs.get_symrefs().get(b"HEAD")
    return [head] if head and head.startswith(b"refs/heads/") else []

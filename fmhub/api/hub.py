"""``fmhub hub push`` and ``fmhub hub clone``: Hugging Face Hub repositories in fmhub's layout (`fmhub.git.hub`)."""

from __future__ import annotations

from typing import Optional

from fmhub.base.errors import FmhubError


def push(repo_id: Optional[str] = None, rev: str = "HEAD", branch: str = "main", message: Optional[str] = None,
         private: bool = False, progress: bool = False):
    """Commit ``rev``'s files to the Hub repo ``repo_id`` (default: the one this repository came from or last pushed
    to); only tensor objects the Hub lacks are uploaded. Returns `fmhub.git.hub.PushResult`."""
    from fmhub.git import hub

    repo_id = repo_id or hub.default_repo_id()
    if not repo_id:
        raise FmhubError("which Hub repo? give REPO_ID (user/name); later pushes remember it")
    return hub.push(repo_id, rev, branch, message, private, progress=progress)


def clone(repo_id: str, directory: Optional[str] = None, revision: Optional[str] = None, checkout: bool = True,
          progress: bool = False):
    """Clone a Hub repo pushed by fmhub into ``directory`` (default: the repo's name); `fmhub.git.hub.CloneResult`."""
    from fmhub.git import hub

    return hub.clone(repo_id, directory or repo_id.rsplit("/", 1)[-1], revision, checkout, progress=progress)

"""Where things are in a git repository: its control dir, its object store, its config."""

from __future__ import annotations

import os
import subprocess
from urllib.parse import urlparse

from fmhub.errors import FmhubError
from fmhub.store import ObjectStore


def git(*args: str, cwd: str | None = None, check: bool = True) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FmhubError("git is not installed or not on PATH") from None
    if check and proc.returncode != 0:
        raise FmhubError(f"git {' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def common_dir(cwd: str | None = None) -> str:
    """The repository's shared control dir (``.git``, also for linked worktrees)."""
    proc = subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FmhubError("not inside a git repository; run this in one (or `git init` first)")
    path = proc.stdout.strip()
    return os.path.abspath(os.path.join(cwd or os.getcwd(), path))


def toplevel(cwd: str | None = None) -> str:
    out = git("rev-parse", "--show-toplevel", cwd=cwd, check=False).strip()
    if not out:
        raise FmhubError("not inside a git work tree; run this in one")
    return out


def store_dir(gitdir: str) -> str:
    configured = git("config", "--get", "fmhub.storedir", cwd=gitdir, check=False).strip()
    if configured:
        return configured if os.path.isabs(configured) else os.path.join(gitdir, configured)
    return os.path.join(gitdir, "lfs")


def local_remote_stores(gitdir: str) -> list[str]:
    """Object stores of remotes that are local repositories (``git clone /path``, ``file://``)."""
    out = git("config", "--get-regexp", r"^remote\..*\.url$", cwd=gitdir, check=False)
    stores = []
    for line in out.splitlines():
        _key, _, url = line.partition(" ")
        parsed = urlparse(url)
        if parsed.scheme == "file":
            path = parsed.path
        elif parsed.scheme == "" and not _looks_like_scp(url):
            path = url if os.path.isabs(url) else os.path.join(os.path.dirname(gitdir), url)
        else:
            continue
        for candidate in (os.path.join(path, ".git"), path):
            if os.path.isdir(os.path.join(candidate, "objects")):
                stores.append(store_dir(candidate))
                break
    return stores


def _looks_like_scp(url: str) -> bool:
    head = url.split("/", 1)[0]
    return ":" in head and not os.path.exists(head)


def open_store(cwd: str | None = None, create: bool = True) -> ObjectStore:
    """The repository's object store, borrowing from the stores of local remotes."""
    gitdir = common_dir(cwd)
    path = store_dir(gitdir)
    alternates = local_remote_stores(gitdir)
    return ObjectStore.create(path, alternates) if create else ObjectStore(path, alternates)


def staged_blob(path: str, limit: int, cwd: str | None = None) -> bytes | None:
    """What git's index holds for ``path`` (honouring ``GIT_INDEX_FILE``), if it is a blob of at most ``limit`` bytes.

    None when the path is not staged, is conflicted, or is bigger: a raw
    checkpoint committed before tracking is not read just to be thrown away.
    """
    try:
        proc = subprocess.Popen(
            ["git", "cat-file", "--batch"], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except FileNotFoundError:
        return None
    try:
        proc.stdin.write(b":" + os.fsencode(path) + b"\n")
        proc.stdin.close()
        head = proc.stdout.readline().split()
        if len(head) != 3 or head[1] != b"blob" or int(head[2]) > limit:
            return None
        data = proc.stdout.read(int(head[2]))
        return data if len(data) == int(head[2]) else None
    finally:
        proc.kill()
        proc.wait()


def blob_at(rev: str, path: str, cwd: str | None = None) -> bytes:
    """The blob committed at ``rev:path``, as git stores it (no filters, no textconv)."""
    proc = subprocess.run(["git", "cat-file", "blob", f"{rev}:{path}"], cwd=cwd, capture_output=True)
    if proc.returncode != 0:
        raise FmhubError(f"{rev}:{path}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout

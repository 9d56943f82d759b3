"""Finding manifests (and git-lfs pointers) in a repository's history and trees, and reading them.

What needs to know which objects commits refer to uses this: push and fetch (`fmhub.git.sync`), the
maintenance commands (`fmhub.git.gc`, `fmhub.git.repack`) and the Hub (`fmhub.git.hub`). Blobs are found
with git's own plumbing (`rev-list --objects`, `cat-file --batch-check` to skip blobs too big to be a
manifest, then one `cat-file --batch`), so a history with large raw files is listed, not read. Nothing here
touches the network.
"""

from __future__ import annotations

import subprocess
import threading
from typing import Callable, Iterator, Sequence

from dulwich.lfs import LFSPointer

from fmhub.base.errors import FmhubError
from fmhub.base.gitrun import GitError, failure, start
from fmhub.core.manifest import MAGIC, MAX_MANIFEST_BYTES, is_manifest
from fmhub.core.repo import git, toplevel


def blobs_in_history(rev_args: list[str], cwd: str | None = None) -> list[tuple[str, str]]:
    """(blob sha, path) of every blob small enough to be a manifest, in the commits ``rev-list rev_args`` lists."""
    revlist_args = ["rev-list", "--objects", *rev_args]
    check_args = ["cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize) %(rest)"]
    revlist = start(revlist_args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        check = start(check_args, cwd=cwd, stdin=revlist.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except GitError:
        revlist.kill()
        revlist.wait()
        raise
    revlist.stdout.close()  # cat-file owns the pipe now
    out, check_err = check.communicate()
    revlist_err = revlist.stderr.read()
    revlist.stderr.close()
    if revlist.wait() != 0:
        raise failure(revlist_args, revlist.returncode, revlist_err)
    if check.returncode != 0:
        raise failure(check_args, check.returncode, check_err)
    blobs = []
    for line in out.decode("utf-8", "surrogateescape").splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3 and parts[1] == "blob" and len(MAGIC) <= int(parts[2]) <= MAX_MANIFEST_BYTES:
            blobs.append((parts[0], parts[3] if len(parts) > 3 else ""))
    return blobs


def blobs_in_trees(revs: Sequence[str], paths: Sequence[str], cwd: str | None) -> list[tuple[str, str]]:
    """(blob sha, path) of every blob small enough to be a manifest in the trees of ``revs`` (under ``paths``)."""
    top = toplevel(cwd)
    blobs: dict[str, str] = {}
    for rev in revs:
        sha = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", cwd=top, check=False).strip()
        if not sha:
            raise FmhubError(f"unknown revision {rev!r}")
        out = git("ls-tree", "-r", "-z", "-l", "--full-tree", sha, "--", *paths, cwd=top)
        for entry in out.split("\0"):
            meta, _, path = entry.partition("\t")
            fields = meta.split()
            if len(fields) == 4 and fields[1] == "blob" and fields[3].isascii() and fields[3].isdigit():
                if len(MAGIC) <= int(fields[3]) <= MAX_MANIFEST_BYTES:
                    blobs.setdefault(fields[2], path)
    return list(blobs.items())


LFS_HEAD = b"version https:/"  # the first bytes of a git-lfs pointer, as many as a manifest's magic


def manifest_or_pointer(head: bytes) -> bool:
    """Whether a blob starting with ``head`` may be a manifest or a git-lfs pointer (for `read_blobs`)."""
    return is_manifest(head) or head.startswith(LFS_HEAD)


def lfs_pointer(data: bytes) -> LFSPointer | None:
    """The git-lfs pointer ``data`` holds, if it is one with a valid sha256 oid."""
    pointer = LFSPointer.from_bytes(data)
    return pointer if pointer is not None and pointer.is_valid_oid() else None


def read_blobs(
    blobs: Sequence[tuple[str, str]], cwd: str | None = None, wanted: Callable[[bytes], bool] = is_manifest
) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each blob whose first bytes are ``wanted`` (a manifest), one in memory at a time, through one `git cat-file --batch`."""
    if not blobs:
        return
    proc = start(["cat-file", "--batch"], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def feed() -> None:  # a writer thread: git's output must be read while we write, or both block
        try:
            for sha, _path in blobs:
                proc.stdin.write(sha.encode() + b"\n")
            proc.stdin.close()
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        for sha, path in blobs:
            head = proc.stdout.readline().split()
            if len(head) != 3 or head[1] != b"blob":
                raise FmhubError(f"git cat-file could not read blob {sha} ({path})")
            size = int(head[2])
            data = proc.stdout.read(min(size, len(MAGIC)))
            if wanted(data):
                data += proc.stdout.read(size - len(data))
            else:  # not wanted: skip it in chunks rather than hold it
                left = size - len(data)
                while left > 0 and (chunk := proc.stdout.read(min(left, 1 << 20))):
                    left -= len(chunk)
                data = b""
            proc.stdout.read(1)  # the newline after each object
            if data and len(data) != size:
                raise FmhubError(f"git cat-file returned a short blob {sha} ({path})")
            if data:
                yield path, data
    finally:
        proc.kill()
        proc.wait()
        writer.join()

"""Where things are in a git repository: its control dir, its object store, its config, its staged blobs.

git runs through `fmhub.base.gitrun` (its error rule is there); `git` here adds what git's filter needs on
top: config reads answered from one listing per process, and the answers `fmhub.base.prefetch` asked for
as the filter started.
"""

from __future__ import annotations

import os
import re
import sys

from fmhub.base.errors import FmhubError
from fmhub.base import gitrun
from fmhub.base.gitrun import GitError, failure, run, start

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from fmhub.core.store import ObjectStore


def git(*args: str, cwd: str | None = None, check: bool = True) -> str:
    """The stdout of ``git ARGS`` as text, under `fmhub.base.gitrun.run`'s rule (``check=True``: `GitError` when
    it fails); inside git's filter a config read is answered from the process's one listing (`cache_git_state`)."""
    answer = _from_snapshot(args[1:], cwd) if _snapshots is not None and args[:1] == ("config",) else None
    if answer is None:
        return run(args, cwd=cwd, check=check).stdout
    rc, out, err = answer
    if check and rc != 0:
        raise failure(args, rc, err)
    return out


def fmhub_config(cwd: str | None = None) -> dict[str, str]:
    """Every ``fmhub.*`` key git sees here and its last value (keys lowercased by git), in one read: what
    `fmhub.core.deltas.policy_from_config` takes."""
    return config_values(r"^fmhub\.", cwd)


def common_dir(cwd: str | None = None) -> str:
    """The repository's shared control dir (``.git``, also for linked worktrees)."""
    return _git_dirs(cwd)[0]


def _git_dirs(cwd: str | None) -> tuple[str, str]:
    """(the common dir, the index file git uses, ``GIT_INDEX_FILE`` honoured), from one ``git rev-parse``."""
    where = os.path.abspath(cwd or os.getcwd())
    if _common_dirs is not None and where in _common_dirs:
        return _common_dirs[where], _index_files[where]
    rc, out = _ask_git(("rev-parse", "--git-common-dir", "--git-path", "index"), cwd)
    lines = out.decode("utf-8", "surrogateescape").splitlines()
    if rc != 0 or len(lines) < 2:
        raise FmhubError("not inside a git repository; run this in one (or `git init` first)")
    common, index = (os.path.abspath(os.path.join(where, line.strip())) for line in lines[:2])
    if _common_dirs is not None:
        _common_dirs[where], _index_files[where] = common, index
    return common, index


# -- reading git's config once per process ---------------------------------------------------
#
# git starts the filter process (and the diff and merge drivers) once per git command, so each
# `git config` or `git rev-parse` they run is paid on every `git add`, `git status`, `git checkout`.
# Inside those processes `cache_git_state` turns every config read into a lookup in one
# `git config --list -z` per repository; git itself reads its config once per command, so the
# filter sees the settings its command started with. Elsewhere (the CLI, tests) nothing is cached.

_snapshots: dict[str, dict[str, list[str | None]] | None] | None = None  # directory -> key -> values (None: valueless)
_common_dirs: dict[str, str] | None = None
_index_files: dict[str, str] = {}
_index_readers: dict[str, _IndexReader] = {}


def cache_git_state() -> None:
    """For the rest of this process, read git config once per repository, `common_dir` once per directory,
    and staged blobs through one ``git cat-file`` (`staged_blob`)."""
    global _snapshots, _common_dirs
    if _snapshots is None:
        _snapshots, _common_dirs = {}, {}


def _snapshot(cwd: str | None) -> dict[str, list[str | None]] | None:
    """Every config value git sees from ``cwd`` (None when git cannot list them: then each read asks git)."""
    where = os.path.abspath(cwd or os.getcwd())
    if _common_dirs:  # git run inside a repository's .git reads that repository's config: share one listing
        where = next((w for w, d in _common_dirs.items() if d == where), where)
    if where not in _snapshots:
        try:
            rc, out = _ask_git(("config", "--list", "-z"), where)
        except (OSError, GitError):
            rc, out = 1, b""
        _snapshots[where] = _parse_list(out) if rc == 0 else None
    return _snapshots[where]


def _ask_git(args: tuple[str, ...], cwd: str | None) -> tuple[int, bytes]:
    """(exit status, stdout) of ``git ARGS``: the answer `fmhub.base.prefetch` already has when git's filter started it."""
    prefetch = sys.modules.get("fmhub.base.prefetch")
    got = prefetch.take(*args, cwd=cwd) if prefetch is not None else None
    if got is None:
        done = run(args, cwd=cwd, check=False, text=False)
        got = done.returncode, done.stdout
    return got


def _parse_list(raw: bytes) -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = {}
    for item in raw.decode("utf-8", "surrogateescape").split("\0"):
        if item:
            key, newline, value = item.partition("\n")
            out.setdefault(key, []).append(value if newline else None)
    return out


def _canonical_key(key: str) -> str:
    """Section and variable names are case-insensitive, a subsection is not (as `git config --list` prints them)."""
    section, _, rest = key.partition(".")
    middle, _, name = rest.rpartition(".")
    return f"{section.lower()}.{middle}.{name.lower()}" if middle else f"{section.lower()}.{name.lower()}"


_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off", "")


def _as_bool(value: str | None) -> str | None:
    """git's ``--type=bool`` reading of a value: "true"/"false", None when git would refuse it."""
    if value is None:
        return "true"  # `[fmhub] deltas` without `=`
    low = value.strip().lower()
    if low in _TRUE or low in _FALSE:
        return "true" if low in _TRUE else "false"
    m = re.fullmatch(r"([-+]?[0-9]{1,40})([kmg]?)", low)  # ASCII: `\d` takes "٣"
    return None if m is None else ("true" if int(m.group(1)) != 0 else "false")


def _read_form(args: tuple[str, ...]) -> tuple[str, str, bool] | None:
    """("get" or "regexp", key or pattern, --type=bool) for the read-only `git config` forms fmhub uses, else None."""
    rest = list(args)
    as_bool = "--type=bool" in rest
    if as_bool:
        rest.remove("--type=bool")
    if rest[:1] == ["--get-regexp"] and len(rest) == 2 and not as_bool:
        return "regexp", rest[1], False
    if rest[:1] == ["--get"]:
        rest = rest[1:]
    if len(rest) != 1 or rest[0].startswith("-"):
        return None
    return "get", rest[0], as_bool


def _from_snapshot(args: tuple[str, ...], cwd: str | None) -> tuple[int, str, str] | None:
    """(returncode, stdout, stderr) of ``git config ARGS`` answered from the listing; None: run git."""
    form = _read_form(args)
    if form is None:
        _snapshots.clear()  # anything else may write the config: list it again on the next read
        return None
    snap = _snapshot(cwd)
    if snap is None:
        return None
    kind, key, as_bool = form
    if kind == "regexp":
        return _get_regexp(snap, key)
    values = snap.get(_canonical_key(key))
    if not values:
        return 1, "", ""
    value = values[-1]  # the last one wins, as with `git config --get`
    if as_bool:
        value = _as_bool(value)
        if value is None:
            return 128, "", f"fatal: bad boolean config value {values[-1]!r} for {key!r}"
    return 0, (value or "") + "\n", ""


def _get_regexp(snap: dict[str, list[str | None]], pattern: str) -> tuple[int, str, str]:
    try:
        rx = re.compile(pattern)
    except re.error:
        return 6, "", f"error: invalid key pattern: {pattern}"
    lines = [key if v is None else f"{key} {v}" for key, values in snap.items() if rx.search(key) for v in values]
    return (0, "".join(line + "\n" for line in lines), "") if lines else (1, "", "")


def config_values(pattern: str, cwd: str | None = None) -> dict[str, str]:
    """The config keys matching ``pattern`` (a regular expression, as ``git config --get-regexp``) and their last values."""
    if _snapshots is not None and (snap := _snapshot(cwd)) is not None:
        return {k: v[-1] or "" for k, v in snap.items() if re.search(pattern, k)}
    listed = run(("config", "-z", "--get-regexp", pattern), cwd=cwd, check=False).stdout
    out: dict[str, str] = {}
    for item in listed.split("\0"):
        name, _, value = item.partition("\n")
        if name:
            out[name] = value
    return out


def toplevel(cwd: str | None = None) -> str:
    out = gitrun.toplevel(cwd)
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
        from urllib.parse import (
            urlparse,  # here: most filter runs are in repositories without remotes
        )

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
    from fmhub.core.store import ObjectStore

    gitdir = common_dir(cwd)
    path = store_dir(gitdir)
    alternates = local_remote_stores(gitdir)
    return ObjectStore.create(path, alternates) if create else ObjectStore(path, alternates)


def staged_blob(path: str, limit: int | None, cwd: str | None = None, too_big: bytes | None = None) -> bytes | None:
    """What git's index holds for ``path`` (honouring ``GIT_INDEX_FILE``), if it is a blob of at most ``limit`` bytes.

    None when the path is not staged or is conflicted; ``too_big`` (default
    None) when it is bigger: a raw checkpoint committed before tracking is not
    read just to be thrown away, and a caller that must tell "too big" from
    "not there" (an access policy: the first fails closed) passes a marker.
    """
    if _common_dirs is not None:  # git's filter process: one `git cat-file` for every file of the command
        where = os.path.abspath(cwd or os.getcwd())
        reader = _index_readers.get(where)
        if reader is None:
            try:
                reader = _index_readers[where] = _IndexReader(cwd, _git_dirs(cwd)[1])
            except FmhubError:  # not a repository: nothing is staged
                return None
        if reader.works:
            return reader.blob(path, limit, too_big)
    import subprocess

    try:
        proc = start(("cat-file", "--batch"), cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except GitError:
        return None
    try:
        proc.stdin.write(b":" + os.fsencode(path) + b"\n")
        proc.stdin.close()
        size = _blob_size(proc.stdout.readline())
        if size is None:
            return None
        if limit is not None and size > limit:
            return too_big
        data = proc.stdout.read(size)
        return data if len(data) == size else None
    finally:
        proc.kill()
        proc.wait()


def _blob_size(head: bytes) -> int | None:
    """The size in a ``git cat-file`` header ``<oid> blob <size>``; None for a missing object or another type."""
    fields = head.split()
    if len(fields) != 3 or fields[1] != b"blob" or not fields[2].isdigit() or len(fields[0]) not in (40, 64):
        return None
    return int(fields[2])


class _IndexReader:
    """Staged blobs through one ``git cat-file --batch-command`` (git 2.36+), started again whenever the
    index file changes: each answer is the index as it is now, as with one ``git cat-file`` per question
    (git writes the index once per command, but a rebase, say, writes it once per commit).
    """

    def __init__(self, cwd: str | None, index: str) -> None:
        self.cwd = cwd
        self.index = index
        self.works = True  # False: this git has no --batch-command
        self._proc = None  # a running `git cat-file --batch-command` (`fmhub.base.prefetch.Child`)
        self._seen: tuple[int, int, int] | None = None

    def _index_state(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.index)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def blob(self, path: str, limit: int | None, too_big: bytes | None = None) -> bytes | None:
        state = self._index_state()
        if self._proc is not None and state != self._seen:
            self.close()
        try:
            if self._proc is None:
                self._proc = _talk_to_git(("cat-file", "--batch-command"), self.cwd)
            self._seen = state
            self._proc.stdin.write(b"contents :" + os.fsencode(path) + b"\n")
            self._proc.stdin.flush()
            head = self._proc.stdout.readline()
        except OSError:  # no git, or it quit: an old git without --batch-command
            head = b""
        if not head:
            self.close()
            self.works = False
            return staged_blob(path, limit, self.cwd, too_big)
        size = _blob_size(head)
        if size is None:
            return None
        if limit is not None and size > limit:
            self.close()  # stop it rather than read a big blob just to throw it away
            return too_big
        data = self._proc.stdout.read(size + 1)  # the contents, then a newline
        if len(data) != size + 1:
            self.close()
            return None
        return data[:size]

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def _talk_to_git(args: tuple[str, ...], cwd: str | None):
    """A running ``git ARGS`` with ``stdin`` and ``stdout`` pipes: the one `fmhub.base.prefetch` started, if it did."""
    from fmhub.base import prefetch

    return prefetch.take_child(*args, cwd=cwd) or prefetch.Child(args, cwd)


def blob_at(rev: str, path: str, cwd: str | None = None, limit: int | None = None) -> bytes:
    """The blob committed at ``rev:path``, as git stores it (no filters, no textconv); `GitError` naming
    ``rev:path`` when there is none, or when it is over ``limit`` bytes (nothing past that is read)."""
    return run(("cat-file", "blob", f"{rev}:{path}"), cwd=cwd, text=False, limit=limit).stdout

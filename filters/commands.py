"""The commands git runs: the filters, the diff and merge drivers, the pre-push and pre-commit hooks.

git starts them often (the filter once per ``git add``, ``git status``,
``git checkout``), so they run without the CLI framework: `run` parses their
fixed arguments by hand and imports only what the command needs. Anything
else (``--help``, a malformed call, any other command) gets None and goes to
the full CLI (`fmhub.cli`), which prints usage errors as usual.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    from typing import Callable, Sequence


NO_PATH = "<stdin>"  # filter-clean / filter-smudge called without a path (git always gives one: %f)
STORING = ("filter-process", "filter-clean", "filter-smudge")  # the commands that store and check out files


def run(argv: Sequence[str]) -> int | None:
    """Run a git-invoked command and return its exit status; None when ``argv`` is not one."""
    if not argv or argv[0] not in COMMANDS:
        return None
    low, high, cached, func = COMMANDS[argv[0]]
    args = list(argv[1:])
    if not low <= len(args) <= high or any(a.startswith("-") and argv[0] != "diff-driver" for a in args) or "--help" in args:
        return None
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")  # as fmhub.cli.main: for the processes we start
    if argv[0] in STORING:
        from fmhub.plugin import host

        host.set_strict()  # a plugin that fails to load fails the file: skipping a format would change what is stored
    if cached:
        from fmhub.core.repo import cache_git_state

        cache_git_state()  # git's config does not change under one git command
    try:
        return func(*args)
    except BrokenPipeError:  # the reader went away (a pager closed): quietly, as click does
        sys.stdout = None
        return 1
    except Exception as exc:  # one line for git to show, never a traceback (FMHUB_DEBUG=1 shows it)
        if os.environ.get("FMHUB_DEBUG"):
            raise
        from fmhub.base.errors import FmhubError, unexpected

        _say_error(str(exc) if isinstance(exc, FmhubError) else unexpected(argv[0], exc))
        return 1


def _say_error(message: str) -> None:
    from fmhub.base.errors import one_line

    sys.stderr.write(f"fmhub: {one_line(message)}\n")
    sys.stderr.flush()


def filter_process() -> int:
    """git's long-running clean/smudge filter; exits at once when done (git waits for that)."""
    from fmhub_filters import process

    status = process.main()
    # Everything is written and closed by now (each answer flushed, the store closed, audit entries
    # synced): skip the interpreter's teardown of every module, which git would wait for.
    for stream in (sys.__stdout__, sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(status)


def filter_clean(path: str = NO_PATH) -> int:
    """Checkpoint on stdin -> manifest on stdout, storing its tensors (git's one-shot clean filter).

    Without a path no write rule can be matched, so it is refused wherever a policy governs (fail closed),
    before anything is read or stored.
    """
    from fmhub.core import checkpoint
    from fmhub.core.deltas import policy_from_config
    from fmhub_filters.process import check_access
    from fmhub.base.errors import FmhubError
    from fmhub.core.manifest import MAX_MANIFEST_BYTES
    from fmhub.core.repo import fmhub_config, open_store, staged_blob

    try:
        if path == NO_PATH:
            from fmhub.governance.access import check_unnamed

            check_unnamed("a file given without its path (run `fmhub filter-clean PATH`)", via="filter-clean", action="write")
        store = open_store()
        try:
            previous = checkpoint.staged_manifest(path, staged_blob(path, MAX_MANIFEST_BYTES))  # deltas, as the filter process
            out = checkpoint.clean(sys.stdin.buffer, store, path, previous=previous, deltas=policy_from_config(fmhub_config()), access=check_access)
        finally:
            store.close()
    except FmhubError as exc:
        _say_error(str(exc))
        return 1
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0


def filter_smudge(path: str = NO_PATH) -> int:
    """Manifest on stdin -> the original checkpoint on stdout (git's one-shot smudge filter).

    Without a path no read rule can be matched, so a manifest is refused wherever a policy governs (fail closed).
    """
    from fmhub.core import checkpoint
    from fmhub.base.errors import FmhubError
    from fmhub.core.repo import open_store
    from fmhub_filters.process import check_access

    try:
        data = sys.stdin.buffer.read()
        if path == NO_PATH:
            _check_unnamed(data)
        store = open_store()
        checkpoint.smudge(data, store, sys.stdout.buffer, path, fetch=lazy_fetcher(store), access=check_access)
    except FmhubError as exc:
        _say_error(str(exc))
        return 1
    sys.stdout.buffer.flush()
    return 0


def _check_unnamed(data: bytes) -> None:
    from fmhub.core.manifest import is_manifest

    if is_manifest(data):
        from fmhub.governance.access import check_unnamed

        check_unnamed("a manifest given without its path (run `fmhub filter-smudge PATH`)", via="filter-smudge")


def lazy_fetcher(store) -> Callable[[list[tuple[str, int]]], None]:
    """Downloads objects a smudge lacks from the remote's LFS server; imports the transfer layer only when called."""

    def fetch(objects: list[tuple[str, int]]) -> None:
        from fmhub.git.sync import LazyFetcher

        LazyFetcher(store)(objects)

    return fetch


def pre_push(remote: str, url: str = "") -> int:
    """git's pre-push hook: upload the tensor objects of the pushed commits that the server lacks (reads git's stdin)."""
    from fmhub.git import sync
    from fmhub.base.errors import FmhubError

    try:
        report = sync.push(remote, sys.stdin.read().splitlines(), url=url or None)
    except FmhubError as exc:
        _say_error(f"push stopped: {exc}")
        return 1
    if report.needed:
        sys.stderr.write(summary("uploaded", report) + "\n")
    return 0


def pre_commit() -> int:
    """git's pre-commit hook: refuse a raw checkpoint staged at a path .gitattributes routes through fmhub
    (committed, its bytes would stay in history for good); one line naming the paths and the fix."""
    import shlex

    from fmhub.base.errors import FmhubError
    from fmhub.git.fsck import staged_raw_checkpoints
    from fmhub.git.install import install_state

    try:
        raw = staged_raw_checkpoints()
        setup = "fmhub install && " if raw and install_state() != "ok" else ""
    except FmhubError as exc:
        _say_error(f"pre-commit check failed: {exc}")
        return 1
    if not raw:
        return 0
    shown = ", ".join(raw[:5]) + (f" and {len(raw) - 5} more" if len(raw) > 5 else "")
    quoted = " ".join(shlex.quote(p) for p in raw[:5]) if len(raw) <= 5 else "."
    _say_error(f"commit refused: {shown} staged as raw checkpoint bytes, not through fmhub's filter (staged before "
               f"`fmhub track`, or without the filter installed); run `{setup}git add --renormalize {quoted}` and commit "
               "again (`git commit --no-verify` commits the raw bytes)")
    return 1


def summary(verb: str, report) -> str:
    """One line for a transfer: how many objects, how many bytes, where, how many were already there."""
    from fmhub.base.units import human_bytes

    where = f" {'to' if verb == 'uploaded' else 'from'} {report.destination}" if report.destination else ""
    have = report.needed - report.count
    rest = f"; {have} of {report.needed} already there" if have > 0 else ""
    return f"fmhub: {verb} {report.count} object(s), {human_bytes(report.bytes)}{where}{rest}"


def merge_driver(base: str, ours: str, theirs: str, pathname: str) -> int:
    """Three-way tensor merge for git (merge.fmhub.driver)."""
    from fmhub_filters import merge_driver as md

    return md.run(base, ours, theirs, pathname)


def _utf8_stdout() -> None:
    """git may run us under LANG=C; tensor names are UTF-8 whatever the locale."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8", errors="replace")


def diff_driver(*args: str) -> int:
    """Semantic checkpoint diff for git (diff.fmhub.command): git's PATH OLD-FILE OLD-HEX OLD-MODE NEW-FILE NEW-HEX NEW-MODE."""
    from fmhub_filters import diff_driver as dd

    _utf8_stdout()
    return dd.run(list(args))


def textconv(path: str) -> int:
    """One line per tensor (name, dtype, shape, sha256, norm, mean, std) for git log -p / show (diff.fmhub.textconv)."""
    from fmhub_filters import diff_driver as dd

    _utf8_stdout()
    return dd.textconv(path)


# name -> (fewest arguments, most arguments, read git config once, function)
COMMANDS: dict[str, tuple[int, int, bool, Callable[..., int]]] = {
    "filter-process": (0, 0, True, filter_process),
    "filter-clean": (0, 1, True, filter_clean),
    "filter-smudge": (0, 1, True, filter_smudge),
    "diff-driver": (1, 1 << 16, True, diff_driver),
    "textconv": (1, 1, True, textconv),
    "merge-driver": (4, 4, True, merge_driver),
    "pre-push": (1, 2, False, pre_push),  # pushes take seconds; and a push may change the config it reads
    "pre-commit": (0, 0, False, pre_commit),
}

"""Git's answers that git's filter will ask for, asked for as it starts, while Python imports the rest.

git starts fmhub's filter for every ``git add``, ``git status`` and ``git
checkout``, and the filter's first questions are always the same: where the
repository's control directory and index are (``git rev-parse``) and what its
config says (``git config --list -z``). Each git process costs a few
milliseconds; started here, before fmhub's modules are imported, they run at
the same time as those imports. `fmhub.core.repo` takes their answers
(`take`) instead of starting them again. Only ``os`` is used: it is already
loaded when Python starts, and ``subprocess`` is not yet.
"""

from __future__ import annotations

import os

_running: dict[tuple[str, ...], tuple[int, int, str]] = {}  # git arguments -> (pid, read end of its stdout, cwd)
_children: dict[tuple[str, ...], tuple["Child", str]] = {}  # git arguments -> (a process to talk to, cwd)


class Child:
    """A git process fmhub talks to through pipes (``git cat-file --batch-command``), started with posix_spawn:
    what `subprocess.Popen` gives, without importing `subprocess` (7 ms of git's filter's start-up)."""

    def __init__(self, args: tuple[str, ...], cwd: str | None = None) -> None:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        actions = [(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_CLOSE, in_w),
                   (os.POSIX_SPAWN_CLOSE, out_r), (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)]
        here = os.getcwd()
        try:
            if cwd is not None:
                os.chdir(cwd)  # posix_spawn has no cwd of its own (Python 3.11)
            self.pid = os.posix_spawnp("git", ["git", *args], os.environ, file_actions=actions)
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
            raise
        finally:
            if cwd is not None:
                os.chdir(here)
        os.close(in_r)
        os.close(out_w)
        self.stdin = os.fdopen(in_w, "wb")
        self.stdout = os.fdopen(out_r, "rb")

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        for f in (self.stdin, self.stdout):
            try:
                f.close()
            except OSError:
                pass
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


def start_child(*args: str) -> None:
    """Start ``git ARGS`` to be talked to (`take_child`), in the current directory."""
    try:
        _children[args] = (Child(args), os.getcwd())
    except (OSError, AttributeError):
        pass  # the caller starts it itself


def start(*commands: tuple[str, ...]) -> None:
    """Start ``git ARGS`` for each of ``commands`` in the current directory, output to a pipe read by `take`."""
    for args in commands:
        r, w = os.pipe()
        try:
            pid = os.posix_spawnp("git", ["git", *args], os.environ, file_actions=[
                (os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_CLOSE, r), (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ])
        except (OSError, AttributeError):  # no git on PATH, or no posix_spawn: the caller runs git itself
            os.close(r)
            os.close(w)
            continue
        os.close(w)
        _running[tuple(args)] = (pid, r, os.getcwd())


def take(*args: str, cwd: str | None = None) -> tuple[int, bytes] | None:
    """(exit status, stdout) of ``git ARGS`` if `start` started it in ``cwd`` (default: here); None otherwise.

    Each answer is taken once: a second call asks git again.
    """
    found = _running.get(tuple(args))
    if found is None or os.path.abspath(cwd or os.getcwd()) != found[2]:
        return None
    del _running[tuple(args)]
    pid, r, _ = found
    chunks = []
    try:
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


def take_child(*args: str, cwd: str | None = None) -> Child | None:
    """The `Child` `start_child` started for ``git ARGS`` in ``cwd`` (default: here), once; None otherwise."""
    found = _children.get(args)
    if found is None or os.path.abspath(cwd or os.getcwd()) != found[1]:
        return None
    del _children[args]
    return found[0]

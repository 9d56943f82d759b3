"""Running git: the one place fmhub starts a git process, with one rule for errors.

- `run` runs ``git ARGS`` to the end and returns a `GitResult` (``returncode``, ``stdout``, ``stderr``).
  With ``check=True`` (the default) an exit status other than 0 raises `GitError`: one line,
  ``git ARGS failed: STDERR`` (git's stderr with its lines joined by ``; ``, control characters escaped,
  both parts cut to a few hundred characters). With ``check=False`` the result comes back whatever the
  status, and the caller reads ``returncode``.
- Whatever ``check`` says, `GitError` is raised when git cannot be started (not installed, or ``cwd`` is
  not a directory), when it runs past ``timeout`` seconds, and when it prints more than ``limit`` bytes
  on stdout: callers that read what a remote controls (a blob of a fetched commit) pass ``limit``, and
  nothing past it is read into memory.
- `start` is for the few readers that talk to a git that streams (``cat-file --batch``, ``rev-list``):
  a ``subprocess.Popen`` under the same rule for starting it; `failure` makes the same one-line error
  from an exit status the caller collected itself.

``subprocess`` is imported when git is first run, not when this module is: git's filter asks its first
questions through `fmhub.base.prefetch`, and `fmhub.core.repo` answers config reads from one listing, so a
clean that needs nothing more never imports it (tests/git/test_startup.py). That is the one other way fmhub
starts git, and only inside git's filter: `fmhub.base.prefetch` (beside it in this layer, with ``os.posix_spawn``)
starts the ``rev-parse``, ``config --list`` and ``cat-file --batch-command`` that `fmhub.core.repo` reads,
and `fmhub.core.repo._ask_git` falls back to `run` when it did not.
"""

from __future__ import annotations

import os
from collections import namedtuple

from fmhub.base.errors import FmhubError, printable

TYPE_CHECKING = False  # the names below are for annotations only: typing costs git's filter ~9 ms at start-up
if TYPE_CHECKING:
    import subprocess
    from typing import BinaryIO, Mapping, Sequence

MAX_SHOWN = 300  # characters of the command, and of git's stderr, quoted in an error
MAX_STDERR = 64 << 10  # bytes of git's stderr kept when ``limit`` bounds its stdout


class GitError(FmhubError):
    """A git command could not be run, or failed under ``check=True``: one line naming it and git's stderr."""


class GitResult(namedtuple("GitResult", "returncode stdout stderr")):
    """What a finished git printed: ``stdout`` and ``stderr`` as str (``text=True``) or bytes; ``stdout`` is None
    when it went to a file the caller gave."""

    __slots__ = ()


def command(args: Sequence[str]) -> str:
    """``git ARGS`` as an error shows it: one line, at most `MAX_SHOWN` characters."""
    shown = printable(" ".join(["git", *args]))
    return shown if len(shown) <= MAX_SHOWN else shown[: MAX_SHOWN - 1] + "…"


def failure(args: Sequence[str], returncode: int | None, stderr: str | bytes | None) -> GitError:
    """The `GitError` for ``git ARGS`` having exited with ``returncode`` after printing ``stderr``."""
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    said = "; ".join(line.strip() for line in (stderr or "").splitlines() if line.strip())
    said = printable(said)
    if len(said) > MAX_SHOWN:
        said = said[: MAX_SHOWN - 1] + "…"
    return GitError(f"{command(args)} failed: {said or f'exit status {returncode}'}")


def _not_started(args: Sequence[str], cwd: str | None, exc: OSError) -> GitError:
    if cwd is not None and not os.path.isdir(cwd):
        return GitError(f"{command(args)} cannot run: {printable(cwd)} is not a directory")
    if isinstance(exc, FileNotFoundError):
        return GitError("git is not installed or not on PATH")
    return GitError(f"{command(args)} cannot run: {exc}")


def run(
    args: Sequence[str], *, cwd: str | None = None, check: bool = True, input: str | bytes | None = None,
    text: bool = True, limit: int | None = None, stdout: BinaryIO | None = None, env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> GitResult:
    """Run ``git ARGS`` in ``cwd`` to the end (the rule: this module's docstring).

    ``input`` goes to its stdin (str when ``text``); ``stdout`` (a binary file) takes its output instead of
    memory; ``limit`` bounds the bytes of stdout read into memory; ``env`` replaces the environment.
    """
    import subprocess  # here, not at the top: see the module's docstring

    argv = ["git", *args]
    try:
        if limit is not None and stdout is None:
            rc, out, err = _bounded(argv, cwd, input, limit, env, timeout)
            if text:
                out, err = out.decode(), err.decode("utf-8", "replace")
        else:
            proc = subprocess.run(
                argv, cwd=cwd, input=input, text=text, env=env, timeout=timeout,
                stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.PIPE,
            )
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        raise GitError(f"{command(args)} did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise _not_started(args, cwd, exc) from None
    if check and rc != 0:
        raise failure(args, rc, err)
    return GitResult(rc, out, err)


def _bounded(
    argv: list[str], cwd: str | None, input: str | bytes | None, limit: int, env: Mapping[str, str] | None,
    timeout: float | None,
) -> tuple[int, bytes, bytes]:
    """(status, stdout, stderr) of a git whose stdout is read up to ``limit`` bytes; GitError past that."""
    import subprocess
    import threading

    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    errs: list[bytes] = []

    def drain_stderr() -> None:  # read beside stdout, or a chatty git blocks on a full pipe
        kept = 0
        while chunk := proc.stderr.read(1 << 16):
            if kept < MAX_STDERR:
                errs.append(chunk[: MAX_STDERR - kept])
                kept += len(errs[-1])

    def feed() -> None:
        try:
            proc.stdin.write(input.encode() if isinstance(input, str) else input)
            proc.stdin.close()
        except OSError:  # git stopped reading: its exit status says why
            pass

    threads = [threading.Thread(target=drain_stderr, daemon=True)]
    if input is not None:
        threads.append(threading.Thread(target=feed, daemon=True))
    for t in threads:
        t.start()
    try:
        out = proc.stdout.read(limit + 1)
        if len(out) > limit:
            raise GitError(f"{command(argv[1:])} printed more than {limit} bytes; not read further")
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        for t in threads:
            t.join()
        proc.stderr.close()
    return rc, out, b"".join(errs)


def start(args: Sequence[str], *, cwd: str | None = None, **popen) -> subprocess.Popen:
    """``git ARGS`` started with ``subprocess.Popen(**popen)`` (pipes as the caller asks), for output it streams.

    GitError when git cannot be started; the caller waits for it and checks its exit with `failure`.
    """
    import subprocess

    try:
        return subprocess.Popen(["git", *args], cwd=cwd, **popen)
    except OSError as exc:
        raise _not_started(args, cwd, exc) from None


def toplevel(cwd: str | None = None) -> str | None:
    """The work tree's top directory (``git rev-parse --show-toplevel``); None outside a work tree.
    `GitError` when git cannot start: callers choose their own fallback for both."""
    done = run(["rev-parse", "--show-toplevel"], cwd=cwd, check=False)
    return done.stdout.strip() or None if done.returncode == 0 else None

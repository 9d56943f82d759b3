"""Registering fmhub with git: filter, diff and merge driver config, and ``.gitattributes`` patterns."""

from __future__ import annotations

import os
import shlex
import sys

from dulwich.attrs import parse_git_attributes

from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError
from fmhub.core.repo import common_dir, git, open_store, toplevel

DRIVER = "fmhub"
ATTRIBUTES = f"filter={DRIVER} diff={DRIVER} merge={DRIVER} -text"


def default_command() -> str:
    """How git should start fmhub: this interpreter, so the filter finds the same installation.

    Without ``site`` (``-S``), through `fmhub.boot`, which sets up sys.path itself: git starts the
    filter once per command and ``site`` costs more than the rest of a small clean.
    """
    import fmhub

    boot = os.path.join(os.path.dirname(os.path.abspath(fmhub.__file__)), "boot.py")
    if not os.path.isfile(boot):  # fmhub imported from a zip, say
        return f"{shlex.quote(sys.executable)} -m fmhub"
    return f"{shlex.quote(sys.executable)} -S {shlex.quote(boot)}"


def driver_config(command: str) -> dict[str, str]:
    return {
        f"filter.{DRIVER}.process": f"{command} filter-process",
        # one-shot fallbacks for tools that do not speak the process protocol
        f"filter.{DRIVER}.clean": f"{command} filter-clean %f",
        f"filter.{DRIVER}.smudge": f"{command} filter-smudge %f",
        f"filter.{DRIVER}.required": "true",
        # semantic diffs: `git diff` runs the command (git appends its 7 arguments); `git log -p` / `git show`
        # use the textconv (one line per tensor), cached per blob. diff.fmhub.binary stays unset.
        f"diff.{DRIVER}.command": f"{command} diff-driver",
        f"diff.{DRIVER}.textconv": f"{command} textconv",
        f"diff.{DRIVER}.cachetextconv": "true",
        f"merge.{DRIVER}.name": "fmhub tensor-level three-way merge",
        f"merge.{DRIVER}.driver": f"{command} merge-driver %O %A %B %P",
    }


def _scope(global_: bool, cwd: str | None) -> list[str]:
    if global_:
        return ["--global"]
    common_dir(cwd)  # fail clearly outside a repository
    return ["--local"]


def install(global_: bool = False, command: str | None = None, cwd: str | None = None) -> dict[str, str]:
    scope = _scope(global_, cwd)
    cfg = driver_config(command or default_command())
    for key, value in cfg.items():
        git("config", *scope, key, value, cwd=cwd)
    if not global_:
        open_store(cwd, create=True)
        install_pre_push(command or default_command(), cwd)
    compile_bytecode()
    return cfg


def compile_bytecode() -> None:
    """Write the bytecode of fmhub's own packages now, so that git's filter, started for every git command, never
    compiles them itself (it cannot keep what it compiles where PYTHONDONTWRITEBYTECODE is set, as in many
    containers). Quietly does nothing where the installation is read-only."""
    import compileall
    import importlib.util

    # found, not imported: the filters and plugins sit above this layer (fmhub.tools.layers)
    for name in ("fmhub", "fmhub_filters", "fmhub_plugins"):
        found = importlib.util.find_spec(name)
        for directory in (found.submodule_search_locations or []) if found else []:
            try:
                compileall.compile_dir(directory, quiet=2, maxlevels=3)
            except OSError:
                pass


def uninstall(global_: bool = False, cwd: str | None = None) -> None:
    scope = _scope(global_, cwd)
    for section in (f"filter.{DRIVER}", f"diff.{DRIVER}", f"merge.{DRIVER}"):
        git("config", *scope, "--remove-section", section, cwd=cwd, check=False)
    if not global_:
        uninstall_pre_push(cwd)


# -- the pre-push hook --------------------------------------------------------
#
# git runs exactly one `pre-push` file, and git-lfs wants that slot too. So the
# hook fmhub writes runs, in order: a hook that was there before (kept as
# `pre-push.local`), fmhub's upload, then `git lfs pre-push` when the repository
# uses git-lfs. git-lfs's own hook is set aside as `pre-push.git-lfs` (not run:
# the combined hook already calls git-lfs) and comes back on `fmhub uninstall`.

HOOK_MARK = "# fmhub pre-push hook"

_HOOK_TEMPLATE = """#!/bin/sh
{mark}: written by `fmhub install`; `fmhub uninstall` puts back what was here.
# Runs the hook that was here before (pre-push.local), uploads the tensor objects of
# the commits being pushed, then runs git-lfs's pre-push when this repository uses git-lfs.
stdin=$(mktemp "${{TMPDIR:-/tmp}}/fmhub-pre-push.XXXXXX") || exit 1
trap 'rm -f "$stdin"' EXIT
cat >"$stdin" || exit 1
here=$(dirname "$0")
if [ -x "$here/pre-push.local" ]; then
    "$here/pre-push.local" "$@" <"$stdin" || exit $?
fi
{command} pre-push "$@" <"$stdin" || exit $?
if [ -n "$(git config filter.lfs.process)" ]; then
    if command -v git-lfs >/dev/null 2>&1; then
        git lfs pre-push "$@" <"$stdin" || exit $?
    else
        echo >&2 "fmhub: this repository is configured for git-lfs but git-lfs is not on PATH; its objects were not pushed"
    fi
fi
exit 0
"""


def hooks_dir(cwd: str | None = None) -> str:
    """Where git looks for hooks (``core.hooksPath`` honoured; shared by linked worktrees)."""
    out = git("rev-parse", "--git-path", "hooks", cwd=cwd).strip()
    return os.path.abspath(os.path.join(cwd or os.getcwd(), out))


def pre_push_path(cwd: str | None = None) -> str:
    return os.path.join(hooks_dir(cwd), "pre-push")


def _is_git_lfs_hook(text: str) -> bool:
    """git-lfs's stock pre-push hook (any version): a git-lfs guard line and `git lfs pre-push "$@"`, nothing else."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return 'git lfs pre-push "$@"' in lines and all(
        line == 'git lfs pre-push "$@"' or line.startswith("command -v git-lfs") for line in lines
    )


def install_pre_push(command: str, cwd: str | None = None) -> str:
    """Write fmhub's pre-push hook, keeping a hook that was there (see above); returns its path. Idempotent."""
    path = pre_push_path(cwd)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if HOOK_MARK in text:
            pass  # ours: rewrite it (the command may have changed)
        elif _is_git_lfs_hook(text):
            os.replace(path, path + ".git-lfs")
        elif os.path.lexists(path + ".local"):
            raise FmhubError(
                f"{path} exists and so does {path}.local, where fmhub would keep it; "
                "merge them into pre-push.local and run `fmhub install` again"
            )
        else:
            os.replace(path, path + ".local")
    with atomic_write(path, "w", chmod=0o755) as f:
        f.write(_HOOK_TEMPLATE.format(mark=HOOK_MARK, command=command))
    return path


def uninstall_pre_push(cwd: str | None = None) -> None:
    """Remove fmhub's pre-push hook and put back the one it replaced, if any; a hook that is not fmhub's stays."""
    path = pre_push_path(cwd)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            if HOOK_MARK not in f.read():
                return
    except FileNotFoundError:
        return
    for saved in (path + ".local", path + ".git-lfs"):
        if os.path.lexists(saved):
            os.replace(saved, path)
            return
    os.unlink(path)


def _attributes_path(cwd: str | None) -> str:
    return os.path.join(toplevel(cwd), ".gitattributes")


def tracked_patterns(cwd: str | None = None) -> list[str]:
    path = _attributes_path(cwd)
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return [
            pattern.decode()
            for pattern, attrs in parse_git_attributes(f)
            if attrs.get(b"filter") == DRIVER.encode()
        ]


def _rewrite_attributes(cwd: str | None, keep, extra: list[str]) -> list[str]:
    """Rewrite .gitattributes keeping lines for which keep(pattern) is true, appending ``extra``; returns dropped lines."""
    path = _attributes_path(cwd)
    lines = open(path, encoding="utf-8").read().splitlines() if os.path.exists(path) else []
    kept, dropped = [], []
    for line in lines:
        fields = line.split()
        if fields and not line.lstrip().startswith("#") and not keep(fields[0], fields[1:]):
            dropped.append(line)
        else:
            kept.append(line)
    text = "\n".join(kept + extra) + "\n" if kept or extra else ""
    with atomic_write(path, "w") as f:
        f.write(text)
    return dropped


def track(patterns: list[str], cwd: str | None = None) -> list[str]:
    """Route ``patterns`` through fmhub; a line for the same pattern (git-lfs's, say) is replaced. Returns replaced lines."""
    for p in patterns:
        if any(c.isspace() for c in p):
            raise FmhubError(f"pattern {p!r} contains whitespace, which .gitattributes cannot express")
    wanted = set(patterns)
    return _rewrite_attributes(cwd, lambda pattern, _attrs: pattern not in wanted, [f"{p} {ATTRIBUTES}" for p in patterns])


def untrack(patterns: list[str], cwd: str | None = None) -> list[str]:
    wanted = set(patterns)
    return _rewrite_attributes(
        cwd, lambda pattern, attrs: not (pattern in wanted and f"filter={DRIVER}" in attrs), []
    )

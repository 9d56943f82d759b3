"""Registering fmhub with git: filter, diff and merge driver config, and ``.gitattributes`` patterns."""

from __future__ import annotations

import os
import shlex
import sys

from dulwich.attrs import parse_git_attributes

from fmhub.git import merge_notes
from fmhub.base.atomic import atomic_write
from fmhub.base.errors import FmhubError
from fmhub.core.repo import common_dir, git, open_store, toplevel

DRIVER = "fmhub"
ATTRIBUTES = f"filter={DRIVER} diff={DRIVER} merge={DRIVER} -text"
# the first line of a .gitattributes that `fmhub track` creates: what a clone made without fmhub holds, and the fix
ATTRIBUTES_HINT = ("# filter=fmhub files are stored by fmhub: a clone without it holds text manifests there; "
                   "run `fmhub install && fmhub checkout`")


def default_command() -> str:
    """How git should start fmhub: this interpreter, so the filter finds the same installation.

    Without ``site`` (``-S``), through `fmhub.boot`, which sets up sys.path itself: git starts the
    filter once per command and ``site`` costs more than the rest of a small clean. Behind a guard
    (`guarded`): when this environment is moved or deleted, every git command on a tracked file
    says to run `fmhub install` again instead of only "clean filter 'fmhub' failed".
    """
    import fmhub

    boot = os.path.join(os.path.dirname(os.path.abspath(fmhub.__file__)), "boot.py")
    if not os.path.isfile(boot):  # fmhub imported from a zip, say
        return guarded(sys.executable, "-m", "fmhub")
    return guarded(sys.executable, "-S", boot)


# ``sh -c GUARD PYTHON ARGS...``: $0 is the Python, $1 $2 "-S BOOT" (or "-m fmhub"), then what git appends.
# Two shell tests, then exec: no process besides the shell, and one simple command, so a wrapper may `exec` it.
GUARD = "; ".join((
    r'[ -x "$0" ] || { echo >&2 "fmhub: the Python that \`fmhub install\` recorded ($0) is gone; run \`fmhub install\` again"; exit 1; }',
    r'[ "$1" != -S ] || [ -f "$2" ] || { echo >&2 "fmhub: the fmhub installation that \`fmhub install\` recorded ($2) is gone; run \`fmhub install\` again"; exit 1; }',
    'exec "$0" "$@"',
))


def guarded(python: str, *args: str) -> str:
    """``python ARGS`` (a command git appends its arguments to) behind `GUARD`: when ``python`` (or the boot.py
    after ``-S``) is gone, it prints "fmhub: the Python that `fmhub install` recorded (PATH) is gone; run `fmhub
    install` again" to stderr and fails, as the missing interpreter did (``filter.fmhub.required`` stays true)
    but with the reason. POSIX ``sh`` (git runs configured commands through it); Windows is not covered.
    """
    return " ".join(["sh", "-c", shlex.quote(GUARD), *(shlex.quote(a) for a in (python, *args))])


def recorded_paths(command: str) -> list[str]:
    """The paths a `guarded` command checks (none for another command: one given with ``--command``)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    if words[:3] != ["sh", "-c", GUARD] or len(words) < 4:
        return []
    return words[3:4] + (words[5:6] if words[4:5] == ["-S"] else [])


def configured_command(cwd: str | None = None) -> str:
    """The filter command git would run here (any config scope); '' when fmhub's filter is not installed."""
    for key in (f"filter.{DRIVER}.process", f"filter.{DRIVER}.clean"):
        value = git("config", "--get", key, cwd=cwd, check=False).strip()
        if value:
            return value
    return ""


def install_state(cwd: str | None = None) -> str:
    """``"ok"``, ``"missing"`` (no filter configured: `git add` stores files raw) or ``"stale"`` (the Python or
    fmhub that `install` recorded is gone: every git command on a tracked file fails)."""
    command = configured_command(cwd)
    if not command:
        return "missing"
    return "stale" if any(not os.path.exists(p) for p in recorded_paths(command)) else "ok"


def ensure_installed(cwd: str | None = None) -> str | None:
    """Install fmhub in this repository (as `fmhub install`) when its filter is missing or stale; why it did
    ("missing"/"stale"), or None when it was in place."""
    state = install_state(cwd)
    if state == "ok":
        return None
    install(cwd=cwd)
    return state


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
        install_pre_commit(command or default_command(), cwd)
        merge_notes.install(cwd)  # the merge commit's message names the strategies the merge driver used
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
        uninstall_pre_commit(cwd)
        merge_notes.uninstall(cwd)


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


def pre_commit_path(cwd: str | None = None) -> str:
    return os.path.join(hooks_dir(cwd), "pre-commit")


def _is_git_lfs_hook(text: str) -> bool:
    """git-lfs's stock pre-push hook (any version): a git-lfs guard line and `git lfs pre-push "$@"`, nothing else."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return 'git lfs pre-push "$@"' in lines and all(
        line == 'git lfs pre-push "$@"' or line.startswith("command -v git-lfs") for line in lines
    )


def _write_hook(path: str, mark: str, text: str, set_aside_lfs: bool) -> str:
    """Write fmhub's hook at ``path``, keeping one that was there as ``PATH.local`` (git-lfs's stock pre-push as
    ``PATH.git-lfs`` when ``set_aside_lfs``); rewrites a hook of fmhub's (the command may have changed)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            old = f.read()
        if mark in old:
            pass  # ours: rewrite it
        elif set_aside_lfs and _is_git_lfs_hook(old):
            os.replace(path, path + ".git-lfs")
        elif os.path.lexists(path + ".local"):
            name = os.path.basename(path)
            raise FmhubError(
                f"{path} exists and so does {path}.local, where fmhub would keep it; "
                f"merge them into {name}.local and run `fmhub install` again"
            )
        else:
            os.replace(path, path + ".local")
    with atomic_write(path, "w", chmod=0o755) as f:
        f.write(text)
    return path


def _remove_hook(path: str, mark: str) -> None:
    """Remove fmhub's hook at ``path`` and put back the one it replaced, if any; a hook that is not fmhub's stays."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            if mark not in f.read():
                return
    except FileNotFoundError:
        return
    for saved in (path + ".local", path + ".git-lfs"):
        if os.path.lexists(saved):
            os.replace(saved, path)
            return
    os.unlink(path)


def install_pre_push(command: str, cwd: str | None = None) -> str:
    """Write fmhub's pre-push hook, keeping a hook that was there (see above); returns its path. Idempotent."""
    return _write_hook(pre_push_path(cwd), HOOK_MARK, _HOOK_TEMPLATE.format(mark=HOOK_MARK, command=command), True)


def uninstall_pre_push(cwd: str | None = None) -> None:
    """Remove fmhub's pre-push hook and put back the one it replaced, if any; a hook that is not fmhub's stays."""
    _remove_hook(pre_push_path(cwd), HOOK_MARK)


# -- the pre-commit hook ------------------------------------------------------
#
# Refuses a commit whose index holds a raw checkpoint at a path .gitattributes
# routes through fmhub (staged before `fmhub track`, or with the filter
# bypassed): committed, those bytes would stay in git's history for good. A
# hook that was there before (kept as `pre-commit.local`) runs first.

PRE_COMMIT_MARK = "# fmhub pre-commit hook"

_PRE_COMMIT_TEMPLATE = """#!/bin/sh
{mark}: written by `fmhub install`; `fmhub uninstall` puts back what was here.
# Runs the hook that was here before (pre-commit.local), then refuses raw checkpoints
# staged at paths that .gitattributes routes through fmhub (`git commit --no-verify` skips it).
here=$(dirname "$0")
if [ -x "$here/pre-commit.local" ]; then
    "$here/pre-commit.local" "$@" || exit $?
fi
# Only a staged blob at a tracked path that is not a manifest starts fmhub (which tells a checkpoint from other bytes).
for blob in $(git diff --cached --raw --no-abbrev --no-renames --diff-filter=AMT -- ':(attr:filter=fmhub)' | cut -d' ' -f4); do
    if [ "$(git cat-file blob "$blob" 2>/dev/null | head -c 14 | tr -d '\\000')" != "fmhub manifest" ]; then
        {command} pre-commit || exit $?
        break
    fi
done
exit 0
"""


def install_pre_commit(command: str, cwd: str | None = None) -> str:
    """Write fmhub's pre-commit hook, keeping a hook that was there as ``pre-commit.local``; returns its path."""
    return _write_hook(pre_commit_path(cwd), PRE_COMMIT_MARK,
                       _PRE_COMMIT_TEMPLATE.format(mark=PRE_COMMIT_MARK, command=command), False)


def uninstall_pre_commit(cwd: str | None = None) -> None:
    _remove_hook(pre_commit_path(cwd), PRE_COMMIT_MARK)


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
    if not lines and extra:
        lines = [ATTRIBUTES_HINT]  # a new file: say what a clone without fmhub holds
    kept, dropped = [], []
    for line in lines:
        fields = line.split()
        if fields and not line.lstrip().startswith("#") and not keep(fields[0], fields[1:]):
            dropped.append(line)
        else:
            kept.append(line)
    if not extra and not any(f"filter={DRIVER}" in line.split()[1:] for line in kept if not line.lstrip().startswith("#")):
        kept = [line for line in kept if line != ATTRIBUTES_HINT]  # nothing left for fmhub: its hint goes too
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

"""What fmhub's merge driver did, in the merge commit's message: which strategy merged which tensors.

git gives a merge driver no say in the commit message, and writes ``MERGE_MSG`` itself after every driver has
run. So the driver leaves one line per merged file in ``$GIT_DIR/fmhub-merge-notes`` (`record`), and a
``prepare-commit-msg`` hook (`install`; a shell script that needs no Python) appends to a merge commit's message
the lines of the files whose staged version is still the one the driver wrote, then deletes the notes: a merge
aborted, or a file resolved by hand, leaves no line behind. A line reads::

    fmhub: model.safetensors: task-arithmetic (12 tensors), ours (3)
"""

from __future__ import annotations

import os
import stat
from typing import Mapping

from fmhub.core.repo import git

NOTES = "fmhub-merge-notes"  # under the git directory (`git rev-parse --git-path`)
HOOK = "prepare-commit-msg"
HOOK_MARK = "# fmhub prepare-commit-msg hook"

HOOK_TEXT = f"""#!/bin/sh
{HOOK_MARK}: adds to a merge commit's message which strategy fmhub's merge driver used on which tensors.
# The driver leaves "BLOB<TAB>PATH<TAB>LINE" per merged file in $GIT_DIR/{NOTES}; a LINE is added when PATH is
# still staged as BLOB (the file the driver wrote). The notes go in every case.
notes=$(git rev-parse --git-path {NOTES})
if [ -f "$notes" ]; then
    if [ "$2" = merge ]; then
        tab=$(printf '\\t')
        first=1
        while IFS= read -r line || [ -n "$line" ]; do
            blob=${{line%%"$tab"*}}
            rest=${{line#*"$tab"}}
            path=${{rest%%"$tab"*}}
            text=${{rest#*"$tab"}}
            if [ "$(git rev-parse -q --verify ":$path" 2>/dev/null)" = "$blob" ]; then
                if [ "$first" = 1 ]; then printf '\\n' >>"$1"; first=0; fi
                printf '%s\\n' "$text" >>"$1"
            fi
        done <"$notes"
    fi
    rm -f "$notes"
fi
here=$(dirname "$0")
if [ -x "$here/{HOOK}.local" ]; then
    exec "$here/{HOOK}.local" "$@"
fi
exit 0
"""


def summary(path: str, used: Mapping[str, int]) -> str:
    """``fmhub: PATH: STRATEGY (N tensors), STRATEGY (M)``, most used first."""
    from fmhub.base.errors import one_line

    parts = sorted(used.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{name} ({n} tensor{'s' if n != 1 else ''})" if i == 0 else f"{name} ({n})"
                     for i, (name, n) in enumerate(parts))
    return one_line(f"fmhub: {path}: {text}")


def _git_path(name: str, cwd: str | None) -> str:
    out = git("rev-parse", "--git-path", name, cwd=cwd).strip()
    return os.path.abspath(os.path.join(cwd or os.getcwd(), out))


def record(path: str, merged_file: str, used: Mapping[str, int], cwd: str | None = None) -> str | None:
    """Note that ``path`` was merged into ``merged_file`` (what git stages) with the strategies ``used``
    (name -> tensors), replacing an earlier note for ``path``; the line, or None when there is nothing to say.
    Installs the hook (`ensure_hook`) when no other ``prepare-commit-msg`` hook is there."""
    if not used or "\t" in path or "\n" in path:
        return None
    line = summary(path, used)
    blob = git("hash-object", "--no-filters", "--", merged_file, cwd=cwd).strip()
    notes = _git_path(NOTES, cwd)
    kept = []
    if os.path.isfile(notes):
        with open(notes, encoding="utf-8", errors="replace") as f:
            kept = [x for x in f.read().splitlines() if x.split("\t")[1:2] != [path]]
    with open(notes, "w", encoding="utf-8") as f:
        f.write("".join(f"{x}\n" for x in [*kept, f"{blob}\t{path}\t{line}"]))
    ensure_hook(cwd)
    return line


def hook_path(cwd: str | None = None) -> str:
    return os.path.join(_git_path("hooks", cwd), HOOK)


def ensure_hook(cwd: str | None = None) -> bool:
    """Write fmhub's ``prepare-commit-msg`` hook unless another one is there (that one is left alone); whether
    fmhub's is in place."""
    hook = hook_path(cwd)
    try:
        with open(hook, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        text = None
    except OSError:
        return False
    if text == HOOK_TEXT:
        return True
    if text is not None and HOOK_MARK not in text:
        return False
    try:
        os.makedirs(os.path.dirname(hook), exist_ok=True)
        with open(hook, "w", encoding="utf-8") as f:
            f.write(HOOK_TEXT)
        os.chmod(hook, os.stat(hook).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except OSError:
        return False
    return True


def install(cwd: str | None = None) -> str:
    """Write the hook, keeping a hook that was there as ``prepare-commit-msg.local`` (run after fmhub's); its path."""
    hook = hook_path(cwd)
    if os.path.isfile(hook):
        with open(hook, encoding="utf-8", errors="replace") as f:
            if HOOK_MARK not in f.read():
                os.replace(hook, hook + ".local")
    ensure_hook(cwd)
    return hook


def uninstall(cwd: str | None = None) -> None:
    """Remove fmhub's hook and put back the one it set aside, if any; a hook that is not fmhub's stays."""
    hook = hook_path(cwd)
    try:
        with open(hook, encoding="utf-8", errors="replace") as f:
            ours = HOOK_MARK in f.read()
    except OSError:
        return
    if ours:
        os.remove(hook)
        if os.path.isfile(hook + ".local"):
            os.replace(hook + ".local", hook)

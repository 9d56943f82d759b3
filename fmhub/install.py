"""Registering fmhub with git: filter, diff and merge driver config, and ``.gitattributes`` patterns."""

from __future__ import annotations

import os
import shlex
import sys

from dulwich.attrs import parse_git_attributes

from fmhub.errors import FmhubError
from fmhub.repo import common_dir, git, open_store, toplevel

DRIVER = "fmhub"
ATTRIBUTES = f"filter={DRIVER} diff={DRIVER} merge={DRIVER} -text"


def default_command() -> str:
    """How git should start fmhub: this interpreter, so the filter finds the same installation."""
    return f"{shlex.quote(sys.executable)} -m fmhub"


def driver_config(command: str) -> dict[str, str]:
    return {
        f"filter.{DRIVER}.process": f"{command} filter-process",
        # one-shot fallbacks for tools that do not speak the process protocol
        f"filter.{DRIVER}.clean": f"{command} clean %f",
        f"filter.{DRIVER}.smudge": f"{command} smudge %f",
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
    return cfg


def uninstall(global_: bool = False, cwd: str | None = None) -> None:
    scope = _scope(global_, cwd)
    for section in (f"filter.{DRIVER}", f"diff.{DRIVER}", f"merge.{DRIVER}"):
        git("config", *scope, "--remove-section", section, cwd=cwd, check=False)


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
    tmp = path + ".fmhub-tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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

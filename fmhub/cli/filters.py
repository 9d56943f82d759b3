"""The commands git runs (hidden): they live in `fmhub_filters.commands`, which ``python -m fmhub`` reaches without
the CLI; these entries keep them working through the ``fmhub`` script and give a usage message for bad arguments."""

from __future__ import annotations

from typing import List

import typer

app = typer.Typer()


@app.command("filter-process", hidden=True)
def filter_process() -> None:
    """git's long-running clean/smudge filter (started by git)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.run(["filter-process"]))


@app.command("filter-clean", hidden=True)
def filter_clean(path: str = typer.Argument("<stdin>")) -> None:
    """Checkpoint on stdin -> manifest on stdout, storing its tensors (git's one-shot clean filter)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.filter_clean(path))


@app.command("filter-smudge", hidden=True)
def filter_smudge(path: str = typer.Argument("<stdin>")) -> None:
    """Manifest on stdin -> the original checkpoint on stdout (git's one-shot smudge filter)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.filter_smudge(path))


@app.command("pre-push", hidden=True)
def pre_push(remote: str, url: str = typer.Argument("")) -> None:
    """git's pre-push hook: upload the tensor objects of the pushed commits that the server lacks (reads git's stdin)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.pre_push(remote, url))


@app.command("pre-commit", hidden=True)
def pre_commit() -> None:
    """git's pre-commit hook: refuse a commit that stages a raw checkpoint at a path fmhub tracks."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.pre_commit())


@app.command("merge-driver", hidden=True)
def merge_driver(base: str, ours: str, theirs: str, pathname: str) -> None:
    """Three-way tensor merge for git (merge.fmhub.driver)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.merge_driver(base, ours, theirs, pathname))


@app.command("diff-driver", hidden=True, context_settings={"ignore_unknown_options": True})
def diff_driver(args: List[str] = typer.Argument(..., help="git's PATH OLD-FILE OLD-HEX OLD-MODE NEW-FILE NEW-HEX NEW-MODE")) -> None:
    """Semantic checkpoint diff for git (diff.fmhub.command)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.diff_driver(*args))


@app.command("textconv", hidden=True)
def textconv(path: str) -> None:
    """One line per tensor (name, dtype, shape, sha256, norm, mean, std) for git log -p / show (diff.fmhub.textconv)."""
    from fmhub_filters import commands as gitcmd

    raise typer.Exit(gitcmd.textconv(path))

"""``fmhub migrate`` (`fmhub.api.migrate`): convert a branch's history from git-lfs to fmhub."""

from __future__ import annotations

from typing import List

import typer

from fmhub.cli.common import console

app = typer.Typer()


@app.command()
def migrate(
    branches: List[str] = typer.Argument(None, metavar="BRANCH|BASE..BRANCH", help="Default: the current branch."),
    include: List[str] = typer.Option([], "--include", "-I", metavar="PATTERN",
                                      help="Files to convert (default: the patterns fmhub tracks, else *.safetensors)."),
    everything: bool = typer.Option(False, "--everything", help="Every local branch."),
) -> None:
    """Rewrite a branch's history so checkpoints stored by git-lfs (or as raw blobs) become fmhub manifests.

    Like `git lfs migrate import`: each commit's matching files are cleaned into fmhub's store (a Git LFS pointer through its object in .git/lfs/objects).

    The .gitattributes lines for the patterns become fmhub's; the old tip stays as refs/fmhub/pre-migrate/BRANCH. Needs a clean work tree; the new tip is checked out. See docs/migrate.md.
    """
    from fmhub.api.migrate import migrate as run

    done = run(branches or [], include, everything)
    for ref, (old, new) in done.refs.items():
        name = ref.removeprefix("refs/heads/")
        if old == new:
            console.print(f"{name}: nothing to convert", highlight=False)
        else:
            console.print(f"{name}: {old[:12]} -> {new[:12]} (old tip kept as refs/fmhub/pre-migrate/{name})", highlight=False)
    console.print(f"{done.commits} commit(s) rewritten, {done.converted} file version(s) converted "
                  f"({', '.join(done.patterns)})" + ("; work tree checked out" if done.checked_out else ""), highlight=False)

"""``fmhub hub push`` and ``fmhub hub clone`` (`fmhub.api.hub`)."""

from __future__ import annotations

from typing import Optional

import typer

from fmhub.cli.common import err, say

app = typer.Typer()
hub_app = typer.Typer(no_args_is_help=True, help="Hugging Face Hub repositories through huggingface_hub (HF_ENDPOINT, HF_TOKEN).")
app.add_typer(hub_app, name="hub")


@hub_app.command("push")
def hub_push(
    repo_id: Optional[str] = typer.Argument(None, help="user/name on the Hub (default: the repo this one was cloned from or last pushed to)."),
    rev: str = typer.Option("HEAD", "--rev", help="The git revision whose files to push."),
    branch: str = typer.Option("main", help="The Hub branch to commit to (created if missing)."),
    message: Optional[str] = typer.Option(None, "-m", "--message", help="The Hub commit message (default: from the git commit)."),
    private: bool = typer.Option(False, help="Create the Hub repo private if it does not exist."),
) -> None:
    """Commit REV's files to a Hub repo in fmhub's layout; only tensor objects the Hub lacks are uploaded."""
    from fmhub.api import hub
    from fmhub.base.units import human_bytes

    res = hub.push(repo_id, rev, branch, message, private, progress=err.is_terminal)
    if not res.changed:
        say(f"{res.repo_id} on the Hub already holds these files ({res.objects_present} objects); nothing to push")
        return
    say(f"pushed {res.files} file(s) to {res.url}: {res.objects_sent} object(s) uploaded ({human_bytes(res.bytes_sent)}), "
        f"{res.objects_present} already on the Hub" + (f"; removed {', '.join(res.deleted)}" if res.deleted else ""))


@hub_app.command("clone")
def hub_clone(
    repo_id: str = typer.Argument(..., help="user/name on the Hub."),
    directory: Optional[str] = typer.Argument(None, help="Where to clone (default: the repo's name)."),
    revision: Optional[str] = typer.Option(None, "--revision", "-r", help="A Hub branch, tag or commit (default: main)."),
    checkout: bool = typer.Option(True, "--checkout/--no-checkout", help="Download objects and write the checkpoints (else manifests only; `fmhub checkout` later)."),
) -> None:
    """Clone a Hub repo pushed by fmhub into a new git repository with loadable checkpoints."""
    from fmhub.api import hub
    from fmhub.base.units import human_bytes

    res = hub.clone(repo_id, directory, revision, checkout, progress=err.is_terminal)
    what = f"{len(res.checkpoints)} checkpoint(s), {res.objects} object(s) downloaded ({human_bytes(res.bytes)})"
    if res.imported:
        what += f"; imported {len(res.imported)} plain checkpoint(s) into fmhub: {', '.join(res.imported)}"
    say(f"cloned {repo_id}@{res.revision[:12]} into {res.directory}: {what}")

"""The ``fmhub`` command line: parse, call one function of `fmhub.api`, render.

One module per command group (`git`, `filters`, `diff`, `models`, `ml`, `data`, `governance`, `run`, `serve`,
`server`, `hub`), imported only when one of its commands runs: ``fmhub --help`` lists the commands from
`COMMANDS` without importing any of them. `FmhubGroup.invoke` is the one place where a command's errors become one
line on stderr and exit status 1 (`FmhubError`: its message; anything else: what failed, ``FMHUB_DEBUG=1`` keeping the
traceback); `main` does the same for what fails outside a command. No command reads ``sys.argv``: `main(argv)`, the
shell and typer's CliRunner give the same words to the same parser.

May import: every layer below it (the library through `fmhub.api`, the git commands of ``fmhub_filters``).
"""

from __future__ import annotations

import errno
import importlib
import os
from typing import Any, Optional, Sequence

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from fmhub.base.errors import FmhubError

# name -> (module under fmhub.cli, hidden, first paragraph of its help), in the order `fmhub --help` lists them;
# tests/git/test_api.py checks this table against the commands themselves
COMMANDS: dict[str, tuple[str, bool, str]] = {
    "install": ("git", False, "Register fmhub's filter, diff and merge drivers with git."),
    "uninstall": ("git", False, "Remove fmhub's drivers from git config (objects and .gitattributes stay)."),
    "track": ("git", False, "Store files matching PATTERNS tensor by tensor (writes .gitattributes); no patterns lists them."),
    "untrack": ("git", False, "Stop routing PATTERNS through fmhub."),
    "plugins": ("governance", False, "List loaded plugins and what each provides."),
    "filter-process": ("filters", True, ""),
    "filter-clean": ("filters", True, ""),
    "filter-smudge": ("filters", True, ""),
    "pre-push": ("filters", True, ""),
    "pre-commit": ("filters", True, ""),
    "fetch": ("git", False, "Download every tensor object the checkpoints committed at REVs (default HEAD) need, so checkouts work offline."),
    "push-objects": ("git", False, "Upload the tensor objects of REVs' history (default HEAD) that the server lacks: for commits "
                                   "pushed before `fmhub install`."),
    "migrate": ("migrate", False, "Rewrite a branch's history so checkpoints stored by git-lfs (or as raw blobs) become fmhub manifests."),
    "merge-driver": ("filters", True, ""),
    "diff-driver": ("filters", True, ""),
    "textconv": ("filters", True, ""),
    "diff": ("diff", False, "What changed in each tensor: HEAD vs the work tree, REV vs the work tree, or REV1 vs REV2."),
    "merge": ("models", False, "Merge N models (and a base) tensor by tensor into one, outside a git merge; also PEFT LoRA adapters."),
    "ls": ("git", False, "List the tensors of a checkpoint (in the work tree, or at --rev)."),
    "checkout": ("git", False, "Turn work-tree files that are still manifests (a clone made before `fmhub install`) into checkpoints."),
    "fsck": ("git", False, "Verify the object store: every object's hash, and the objects REV needs."),
    "gc": ("git", False, "Delete store objects no commit (reachable from a ref or reflog) and no staged file refers to."),
    "repack": ("git", False, "Store old tensor versions as deltas against newer ones; what the branch tips need stays whole."),
    "extract": ("models", False, "Partial checkout: write only the matching tensors to a new file, reading (and fetching) only "
                                 "their objects."),
    "fisher": ("models", False, "Empirical diagonal Fisher of MODEL on DATA (per-example squared gradients; CPU or GPU through accelerate)."),
    "sparsify": ("models", False, "Keep only the top-K% most important entries of a fine-tune's update (FishMask); the rest get "
                                  "the base's exact bits."),
    "finetune": ("ml", False, "Fine-tune BASE (reproducibly, with accelerate); with --fisher/--keep only the masked entries "
                              "change, bit-exact elsewhere."),
    "commit": ("models", False, "Commit a fine-tune as a FishMask sparse update of its committed base: stored as sparse deltas, "
                                "quality loss reported."),
    "label": ("data", False, "Weak supervision: run a pipeline's labelling functions, combine their votes, write probabilistic labels."),
    "demo": ("run", False, "Build a tiny transformers model, version it with git + fmhub, and show what fmhub stores."),
    "lineage": ("governance", False, "Show which datasets, models and pipeline steps produced PATH (from its .lineage.json records)."),
    "unlearn": ("governance", False, "List every committed model version trained (directly or through a pipeline or merge) on SOURCE."),
    "run": ("run", False, "Build what fmhub.yaml declares: data pipelines, adapters per task, selection, merge, deploy; only "
                          "what is out of date."),
    "select": ("ml", False, "Rank the base model and its adapters on the declared tasks: a leaderboard, best first (mean rank over tasks)."),
    "init": ("run", False, "Start a repository with fmhub installed; --example writes a tiny model, data and an fmhub.yaml and runs it."),
    "serve": ("serve", False, "Serve BASE with many LoRA adapters over an OpenAI-compatible HTTP API (`model` names the adapter)."),
    "deploy": ("serve", False, "Hot-swap a running server to the adapters declared at REV: new ones load, changed ones swap, "
                               "removed ones go."),
    "join": ("data", False, "Bring a metadata table's attributes (entity -> type, ...) into text rows, as fmhub.yaml's join: declares."),
    "eval": ("ml", False, "Score a model (and adapter) row by row; store the predictions; report the metric per slice, and what "
                          "changed since --compare."),
    "explain": ("ml", False, "Provenance of predictions: for failing rows, the training rows most responsible for what the model predicted."),
    "patch": ("ml", False, "Fix a failing slice through data: label a patch set, fine-tune the base on it, and keep it only if "
                           "the gate passes."),
    "rebase": ("models", False, "Move adapters and fine-tunes of a base onto a new version of it: the model analogue of rebasing a branch."),
    "adapter": ("models", False, "PEFT LoRA adapters tracked as versions against their base model's revision."),
    "hub": ("hub", False, "Hugging Face Hub repositories through huggingface_hub (HF_ENDPOINT, HF_TOKEN)."),
    "clean": ("data", False, "Data pipelines: clean a dataset as fmhub.yaml says (`fmhub clean [PIPELINE]`, options: `fmhub "
                             "clean run --help`), review the decisions."),
    "server": ("server", False, "A git + Git LFS server that enforces the access policy (docs/server.md)."),
    "audit": ("governance", False, "The hash-chained audit log of filter runs, pushes, fetches, merges and pipeline runs."),
}

ARGS = "fmhub.args"  # ctx.meta: the words after `fmhub`, as given (click drops `--`; `fmhub diff` needs it)
_LISTING = "fmhub.listing"  # ctx.meta: set while `fmhub --help` lists the commands


def debug() -> bool:
    """``FMHUB_DEBUG`` set: errors no check anticipated keep their traceback."""
    return bool(os.environ.get("FMHUB_DEBUG"))


def say_error(message: str, markup: bool = True) -> None:
    """``fmhub: MESSAGE`` as one line on stderr (`fmhub.base.errors.one_line`; no markup is read from the message)."""
    from fmhub.base.errors import one_line

    if markup:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True).print(f"[red]fmhub:[/red] {escape(one_line(message))}", highlight=False, soft_wrap=True)
    else:
        import sys

        sys.stderr.write(f"fmhub: {one_line(message)}\n")


def _passes_through(exc: BaseException) -> bool:
    """click's own exits and usage errors (a ClickException has ``show`` and ``exit_code``), and a closed pipe:
    click handles them."""
    click_error = hasattr(exc, "show") and hasattr(exc, "exit_code")
    return isinstance(exc, (typer.Exit, typer.Abort)) or click_error or (isinstance(exc, OSError) and exc.errno == errno.EPIPE)


def _unexpected(args: Sequence[str], exc: BaseException) -> str:
    from fmhub.base.errors import unexpected

    return unexpected(f"fmhub {' '.join(list(args)[:1])}".strip(), exc)


class FmhubGroup(TyperGroup):
    """The ``fmhub`` group: commands load on first use, from `COMMANDS`; errors become one line (see `main`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name, (_, hidden, text) in COMMANDS.items():  # what `--help` and "did you mean" need, nothing imported
            self.commands.setdefault(name, TyperCommand(name=name, help=text, hidden=hidden))
        self._loaded: dict[str, Any] = {}

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta[ARGS] = list(args)
        return super().parse_args(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        ctx.meta[_LISTING] = True
        try:
            super().format_help(ctx, formatter)
        finally:
            ctx.meta.pop(_LISTING, None)

    def get_command(self, ctx: Any, cmd_name: str) -> Optional[Any]:
        if cmd_name not in COMMANDS or ctx.meta.get(_LISTING):
            return super().get_command(ctx, cmd_name)
        return self.load(cmd_name)

    def load(self, name: str) -> Any:
        """The click command ``name``, importing its module (`COMMANDS`) the first time."""
        module = COMMANDS[name][0]
        if module not in self._loaded:
            self._loaded[module] = typer.main.get_group(importlib.import_module(f"fmhub.cli.{module}").app)
        return self._loaded[module].commands[name]

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:  # the one handler of every command's errors
            if _passes_through(exc):
                raise
            if isinstance(exc, FmhubError):
                say_error(str(exc))
            elif debug():
                raise
            else:
                say_error(_unexpected(ctx.meta.get(ARGS, ()), exc), markup=False)
            raise typer.Exit(1) from None


def _flag_type(self: TyperOption, ctx: Any) -> Optional[str]:
    """An option's type label in help (``<int>``, ``<str>``), none for a flag (typer would show ``<bool>``)."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = getattr(TyperOption, "display_type_rich", None)  # typer >= 0.20 labels types, <bool> included
if _option_type is not None:
    TyperOption.display_type_rich = _flag_type  # every command's help, however loaded (the help options' too)

# `-h` is `--help`, for `fmhub` and every command under it (click hands a context's settings down to its children)
app = typer.Typer(cls=FmhubGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Engineer foundation models like software, in plain git.")


def _print_version(value: bool) -> None:
    if value:
        from fmhub import __version__

        print(f"fmhub {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print fmhub's version and exit."),
) -> None:
    # the callback also makes typer build a group (FmhubGroup) though no command is registered here
    pass


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``fmhub ARGV...`` (default: this process's arguments) and return its exit status.

    ``main(["diff", "HEAD~1"])``, the shell's ``fmhub diff HEAD~1`` and typer's ``CliRunner().invoke(app, [...])`` read
    the same words the same way.
    """
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    try:
        typer.main.get_command(app).main(args=argv, standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        if isinstance(code, str):  # sys.exit("message"), from a library or a plugin: say it, as Python would
            say_error(code, markup=False)
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as exc:  # outside any command (e.g. while listing them): one line too
        if debug() and not isinstance(exc, FmhubError):
            raise
        say_error(str(exc) if isinstance(exc, FmhubError) else _unexpected(argv or (), exc), markup=False)
        return 1
    return 0

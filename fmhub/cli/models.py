"""``fmhub merge|extract|fisher|sparsify|commit|rebase`` and ``fmhub adapter add|ls|merge`` (`fmhub.api.models`)."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer
from rich.table import Table

from fmhub.cli.common import console, print_losses, say, utf8_stdout, value

app = typer.Typer()


@app.command()
def merge(
    inputs: List[str] = typer.Argument(..., help="A recipe (.yaml), or the models to merge: files, shard/adapter directories, REV:PATH."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Where to write the result (overrides the recipe's `output`)."),
    base: Optional[str] = typer.Option(None, "--base", help="The common base model (needed by task-arithmetic, ties, dare-*)."),
    strategy: Optional[str] = typer.Option(None, "-s", "--strategy", help="Merge strategy for every tensor (`fmhub plugins` lists them)."),
    weight: List[float] = typer.Option([], "-w", "--weight", help="One weight per model, in order."),
    option: List[str] = typer.Option([], "--option", help="Strategy option KEY=VALUE (density=0.5, scale=1, seed=0, t=0.5)."),
    into: Optional[str] = typer.Option(None, "--into", help="For PEFT adapters: `base` (full weights) or `adapter` (one adapter)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was done per tensor as JSON."),
) -> None:
    """Merge N models (and a base) tensor by tensor into one, outside a git merge; also PEFT LoRA adapters."""
    from collections import Counter

    from fmhub.api import models
    from fmhub.base.units import human_bytes

    with console.status("merging", spinner="dots") as status:
        report = models.merge(inputs, output, base, strategy, weight, option, into,
                              progress=lambda name: status.update(f"merging {name}"))
    if as_json:
        console.print_json(json.dumps({"output": report.output, "bytes": report.bytes_written,
                                       "tensors": [{"name": n, "action": a} for n, a in report.actions],
                                       "carried": report.carried, "carried_from": report.carried_from}))
        return
    counts = Counter(a for _, a in report.actions)
    table = Table("action", "tensors", title=f"wrote {report.output} ({human_bytes(report.bytes_written)})")
    for action, n in counts.most_common():
        table.add_row(action, str(n))
    console.print(table)
    if report.carried:
        say(f"with {', '.join(report.carried)} from {report.carried_from}")


@app.command()
def extract(
    source: str = typer.Argument(..., help="A checkpoint file or directory, or REV:PATH (e.g. main:model/)."),
    tensors: List[str] = typer.Option(..., "--tensors", "-t", help='Tensor-name pattern, e.g. "model.layers.0.*" (repeatable).'),
    output: str = typer.Option(..., "-o", "--output", help="The .safetensors file to write."),
) -> None:
    """Partial checkout: write only the matching tensors to a new file, reading (and fetching) only their objects."""
    from fmhub.api import models
    from fmhub.base.units import human_bytes

    done = models.extract(source, tensors, output)
    console.print(f"wrote {done.output}: {len(done.tensors)} tensors, {human_bytes(done.bytes_written)}", highlight=False)


@app.command()
def fisher(
    model: str = typer.Argument(..., help="A save_pretrained directory of a causal LM."),
    data: str = typer.Option(..., "--data", help="Examples: a .jsonl ({\"text\"} or {\"input_ids\"}) or .txt file (one per line)."),
    output: str = typer.Option(..., "-o", "--output", help="The .safetensors file to write."),
    batch_size: int = typer.Option(8, help="Examples per vectorised pass."),
    max_examples: Optional[int] = typer.Option(None, help="Use at most this many examples (a seeded subset)."),
    max_length: int = typer.Option(128, help="Tokens per example, at most."),
    seed: int = typer.Option(0),
) -> None:
    """Empirical diagonal Fisher of MODEL on DATA (per-example squared gradients; CPU or GPU through accelerate)."""
    from fmhub.api import models

    rep = models.fisher(model, data, output, batch_size=batch_size, max_examples=max_examples, max_length=max_length, seed=seed)
    say(f"wrote {rep.output}: Fisher of {rep.tensors} tensors ({rep.parameters:,} parameters) from {rep.examples} examples, "
        f"{rep.tokens} tokens, on {rep.device} in {rep.seconds:.1f} s ({rep.method})")


@app.command()
def sparsify(
    base: str = typer.Argument(..., help="The base checkpoint (file or save_pretrained directory)."),
    finetuned: str = typer.Argument(..., help="The fine-tune of BASE."),
    fisher_file: str = typer.Option(..., "--fisher", help="A Fisher file (`fmhub fisher`) for these tensors."),
    keep: str = typer.Option(..., "--keep", help="Fraction of entries whose update is kept, e.g. 1%."),
    output: str = typer.Option(..., "-o", "--output", help="Where to write (a .safetensors file, or a directory)."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluation examples: report the loss of base, fine-tune and sparse update."),
) -> None:
    """Keep only the top-K% most important entries of a fine-tune's update (FishMask); the rest get the base's exact bits.

    Commit the result with `git config fmhub.deltas true` and fmhub stores it as sparse deltas against the base.
    """
    from fmhub.api import models

    done = models.sparsify(base, finetuned, fisher_file, keep, output, data)
    rep = done.report
    say(f"wrote {rep.output}: kept {rep.kept:,} of {rep.total:,} entries ({rep.kept_fraction:.2%}; {rep.changed:,} differ from the base, "
        f"of {rep.update_size:,} in the dense update), {rep.fisher_norm_retained:.1%} of the update's Fisher-weighted norm")
    if done.losses:
        print_losses(done.losses, "fine-tune")


@app.command()
def commit(
    path: str = typer.Argument(..., help="A fine-tuned .safetensors file or model directory whose base is committed."),
    message: str = typer.Option(..., "-m", "--message"),
    sparse: Optional[str] = typer.Option(None, "--sparse", help="Keep the top K% of the update by Fisher value, e.g. 1% (git config fmhub.sparse.keep)."),
    fisher_file: Optional[str] = typer.Option(None, "--fisher", help="The Fisher file (`fmhub fisher`; git config fmhub.sparse.fisher)."),
    data: Optional[str] = typer.Option(None, "--data", help="Evaluation examples: report base, dense and sparse eval loss."),
    base: str = typer.Option("HEAD", "--base", help="The revision holding the base version of PATH."),
) -> None:
    """Commit a fine-tune as a FishMask sparse update of its committed base: stored as sparse deltas, quality loss reported."""
    from fmhub.api import models
    from fmhub.base.units import human_bytes

    rep = models.commit_sparse(path, message, sparse, fisher_file, data, base)
    say(f"committed {rep.commit[:12]}: kept {rep.kept_fraction:.2%} of the update; stored {human_bytes(rep.stored_bytes)} "
        f"for {human_bytes(rep.changed_bytes)} of changed tensors ({rep.stored_bytes / max(rep.changed_bytes, 1):.2%})")
    if rep.losses:
        print_losses(rep.losses, "dense")


@app.command("rebase")
def rebase_cmd(
    sources: List[str] = typer.Argument(..., help="Adapters or fine-tuned models built on the old base."),
    onto: str = typer.Option(..., "--onto", help="The new base (e.g. the patched one)."),
    old: str = typer.Option(..., "--from", help="The base they were built on."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output directory (one source only; default: rebase in place)."),
    strategy: str = typer.Option("task-arithmetic", "--strategy", help="For full models: the merge strategy (task-arithmetic, ties, ...)."),
    check: Optional[str] = typer.Option(None, "--check", help="A task of fmhub.yaml to score before and after; a regression refuses the rebase."),
    max_regression: float = typer.Option(0.02, "--max-regression"),
    retune: int = typer.Option(0, "--retune", help="An adapter that regresses on the new base trains this many more steps on the --check task, then is checked again."),
    lr: Optional[float] = typer.Option(None, "--lr", help="The retune's learning rate (default: a third or a tenth of the adapter's own, whichever does better)."),
    spec_file: Optional[str] = typer.Option(None, "--spec"),
) -> None:
    """Move adapters and fine-tunes of a base onto a new version of it: the model analogue of rebasing a branch."""
    from fmhub.api import models

    done = models.rebase(sources, onto, old, output, strategy, check, max_regression, retune, lr, spec_file)
    t = Table("source", "kind", "output", "before", "after", "retuned", title=f"rebased onto {onto}", title_justify="left")
    for src, r in done:
        t.add_row(src, r.kind, r.output, value(r.score_before), value(r.score_after), f"{r.retuned} steps" if r.retuned else "")
    console.print(t)


adapter_app = typer.Typer(no_args_is_help=True, help="PEFT LoRA adapters tracked as versions against their base model's revision.")
app.add_typer(adapter_app, name="adapter")


@adapter_app.command("add")
def adapter_add(
    adapter_dir: str = typer.Argument(..., help="A PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."),
    base: str = typer.Option(..., "--base", help="The base model's path in this repository (a file or a shard directory)."),
    rev: str = typer.Option("HEAD", "--rev", help="The commit of the base the adapter was trained on."),
) -> None:
    """Check ADAPTER_DIR fits BASE at REV, record that base in fmhub-adapter.json, and stage the adapter."""
    from fmhub.api import models

    info = models.adapter_add(adapter_dir, base, rev)
    say(f"staged {info.path}: LoRA r={info.rank} alpha={info.alpha:g} on {len(info.modules)} weights of "
        f"{info.base.path} at {info.base.revision[:12]}")


@adapter_app.command("ls")
def adapter_ls(
    rev: Optional[str] = typer.Option(None, "--rev", help="List the adapters committed at REV (default: the work tree)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Adapters, their base model revision, and whether the base has changed since."""
    from dataclasses import asdict

    from fmhub.api import models

    infos = models.adapter_list(rev)
    if as_json:
        utf8_stdout()
        sys.stdout.write(json.dumps([asdict(i) for i in infos], indent=2) + "\n")
        return
    table = Table("adapter", "r", "alpha", "targets", "base", "trained on", "base now")
    for i in infos:
        now = {"same": "[green]same[/]", "missing": "[red]missing[/]"}.get(i.base_now, f"[yellow]changed[/] ({len(i.changed_files)} files)")
        table.add_row(i.path, str(i.rank), f"{i.alpha:g}", ",".join(i.modules), i.base.path, i.base.revision[:12], now)
    console.print(table if infos else "no adapters recorded (fmhub adapter add)")


@adapter_app.command("merge")
def adapter_merge(
    adapter_dir: str = typer.Argument(..., help="An adapter recorded with `fmhub adapter add`."),
    tolerance: str = typer.Option("0", "--tolerance", help="Largest error allowed per element; 0 stores the merge bit-exact."),
) -> None:
    """Merge the adapter into its base in the work tree and stage it: each changed weight a low-rank delta.

    Fails, writing nothing, when a changed weight cannot be stored as a delta within the tolerance.
    """
    from fmhub.api import models
    from fmhub.base.units import human_bytes

    rep = models.adapter_merge(adapter_dir, tolerance)
    table = Table("tensor", "stored as", "bytes", "of full", "max error")
    for t in rep.tensors:
        table.add_row(t.name, t.codec or "whole", human_bytes(t.stored), f"{t.stored / max(t.size, 1):.1%}",
                      "exact" if t.max_error is None else f"{t.max_error:.3g}")
    console.print(table)
    say(f"merged {rep.adapter} into {', '.join(rep.files)} and staged it: {human_bytes(rep.stored)} stored for "
        f"{human_bytes(rep.full)} of changed weights ({rep.stored / max(rep.full, 1):.1%}); commit to keep it")

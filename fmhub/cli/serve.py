"""``fmhub serve`` and ``fmhub deploy`` (`fmhub.api.serve`)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich.table import Table

from fmhub.cli.common import console, err, say

app = typer.Typer()


@app.command()
def serve(
    base: Optional[str] = typer.Option(None, "--base", help="The base model: a directory, or PATH@REV in this repository."),
    adapters: List[str] = typer.Option(None, "--adapters", help="PATH[@REV] of an adapter or a directory of adapters, or NAME=PATH[@REV]; repeat or comma-separate."),
    declared: Optional[str] = typer.Option(None, "--declared", help="Also serve the adapters recorded with `fmhub adapter add` at this revision."),
    backend_name: Optional[str] = typer.Option(None, "--backend", help="The serving backend (`fmhub plugins`): local (default), vllm."),
    host: Optional[str] = typer.Option(None, "--host", help="Default 127.0.0.1."),
    port: Optional[int] = typer.Option(None, "--port", help="Default 8000; 0 picks a free one."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu, cuda, cuda:N."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16, float16."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Rows decoding together (32)."),
    gpu_slots: Optional[int] = typer.Option(None, "--gpu-slots", help="At most this many adapters on the device at once (default: as many as --adapter-memory-mb holds)."),
    adapter_memory_mb: Optional[float] = typer.Option(None, "--adapter-memory-mb", help="Device memory for the active adapters (default: 10% of the GPU's free memory, 1024 on the CPU)."),
    cpu_cache_mb: Optional[float] = typer.Option(None, "--cpu-cache-mb", help="Warm tier: adapters in host memory (2048)."),
    disk_cache_mb: Optional[float] = typer.Option(None, "--disk-cache-mb", help="Cold tier: adapters materialized from the store (20480)."),
    eviction: Optional[str] = typer.Option(None, "--eviction", help="lru (default) or lfu, for every tier."),
    cycle_time: Optional[float] = typer.Option(None, "--cycle-time", help="Seconds an adapter stays on the device while others wait for room (0.5)."),
    max_lora_rank: Optional[int] = typer.Option(None, "--max-lora-rank", help="Largest adapter rank served (64)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Prompt + completion tokens (default: the model's)."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Default: .git/fmhub/serve-cache."),
    admin_token: Optional[str] = typer.Option(None, "--admin-token", envvar="FMHUB_ADMIN_TOKEN", help="The admin API's bearer token (fmhub deploy); default: a random one, printed at start. Required with a --host other machines reach."),
    export_only: Optional[str] = typer.Option(None, "--export-only", help="vllm: write the model, adapters and launch script to DIR, start nothing."),
    spec_file: Optional[str] = typer.Option(None, "--spec", help="The fmhub.yaml whose serve: section gives the defaults."),
) -> None:
    """Serve BASE with many LoRA adapters over an OpenAI-compatible HTTP API (`model` names the adapter).

    Options left out come from the serve: section of fmhub.yaml, when there is one.
    """
    from fmhub.api import serve as serving

    done = serving.serve(spec_file, export_only, base=base, adapters=adapters or None, declared=declared, backend=backend_name,
                         host=host, port=port, device=device, dtype=dtype, max_batch=max_batch, gpu_slots=gpu_slots, adapter_memory_mb=adapter_memory_mb,
                         cpu_cache_mb=cpu_cache_mb, disk_cache_mb=disk_cache_mb, eviction=eviction, cycle_time=cycle_time,
                         max_lora_rank=max_lora_rank, max_model_len=max_model_len, cache_dir=cache_dir, admin_token=admin_token)
    if isinstance(done, serving.Exported):
        for warning in done.warnings:
            err.print(f"warning: {warning}", highlight=False, soft_wrap=True)
        say(f"wrote {done.directory}: start it with {done.script}")
        return
    say(f"serving {done.config.base.label} with {len(done.config.adapters)} adapter(s) at {done.handle.url} (Ctrl-C stops)")
    if done.generated_token:  # the local backend's admin API always wants a token
        say(f"admin token for this run (fmhub deploy --token, or FMHUB_ADMIN_TOKEN): {done.generated_token}")
    done.handle.wait()


@app.command()
def deploy(
    url: str = typer.Option(..., "--url", help="The running server, e.g. http://127.0.0.1:8000."),
    rev: str = typer.Option("HEAD", "--rev", help="Serve the adapters recorded (fmhub adapter add) at this revision."),
    base: Optional[str] = typer.Option(None, "--base", help="Only the adapters of this base path."),
    adapters: List[str] = typer.Option(None, "--adapters", help="Serve these instead (PATH[@REV], NAME=PATH[@REV])."),
    backend_name: str = typer.Option("local", "--backend"),
    token: Optional[str] = typer.Option(None, "--token", envvar="FMHUB_ADMIN_TOKEN"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Hot-swap a running server to the adapters declared at REV: new ones load, changed ones swap, removed ones go."""
    from fmhub.api import serve as serving

    report = serving.deploy(url, rev, base, adapters or [], backend_name, token)
    if as_json:
        console.print_json(json.dumps(report.to_json()))
        return
    table = Table("change", "adapters", title=f"deployed {rev} to {url}")
    for what in ("added", "updated", "removed", "unchanged"):
        names = getattr(report, what)
        if names:
            table.add_row(what, ", ".join(names))
    for name, why in report.failed.items():
        table.add_row("failed", f"{name}: {why}")
    console.print(table)
    if report.failed:
        raise typer.Exit(1)

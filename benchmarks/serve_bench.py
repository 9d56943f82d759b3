"""Serving many adapters on one base: does throughput hold when every client uses its own adapter?

A Llama-style model is built from a transformers config (random weights,
nothing downloaded) with N random LoRA adapters (PEFT's format, r = 16 on
q/k/v/o). One fmhub server (the local backend, *default settings*: only the
device and a cache directory are given) runs in its own process with torch
held to ``--threads`` threads (1 by default: on a loaded 2-core machine more
threads made the figures swing 30x), and a closed-loop load generator sends,
from C client threads over plain HTTP, R requests each (random prompt,
fixed number of new tokens, greedy, ``ignore_eos``):

* **single**: every client on one adapter;
* **mixed**: client i on adapter i (C distinct adapters);
* **cold** (after the timed pairs, on a second server): more adapters than fit
  in its adapter memory and its warm tier (``--cold-adapters``), each request
  for a random one, so adapters are evicted and loaded from disk again.

Each repeat runs single and mixed back to back (the order alternates); the
ratio mixed / single of each repeat is printed with its median and spread.
From the server's own metrics (``GET /metrics``) come the rows per decode step;
latency is per request, end to end: p50/p99 overall and the p99 of each
adapter (the largest is printed: a starving adapter shows there).

    python benchmarks/serve_bench.py                       # CPU: 64 clients x 64 adapters vs 1 (~3 min on 2 cores)
    python benchmarks/serve_bench.py --device cuda         # the same on a GPU: the ~1 B Llama preset, bf16
    python benchmarks/serve_bench.py --quick --json out.json   # a smoke run (< 1 min)
    python benchmarks/serve_bench.py --option gpu_slots=8      # the old fixed 8 slots, for comparison
    python benchmarks/serve_bench.py --engine naive --no-cold  # one merged model per adapter, swapped (serve_baseline.py)

On a GPU (``--device cuda``, or ``--refs`` anywhere) the same model is then
timed with transformers' ``generate`` and peft's mixed-adapter batch, and
fmhub's tok/s is given as a fraction of the memory-bandwidth bound
(`serve_refs.py`).

Target (issue 24): mixed / single >= 0.8 with default settings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = {
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=2, inter=688, vocab=2048, prompt=(16, 48), new=32, clients=64,
                per_client=2, rank=16, cold_adapters=192, cold_pool_adapters=24),
    "gpu": dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=5632, vocab=32000, prompt=(128, 128), new=128, clients=64,
                per_client=2, rank=16, cold_adapters=256, cold_pool_adapters=32),
    "quick": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=512, prompt=(4, 12), new=8, clients=16,
                  per_client=2, rank=8, cold_adapters=24, cold_pool_adapters=4),
}


def build(root: str, p: dict, n_adapters: int, dtype_name: str) -> tuple[str, str]:
    """A random Llama from a config and ``n_adapters`` random LoRA adapters in ``root/adapters``."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"], num_hidden_layers=p["layers"],
                      num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], max_position_embeddings=1024)
    base = os.path.join(root, "base")
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(base)
    head = p["hidden"] // p["heads"]
    shapes = {"q_proj": (p["hidden"], p["hidden"]), "k_proj": (p["kv_heads"] * head, p["hidden"]),
              "v_proj": (p["kv_heads"] * head, p["hidden"]), "o_proj": (p["hidden"], p["hidden"])}
    gen = torch.Generator().manual_seed(1)
    r = p["rank"]
    for i in range(n_adapters):
        d = os.path.join(root, "adapters", f"ad{i:03d}")
        os.makedirs(d)
        tensors = {}
        for layer in range(p["layers"]):
            for mod, (out_f, in_f) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(r, in_f, generator=gen) / in_f ** 0.5).to(dtype)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, r, generator=gen) * 0.02).to(dtype)
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(shapes), "task_type": "CAUSAL_LM",
                       "base_model_name_or_path": base}, f)
    return base, os.path.join(root, "adapters")


# -- the server, in its own process -------------------------------------------------------------
def run_server(args) -> None:
    """``--serve``: serve ``--base`` with ``--adapters`` at default settings (plus ``--option KEY=VALUE``); print the URL."""
    import torch

    torch.set_num_threads(args.threads)
    from fmhub.serving.config import ServeConfig
    from fmhub.serving.engine import Engine
    from fmhub.serving.http import HttpServer
    from fmhub.serving.sources import parse_adapters, parse_source

    options = {k: float(v) if "." in v else int(v) for k, v in (o.split("=", 1) for o in args.option)}
    config = ServeConfig(parse_source(args.base), parse_adapters([args.adapters]), port=0, device=args.device,
                         cache_dir=os.path.join(args.workdir, f"cache-{os.getpid()}"), **options)
    engine = naive_engine(config) if args.engine == "naive" else Engine(config)
    # the default connection limit (64): a client's next connection waits a moment for its old thread (HANDOVER_S)
    server = HttpServer(engine, port=0, max_connections=args.connections)
    print(f"URL {server.url}", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    server.stop()


def naive_engine(config):
    """`serve_baseline.NaiveEngine`: one merged model per adapter, swapped (``--engine naive``, for comparison)."""
    from serve_baseline import NaiveEngine

    from fmhub.serving.model import load_base

    loaded = load_base(config.base, config.cache_dir, config.device, config.dtype)
    return NaiveEngine(loaded, config, {a.name: a.source.path for a in config.adapters})


def start_server(args, base: str, adapters: str, options: list[str]) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--base", base, "--adapters", adapters, "--device", args.device,
           "--threads", str(args.threads), "--workdir", args.workdir, "--engine", args.engine]
    cmd += [x for o in options for x in ("--option", o)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("URL "):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split()[1]


# -- the load -----------------------------------------------------------------------------------
def load(url: str, plan: list[list[str]], p: dict, seed: int, pid: int | None = None) -> dict:
    """Closed loop: client i sends the requests of ``plan[i]`` (adapter names) one after another."""
    rng = random.Random(seed)
    work = [[(name, [rng.randrange(3, p["vocab"]) for _ in range(rng.randint(*p["prompt"]))]) for name in names] for names in plan]
    lock = threading.Lock()
    latencies: list[tuple[str, float]] = []
    tokens, errors = [0], []

    def client(items) -> None:
        for name, prompt in items:
            body = json.dumps({"model": name, "prompt": prompt, "max_tokens": p["new"], "temperature": 0, "ignore_eos": True}).encode()
            req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
            start = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=600) as resp:
                    doc = json.loads(resp.read())
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{exc.__class__.__name__}: {exc}")
                continue
            with lock:
                latencies.append((name, time.monotonic() - start))
                tokens[0] += doc["usage"]["completion_tokens"]

    before, cpu = scrape(url), cpu_seconds(pid)
    threads = [threading.Thread(target=client, args=(w,)) for w in work]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    cpu = cpu_seconds(pid) - cpu if pid else None
    return {"tokens": tokens[0], "wall_s": wall, "tok_per_s": tokens[0] / wall, "server_cpu_s": cpu,
            "tok_per_cpu_s": tokens[0] / cpu if cpu else None, "errors": len(errors), "error_sample": errors[:3],
            "requests": len(latencies), **latency_figures(latencies), **step_figures(before, scrape(url))}


def latency_figures(latencies: list[tuple[str, float]]) -> dict:
    lat = sorted(s for _, s in latencies)
    per: dict[str, list[float]] = {}
    for name, s in latencies:
        per.setdefault(name, []).append(s)
    p99s = {name: p99(v) for name, v in per.items()}
    worst = max(p99s, key=p99s.get) if p99s else None
    return {"p50_s": statistics.median(lat) if lat else None, "p99_s": p99(lat) if lat else None,
            "adapter_p99_max_s": p99s[worst] if worst else None, "adapter_p99_max": worst, "adapters_served": len(per)}


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (Linux): unlike wall time, barely moved by others sharing the machine."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p99(values: list[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(0.99 * (len(v) - 1))))]


def scrape(url: str) -> dict[str, float]:
    """The server's counters, summed over labels."""
    with urllib.request.urlopen(url + "/metrics", timeout=60) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r"^(fmhub_[a-z_]+?)(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def step_figures(before: dict, after: dict) -> dict:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    steps = d.get("fmhub_decode_steps_total", 0.0)
    # servers without fmhub_decode_rows_total: every token but each request's first (from its prefill) is a decode row
    rows = d.get("fmhub_decode_rows_total", d.get("fmhub_generated_tokens_total", 0.0) - d.get("fmhub_requests_total", 0.0))
    return {"decode_steps": steps, "rows_per_step": rows / steps if steps else None}


# -- the scenarios ------------------------------------------------------------------------------
def paired_runs(args, p: dict, base: str, adapters: str) -> dict:
    proc, url = start_server(args, base, adapters, args.option)
    names = [f"ad{i:03d}" for i in range(p["clients"])]
    plans = {"single": [[names[0]] * p["per_client"] for _ in names], "mixed": [[n] * p["per_client"] for n in names]}
    try:
        load(url, [[n] for n in names], p, seed=99)  # every adapter once before timing: the timed runs are the steady state
        runs: dict[str, list[dict]] = {"single": [], "mixed": []}
        for i in range(args.repeat):
            for kind in (("single", "mixed") if i % 2 == 0 else ("mixed", "single")):
                r = load(url, plans[kind], p, seed=args.seed + i, pid=proc.pid)
                runs[kind].append(r)
                print(f"  repeat {i + 1} {kind:6s}: {line(r)}", flush=True)
    finally:
        proc.stdin.close()
        proc.wait(60)
    return runs


def cold_run(args, p: dict, base: str, adapters: str) -> dict:
    """More adapters than the server's adapter memory and warm tier hold: requests load them from disk again."""
    n, fit = p["cold_adapters"], p["cold_pool_adapters"]
    pool, warm = (fit * adapter_mb(p, args.dtype_bytes, pool) for pool in (True, False))
    options = [f"adapter_memory_mb={pool:.6f}", f"cpu_cache_mb={warm:.6f}"] + args.option
    proc, url = start_server(args, base, adapters, options)
    rng = random.Random(args.seed)
    names = [f"ad{i:03d}" for i in range(n)]
    try:
        r = load(url, [[rng.choice(names) for _ in range(p["per_client"])] for _ in range(p["clients"])], p, seed=args.seed)
        after = scrape(url)
    finally:
        proc.stdin.close()
        proc.wait(60)
    r["adapter_loads"] = after.get("fmhub_adapter_loads_total", 0.0)
    return r


def adapter_mb(p: dict, dtype_bytes: int, pool: bool) -> float:
    """What one adapter takes: of the server's adapter pool (``pool``: a rank row of every Linear layer, as the pool counts
    them), or of its warm tier (its factors: q, k, v, o)."""
    h, kv = p["hidden"], p["kv_heads"] * p["hidden"] // p["heads"]
    per_layer = 2 * (2 * h) + 2 * (h + kv) + (3 * (h + p["inter"]) if pool else 0)  # q, o; k, v; gate, up, down
    return p["layers"] * per_layer * p["rank"] * dtype_bytes / 2**20


def line(r: dict) -> str:
    cpu = f"  {r['tok_per_cpu_s']:7.1f} tok/cpu-s" if r.get("tok_per_cpu_s") else ""
    return (f"{r['tok_per_s']:8.1f} tok/s{cpu}  rows/step {r['rows_per_step'] or 0:5.1f}  p50 {r['p50_s']:.3f} s  p99 {r['p99_s']:.3f} s  "
            f"adapter p99 max {r['adapter_p99_max_s']:.3f} s  errors {r['errors']}")


def median(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(runs: dict, cold: dict | None, p: dict) -> dict:
    ratios = [m["tok_per_s"] / s["tok_per_s"] for s, m in zip(runs["single"], runs["mixed"])]
    med = {k: {f: median([r[f] for r in v]) for f in ("tok_per_s", "rows_per_step", "p50_s", "p99_s", "adapter_p99_max_s")}
           for k, v in runs.items()}
    print()
    print("| load | tok/s (median) | rows / decode step | p50 s | p99 s | per-adapter p99, max s |")
    print("|---|---|---|---|---|---|")
    for kind, label in (("single", f"{p['clients']} clients, 1 adapter"), ("mixed", f"{p['clients']} clients, {p['clients']} adapters")):
        m = med[kind]
        print(f"| {label} | {m['tok_per_s']:.1f} | {m['rows_per_step'] or 0:.1f} | {m['p50_s']:.3f} | {m['p99_s']:.3f} | {m['adapter_p99_max_s']:.3f} |")
    if cold:
        print(f"| {p['clients']} clients, {p['cold_adapters']} adapters, {p['cold_pool_adapters']} fit (cold loads) | "
              f"{cold['tok_per_s']:.1f} | {cold['rows_per_step'] or 0:.1f} | {cold['p50_s']:.3f} | {cold['p99_s']:.3f} | "
              f"{cold['adapter_p99_max_s']:.3f} |")
    ratio = statistics.median(ratios)
    print(f"\nmixed / single, tokens per second: median {ratio:.2f}x, spread {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} "
          f"repeats ({', '.join(f'{x:.2f}' for x in ratios)}); target >= 0.8x {'OK' if ratio >= 0.8 else 'MISS'}")
    cpu = [m["tok_per_cpu_s"] / s["tok_per_cpu_s"] for s, m in zip(runs["single"], runs["mixed"]) if m["tok_per_cpu_s"] and s["tok_per_cpu_s"]]
    if cpu:  # what a machine shared with other work cannot blur much: the server's CPU time per token
        print(f"mixed / single, tokens per server CPU second: median {statistics.median(cpu):.2f}x, "
              f"spread {min(cpu):.2f}-{max(cpu):.2f}x")
    return {"ratios": ratios, "ratio_median": ratio, "cpu_ratios": cpu, "medians": med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model and load size (default: gpu with --device cuda, else cpu)")
    ap.add_argument("--quick", action="store_true", help="the smoke preset, one repeat")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (1: steady figures on a shared machine)")
    ap.add_argument("--repeat", type=int, default=None, help="pairs of timed runs (default 5; --quick 1)")
    ap.add_argument("--option", action="append", default=[], help="a server setting KEY=VALUE over the defaults (e.g. gpu_slots=8)")
    ap.add_argument("--no-cold", action="store_true", help="skip the run with more adapters than fit")
    ap.add_argument("--engine", choices=("fmhub", "naive"), default="fmhub", help="naive: serve_baseline.py's merged-model swapping")
    ap.add_argument("--refs", action="store_true", help="also time HF generate and peft on the same model (default on a GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", help=argparse.SUPPRESS)
    ap.add_argument("--connections", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return run_server(args)
    import torch

    torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")
    p = PRESETS[preset]
    args.clients = p["clients"]
    args.repeat = args.repeat or (1 if args.quick else 5)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="fmhub-serve-bench-")
    gpu = args.device.startswith("cuda")
    args.dtype_bytes = 2 if gpu else 4
    t0 = time.monotonic()
    n = max(p["clients"], 0 if args.no_cold else p["cold_adapters"])
    base, adapters = build(args.workdir, p, n, "bfloat16" if gpu else "float32")
    print(f"preset {preset}: Llama {p['hidden']}x{p['layers']} layers, vocab {p['vocab']}, {n} adapters r={p['rank']} on q/k/v/o; "
          f"{p['clients']} clients x {p['per_client']} requests of {p['new']} new tokens; server defaults"
          f"{' + ' + ', '.join(args.option) if args.option else ''}; device {args.device}, {args.threads} torch thread(s); "
          f"built in {time.monotonic() - t0:.1f} s", flush=True)
    runs = paired_runs(args, p, base, adapters)
    cold = None if args.no_cold else cold_run(args, p, base, adapters)
    if cold:
        print(f"  cold ({p['cold_adapters']} adapters, {p['cold_pool_adapters']} fit): {line(cold)}  loads {cold['adapter_loads']:.0f}")
    summary = summarize(runs, cold, p)
    refs = None
    if args.refs or gpu:
        from serve_refs import references, report

        refs = {"batch": 32, "mixed": 8, "clients": p["clients"], **references(base, adapters, p, 32, args.device)}
        report(refs, summary["medians"]["single"]["tok_per_s"], summary["medians"]["mixed"]["tok_per_s"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": preset, "params": p, "device": args.device, "threads": args.threads, "options": args.option,
                       "engine": args.engine, "runs": runs, "cold": cold, "refs": refs, **summary}, f, indent=2)


if __name__ == "__main__":
    main()

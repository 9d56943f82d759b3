"""Serving many adapters on one base: fmhub's multi-adapter batching vs one merged model per adapter, swapped in and out.

A Llama-style model is built from a config (random weights, nothing
downloaded) with N random LoRA adapters (r = 16 on q/k/v/o). Each server
(fmhub's local backend, and `serve_baseline.NaiveEngine` behind the same HTTP
layer) is started on 127.0.0.1 and a closed-loop load generator runs C
clients, each sending requests one after another for an adapter drawn
uniformly from the N (fixed seed), with random prompt lengths and a fixed
number of new tokens (greedy, ``ignore_eos``). Throughput is completion
tokens per second of wall time; latency is per request, end to end. Each
server gets a warm-up (every adapter once) and ``--repeat`` timed runs with
different request mixes; the median run is reported.

    python benchmarks/serve_bench.py                  # CPU-sized model, N = 1, 8, 64 (~3 min on 2 cores)
    python benchmarks/serve_bench.py --preset gpu     # the 0.95 B model of BENCHMARK_TARGETS.md, bf16, batch 32
    python benchmarks/serve_bench.py --quick --repeat 1 --json out.json   # a smoke run

Targets (../shared/BENCHMARK_TARGETS.md and issue 8): with 64 adapters at least
0.7x fmhub's single-adapter throughput; a mixed 8-adapter batch at least 0.9x;
on a GPU, at least 20 % of the memory-bandwidth bound.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=2, inter=688, vocab=2048, prompt=(16, 48), new=32, clients=16,
                requests=96, batch=16, rank=16),
    "gpu": dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=5632, vocab=32000, prompt=(128, 128), new=128, clients=32,
                requests=256, batch=32, rank=16),
    "quick": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=512, prompt=(4, 12), new=8, clients=4,
                  requests=16, batch=8, rank=8),
}


def build(root: str, p: dict, n_adapters: int, dtype: torch.dtype) -> tuple[str, dict[str, str]]:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"], num_hidden_layers=p["layers"],
                      num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], max_position_embeddings=1024)
    base = os.path.join(root, "base")
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(base)
    head = p["hidden"] // p["heads"]
    shapes = {"q_proj": (p["hidden"], p["hidden"]), "k_proj": (p["kv_heads"] * head, p["hidden"]),
              "v_proj": (p["kv_heads"] * head, p["hidden"]), "o_proj": (p["hidden"], p["hidden"])}
    adapters = {}
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
        adapters[f"ad{i:03d}"] = d
    return base, adapters


def load(url: str, names: list[str], p: dict, seed: int, every: bool = False) -> dict:
    """Closed-loop load: ``clients`` threads, ``requests`` in all, each for a random adapter (``every``: each adapter once)."""
    rng = random.Random(seed)
    picks = list(names) if every else [rng.choice(names) for _ in range(p["requests"])]
    plan = [(name, [rng.randrange(3, p["vocab"]) for _ in range(rng.randint(*p["prompt"]))]) for name in picks]
    lock = threading.Lock()
    latencies, tokens, errors = [], [0], []
    it = iter(plan)

    def client() -> None:
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                return
            name, prompt = item
            body = json.dumps({"model": name, "prompt": prompt, "max_tokens": p["new"], "temperature": 0, "ignore_eos": True}).encode()
            req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
            start = time.monotonic()
            try:
                with urllib.request.urlopen(req, timeout=600) as resp:
                    doc = json.loads(resp.read())
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                latencies.append(time.monotonic() - start)
                tokens[0] += doc["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(p["clients"])]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else lat * 99
    return {"tokens": tokens[0], "wall_s": wall, "tok_per_s": tokens[0] / wall, "p50_s": statistics.median(lat) if lat else None,
            "p99_s": q[98] if lat else None, "errors": len(errors), "requests": len(lat)}


def serve_and_load(kind: str, base: str, adapters: dict[str, str], n: int, p: dict, args) -> dict:
    from fmhub.serving.config import ServeConfig
    from fmhub.serving.engine import Engine
    from fmhub.serving.http import HttpServer
    from fmhub.serving.model import load_base
    from fmhub.serving.sources import AdapterSpec, Source

    names = sorted(adapters)[:n]
    specs = [AdapterSpec(a, Source(adapters[a])) for a in names]
    config = ServeConfig(Source(base), specs, port=0, device=args.device, dtype=args.dtype, max_batch=p["batch"],
                         gpu_slots=min(max(n, 1), args.slots), cycle_time=args.cycle_time, max_lora_rank=p["rank"],
                         cache_dir=os.path.join(args.workdir, "cache"))
    loaded = load_base(config.base, config.cache_dir, config.device, config.dtype)
    if kind == "fmhub":
        engine = Engine(config, loaded)
    else:
        from serve_baseline import NaiveEngine

        engine = NaiveEngine(loaded, config, {a: adapters[a] for a in names})
    server = HttpServer(engine, port=0)
    try:
        load(server.url, names, p, seed=99, every=True)  # every adapter loaded once: the timed run is the steady state
        runs = [load(server.url, names, p, seed=args.seed + i) for i in range(args.repeat)]
        out = sorted(runs, key=lambda r: r["tok_per_s"])[len(runs) // 2]  # the median run (2 cores: runs vary)
        out["runs_tok_per_s"] = [r["tok_per_s"] for r in runs]
        if kind == "naive":
            out["swaps"] = engine.swaps
    finally:
        server.stop()
        del engine, loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def bandwidth_bound(base: str, batch: int) -> float | None:
    """Tokens/s if each decode step read every weight once at the GPU's memory bandwidth (H100 SXM: 3.35 TB/s)."""
    if not torch.cuda.is_available():
        return None
    size = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors"))
    bw = {"H100": 3.35e12, "H200": 4.8e12}.get(next((k for k in ("H100", "H200") if k in torch.cuda.get_device_name()), ""), 3.35e12)
    return bw / size * batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model and load size (default: gpu on a GPU, else cpu)")
    ap.add_argument("--quick", action="store_true", help="the smoke preset, N = 1, 2, 4")
    ap.add_argument("--adapters", default=None, help="comma-separated N values (default 1,8,64)")
    ap.add_argument("--slots", type=int, default=64, help="fmhub's device slots")
    ap.add_argument("--cycle-time", type=float, default=0.5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per server; the median is reported")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    preset = "quick" if args.quick else args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    p = PRESETS[preset]
    ns = [int(x) for x in (args.adapters or ("1,2,4" if args.quick else "1,8,64")).split(",")]
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="fmhub-serve-bench-")
    dtype = torch.bfloat16 if torch.cuda.is_available() and args.dtype in ("auto", "bfloat16") else torch.float32
    t0 = time.monotonic()
    base, adapters = build(args.workdir, p, max(ns), dtype)
    print(f"preset {preset}: Llama {p['hidden']}x{p['layers']} layers, vocab {p['vocab']}, {max(ns)} adapters r={p['rank']} on q/k/v/o, "
          f"{p['clients']} clients, {p['requests']} requests of {p['new']} new tokens, batch {p['batch']}; device "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; built in {time.monotonic() - t0:.1f} s", flush=True)
    results = {}
    for n in ns:
        for kind in ("fmhub",) + (() if args.no_baseline else ("naive",)):
            r = serve_and_load(kind, base, adapters, n, p, args)
            results[f"{kind}/{n}"] = r
            print(f"  {kind:6s} N={n:3d}: {r['tok_per_s']:9.1f} tok/s  p50 {r['p50_s']:.3f} s  p99 {r['p99_s']:.3f} s"
                  f"{'  swaps ' + str(r['swaps']) if 'swaps' in r else ''}  errors {r['errors']}", flush=True)
    single = results[f"fmhub/{ns[0]}"]["tok_per_s"]
    print()
    print(f"| N adapters | fmhub tok/s | p50 / p99 s | naive tok/s | p50 / p99 s | fmhub / naive | fmhub / fmhub N={ns[0]} |")
    print("|---|---|---|---|---|---|---|")
    for n in ns:
        f = results[f"fmhub/{n}"]
        nv = results.get(f"naive/{n}")
        print(f"| {n} | {f['tok_per_s']:.1f} | {f['p50_s']:.3f} / {f['p99_s']:.3f} | "
              + (f"{nv['tok_per_s']:.1f} | {nv['p50_s']:.3f} / {nv['p99_s']:.3f} | {f['tok_per_s'] / nv['tok_per_s']:.2f}x" if nv else "- | - | -")
              + f" | {f['tok_per_s'] / single:.2f}x |")
    checks = []
    if 64 in ns:
        ratio = results["fmhub/64"]["tok_per_s"] / single
        checks.append(("64 adapters vs single adapter", ratio, 0.7))
    if 8 in ns:
        checks.append(("8 adapters vs single adapter", results["fmhub/8"]["tok_per_s"] / single, 0.9))
    bound = bandwidth_bound(base, p["batch"])
    if bound and 8 in ns:
        checks.append(("8 adapters vs bandwidth bound", results["fmhub/8"]["tok_per_s"] / bound, 0.2))
    for what, ratio, target in checks:
        print(f"{what}: {ratio:.2f}x (target >= {target}x) {'OK' if ratio >= target else 'MISS'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": preset, "params": p, "results": results, "bandwidth_bound_tok_s": bound,
                       "checks": [{"what": w, "ratio": r, "target": t} for w, r, t in checks]}, f, indent=2)


if __name__ == "__main__":
    main()

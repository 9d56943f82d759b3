"""Peers of `serve_bench.py` on the same machine and model: transformers' ``generate``, peft's mixed-adapter batch, the bound.

Each runs in the benchmark's process after its servers have stopped (so they
do not share the device), on the same base and adapters, batch ``batch``,
prompts of ``prompt`` tokens and ``new`` new tokens (greedy, no early stop):

* **HF generate**: the base alone, one static batch (the floor any server should beat);
* **peft, one adapter** and **peft, mixed**: `PeftModel.generate` with
  ``adapter_names`` naming one adapter per row, ``mixed`` distinct ones cycled;
* **bandwidth bound**: tokens/s if each decode step read every weight once at the
  GPU's memory bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s), times the batch.
"""

from __future__ import annotations

import os
import time

import torch

BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def bandwidth_bound(base: str, batch: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    size = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors"))
    name = torch.cuda.get_device_name()
    bw = next((v for k, v in BANDWIDTH.items() if k in name), BANDWIDTH["H100"])
    return bw / size * batch


def _timed_generate(model, p: dict, batch: int, device: str, **kw) -> float:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, p["vocab"], (batch, p["prompt"][1]), generator=gen).to(device)
    args = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **kw)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **args)  # warm-up: kernels, allocator
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=p["new"], min_new_tokens=p["new"], **args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return batch * p["new"] / (time.perf_counter() - start)


def references(base: str, adapters: str, p: dict, batch: int, device: str, mixed: int = 8) -> dict:
    """tok/s of HF generate, peft with one adapter and with ``mixed`` adapters in the batch, and the bandwidth bound."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
    out = {"hf_generate": _timed_generate(model, p, batch, device)}
    names = [f"ad{i:03d}" for i in range(mixed)]
    peft = PeftModel.from_pretrained(model, os.path.join(adapters, names[0]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(os.path.join(adapters, n), adapter_name=n)
    peft.eval()
    out["peft_single"] = _timed_generate(peft, p, batch, device, adapter_names=[names[0]] * batch)
    out[f"peft_mixed_{mixed}"] = _timed_generate(peft, p, batch, device, adapter_names=[names[i % mixed] for i in range(batch)])
    out["bandwidth_bound"] = bandwidth_bound(base, batch)
    del peft, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def report(refs: dict, single: float, mixed: float) -> None:
    """fmhub's median single- and mixed-adapter tok/s against the peers."""
    k = refs["mixed"]
    peft_mixed = refs[f"peft_mixed_{k}"]
    print(f"\npeers, same machine, batch of {refs['batch']} (tok/s): HF generate {refs['hf_generate']:.0f}, peft one adapter "
          f"{refs['peft_single']:.0f}, peft {k} adapters mixed {peft_mixed:.0f}")
    print(f"fmhub one adapter / HF generate: {single / refs['hf_generate']:.2f}x; fmhub {refs['clients']} adapters mixed / "
          f"peft {k} mixed: {mixed / peft_mixed:.2f}x")
    bound = refs.get("bandwidth_bound")
    if bound:
        print(f"fraction of the memory-bandwidth bound ({bound:.0f} tok/s): one adapter {single / bound:.1%}, mixed {mixed / bound:.1%} "
              "(target >= 20 %)")

"""Shared by the serving tests: tiny models, random LoRA adapters, reference generations, an HTTP client."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import torch

from fmhub.run.demo import build_tiny_llama

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def save_base(path: Path, seed: int = 0, **overrides) -> Path:
    model = build_tiny_llama(seed=seed)
    if overrides:
        from transformers import LlamaForCausalLM

        cfg = model.config
        for k, v in overrides.items():
            setattr(cfg, k, v)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return path


def random_adapter(path: Path, seed: int, r: int = 4, targets=TARGETS, scale: float = 0.4, base: Path | None = None, alpha: int = 16):
    """A LoRA adapter with random A and B (B large enough that each adapter changes the greedy tokens)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base) if base is not None else build_tiny_llama(seed=0)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    peft.save_pretrained(path)
    return path


def reference(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    """What peft's generate gives for this adapter alone (greedy, exactly n tokens)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def http(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status, ctype = resp.read(), resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raw, status, ctype = exc.read(), exc.code, exc.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in ctype else raw.decode()


def complete(url: str, model: str, prompt, n: int, **extra) -> tuple[int, dict]:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra}
    return http("POST", url + "/v1/completions", body)


def finish_order(requests: list, timeout: float = 60) -> list[str]:
    """Wait for ``requests`` ((name, engine request) pairs), each in its own thread; the names in finishing order."""
    order: list[str] = []
    lock = threading.Lock()

    def wait(name: str, r) -> None:
        r.result(timeout)
        with lock:
            order.append(name)

    threads = [threading.Thread(target=wait, args=nr) for nr in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return order

"""The naive way to serve many adapters, for `serve_bench.py`: one merged model per adapter, swapped in and out.

`NaiveEngine` has the interface of `fmhub.serving.engine.Engine` that the
HTTP layer uses, so both are measured behind the same server. It takes the
oldest waiting request's adapter, merges it into the base weights
(W + scaling·B·A, on the device), and generates for every waiting request of
that adapter together with transformers' ``generate`` (a static, left-padded
batch); the next adapter first restores the base weights. This is what
serving "a fine-tuned model per customer" amounts to when the fine-tunes are
kept as merged models.
"""

from __future__ import annotations

import threading
import time

import torch

from fmhub.models import lora
from fmhub.base.errors import ServeError
from fmhub.serving.engine import GenParams, Request
from fmhub.serving.metrics import Metrics


class NaiveEngine:
    def __init__(self, loaded, config, adapter_dirs: dict[str, str]) -> None:
        self.loaded, self.config, self.metrics = loaded, config, Metrics()
        self.model, self.device = loaded.model, loaded.device
        self.deltas = {}
        for name, path in adapter_dirs.items():  # the factors stay on the device; merging forms B·A per weight
            ad = lora.load_adapter(path)
            self.deltas[name] = {n: (up.a.load().to(self.device, loaded.dtype), up.b.load().to(self.device, loaded.dtype), up.scaling)
                                 for n, up in ad.updates.items()}
        params = dict(self.model.named_parameters())
        self.params = params
        self.originals = {}
        self.merged: str | None = None
        self.swaps = 0
        self.waiting: list[Request] = []
        self._cv = threading.Condition()
        self._stop = False
        self._ids = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def check_prompt(self, prompt, max_tokens) -> None:
        if not prompt or len(prompt) + max_tokens > self.loaded.max_len:
            raise ServeError(400, "prompt too long", param="prompt")

    def submit(self, prompt: list[int], params: GenParams, adapter: str | None = None) -> Request:
        if adapter not in self.deltas and adapter != self.config.base_name:
            raise ServeError(404, f"no adapter {adapter!r}", param="model")
        with self._cv:
            self._ids += 1
            req = Request(f"naive-{self._ids}", list(prompt), params, adapter, None)
            self.waiting.append(req)
            self._cv.notify_all()
        return req

    def adapters(self) -> list[dict]:
        return [{"name": n, "version": "", "source": "", "tier": "gpu" if n == self.merged else "cpu", "state": "cpu",
                 "uses": 0, "error": None} for n in self.deltas]

    def health(self) -> dict:
        return {"status": "ok", "swaps": self.swaps}

    def set_adapters(self, specs, replace=True):
        raise ServeError(400, "the naive baseline does not deploy")

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(30)

    @torch.inference_mode()
    def _merge(self, name: str) -> None:
        if name == self.merged:
            return
        for pname, original in self.originals.items():
            self.params[pname].copy_(original)
        self.originals = {}
        if name != self.config.base_name:
            for wname, (a, b, scaling) in self.deltas[name].items():
                p = self.params[wname]
                self.originals[wname] = p.detach().clone()
                p.add_((b @ a) * scaling)
        self.merged = name
        self.swaps += 1

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting:
                    self._cv.wait()
                if self._stop:
                    return
                name = self.waiting[0].adapter
                group = [r for r in self.waiting if r.adapter == name][: self.config.max_batch]
                for r in group:
                    self.waiting.remove(r)
            self._merge(name)
            self._generate(group)

    @torch.inference_mode()
    def _generate(self, group: list[Request]) -> None:
        longest = max(len(r.prompt) for r in group)
        ids = torch.zeros((len(group), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(group):
            ids[i, longest - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, longest - len(r.prompt):] = 1
        n = max(r.params.max_tokens for r in group)
        out = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=self.loaded.pad)
        now = time.monotonic()
        for i, r in enumerate(group):
            toks = out[i, longest:longest + r.params.max_tokens].tolist()
            r.tokens = toks
            for t in toks:
                r.events.put(("token", t))
            r.first_token = now
            r.events.put(("done", "length"))
